"""Models: the Hugging Face cache folders in cache_dir and home_dir, their local metadata, lookup and deletion."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import NotFoundError, ValidationError
from .adapters import describe_adapter, recognise_adapter
from .gguf import choose_gguf, gguf_variants
from .model_kinds import modalities, recognise

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
REVISION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/]{0,199}$")
MAX_JSON_BYTES = 100 * 1024 * 1024  # safetensors' own limit for a header
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
          "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
          "F8_E5M2": "float8_e5m2"}
WHISPER_CT2_FIELDS = {"alignment_heads", "lang_ids", "suppress_ids_begin"}


def validate_repo_id(repo_id) -> str:
    """A Hugging Face repo id, `org/name` of letters, digits, '.', '_' and '-'; ValidationError("model") if not."""
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id \
            or repo_id.endswith("."):
        raise ValidationError("model", f"expected a Hugging Face repo id such as org/name, got {repo_id!r}")
    return repo_id


def validate_revision(revision) -> str:
    """A branch, tag or commit name usable as a path below refs/; ValidationError("revision") if not."""
    if not isinstance(revision, str) or not REVISION.fullmatch(revision) or ".." in revision or "//" in revision \
            or revision.endswith("/"):
        raise ValidationError("revision", f"expected a branch, tag or commit, got {revision!r}")
    return revision


def repo_folder(repo_id: str) -> str:
    """The cache folder name of a repo: models--org--name."""
    return "models--" + repo_id.replace("/", "--")


def model_roots(cache_dir: Optional[Path], home_dir: Optional[Path]) -> List[Tuple[str, Path]]:
    """The model folders in lookup order: ("cache", cache_dir/models) then ("home", home_dir/models)."""
    return [(name, Path(base) / "models") for name, base in (("cache", cache_dir), ("home", home_dir)) if base]


def human_bytes(count: int) -> str:
    """Decimal units, as the Hub shows sizes: 2100000 -> '2.1 MB'."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count} bytes" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000


# --- local metadata ------------------------------------------------------------------------------------

def _open_regular(path: Path):
    """Open a regular file for reading; a FIFO or device (a hostile link) raises ValueError instead of blocking."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path.name}: not a regular file")
    return os.fdopen(fd, "rb")


def _read_json(path: Path, limit: int = 10 * 1024 * 1024):
    """A small JSON file's content, or None when it is absent, not a regular file, too big or not JSON."""
    try:
        with _open_regular(path) as handle:
            data = handle.read(limit + 1)
        return json.loads(data) if len(data) <= limit else None
    except (OSError, ValueError, RecursionError):
        return None


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file (8-byte little-endian length, then JSON); tensors are not read."""
    with _open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name}: too short for a safetensors file")
        length = int.from_bytes(head, "little")
        if length < 2 or length > min(MAX_JSON_BYTES, size - 8):
            raise ValueError(f"{path.name}: header length {length} does not fit a {size}-byte file")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: the header is not a JSON object")
    return header


def safetensors_summary(files: List[Path]) -> Tuple[int, Optional[str], int]:
    """(parameter count, dominant dtype in torch's naming, tensor bytes) over the headers of `files`."""
    params, nbytes, per_dtype = 0, 0, {}
    for path in files:
        for name, info in read_safetensors_header(path).items():
            if name == "__metadata__":
                continue
            shape, dtype, offsets = (info.get(key) if isinstance(info, dict) else None
                                     for key in ("shape", "dtype", "data_offsets"))
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) \
                    or not isinstance(dtype, str) or not isinstance(offsets, list) or len(offsets) != 2 \
                    or not all(isinstance(o, int) for o in offsets):
                raise ValueError(f"{path.name}: tensor {name!r} has a malformed entry")
            count = 1
            for dim in shape:
                count *= dim
            params += count
            nbytes += int(offsets[1]) - int(offsets[0])
            per_dtype[dtype] = per_dtype.get(dtype, 0) + count
    dominant = max(per_dtype, key=per_dtype.get) if per_dtype else None
    return params, DTYPES.get(dominant, dominant.lower() if dominant else None), nbytes


def _weight_files(snapshot: Path) -> List[Path]:
    """The safetensors files holding the model: the index's shards, else model.safetensors, else all top-level."""
    index = _read_json(snapshot / "model.safetensors.index.json")
    if isinstance(index, dict) and isinstance(index.get("weight_map"), dict):
        names = sorted({str(name) for name in index["weight_map"].values()})
        if any(Path(name).is_absolute() or ".." in Path(name).parts for name in names):
            raise ValueError("model.safetensors.index.json names a file outside the snapshot")
        return [snapshot / name for name in names]
    if (snapshot / "model.safetensors").exists():
        return [snapshot / "model.safetensors"]
    return sorted(snapshot.glob("*.safetensors"))


def describe_snapshot(snapshot: Path) -> dict:
    """What a snapshot holds, from local files only: format, kind (and the kinds it can be launched as, and why:
    catalog/model_kinds.py), what it takes as input (modalities: text, image, audio), parameters, dtype,
    weights_bytes, architectures, adapter (a PEFT adapter's base, rank: catalog/adapters.py). Problems go in "error",
    never raised.
    """
    out = {"format": None, "kind": None, "kinds": [], "kind_reason": None, "modalities": [], "parameters": None,
           "dtype": None, "weights_bytes": None, "architectures": [], "model_type": None, "error": None}
    config = _read_json(snapshot / "config.json")
    config = config if isinstance(config, dict) else {}
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    out["architectures"] = archs
    dtype = config.get("torch_dtype") or config.get("dtype")
    out["dtype"] = dtype if isinstance(dtype, str) else None
    out["model_type"] = config["model_type"] if isinstance(config.get("model_type"), str) else None
    try:
        weights = _weight_files(snapshot)
        ggufs = sorted(p for p in snapshot.rglob("*.gguf") if p.is_file())
        if weights:
            params, dtype, nbytes = safetensors_summary(weights)
            out.update(format="safetensors", parameters=params, dtype=dtype or out["dtype"], weights_bytes=nbytes)
        elif (snapshot / "model.bin").is_file() and WHISPER_CT2_FIELDS & set(config):
            out.update(format="ctranslate2", weights_bytes=(snapshot / "model.bin").stat().st_size)
        elif ggufs:
            variants = gguf_variants(ggufs)
            chosen = choose_gguf(variants)
            out.update(format="gguf", weights_bytes=sum(p.stat().st_size for p in variants[chosen]),
                       model_file=str(variants[chosen][0].relative_to(snapshot)),
                       gguf_variants=sorted(variants))
        elif list(snapshot.glob("pytorch_model*.bin")):
            out.update(format="pytorch", weights_bytes=sum(p.stat().st_size for p in snapshot.glob("pytorch_model*.bin")))
    except (OSError, ValueError, RecursionError) as exc:
        out["error"] = f"cannot read the weights: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
    out["adapter"] = describe_adapter(snapshot)  # a LoRA adapter (catalog/adapters.py): launched with its base
    out["kind"], out["kinds"], out["kind_reason"] = recognise_adapter(out["adapter"]) if out["adapter"] else \
        recognise(config, snapshot, out["format"])
    out["modalities"] = modalities(config, out["kind"])
    return out


# --- the inventory -------------------------------------------------------------------------------------

@dataclass
class ModelRevision:
    """One snapshot of a repo in cache_dir or home_dir; `meta` is describe_snapshot's result."""
    repo_id: str
    revision: str  # the snapshot folder name: a commit hash
    refs: List[str]
    location: str  # "cache" or "home"
    path: Path
    size_bytes: int = 0  # on disk, each blob counted once
    complete: bool = True  # False: files missing (an interrupted download)
    meta: dict = field(default_factory=dict)

    @property
    def kind(self) -> Optional[str]:
        """The service kind this snapshot fits, or None."""
        return self.meta.get("kind")

    @property
    def kinds(self) -> List[str]:
        """The kinds it can be launched as, its kind first (none known: any)."""
        return list(self.meta.get("kinds") or ([self.kind] if self.kind else []))

    @property
    def size_gb(self) -> float:
        """The model's size for tier selection: tensor bytes when known, else bytes on disk, in GB (10^9)."""
        return (self.meta.get("weights_bytes") or self.size_bytes) / 1e9

    def to_dict(self) -> dict:
        """Plain data for the API."""
        return {"revision": self.revision, "refs": self.refs, "location": self.location, "path": str(self.path),
                "size_bytes": self.size_bytes, "size_gb": round(self.size_gb, 3), "complete": self.complete,
                **self.meta}


@dataclass
class ModelEntry:
    """A repo id with every local snapshot of it."""
    repo_id: str
    revisions: List[ModelRevision]  # in lookup order: the one used without a revision first
    size_bytes: int = 0

    @property
    def kind(self) -> Optional[str]:
        """The kind of the revision used when none is asked for."""
        return self.revisions[0].kind if self.revisions else None

    def to_dict(self) -> dict:
        """Plain data for the API, revisions in lookup order."""
        return {"repo_id": self.repo_id, "kind": self.kind,
                "kinds": self.revisions[0].kinds if self.revisions else [],
                "modalities": self.revisions[0].meta.get("modalities") or [] if self.revisions else [],
                "size_bytes": self.size_bytes,
                "revisions": [revision.to_dict() for revision in self.revisions]}


def _snapshot_files(snapshot: Path) -> Tuple[Dict[tuple, int], bool]:
    """Regular files reached from a snapshot (symlinks followed), keyed by (device, inode); and whether none dangle."""
    found, intact = {}, True
    for folder, _dirs, names in os.walk(snapshot):
        for name in names:
            try:
                info = os.stat(os.path.join(folder, name))
            except OSError:
                intact = False
                continue
            if stat.S_ISREG(info.st_mode):
                found[(info.st_dev, info.st_ino)] = info.st_size
    return found, intact


def _refs(repo_dir: Path) -> Dict[str, List[str]]:
    """commit -> the ref names (main, a tag, pr/1) pointing at it."""
    out: Dict[str, List[str]] = {}
    base = repo_dir / "refs"
    for path in sorted(base.rglob("*")) if base.is_dir() else []:
        if path.is_file():
            try:
                out.setdefault(path.read_text().strip()[:100], []).append(path.relative_to(base).as_posix())
            except (OSError, UnicodeDecodeError):
                continue
    return out


def _revisions(location: str, repo_dir: Path, repo_id: str, metadata: bool = True) -> Tuple[List[ModelRevision], int]:
    """The snapshots of one repo folder in preference order (main first, then newest), and the repo's disk size."""
    refs, revisions, seen = _refs(repo_dir), [], {}
    snapshots = repo_dir / "snapshots"
    for path in sorted(snapshots.iterdir()) if snapshots.is_dir() else []:
        if not path.is_dir() or path.is_symlink():
            continue
        files, intact = _snapshot_files(path)
        seen.update(files)
        tree = _read_json(repo_dir / "trees" / f"{path.name}.json")
        if isinstance(tree, dict) and isinstance(tree.get("files"), dict):
            intact = intact and all((path / name).exists() for name in tree["files"])
        revisions.append(ModelRevision(repo_id, path.name, refs.get(path.name, []), location, path,
                                       sum(files.values()), intact, describe_snapshot(path) if metadata else {}))
    revisions.sort(key=lambda r: ("main" not in r.refs, -r.path.stat().st_mtime, r.revision))
    return revisions, sum(seen.values())


def scan_models(cache_dir: Optional[Path], home_dir: Optional[Path], metadata: bool = True) -> List[ModelEntry]:
    """Every model in cache_dir/models and home_dir/models (Hugging Face cache layout), sorted by repo id.

    Works without network. A repo in both places has the cache's revisions first (the lookup order).
    `metadata=False` skips reading config.json and safetensors headers (revisions then have empty `meta`).
    """
    entries: Dict[str, ModelEntry] = {}
    for location, root in model_roots(cache_dir, home_dir):
        for repo_dir in sorted(root.glob("models--*--*")) if root.is_dir() else []:
            repo_id = repo_dir.name[len("models--"):].replace("--", "/", 1)
            if not REPO_ID.fullmatch(repo_id) or not repo_dir.is_dir():
                continue
            try:
                revisions, size = _revisions(location, repo_dir, repo_id, metadata)
            except OSError:
                continue  # unreadable folder: not usable either
            if not revisions:
                continue  # refs or blobs only: nothing to run
            entry = entries.setdefault(repo_id, ModelEntry(repo_id, []))
            entry.revisions.extend(revisions)
            entry.size_bytes += size
    return [entries[key] for key in sorted(entries)]


def _local_revisions(roots: List[Tuple[str, Path]], repo_id: str) -> List[ModelRevision]:
    """The snapshots of `repo_id` under `roots`, in lookup order, without metadata; unreadable folders give none."""
    found: List[ModelRevision] = []
    for location, root in roots:
        repo_dir = root / repo_folder(repo_id)
        try:
            found += _revisions(location, repo_dir, repo_id, metadata=False)[0] if repo_dir.is_dir() else []
        except OSError:
            continue
    return found


def _matches(revision: ModelRevision, wanted: str) -> bool:
    return wanted == revision.revision or wanted in revision.refs or (
        len(wanted) >= 7 and re.fullmatch(r"[0-9a-f]+", wanted) is not None and revision.revision.startswith(wanted))


def find_revision(repo_id: str, revision: Optional[str] = None, *, cache_dir: Optional[Path],
                  home_dir: Optional[Path]) -> ModelRevision:
    """The snapshot to run: cache_dir first, then home_dir; `revision` is a commit (or its first 7+ digits) or a ref.

    Without a revision: the local `main`, else the newest snapshot (never a download of something else).
    Raises ValidationError("model"/"revision", "... available: ...").
    """
    validate_repo_id(repo_id)
    if revision is not None:
        validate_revision(revision)
    candidates = _local_revisions(model_roots(cache_dir, home_dir), repo_id)
    if not candidates:
        known = [entry.repo_id for entry in scan_models(cache_dir, home_dir, metadata=False)]
        places = " or ".join(str(root) for _, root in model_roots(cache_dir, home_dir)) or "no model folder"
        raise ValidationError("model", f"{repo_id} is not downloaded (looked in {places}); available: "
                                       f"{', '.join(known[:30]) or 'none'}")
    wanted = [c for c in candidates if revision is None or _matches(c, revision)]
    usable = [c for c in wanted if c.complete]
    if usable:
        chosen = usable[0]
        chosen.meta = describe_snapshot(chosen.path)
        return chosen
    listing = ", ".join(f"{c.revision[:12]}{' (' + ', '.join(c.refs) + ')' if c.refs else ''} in {c.location}"
                        f"{'' if c.complete else ', incomplete'}" for c in candidates)
    if wanted:
        what = f"{repo_id} {revision}" if revision else repo_id
        raise ValidationError("revision" if revision else "model", f"{what} is incomplete (an interrupted download?): "
                                                                   f"download it again; available: {listing}")
    raise ValidationError("revision", f"{revision} is not downloaded for {repo_id}; available: {listing}")


def find_model(repo_id: str, revision: Optional[str] = None, *, cache_dir: Optional[Path],
               home_dir: Optional[Path]) -> Path:
    """The snapshot folder to give the server (see find_revision for the rules and errors)."""
    return find_revision(repo_id, revision, cache_dir=cache_dir, home_dir=home_dir).path


def _inside(path: Path, base: Path) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(base).rstrip(os.sep) + os.sep)


def delete_model(repo_id: str, revision: Optional[str] = None, *, cache_dir: Optional[Path],
                 home_dir: Path) -> dict:
    """Delete a model (or one revision of it) from home_dir; the shared cache_dir is never touched.

    Returns {"repo_id", "revisions": [deleted commits], "freed_bytes"}. Raises ValidationError for bad ids and for
    anything that is only in cache_dir, NotFoundError when there is nothing to delete.
    """
    validate_repo_id(repo_id)
    if revision is not None:
        validate_revision(revision)
    root = Path(home_dir) / "models"
    repo_dir = root / repo_folder(repo_id)
    in_cache = _local_revisions(model_roots(cache_dir, None), repo_id)
    read_only = f"is in the shared cache_dir ({cache_dir}), which the site admins manage: it cannot be deleted here"
    if not os.path.lexists(repo_dir):
        if in_cache and (revision is None or any(_matches(r, revision) for r in in_cache)):
            raise ValidationError("model", f"{repo_id} {read_only}")
        raise NotFoundError(f"model {repo_id}{' ' + revision if revision else ''} is not in your models ({root})")
    if repo_dir.is_symlink() or not repo_dir.is_dir() or (cache_dir is not None and _inside(repo_dir, cache_dir)):
        raise ValidationError("model", f"{repo_dir} is not a model folder of your own (a link or inside cache_dir): "
                                       "remove it by hand if you mean to")
    revisions, size = _revisions("home", repo_dir, repo_id, metadata=False)
    doomed = revisions if revision is None else [r for r in revisions if _matches(r, revision)]
    if not doomed:
        if any(_matches(r, revision) for r in in_cache):
            raise ValidationError("revision", f"{revision} of {repo_id} {read_only}")
        available = ", ".join(r.revision[:12] + (f" ({', '.join(r.refs)})" if r.refs else "") for r in revisions)
        raise NotFoundError(f"revision {revision} of {repo_id} is not in your models; available: {available or 'none'}")
    if len(doomed) == len(revisions):
        shutil.rmtree(repo_dir)  # never follows the symlinks inside
        return {"repo_id": repo_id, "revisions": [r.revision for r in doomed], "freed_bytes": size}
    blobs = repo_dir / "blobs"
    for item in doomed:
        shutil.rmtree(item.path)
        (repo_dir / "trees" / f"{item.revision}.json").unlink(missing_ok=True)
        for ref in item.refs:
            (repo_dir / "refs" / ref).unlink(missing_ok=True)
    kept = {os.path.basename(os.readlink(os.path.join(folder, name)))
            for folder, _dirs, names in os.walk(repo_dir / "snapshots") for name in names
            if os.path.islink(os.path.join(folder, name))}
    for blob in blobs.iterdir() if blobs.is_dir() else []:
        if blob.name not in kept and blob.is_file() and not blob.is_symlink():
            blob.unlink()
    left = _revisions("home", repo_dir, repo_id, metadata=False)[1]
    return {"repo_id": repo_id, "revisions": [r.revision for r in doomed], "freed_bytes": size - left}
