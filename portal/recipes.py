"""Recipes: a declared set of services (Pilotfish's own format, or the student orchestrator's JSON) as launch requests.

Pure: no portal, no network. `load_recipe(path)` or `parse_recipe(data, default_name)` return a Recipe whose
`launches` are the request bodies for `POST /api/services`, each with a deterministic `name`, so that
`pilotfish apply --delete` recognises the services a recipe created.

Pilotfish format (YAML or JSON), a list of services or a mapping with `name` and `services`:

    name: demo
    services:
      - {kind: text-generation, model: org/name, tier: Small, time: 60, count: 2, engine_args: [--max-model-len, "4096"],
         idle_timeout: 30m, replicas: "1:3"}
      - {kind: speech-recognition, model: org/whisper, resources: {partition: gpu, memory_gb: 16}, renew: 8h}

`renew` as in a launch: true (a successor job takes over before each job's time limit, until stopped), false, how
long the service lives in all (8h, 2d) or when it ends (2026-12-01T18:00); a duration counts from the launch.
`adapters` (text-generation) as in a launch: repo ids of local LoRA adapters of the model (`org/name@<revision>` pins
one), each served beside it.
`image` (Apptainer) as in a launch: the SIF file or image tag to run instead of the pinned image.
`replicas` as in a launch: 2, 1:3 or {min, max, target_in_flight}: one service served by several jobs, where `count`
makes separate services. YAML text such as 1:3 or 1:00:00 stays text here (YAML 1.1 would read a number in base 60).

Instance names: the entry's `name` (with `-<k>` when count > 1), else `<recipe name>-<index>` over all instances.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import List

import yaml

from .catalog.kinds import KINDS
from .errors import ValidationError
from .launching import ADAPTER_SHAPE, parse_resources, parse_time
from .lifetimes import parse_idle_timeout, parse_renewal
from .scaling import parse_replicas

SERVICE_FIELDS = {"kind", "model", "revision", "tier", "resources", "time", "count", "name", "engine_args", "force",
                  "idle_timeout", "renew", "replicas", "image", "adapters"}
NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,80}$")
MAX_COUNT = 20
IMAGE = re.compile(r"^[A-Za-z0-9_.\-/:@]{1,200}$")  # as a launch takes it
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
ADAPTER = re.compile(ADAPTER_SHAPE)  # org/name, or org/name@<revision>
# The orchestrator's `service.type` values, and what they mean here.
STUDENT_TYPES = {"ollama": "text-generation", "inference": "text-generation", "llm": "text-generation",
                 "text-generation": "text-generation", "whisper": "speech-recognition",
                 "speech-recognition": "speech-recognition", "embedding": "text-embedding",
                 "embeddings": "text-embedding", "text-embedding": "text-embedding"}


class RecipeError(Exception):
    """A recipe that cannot be used; the message starts with the field it is about (services[1].model: required)."""

    def __init__(self, field_path: str, problem: str):
        super().__init__(f"{field_path}: {problem}")
        self.field = field_path


@dataclass
class Recipe:
    name: str
    launches: List[dict]  # bodies for POST /api/services, each with a unique `name`
    warnings: List[str] = field(default_factory=list)  # what the recipe says that has no meaning here

    @property
    def names(self) -> List[str]:
        return [body["name"] for body in self.launches]


class _RecipeLoader(yaml.SafeLoader):
    """YAML as a recipe means it: 1:3 (replicas) and 1:00:00 (a time) are text, not YAML 1.1's numbers in base 60."""


def _number_or_text(constructor):
    def construct(loader, node):
        return node.value if ":" in str(node.value) else constructor(loader, node)
    return construct


_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _number_or_text(yaml.SafeLoader.construct_yaml_int))
_RecipeLoader.add_constructor("tag:yaml.org,2002:float", _number_or_text(yaml.SafeLoader.construct_yaml_float))


def load_recipe(path) -> Recipe:
    """Read and validate a recipe file (YAML or JSON)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(str(path), f"cannot read: {exc.strerror}")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_RecipeLoader)
    except (ValueError, yaml.YAMLError) as exc:
        raise RecipeError(str(path), f"not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                                     f"{str(exc).splitlines()[0]}")
    return parse_recipe(data, default_name=path.stem)


def _clean_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", text).strip("-")[:60] or "recipe"


def parse_recipe(data, default_name: str = "recipe") -> Recipe:
    if isinstance(data, dict) and "job" in data:
        return _parse_student(data, default_name)
    if isinstance(data, list):
        name, entries, where = _clean_name(default_name), data, "services"
    elif isinstance(data, dict):
        unknown = set(data) - {"name", "services"}
        if unknown:
            raise RecipeError(sorted(unknown)[0], "unknown field (expected name and services, or job)")
        name = data.get("name", _clean_name(default_name))
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise RecipeError("name", f"expected up to 80 letters, digits, '.', '_' or '-', got {name!r}")
        if "services" not in data:
            raise RecipeError("services", "required (a list of services)")
        entries, where = data["services"], "services"
    else:
        raise RecipeError("recipe", "expected a list of services, a mapping with `services`, or a `job`")
    if not isinstance(entries, list) or not entries:
        raise RecipeError(where, "expected a non-empty list of services")
    launches: List[dict] = []
    for index, entry in enumerate(entries):
        launches.extend(_parse_entry(entry, f"{where}[{index}]", name, len(launches)))
    _check_unique(launches)
    return Recipe(name=name, launches=launches)


def _parse_entry(entry, where: str, recipe_name: str, first_index: int) -> List[dict]:
    if not isinstance(entry, dict):
        raise RecipeError(where, "expected a mapping with kind and model")
    unknown = set(entry) - SERVICE_FIELDS
    if unknown:
        raise RecipeError(f"{where}.{sorted(unknown)[0]}", f"unknown field (expected some of: {', '.join(sorted(SERVICE_FIELDS))})")
    body = {}
    kind = entry.get("kind")
    if kind is None:
        raise RecipeError(f"{where}.kind", f"required (one of: {', '.join(KINDS)})")
    if kind not in KINDS:
        raise RecipeError(f"{where}.kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    body["kind"] = kind
    model = entry.get("model")
    if model is None:
        raise RecipeError(f"{where}.model", "required (a Hugging Face repo id such as org/name)")
    if not isinstance(model, str) or not REPO_ID.fullmatch(model):
        raise RecipeError(f"{where}.model", f"expected a repo id such as org/name, got {model!r}")
    body["model"] = model
    for key in ("revision", "tier"):
        value = entry.get(key)
        if value is not None:
            if not isinstance(value, str) or not value.strip():
                raise RecipeError(f"{where}.{key}", f"expected text, got {value!r}")
            body[key] = value
    if entry.get("time") is not None:
        body["time"] = _checked(f"{where}.time", parse_time, entry["time"])
    if entry.get("idle_timeout") is not None:  # minutes, or "30m", "1h"; 0 or off: never
        body["idle_timeout"] = _checked(f"{where}.idle_timeout", parse_idle_timeout, entry["idle_timeout"])
    if entry.get("renew") is not None:  # checked here, sent as written: a duration counts from the launch
        renew = entry["renew"]
        if isinstance(renew, datetime):  # YAML reads an unquoted time with seconds as one
            renew = renew.isoformat()
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        _checked(f"{where}.renew", lambda value: parse_renewal(value, now), renew)
        body["renew"] = renew
    if entry.get("replicas") is not None:  # checked here, sent as written
        _checked(f"{where}.replicas", parse_replicas, entry["replicas"])
        body["replicas"] = entry["replicas"]
    if entry.get("image") is not None:  # apptainer: the SIF file (or image tag) to run instead of the pinned one
        if not isinstance(entry["image"], str) or not IMAGE.fullmatch(entry["image"]):
            raise RecipeError(f"{where}.image", f"expected an image file name or tag, got {entry['image']!r}")
        body["image"] = entry["image"]
    if entry.get("resources") is not None:
        body["resources"] = _checked(f"{where}.resources", parse_resources, entry["resources"])
    if entry.get("force") is not None:
        if not isinstance(entry["force"], bool):
            raise RecipeError(f"{where}.force", f"expected true or false, got {entry['force']!r}")
        body["force"] = entry["force"]
    args = entry.get("engine_args")
    if args is not None:
        if not isinstance(args, list) or not all(isinstance(arg, (str, int, float)) and not isinstance(arg, bool)
                                                 for arg in args):
            raise RecipeError(f"{where}.engine_args", "expected a list of strings such as [--max-model-len, '4096']")
        body["engine_args"] = [str(arg) for arg in args]
    adapters = entry.get("adapters")
    if adapters is not None:
        if not isinstance(adapters, list) or not all(isinstance(a, str) and ADAPTER.fullmatch(a) for a in adapters):
            raise RecipeError(f"{where}.adapters", "expected a list of adapters' repo ids such as [org/name-lora] "
                                                   "(org/name-lora@<revision> pins one)")
        if adapters and kind != "text-generation":
            raise RecipeError(f"{where}.adapters", f"adapters apply to text-generation services, not {kind}")
        body["adapters"] = adapters
    count = entry.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
        raise RecipeError(f"{where}.count", f"expected an integer from 1 to {MAX_COUNT}, got {count!r}")
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or not NAME.fullmatch(name)):
        raise RecipeError(f"{where}.name", f"expected up to 80 letters, digits, '.', '_' or '-', got {name!r}")
    out = []
    for k in range(count):
        if name:
            instance = name if count == 1 else f"{name}-{k}"
        else:
            instance = f"{recipe_name}-{first_index + k}"
        out.append({**body, "name": instance})
    return out


def _checked(where: str, parse, value):
    """Run one of the launch request's own field checks, naming the recipe's field in the error."""
    try:
        return parse(value)
    except ValidationError as exc:
        sub = exc.extra.get("field", "")
        problem = exc.message.split(": ", 1)[1] if ": " in exc.message else exc.message
        suffix = sub.split(".", 1)[1] if "." in sub else ""
        raise RecipeError(f"{where}.{suffix}" if suffix else where, problem)


def _check_unique(launches: List[dict]) -> None:
    seen = set()
    for body in launches:
        if body["name"] in seen:
            raise RecipeError("services", f"two services would be named {body['name']!r}: give them distinct names")
        seen.add(body["name"])


# --- the student orchestrator's recipe ------------------------------------------------------------------

def _parse_student(data: dict, default_name: str) -> Recipe:
    """`{"job": {"name", "infrastructure": {...}, "service": {...}}}`: map what has a meaning, warn about the rest."""
    job = data["job"]
    if not isinstance(job, dict):
        raise RecipeError("job", "expected a mapping with infrastructure and service")
    warnings = [f"{key}: ignored (only `job` is read)" for key in sorted(set(data) - {"job"})]
    name = _clean_name(str(job.get("name") or default_name))
    infra = job.get("infrastructure") or {}
    service = job.get("service")
    if not isinstance(infra, dict):
        raise RecipeError("job.infrastructure", "expected a mapping")
    if not isinstance(service, dict):
        raise RecipeError("job.service", "required (a mapping with type and model)")
    body = {}
    kind_word = service.get("type", "ollama")
    kind = STUDENT_TYPES.get(str(kind_word).lower())
    if kind is None:
        raise RecipeError("job.service.type", f"{kind_word!r} has no Pilotfish service kind; "
                                              f"expected one of {', '.join(sorted(STUDENT_TYPES))}")
    body["kind"] = kind
    model = service.get("model")
    if model is None:
        raise RecipeError("job.service.model", "required (a Hugging Face repo id such as org/name)")
    if not isinstance(model, str) or not REPO_ID.fullmatch(model):
        raise RecipeError("job.service.model", f"expected a Hugging Face repo id such as org/name, got {model!r} "
                                               "(Ollama model names are not served: pick the model's repo on the "
                                               "Hub, e.g. meta-llama/Llama-2-7b-chat-hf)")
    body["model"] = model
    resources = {}
    for key, target in (("partition", "partition"), ("account", "account"), ("mem_gb", "memory_gb")):
        if infra.get(key) is not None:
            resources[target] = infra[key]
    if resources:
        try:
            body["resources"] = _checked("job.infrastructure", parse_resources, resources)
        except RecipeError as exc:  # name the recipe's own field
            raise RecipeError(exc.field.replace(".memory_gb", ".mem_gb"), str(exc).split(": ", 1)[1])
    if infra.get("time") is not None:
        body["time"] = _checked("job.infrastructure.time", parse_time, infra["time"])
    nodes = infra.get("nodes", 1)
    if nodes not in (None, 1):
        warnings.append(f"job.infrastructure.nodes: {nodes!r} ignored: each service runs on one node "
                        "(replicas serve one service from several jobs; count makes separate services)")
    for key in sorted(set(infra) - {"partition", "account", "mem_gb", "time", "nodes"}):
        warnings.append(f"job.infrastructure.{key}: ignored (no meaning in Pilotfish)")
    for key in ("n_clients", "n_requests_per_client"):
        if key in service:
            warnings.append(f"job.service.{key}: ignored: load tests are not part of a deployment; "
                            "use `pilotfish bench` against the running service")
    if "precision" in service:
        warnings.append("job.service.precision: ignored: pass the engine's own flag instead "
                        "(engine_args: [--dtype, float16])")
    for key in sorted(set(service) - {"type", "model", "n_clients", "n_requests_per_client", "precision"}):
        warnings.append(f"job.service.{key}: ignored (no meaning in Pilotfish)")
    for key in sorted(set(job) - {"name", "infrastructure", "service"}):
        warnings.append(f"job.{key}: ignored (no meaning in Pilotfish)")
    body["name"] = f"{name}-0"
    return Recipe(name=name, launches=[body], warnings=warnings)
