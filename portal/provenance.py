"""Provenance: what a service ran, recorded at launch in `provenance.json` of its job folder: the model's repo and
snapshot revision with each file's sha256, the engine and its version, the Apptainer image's digest, the exact server
arguments, the tier, resources and scheduler arguments. From it: a recipe that launches the identical service again
(revision pinned; `pilotfish apply` reads it) and a paragraph for a paper's methods section.

sha256s: a file of a Hugging Face cache snapshot that links to `blobs/<64 hex>` is an LFS file whose blob is named by
its content's sha256; any other file (and a SIF image) is hashed once: at launch when `PILOTFISH_HOME/sha256.json`
already knows it (same path, size and modification time), else at the first read of the service's provenance.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import threading
from pathlib import Path
from typing import List, Optional

from .engines.installer import ENGINE_INSTALLS
from .errors import NotFoundError
from .models import utcnow
from .scaling import TARGET_IN_FLIGHT_DEFAULT

FILE_NAME = "provenance.json"
CACHE_NAME = "sha256.json"
SHA256 = re.compile(r"^[0-9a-f]{64}$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npz")
RESOURCE_FIELDS = ("partition", "account", "cpus", "memory_gb", "gpus", "gpu_type", "gres", "constraint")
UNKNOWN = "unknown"


# --- sha256s ---------------------------------------------------------------------------------------------------

def blob_sha256(path: Path) -> Optional[str]:
    """The sha256 of an LFS file of a Hugging Face cache: the name of the blob its snapshot link points to (None when
    the file is no such link: a plain file, or a small file whose blob is named by its git hash)."""
    real = Path(os.path.realpath(path))
    return real.name if path.is_symlink() and real.parent.name == "blobs" and SHA256.fullmatch(real.name) else None


def compute_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_cache(cache_file: Optional[Path]) -> dict:
    try:
        data = json.loads(cache_file.read_text()) if cache_file else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data) -> None:
    """Written whole, then renamed over the old file (another worker reads either one or the other)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
    os.replace(partial, path)


def cached_sha256(path: Path, cache_file: Optional[Path], compute: bool = True) -> Optional[str]:
    """The sha256 of `path` (symlinks followed): remembered in `cache_file` by real path, size and modification time,
    else computed and remembered (None when not remembered and `compute` is false)."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    known = _read_cache(cache_file).get(real)
    if isinstance(known, list) and len(known) == 3 and known[:2] == [stat.st_size, stat.st_mtime_ns]:
        return known[2]
    if not compute:
        return None
    digest = compute_sha256(Path(real))
    if cache_file is not None:
        cache = _read_cache(cache_file)  # read again: another worker may have added to it meanwhile
        cache[real] = [stat.st_size, stat.st_mtime_ns, digest]
        _write_json(cache_file, cache)
    return digest


def file_entry(path: Path, name: str, cache_file: Optional[Path]) -> dict:
    """One file as provenance records it at launch: sha256 from its blob's name or the cache, else null (computed at
    the first read of the provenance, if the file is then as it was: `size` and `mtime_ns`)."""
    stat = path.stat()
    blob = blob_sha256(path)
    digest = blob or cached_sha256(path, cache_file, compute=False)
    return {"name": name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest,
            "sha256_from": "blob name" if blob else "computed" if digest else None}


def snapshot_files(snapshot: Path, cache_file: Optional[Path]) -> List[dict]:
    """Every file of a snapshot folder (links followed), its weight files marked."""
    files = []
    for path in sorted(snapshot.rglob("*")):
        if path.is_file():
            name = path.relative_to(snapshot).as_posix()
            files.append({**file_entry(path, name, cache_file), "weights": name.endswith(WEIGHT_SUFFIXES)})
    return files


def fill_sha256(entry: dict, path: Path, cache_file: Optional[Path]) -> bool:
    """Compute a recorded file's missing sha256 if the file is still as it was at launch; True when it changed."""
    if entry.get("sha256") or entry.get("sha256_from"):
        return False
    try:
        stat = path.stat()
    except OSError:
        entry["sha256_from"] = "gone since launch: not hashed"
        return True
    if [stat.st_size, stat.st_mtime_ns] != [entry.get("size"), entry.get("mtime_ns")]:
        entry["sha256_from"] = "changed since launch: not hashed"
        return True
    entry["sha256"], entry["sha256_from"] = cached_sha256(path, cache_file), "computed"
    return True


# --- the engine's version ---------------------------------------------------------------------------------------

def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _distributions(engine_name: str) -> List[str]:
    """The Python distributions an engine's virtualenv holds it as: the installer's package, then the engine's name."""
    names = []
    install = ENGINE_INSTALLS.get(engine_name)
    if install and install.packages:
        names.append(re.match(r"[A-Za-z0-9_.\-]+", install.packages[0]).group(0))
    names.append(engine_name)
    return [_normal(name) for name in names]


def engine_version(runtime) -> dict:
    """{version, package, version_from}: read from the engine's virtualenv when the runtime runs a program of one
    (its python or script, with no setup lines that could change what runs); else "unknown", never a guess."""
    if runtime.runtime != "native":
        return {"version": UNKNOWN, "version_from": "inside the container image (named by its digest)"}
    if runtime.setup.strip() or "PYTHONPATH" in runtime.env:
        return {"version": UNKNOWN, "version_from": "the site's setup lines or PYTHONPATH choose what runs"}
    try:
        program = Path(shlex.split(runtime.command)[0])
    except (ValueError, IndexError):
        return {"version": UNKNOWN, "version_from": "the runtime's command cannot be read"}
    venv = program.parent.parent
    if not program.is_absolute() or not (venv / "pyvenv.cfg").is_file():
        return {"version": UNKNOWN, "version_from": f"{program} is not a program of a Python virtualenv"}
    found = {}
    for info in venv.glob("lib/python*/site-packages/*.dist-info"):
        package, _, version = info.name[:-len(".dist-info")].partition("-")
        found.setdefault(_normal(package), (package, version, info))
    for wanted in _distributions(runtime.engine.name):
        if wanted in found:
            package, version, info = found[wanted]
            return {"version": version, "package": package, "version_from": str(info)}
    return {"version": UNKNOWN, "version_from": f"no {' or '.join(_distributions(runtime.engine.name))} in {venv}"}


# --- record and read -----------------------------------------------------------------------------------------

def record(service, plan, scheduler_arguments: List[str], cache_file: Optional[Path]) -> dict:
    """Write the service's provenance into its job folder at launch (`plan`: launching.LaunchPlan)."""
    request, model, runtime = plan.request, plan.model, plan.runtime
    image = None
    if plan.image is not None:
        image = {"reference": runtime.image, "file": plan.image.file, "path": str(plan.image.path),
                 **{key: value for key, value in file_entry(plan.image.path, plan.image.file, cache_file).items()
                    if key != "name"}}
    data = {
        "service": service.id, "name": service.name, "kind": service.kind, "recorded_at": utcnow().isoformat() + "Z",
        "model": {"repo_id": model.repo_id, "revision": model.revision, "refs": list(model.refs),
                  "location": model.location, "path": str(model.path), "format": model.meta.get("format"),
                  "files": snapshot_files(model.path, cache_file)},
        "engine": {"name": runtime.engine.name, "title": runtime.engine.title, "runtime": runtime.runtime,
                   "command": runtime.command, **engine_version(runtime)},
        "image": image,
        "server_arguments": list(plan.arguments),
        "engine_args": list(request.engine_args),
        "adapters": [{"repo_id": adapter.name, "revision": adapter.revision, "path": str(adapter.path),
                      "files": snapshot_files(adapter.path, cache_file)} for adapter in plan.adapters],
        "tier": plan.tier.ref if plan.tier else None, "tier_reason": plan.tier_reason,
        "resources": {key: value for key, value in vars(plan.resources).items() if value not in (None, {})},
        "scheduler": service.scheduler, "scheduler_arguments": list(scheduler_arguments),
        "idle_timeout": plan.idle_timeout,
        "launch": {"force": request.force, "renew": request.renew, "lease": request.lease,
                   "replicas": list(request.replicas) if request.replicas else None},
    }
    _write_json(Path(service.job_dir) / FILE_NAME, data)
    return data


def read(service, cache_file: Optional[Path]) -> dict:
    """The service's provenance with every sha256 filled in (computed once, then stored), its recipe and its methods
    paragraph; NotFoundError when none was recorded (launched before the portal recorded provenance)."""
    path = Path(service.job_dir) / FILE_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise NotFoundError(f"service {service.id} has no recorded provenance (launched before this portal recorded "
                            f"it, or its job folder is gone)")
    snapshot = Path(data["model"]["path"])
    changed = [fill_sha256(entry, snapshot / entry["name"], cache_file) for entry in data["model"]["files"]]
    changed += [fill_sha256(entry, Path(adapter["path"]) / entry["name"], cache_file)
                for adapter in data.get("adapters") or [] for entry in adapter["files"]]
    if data.get("image"):
        changed.append(fill_sha256(data["image"], Path(data["image"]["path"]), cache_file))
    if any(changed):
        _write_json(path, data)
    return {**data, "recipe": recipe(data), "methods": methods(data)}


# --- what it is for: the recipe and the methods paragraph -----------------------------------------------------------

def _replicas(values: list):
    low, high, target = values
    if target == TARGET_IN_FLIGHT_DEFAULT:
        return f"{low}:{high}"
    return {"min": low, "max": high, "target_in_flight": target}


def recipe(data: dict, name: Optional[str] = None) -> dict:
    """A recipe (portal/recipes.py) that launches the identical service: revision pinned, the tier and every resource
    as resolved at launch, the same engine arguments, image, idle timeout, renewal (a duration: an end time that has
    passed cannot be pinned) and replicas. `name`: the service's (default: the original's own name)."""
    name = name or data["name"]
    entry = {"kind": data["kind"], "model": data["model"]["repo_id"], "revision": data["model"]["revision"],
             "name": name}
    if data.get("tier"):
        entry["tier"] = data["tier"]
    resources = data.get("resources") or {}
    entry["time"] = resources.get("time")
    pinned = {key: resources[key] for key in RESOURCE_FIELDS if resources.get(key) is not None}
    if pinned:
        entry["resources"] = pinned
    if data.get("engine_args"):
        entry["engine_args"] = list(data["engine_args"])
    if data.get("adapters"):
        entry["adapters"] = [f"{adapter['repo_id']}@{adapter['revision']}" for adapter in data["adapters"]]
    if data.get("image"):
        entry["image"] = data["image"]["file"]
    entry["idle_timeout"] = data.get("idle_timeout") or 0
    launch = data.get("launch") or {}
    if launch.get("force"):
        entry["force"] = True
    renew = launch.get("renew")
    if renew is True or (isinstance(renew, str) and re.fullmatch(r"([0-9]+[dhm])+", renew)):
        entry["renew"] = renew
    if launch.get("replicas"):
        entry["replicas"] = _replicas(launch["replicas"])
    return {"name": re.sub(r"[^A-Za-z0-9_.\-]+", "-", name).strip("-")[:80] or "service", "services": [entry]}


def _amount(value, one: str, many: str) -> str:
    return f"{value:g} {one if value == 1 else many}"


def methods(data: dict) -> str:
    """A short paragraph for a methods section: model and revision, weight hashes, engine and version, image,
    engine options, resources and scheduler."""
    model, engine, resources = data["model"], data["engine"], data.get("resources") or {}
    weights = [entry for entry in model["files"] if entry.get("weights")] or model["files"]
    hashes = "; ".join(f"{entry['name']}, SHA-256 {entry['sha256'] or 'not recorded'}" for entry in weights)
    version = engine.get("version") or UNKNOWN
    served = f"{engine['title']} {version}" if version != UNKNOWN else f"{engine['title']} (version not recorded)"
    if engine.get("package") and _normal(engine["package"]) != _normal(engine["name"]):
        served += f" (the {engine['package']} package)"
    image = data.get("image")
    where = (f" in the Apptainer image {image.get('reference') or image['file']} (SIF file SHA-256 "
             f"{image.get('sha256') or 'not recorded'})" if image else "")
    options = " ".join(shlex.quote(arg) for arg in data.get("engine_args") or [])
    options = f" with the options {options} (all others at the engine's defaults)" if options else \
        " with the engine's default options"
    parts = [_amount(resources["cpus"], "CPU core", "CPU cores")] if resources.get("cpus") else []
    if resources.get("memory_gb"):
        parts.append(f"{resources['memory_gb']:g} GB of memory")
    if resources.get("gpus"):
        parts.append(_amount(resources["gpus"], "GPU", "GPUs") + (f" ({resources['gpu_type']})"
                                                                  if resources.get("gpu_type") else ""))
    place = ", ".join(filter(None, [f"partition {resources['partition']}" if resources.get("partition") else "",
                                    f"tier {data['tier']}" if data.get("tier") else ""]))
    job = "a Slurm job launched by Pilotfish" if data.get("scheduler") == "slurm" else \
        f"a process of one host, launched by Pilotfish's {data.get('scheduler')} scheduler"
    amounts = " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 1 else parts)
    adapters = "".join(f", with its LoRA adapter {adapter['repo_id']} (revision {adapter['revision']}; "
                       + "; ".join(f"{entry['name']}, SHA-256 {entry['sha256'] or 'not recorded'}"
                                   for entry in adapter["files"] if entry.get("weights")) + ")"
                       for adapter in data.get("adapters") or [])
    return (f"The model {model['repo_id']} (Hugging Face revision {model['revision']}; {hashes}){adapters} was "
            f"served by {served}{where} through its OpenAI-compatible HTTP API,{options}. The server ran as {job}"
            + (f" with {amounts}" if amounts else "") + (f" ({place})" if place else "") + ".")
