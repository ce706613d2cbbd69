"""Resource tiers: the site's resource_specs.yaml, tier recommendation by model size, and the resources of a tier."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import yaml

from ..config import ConfigError
from ..errors import ValidationError
from ..lifetimes import parse_idle_timeout
from ..scheduler import Resources
from ..scheduler.sbatch import resource_options

SPECS_FILE = "resource_specs.yaml"
MAX_FILE_BYTES = 1024 * 1024
TIER_FIELDS = ("name", "description", "max_model_size_gb", "gpu_count", "gpu_type", "cpu_cores", "memory_gb", "slurm",
               "idle_timeout")
REQUIRED_TIER_FIELDS = ("name", "description", "max_model_size_gb", "gpu_count", "cpu_cores", "memory_gb")
SLURM_FIELDS = ("constraint", "gres")
PARTITION_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
SLURM_VALUE = re.compile(r"^[^\s\x00-\x1f\x7f]{1,200}$")
TEXT = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")

# The tiers without a resource_specs.yaml; the Open OnDemand form (ood_app/site.rb) reads the same file.
DEFAULT_SPECS_FILE = Path(__file__).resolve().with_name("default_resource_specs.yaml")


class TierSpecError(ConfigError):
    """resource_specs.yaml is broken; the message names the file, the place in it and the problem.

    A ConfigError, so the portal's start-up reports it as one line like any other bad setting.
    """


@dataclass
class Tier:
    """One tier of a partition, as the site wrote it."""
    partition: str
    name: str
    description: str
    max_model_size_gb: Optional[float]  # None: the catch-all tier, no size limit
    gpu_count: int
    cpu_cores: int
    memory_gb: float
    gpu_type: Optional[str] = None
    slurm: Dict[str, str] = field(default_factory=dict)
    idle_timeout: Optional[int] = None  # minutes: the default idle timeout of its services (0: never; None: the site's)

    @property
    def ref(self) -> str:
        """The qualified reference, "partition.name"."""
        return f"{self.partition}.{self.name}"

    @property
    def catch_all(self) -> bool:
        """max_model_size_gb is null: the tier for models larger than every sized tier."""
        return self.max_model_size_gb is None


@dataclass
class ResourceSpecs:
    """A checked resource_specs.yaml (or the built-in defaults)."""
    time_default: int
    time_max: int
    partitions: Dict[str, List[Tier]]  # in file order
    default_partition: str
    models: Dict[str, Tier]  # the site's per-model overrides, resolved
    source: Optional[Path] = None  # None: the built-in defaults


@dataclass
class Recommendation:
    """The tier suggested for a model and why, in words for the user."""
    tier: Optional[Tier]  # None when no tier fits and the partition has no catch-all
    reason: str


# --- loading -------------------------------------------------------------------------------------------

def _show(value) -> str:
    """A value as the YAML author wrote it, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    return {dict: "a mapping", list: "a list"}.get(type(value), f"a {type(value).__name__}")


class _Reader:
    """Checks parsed YAML against the schema; every problem becomes one TierSpecError naming its path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, problem: str):
        """Raise the TierSpecError for `problem` at `path` ("partitions.gpu.tiers[1].gpu_count")."""
        raise TierSpecError(f"{self.source}: {path}: {problem}" if path else f"{self.source}: {problem}")

    def mapping(self, path, value, allowed=None, required=(), optional=False) -> dict:
        """`value` as a mapping with only `allowed` keys (None: any) and all `required` ones; `optional`: None is {}."""
        value = {} if optional and value is None else value
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {_show(value)}")
        for key in value:
            if allowed is not None and key not in allowed:
                self.fail(f"{path}.{key}" if path else str(key),
                          f"unknown field (expected one of: {', '.join(allowed)})")
        for key in required:
            if key not in value:
                self.fail(path, f"missing required field `{key}`")
        return value

    def integer(self, path, value, minimum) -> int:
        """An integer (not a bool) of at least `minimum`."""
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"expected an integer, got {_show(value)}")
        if value < minimum:
            self.fail(path, f"must be at least {minimum}, got {value}")
        return value

    def number(self, path, value, positive=False) -> float:
        """A finite number, at least 0 (above 0 when `positive`)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
                float("inf"), float("-inf")):
            self.fail(path, f"expected a number, got {_show(value)}")
        if value < 0 or (positive and value == 0):
            self.fail(path, f"must be {'greater than 0' if positive else 'at least 0'}, got {value}")
        return value

    def checked(self, path, check, value, *args):
        """What one of the launch's own checks, `check(value, *args)`, returns (None for None); its refusal fails at
        `path`."""
        try:
            return None if value is None else check(value, *args)
        except ValidationError as exc:
            self.fail(path, exc.problem)

    def text(self, path, value, pattern=TEXT, what="a single line of text") -> str:
        """A string matching `pattern`; `what` describes it in the error."""
        if not isinstance(value, str) or not pattern.fullmatch(value):
            self.fail(path, f"expected {what}, got {_show(value)}")
        return value


def _read_tier(r: _Reader, path: str, partition: str, raw) -> Tier:
    raw = r.mapping(path, raw, TIER_FIELDS, REQUIRED_TIER_FIELDS)
    size = raw["max_model_size_gb"]
    slurm = r.mapping(f"{path}.slurm", raw.get("slurm"), SLURM_FIELDS, optional=True)
    gpu_type = raw.get("gpu_type")
    return Tier(
        partition=partition,
        name=r.text(f"{path}.name", raw["name"]).strip() or r.fail(f"{path}.name", "must not be blank"),
        description=r.text(f"{path}.description", raw["description"], re.compile(r"^[^\x00-\x1f\x7f]{0,500}$")),
        max_model_size_gb=None if size is None else r.number(f"{path}.max_model_size_gb", size),
        gpu_count=r.integer(f"{path}.gpu_count", raw["gpu_count"], 0),
        cpu_cores=r.integer(f"{path}.cpu_cores", raw["cpu_cores"], 1),
        memory_gb=r.number(f"{path}.memory_gb", raw["memory_gb"], positive=True),
        gpu_type=None if gpu_type is None else r.text(f"{path}.gpu_type", gpu_type, SLURM_VALUE, "a Slurm GPU type"),
        slurm={key: r.text(f"{path}.slurm.{key}", value, SLURM_VALUE, "a Slurm value without spaces")
               for key, value in slurm.items() if value is not None},
        idle_timeout=r.checked(f"{path}.idle_timeout", parse_idle_timeout, raw.get("idle_timeout")),  # as a launch's
    )


def _build(data, source: str) -> ResourceSpecs:
    r = _Reader(source)
    if data is None:
        r.fail("", "the file is empty (expected a mapping with `partitions`)")
    top = r.mapping("", data, ("time", "partitions", "models"), ("partitions",))
    time = r.mapping("time", top.get("time"), ("default", "max"), optional=True)
    time_default = r.integer("time.default", time.get("default", 30), 1)
    time_max = r.integer("time.max", time.get("max", 180), 1)
    if time_default > time_max:
        r.fail("time.default", f"{time_default} minutes is more than time.max ({time_max} minutes)")

    raw_partitions = r.mapping("partitions", top["partitions"])
    if not raw_partitions:
        r.fail("partitions", "no partition defined")
    partitions: Dict[str, List[Tier]] = {}
    defaults = []
    for name, raw in raw_partitions.items():
        path = f"partitions.{name}"
        r.text(path, name, PARTITION_NAME, "a partition name of letters, digits, '_' or '-' (the key)")
        raw = r.mapping(path, raw, ("default", "tiers"), ("tiers",))
        is_default = raw.get("default", False)
        if not isinstance(is_default, bool):
            r.fail(f"{path}.default", f"expected true or false, got {_show(is_default)}")
        if is_default:
            defaults.append(name)
        if not isinstance(raw["tiers"], list) or not raw["tiers"]:
            r.fail(f"{path}.tiers", f"expected a non-empty list of tiers, got {_show(raw['tiers'])}")
        tiers: List[Tier] = []
        for index, raw_tier in enumerate(raw["tiers"]):
            tier = _read_tier(r, f"{path}.tiers[{index}]", name, raw_tier)
            for other_index, other in enumerate(tiers):
                if other.name.lower() == tier.name.lower():
                    r.fail(f"{path}.tiers[{index}].name",
                           f"duplicate tier name {_show(tier.name)} (also tiers[{other_index}])")
            tiers.append(tier)
        partitions[name] = tiers
    if len(defaults) > 1:
        r.fail("partitions", f"{' and '.join(defaults)} both have `default: true`; mark exactly one")
    if not defaults:
        if len(partitions) > 1:
            r.fail("partitions", "no partition has `default: true`; mark exactly one")
        defaults = list(partitions)

    specs = ResourceSpecs(time_default, time_max, partitions, defaults[0], {},
                          Path(source) if source else None)
    models = r.mapping("models", top.get("models"), optional=True)
    for repo_id, ref in models.items():
        path = f"models.{_show(repo_id)}"
        r.text(path, repo_id, what="a model repo id (the key)")
        r.text(path, ref, what='a tier, "partition.tier" or "tier"')
        specs.models[repo_id] = r.checked(path, resolve_tier, specs, ref)
    return specs


def parse_specs(text: Union[str, bytes], source: str = SPECS_FILE) -> ResourceSpecs:
    """Parse and check the content of a resource_specs.yaml; any problem raises TierSpecError (and nothing else)."""
    r = _Reader(source)
    if isinstance(text, bytes):
        if len(text) > MAX_FILE_BYTES:
            r.fail("", f"larger than {MAX_FILE_BYTES // 1024} KB: not a resource specs file")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            r.fail("", f"not UTF-8 text (byte {exc.start})")
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        r.fail("", f"not valid YAML: {where}{exc.problem or exc.context}")
    except yaml.YAMLError as exc:
        r.fail("", f"not valid YAML: {exc}")
    except RecursionError:
        r.fail("", "not valid YAML: nested too deeply")
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a date such as 2024-13-01
        r.fail("", f"not valid YAML: {exc}")
    return _build(data, source)


def default_specs() -> ResourceSpecs:
    """The built-in tiers used when the site has no resource_specs.yaml: CPU Only, Small, Medium, Large."""
    specs = parse_specs(DEFAULT_SPECS_FILE.read_bytes(), str(DEFAULT_SPECS_FILE))
    specs.source = None
    return specs


def load_specs(path: Optional[Path], required: bool = False) -> ResourceSpecs:
    """Load a resource_specs.yaml; without a path, or a missing file when not `required`, the default tiers."""
    if path is None:
        return default_specs()
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if required:
            raise TierSpecError(f"{path}: file not found")
        return default_specs()
    except OSError as exc:
        raise TierSpecError(f"{path}: cannot read: {exc.strerror}")
    return parse_specs(data, str(path))


def load_site_specs(cache_dir: Optional[Path] = None, specs_path: Optional[Path] = None) -> ResourceSpecs:
    """The site's tiers: `specs_path` (must exist) if given, else cache_dir/resource_specs.yaml, else defaults."""
    if specs_path is not None:
        return load_specs(specs_path, required=True)
    return load_specs(Path(cache_dir) / SPECS_FILE if cache_dir is not None else None)


# --- looking tiers up --------------------------------------------------------------------------------

def _size(size_gb: float) -> str:
    return f"{size_gb:.2f}" if size_gb < 1 else f"{size_gb:.1f}"


def all_tiers(specs: ResourceSpecs) -> List[Tier]:
    """Every tier, default partition first, each partition in file order."""
    order = [specs.default_partition] + [name for name in specs.partitions if name != specs.default_partition]
    return [tier for name in order for tier in specs.partitions[name]]


def resolve_tier(specs: ResourceSpecs, tier_ref) -> Tier:
    """A tier from "Small" (default partition first, then a unique match elsewhere) or "gpu.Small".

    Names match exactly, else case-insensitively. Raises ValidationError("tier", ...) naming what exists.
    """
    available = ", ".join(tier.ref for tier in all_tiers(specs))
    if not isinstance(tier_ref, str) or not tier_ref.strip():
        raise ValidationError("tier", f"expected a tier name such as {all_tiers(specs)[0].ref!r} (available: {available})")
    ref = tier_ref.strip()

    def find(tiers: List[Tier], name: str) -> Optional[Tier]:
        exact = [tier for tier in tiers if tier.name == name]
        loose = [tier for tier in tiers if tier.name.lower() == name.lower()]
        return (exact or loose or [None])[0]

    partition, _, rest = ref.partition(".")
    if rest and partition in specs.partitions:
        tier = find(specs.partitions[partition], rest)
        if tier is not None:
            return tier
    tier = find(specs.partitions[specs.default_partition], ref)
    if tier is not None:
        return tier
    matches = [tier for name, tiers in specs.partitions.items() if name != specs.default_partition
               for tier in [find(tiers, ref)] if tier is not None]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValidationError("tier", f"{ref!r} is in several partitions; say which: "
                                      f"{', '.join(tier.ref for tier in matches)}")
    raise ValidationError("tier", f"unknown tier {ref!r} (available: {available})")


def model_fits(tier: Tier, size_gb: Optional[float]) -> bool:
    """Whether a model of `size_gb` fits `tier`: "up to N GB" is inclusive (size <= N); catch-all fits all."""
    return tier.catch_all or (size_gb is not None and size_gb <= tier.max_model_size_gb)


def check_model_fits(tier: Tier, size_gb: Optional[float], model: str = "the model", force: bool = False) -> None:
    """Refuse a launch on a tier too small for the model (ValidationError("tier", ...)) unless `force`.

    An unknown size passes: the portal cannot tell, and a catch-all is not forced on the user.
    """
    if force or size_gb is None or model_fits(tier, size_gb):
        return
    raise ValidationError("tier", f"{tier.ref} takes models up to {tier.max_model_size_gb:g} GB and {model} is "
                                  f"{_size(size_gb)} GB: pick a larger tier, or force the launch")


def recommend(specs: ResourceSpecs, model_repo_id: Optional[str], size_gb: Optional[float],
              partition: Optional[str] = None) -> Recommendation:
    """The tier for a model, by the seed's rules, in `partition` (default: the site's default partition).

    1. the site's `models` override for this repo (when it is in the partition searched, or none was asked);
    2. the smallest tier whose max_model_size_gb the size fits (size <= limit, see model_fits);
    3. the catch-all tier (max_model_size_gb: null); none: tier None with the reason.
    """
    if partition is not None and partition not in specs.partitions:
        raise ValidationError("partition", f"unknown partition {partition!r} (available: {', '.join(specs.partitions)})")
    override = specs.models.get(model_repo_id) if model_repo_id else None
    if override is not None and partition in (None, override.partition):
        return Recommendation(override, f'set for this model by the site (models: "{model_repo_id}": "{override.ref}")')
    name = partition or specs.default_partition
    tiers = specs.partitions[name]
    catch_all = next((tier for tier in tiers if tier.catch_all), None)
    sized = sorted((tier for tier in tiers if not tier.catch_all), key=lambda tier: tier.max_model_size_gb)
    if size_gb is None:
        if catch_all is not None:
            return Recommendation(catch_all, f"size unknown: catch-all {catch_all.name}")
        return Recommendation(None, f"size unknown and partition {name} has no catch-all tier: pick a tier")
    for tier in sized:
        if model_fits(tier, size_gb):
            return Recommendation(tier, f"{_size(size_gb)} GB fits {tier.name} (up to {tier.max_model_size_gb:g} GB)")
    if catch_all is not None:
        return Recommendation(catch_all, f"{_size(size_gb)} GB is larger than every sized tier: catch-all {catch_all.name}")
    largest = sized[-1]
    return Recommendation(None, f"{_size(size_gb)} GB is larger than every tier of partition {name} (the largest, "
                                f"{largest.name}, takes up to {largest.max_model_size_gb:g} GB) and it has no "
                                f"catch-all tier")


def check_time(specs: ResourceSpecs, time_minutes: Optional[int]) -> int:
    """The time limit in minutes: the site default when None; above time.max is refused, never clamped."""
    if time_minutes is None:
        return specs.time_default
    if isinstance(time_minutes, bool) or not isinstance(time_minutes, int):
        raise ValidationError("time", f"expected minutes, got {time_minutes!r}")
    if time_minutes < 1:
        raise ValidationError("time", "must be at least 1 minute")
    if time_minutes > specs.time_max:
        raise ValidationError("time", f"{time_minutes} minutes exceeds the site maximum of {specs.time_max} minutes")
    return time_minutes


def tier_resources(tier: Tier, time_minutes: int) -> Resources:
    """What a job on `tier` asks of Slurm. slurm.gres, when set, is passed as written and replaces gpus/gpu_type."""
    return Resources(time=time_minutes, partition=tier.partition, cpus=tier.cpu_cores, memory_gb=float(tier.memory_gb),
                     gpus=tier.gpu_count, gpu_type=tier.gpu_type, gres=tier.slurm.get("gres"),
                     constraint=tier.slurm.get("constraint"))


def resources_for(specs: ResourceSpecs, tier_ref: str, time_minutes: Optional[int] = None) -> Resources:
    """The scheduler resources of a tier ("Small" or "gpu.Small") for `time_minutes` (default: the site's)."""
    return tier_resources(resolve_tier(specs, tier_ref), check_time(specs, time_minutes))


sbatch_options = resource_options  # the sbatch options of a tier's resources, as the Open OnDemand form shows them


def tiers_as_dicts(specs: ResourceSpecs, arguments: Optional[Callable[[Resources], List[str]]] = None) -> List[dict]:
    """Every tier as a plain dict for the API, with the resources it becomes and the scheduler's `arguments` for
    them (a Scheduler's `arguments`; by default sbatch's options, which both schedulers show)."""
    arguments = arguments or sbatch_options
    out = []
    for tier in all_tiers(specs):
        resources = tier_resources(tier, specs.time_default)
        out.append({
            "ref": tier.ref, "partition": tier.partition, "name": tier.name, "description": tier.description,
            "default_partition": tier.partition == specs.default_partition,
            "max_model_size_gb": tier.max_model_size_gb, "gpu_count": tier.gpu_count, "gpu_type": tier.gpu_type,
            "cpu_cores": tier.cpu_cores, "memory_gb": tier.memory_gb, "slurm": dict(tier.slurm),
            "idle_timeout": tier.idle_timeout,
            "resources": {key: value for key, value in asdict(resources).items()
                          if key not in ("account", "extra", "exclude")},
            "sbatch": arguments(resources),
        })
    return out
