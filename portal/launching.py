"""Launch requests: field-by-field validation, and the plan (model snapshot, tier, resources, runtime, job script),
made from the resolved site (portal/site.py)."""
from __future__ import annotations

import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, List, Literal, Optional, Union

import jinja2
from flask import current_app, has_app_context
from pydantic import Field, field_validator

from .catalog.adapters import MAX_ADAPTERS, Adapter, resolve_adapters, split_reference
from .catalog.images import ImageFile, find_image
from .catalog.kinds import KINDS, get_kind
from .catalog.models import REPO_ID, REVISION, ModelRevision, find_revision, validate_repo_id, validate_revision
from .catalog.tiers import (ResourceSpecs, Tier, TierSpecError, check_model_fits, check_time, recommend, resolve_tier,
                            tier_resources)
from .engines.base import GUARD_DIR, Preset
from .errors import ForbiddenError, UnavailableError, ValidationError
from .keys import check_key_model
from .launch_options import check_flags_apply, check_kind, model_presets
from .lifetimes import (IDLE_TIMEOUT_MAX_MINUTES, IDLE_TIMEOUT_SHAPE, IDLE_TIMEOUT_WORDS, LEASE_MAX_SECONDS,
                        LEASE_MIN_SECONDS, LEASE_SHAPE, LEASE_WORDS, RENEW_SHAPE, RENEW_WORDS, duration_words,
                        parse_idle_timeout, parse_lease, parse_renewal, parse_time)
from .models import Service, utcnow
from .scaling import REPLICAS_MAX, REPLICAS_SHAPE, REPLICAS_WORDS, parse_replicas
from .scheduler import Resources
from .service_tls import tls_files
from .site import Runtime, Site, build_site
from .validation import Strict, validated

SLURM_WORD = re.compile(r"^[A-Za-z0-9_.,:=+\-\[\]|&()*]{1,200}$")
MAX_ENGINE_ARGS = 100


@dataclass
class LaunchRequest:
    kind: str
    model: str
    revision: Optional[str] = None
    tier: Optional[str] = None
    time: Optional[int] = None
    name: Optional[str] = None
    resources: dict = field(default_factory=dict)  # explicit overrides of the tier's resources
    engine_args: List[str] = field(default_factory=list)
    force: bool = False  # launch on a tier smaller than the model
    image: Optional[str] = None  # apptainer: another staged image than the pinned one
    idle_timeout: Optional[int] = None  # minutes without a request before it stops (0: never; None: the default)
    lease: Optional[int] = None  # seconds it lives without a heartbeat or a request (None: no lease)
    renew: object = False  # True, False, or its end ("8h", an ISO time): read by lifetimes.parse_renewal at launch
    replicas: Optional[tuple] = None  # (min, max, target_in_flight) (portal/replicas.py); None: one job
    adapters: List[str] = field(default_factory=list)  # LoRA adapters served beside the model (catalog/adapters.py)


@dataclass
class LaunchPlan:
    """Everything a launch decides before submitting: shown by a dry run, used by the real launch."""
    request: LaunchRequest
    runtime: Runtime
    model: ModelRevision
    tier: Optional[Tier]
    tier_reason: str
    resources: Resources
    arguments: List[str]
    image: Optional[ImageFile] = None
    exporters: List[dict] = field(default_factory=list)  # monitoring exporters the job starts (site config)
    scheduler_arguments: List[str] = field(default_factory=list)  # what the scheduler is asked (a dry run shows it)
    idle_timeout: Optional[int] = None  # minutes (None: no idle stop): the request's, else the tier's, else the site's
    idle_timeout_reason: str = ""  # where it came from, in words
    presets: List[Preset] = field(default_factory=list)  # flags from what the model is (launch_options.py)
    adapters: List[Adapter] = field(default_factory=list)  # served beside the model, each under its own name

    def to_dict(self) -> dict:
        return {"kind": self.request.kind, "model": self.model.repo_id, "revision": self.model.revision,
                "model_path": str(self.model.path), "location": self.model.location,
                "size_gb": round(self.model.size_gb, 3), "tier": self.tier.ref if self.tier else None,
                "tier_reason": self.tier_reason, "resources": resources_dict(self.resources),
                "sbatch": self.scheduler_arguments,
                "engine": self.runtime.engine.name, "runtime": self.runtime.runtime,
                "image": str(self.image.path) if self.image else None,
                "arguments": self.arguments, "model_kinds": self.model.kinds,
                "adapters": [adapter.to_dict() for adapter in self.adapters],
                "model_modalities": self.model.meta.get("modalities") or [],
                "presets": [preset.to_dict(self.request.engine_args) for preset in self.presets],
                "idle_timeout": self.idle_timeout,
                "idle_timeout_reason": self.idle_timeout_reason, "lease": self.request.lease,
                "renew": self.request.renew,
                "replicas": dict(zip(("min", "max", "target_in_flight"), self.request.replicas))
                if self.request.replicas else None}


REPO_ID_SHAPE = REPO_ID.pattern  # JSON Schema's patterns: ^...$ match whole values there (our own checks fullmatch)
REVISION_SHAPE = REVISION.pattern
ADAPTER_SHAPE = f"{REPO_ID_SHAPE[:-1]}(@{REVISION_SHAPE[1:-1]})?$"  # org/name, or org/name@<revision>
TIME_SHAPE = r"^([0-9]+|([0-9]+-)?[0-9]+(:[0-9][0-9]){1,2})$"
SlurmWord = Annotated[str, Field(pattern=SLURM_WORD.pattern)]
A_SLURM_NAME = "a Slurm name"


class ResourcesBody(Strict):
    """Explicit overrides of the tier's resources (they reach sbatch as arguments, never a shell)."""
    partition: Optional[SlurmWord] = Field(None, description=A_SLURM_NAME)
    account: Optional[SlurmWord] = Field(None, description=A_SLURM_NAME)
    cpus: Optional[Annotated[int, Field(ge=1, le=100000)]] = Field(None, description="an integer of at least 1")
    memory_gb: Optional[Annotated[float, Field(gt=0, le=1e9)]] = Field(None, description="a positive number")
    gpus: Optional[Annotated[int, Field(ge=0, le=10000)]] = Field(None, description="an integer of at least 0")
    gpu_type: Optional[SlurmWord] = Field(None, description=A_SLURM_NAME)
    gres: Optional[SlurmWord] = Field(None, description=A_SLURM_NAME)
    constraint: Optional[SlurmWord] = Field(None, description=A_SLURM_NAME)


class ReplicasBody(Strict):
    min: Annotated[int, Field(ge=1, le=REPLICAS_MAX)] = Field(1, description=f"jobs at least (1 to {REPLICAS_MAX})")
    max: Annotated[int, Field(ge=1, le=REPLICAS_MAX)] = Field(description=f"jobs at most (1 to {REPLICAS_MAX})")
    target_in_flight: Optional[Annotated[int, Field(ge=1, le=10000)]] = Field(
        None, description="requests in flight per job above which a job is added")


class LaunchBody(Strict):
    """A launch request (POST /api/services, the launch page, `pilotfish run`): what to serve and how."""
    kind: Literal[tuple(KINDS)] = Field(description=f"one of {', '.join(KINDS)}")
    model: str = Field(pattern=REPO_ID_SHAPE, description="a Hugging Face repo id such as org/name")
    revision: Optional[str] = Field(None, pattern=REVISION_SHAPE, description="a branch, tag or commit")
    tier: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_.\- ]{1,100}$",
                                description="a tier name such as Small or gpu.Small")
    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_.\- ]{1,100}$",
                                description="a name of up to 100 letters, digits, spaces, '.', '_' or '-'")
    time: Optional[Union[Annotated[int, Field(ge=1)], Annotated[str, Field(pattern=TIME_SHAPE)]]] = Field(
        None, description="minutes, or HH:MM:SS, MM:SS or D-HH:MM")
    resources: Optional[ResourcesBody] = Field(None, description="an object of resource overrides")
    engine_args: Optional[List[Annotated[str, Field(pattern="^[^\\x00]*$")]]] = Field(
        None, max_length=MAX_ENGINE_ARGS,
        description=f"a list of at most {MAX_ENGINE_ARGS} strings without NUL characters (engine flags and values)")
    force: bool = Field(False, description="true or false (true: launch on a tier smaller than the model)")
    image: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_.\-/:@]{1,200}$", description="an image file name or tag")
    idle_timeout: Optional[Union[Annotated[int, Field(ge=0, le=IDLE_TIMEOUT_MAX_MINUTES)],
                                 Annotated[str, Field(pattern=IDLE_TIMEOUT_SHAPE)]]] = Field(
        None, description=f"{IDLE_TIMEOUT_WORDS}; default: the tier's, else the site's, else never")
    lease: Optional[Union[Annotated[int, Field(ge=LEASE_MIN_SECONDS, le=LEASE_MAX_SECONDS)],
                          Annotated[str, Field(pattern=LEASE_SHAPE)]]] = Field(
        None, description=f"{LEASE_WORDS}: stopped once neither renewed (POST /api/services/<id>/lease) nor used "
                          f"for that long")
    renew: Union[bool, Annotated[str, Field(pattern=RENEW_SHAPE)]] = Field(
        False, description=RENEW_WORDS)
    replicas: Optional[Union[Annotated[int, Field(ge=1, le=REPLICAS_MAX)], Annotated[str, Field(pattern=REPLICAS_SHAPE)],
                             ReplicasBody]] = Field(None, description=REPLICAS_WORDS)
    adapters: Optional[List[Annotated[str, Field(pattern=ADAPTER_SHAPE)]]] = Field(
        None, max_length=MAX_ADAPTERS, description=f"at most {MAX_ADAPTERS} repo ids of local LoRA adapters of the "
                                                   "model (org/name, or org/name@<revision> to pin one), each served "
                                                   "beside it under its repo id")

    @field_validator("model")
    @classmethod
    def _repo_id(cls, value):
        return _as_value_error(validate_repo_id, value)

    @field_validator("revision")
    @classmethod
    def _revision(cls, value):
        return value if value is None else _as_value_error(validate_revision, value)

    @field_validator("time")
    @classmethod
    def _minutes(cls, value):
        return value if value is None else _as_value_error(parse_time, value)

    @field_validator("idle_timeout")
    @classmethod
    def _idle_minutes(cls, value):
        return value if value is None else _as_value_error(parse_idle_timeout, value)

    @field_validator("lease")
    @classmethod
    def _lease_seconds(cls, value):
        return value if value is None else _as_value_error(parse_lease, value)

    @field_validator("replicas")
    @classmethod
    def _replica_counts(cls, value):
        if isinstance(value, ReplicasBody):
            value = value.model_dump(exclude_none=True)
        return value if value is None else _as_value_error(parse_replicas, value)

    @field_validator("renew")
    @classmethod
    def _renewal(cls, value):
        _as_value_error(parse_renewal, value, utcnow())  # checked here; the launch reads it again for its time
        return value


class _ResourcesOnly(Strict):
    resources: Optional[ResourcesBody] = Field(None, description="an object of resource overrides")


def _as_value_error(check, value, *more):
    """A check of ours inside a pydantic validator: its problem becomes the field's refusal."""
    try:
        return check(value, *more)
    except ValidationError as exc:
        raise ValueError(exc.problem) from None


def parse_resources(value) -> dict:
    """Explicit resource overrides, checked field by field (ValidationError naming resources.<field>)."""
    if value is not None and not isinstance(value, dict):
        raise ValidationError("resources", "expected an object")
    checked = validated(_ResourcesOnly, {"resources": value}).resources
    return checked.model_dump(exclude_none=True) if checked else {}


def parse_launch_request(body) -> LaunchRequest:
    """Check a launch request field by field (LaunchBody); raise ValidationError naming the first bad field."""
    checked = validated(LaunchBody, body)
    return LaunchRequest(kind=checked.kind, model=checked.model, revision=checked.revision, tier=checked.tier,
                         time=checked.time, name=checked.name,
                         resources=checked.resources.model_dump(exclude_none=True) if checked.resources else {},
                         engine_args=list(checked.engine_args or []), force=checked.force, image=checked.image,
                         idle_timeout=checked.idle_timeout, lease=checked.lease, renew=checked.renew,
                         replicas=checked.replicas, adapters=list(checked.adapters or []))


# --- flags that run code or read files ------------------------------------------------------------------

# Engine flags that run code from the model's repository or read files on the node: the portal owner's alone (an API
# key gets 403). Those naming a file or folder ("file", "folder") must name one inside the model's snapshot or the
# site's allowed folders (`allowed_paths`), for everyone; the words in KEYWORDS name no file.
OWNER_FLAGS = {"--trust-remote-code": None, "--chat-template": "file", "--chat_template": "file",
               "--generation-config": "folder", "--tokenizer": "folder", "--hf-config-path": "folder"}
KEYWORDS = {"--generation-config": {"auto", "vllm"}}
INLINE_TEMPLATE = set("{}\n")  # vLLM reads a --chat-template holding any of these as the template itself


def flags_with_values(args: List[str]):
    """(flag, value or None) for each flag of `args`: `--flag=value`, or `--flag value` when a value follows."""
    for index, arg in enumerate(args):
        if not arg.startswith("-"):
            continue
        flag, equals, value = arg.partition("=")
        if not equals:
            following = args[index + 1] if index + 1 < len(args) else None
            value = following if following is not None and not following.startswith("-") else None
        yield flag, value


def check_owner_flags(args: List[str], principal: Optional[str], model: ModelRevision, config) -> None:
    """Refuse flags that run code or read files to anyone but the owner (403), and files outside the allowed
    folders to everyone (400); both name engine_args."""
    for flag, value in flags_with_values(args):
        what = OWNER_FLAGS.get(flag, "")
        if what == "":
            continue
        if principal != "owner":
            raise ForbiddenError(f"engine_args: {flag} runs code or reads files on the node: only the portal owner "
                                 f"may give it (this request comes from {principal or 'an unknown caller'})",
                                 field="engine_args")
        if what is None or value is None or value in KEYWORDS.get(flag, ()) or INLINE_TEMPLATE & set(value):
            continue
        check_allowed_path(flag, value, what, model, config)


def allowed_folders(model: ModelRevision, config) -> List[Path]:
    """Where files named by engine flags may lie: the model's own folder (its snapshot and the blobs its links point
    to) and the site's allowed_paths (default: cache_dir and home_dir), symlinks resolved."""
    folders = [model.path, model.path.parent.parent] + list(getattr(config, "allowed_paths", None) or [])
    return [Path(os.path.realpath(folder)) for folder in folders]


def check_allowed_path(flag: str, value: str, what: str, model: ModelRevision, config) -> None:
    path = Path(value)
    if not path.is_absolute():
        raise ValidationError("engine_args", f"{flag} {value!r}: expected an absolute path (the model's snapshot is "
                                             f"{model.path})")
    real = Path(os.path.realpath(path))  # symlinks and '..' resolved before the check
    folders = allowed_folders(model, config)
    if not any(real == folder or folder in real.parents for folder in folders):
        raise ValidationError("engine_args", f"{flag} {value}: outside the model's snapshot and the site's allowed "
                                             f"folders ({', '.join(map(str, folders))})")
    if not (real.is_file() if what == "file" else real.is_dir()):
        raise ValidationError("engine_args", f"{flag} {value}: no such {what}")


def resolved_site(settings) -> Site:
    """The site of `settings`: a Site as it is; the portal's settings (a Config) give the site its app built at start;
    other settings are resolved now (as the portal would at start)."""
    if isinstance(settings, Site):
        return settings
    if has_app_context() and current_app.config.get("PILOTFISH") is settings:
        return current_app.extensions["pilotfish.site"]
    return build_site(settings)


def site_specs(site) -> ResourceSpecs:
    """The site's resource tiers, read now; a broken specs file is a 503 naming the file, the place and the problem."""
    try:
        return resolved_site(site).tiers()
    except TierSpecError as exc:
        raise UnavailableError(f"the site's resource tiers cannot be used: {exc}")


def plan_launch(request: LaunchRequest, site, principal: Optional[str] = None) -> LaunchPlan:
    """Decide model snapshot, tier, resources, runtime and server arguments, with a clear error for each refusal.

    `site` is the resolved site (or the portal's settings, see resolved_site); `principal` is who asks ("owner" or
    "key:<name>", as portal.auth names them): flags that run code or read files are the owner's alone, and a key
    limited to models launches only those."""
    site = resolved_site(site)
    config = site.config
    kind = get_kind(request.kind)
    for name, field_name in ((request.model, "model"),
                             *((split_reference(adapter)[0], "adapters") for adapter in request.adapters)):
        check_key_model(principal, name, field=field_name)  # before any is looked for: a key learns nothing of others
    model = find_revision(request.model, request.revision, cache_dir=config.cache_dir, home_dir=config.home_dir)
    check_kind(model, kind)
    runtime = site.runtime(kind, site.engine_for(kind, model.meta.get("format")))
    runtime.check_args(request.engine_args)
    check_flags_apply(runtime, kind, request.engine_args, model.meta.get("modalities") or [])
    check_owner_flags(request.engine_args, principal, model, config)
    adapters = resolve_adapters(request.adapters, model, kind.name, runtime.engine, lambda name, revision: find_revision(
        name, revision, cache_dir=config.cache_dir, home_dir=config.home_dir))
    specs = site_specs(site)
    if request.tier:
        tier = resolve_tier(specs, request.tier)
        reason = "chosen at launch"
    else:
        recommendation = recommend(specs, model.repo_id, model.size_gb)
        tier, reason = recommendation.tier, recommendation.reason
    minutes = check_time(specs, request.time)
    if config.job_deadline is not None:  # the portal runs in a job: its children end by the time it does
        left = int((config.job_deadline - time.time()) // 60)
        if left < 1:
            raise ValidationError("time", "the portal's own job ends within a minute: start a new session")
        minutes = min(minutes, left)
    if tier is not None:
        check_model_fits(tier, model.size_gb, model.repo_id, force=request.force)
        resources = tier_resources(tier, minutes)
    elif request.resources:
        resources = Resources(time=minutes)
    else:
        raise ValidationError("tier", reason)
    for key, value in request.resources.items():
        setattr(resources, key, value)
    if "gpus" in request.resources or "gpu_type" in request.resources:
        resources.gres = request.resources.get("gres")
    image = None
    if runtime.runtime == "apptainer":
        image = find_image(runtime.config_key or kind.name, cache_dir=config.cache_dir, home_dir=config.home_dir,
                           image=request.image, pins=site.image_pins)
    model_file = str(model.path / model.meta["model_file"]) if model.meta.get("model_file") else None
    presets = model_presets(runtime, kind, model, config.media_domains, adapters)
    arguments = runtime.engine.launch_arguments(str(model.path), model.repo_id, resources.gpus, resources.cpus or 1,
                                                model_file, request.engine_args, presets)
    idle_timeout, idle_reason = choose_idle_timeout(request.idle_timeout, tier, config.idle_timeout)
    return LaunchPlan(request, runtime, model, tier, reason, resources, arguments, image,
                      exporters=site.exporters_for(resources.gpus),
                      scheduler_arguments=site.arguments(resources, Path("<job dir>"), "<job name>"),
                      idle_timeout=idle_timeout, idle_timeout_reason=idle_reason, presets=presets, adapters=adapters)


def choose_idle_timeout(requested: Optional[int], tier: Optional[Tier], site_default: Optional[int]) -> tuple:
    """(minutes or None, where it came from): the launch's own idle timeout, else its tier's, else the site's; 0 at
    any of them means never."""
    for minutes, source in ((requested, "asked at launch"), (tier.idle_timeout if tier else None,
                                                             f"tier {tier.ref if tier else ''}'s default"),
                            (site_default, "the site's default")):
        if minutes is not None:
            if not minutes:
                return None, f"no idle stop ({source})"
            return minutes, f"stops after {duration_words(minutes * 60)} without a request ({source})"
    return None, "no idle stop"


# --- the job script -----------------------------------------------------------------------------------

_jinja = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(Path(__file__).resolve().parent.parent / "templates" / "jobs")),
    undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
_jinja.filters["q"] = lambda value: shlex.quote(str(value))
_jinja.globals["guard_dir"] = str(GUARD_DIR)  # the key guard's folder: on the job's PYTHONPATH, bound into containers


def render_job_template(name: str, **values) -> str:
    """A template of templates/jobs/ (a runtime's, a batch's: batch.sh.j2), rendered with `values`."""
    return _jinja.get_template(name).render(**values)


def render_job_script(service: Service, plan: LaunchPlan) -> str:
    """The job script for `plan`, from templates/jobs/<runtime>.sh.j2 (every user value shell-quoted)."""
    model_root = plan.model.path.parent.parent  # models--org--name: the snapshot's links point into its blobs
    return render_job_template(
        f"{plan.runtime.runtime}.sh.j2", service=service, runtime=plan.runtime, job_dir=service.job_dir,
        model_path=str(plan.model.path), model_root=str(model_root), arguments=plan.arguments, gpus=plan.resources.gpus,
        adapter_roots=sorted({str(adapter.path.parent.parent) for adapter in plan.adapters}),
        image_path=str(plan.image.path) if plan.image else "", exporters=plan.exporters,
        tls_arguments=plan.runtime.engine.tls_arguments(*tls_files(service.job_dir)))


def resources_dict(resources: Resources) -> dict:
    return {key: value for key, value in vars(resources).items() if value not in (None, {}, 0) or key == "time"}
