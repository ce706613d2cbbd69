"""Launch requests: field-by-field validation, and the plan (model snapshot, tier, resources, runtime, job script),
made from the resolved site (portal/site.py)."""
from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import jinja2
from flask import current_app, has_app_context

from .catalog.images import ImageFile, find_image
from .catalog.kinds import KINDS, get_kind
from .catalog.models import ModelRevision, find_revision, validate_repo_id, validate_revision
from .catalog.tiers import (ResourceSpecs, Tier, TierSpecError, check_model_fits, check_time, recommend, resolve_tier,
                            tier_resources)
from .errors import UnavailableError, ValidationError, check_fields
from .models import Service
from .scheduler import Resources
from .site import Runtime, Site, build_site

LAUNCH_FIELDS = {"kind", "model", "revision", "tier", "name", "time", "resources", "engine_args", "force", "image"}
RESOURCE_FIELDS = {"partition", "account", "cpus", "memory_gb", "gpus", "gpu_type", "gres", "constraint"}
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

    def to_dict(self) -> dict:
        return {"kind": self.request.kind, "model": self.model.repo_id, "revision": self.model.revision,
                "model_path": str(self.model.path), "location": self.model.location,
                "size_gb": round(self.model.size_gb, 3), "tier": self.tier.ref if self.tier else None,
                "tier_reason": self.tier_reason, "resources": resources_dict(self.resources),
                "sbatch": self.scheduler_arguments,
                "engine": self.runtime.engine.name, "runtime": self.runtime.runtime,
                "image": str(self.image.path) if self.image else None,
                "arguments": self.arguments}


def parse_time(value) -> int:
    """Minutes from an integer, or a Slurm-style "MM", "HH:MM:SS" or "D-HH:MM" string."""
    if isinstance(value, bool):
        raise ValidationError("time", f"expected minutes or HH:MM:SS, got {value!r}")
    if isinstance(value, int):
        minutes = value
    elif isinstance(value, str) and re.fullmatch(r"\d+", value.strip()):
        minutes = int(value)
    elif isinstance(value, str) and re.fullmatch(r"(\d+-)?\d+(:\d\d){1,2}", value.strip()):
        text = value.strip()
        days = 0
        if "-" in text:
            day_text, text = text.split("-", 1)
            days = int(day_text)
        parts = [int(part) for part in text.split(":")]
        if len(parts) == 3:
            hours, mins, secs = parts
        elif days:
            hours, mins, secs = parts[0], parts[1], 0
        else:
            hours, mins, secs = 0, parts[0], parts[1]
        minutes = days * 1440 + hours * 60 + mins + (1 if secs else 0)
    else:
        raise ValidationError("time", f"expected minutes or HH:MM:SS, got {value!r}")
    if minutes < 1:
        raise ValidationError("time", "must be at least 1 minute")
    return minutes


def _optional_str(body: dict, key: str, pattern: re.Pattern, what: str) -> Optional[str]:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not pattern.match(value):
        raise ValidationError(key, f"expected {what}, got {value!r}")
    return value


def parse_resources(value) -> dict:
    """Explicit resource overrides, checked field by field (they reach sbatch as arguments, never a shell)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError("resources", "expected an object")
    unknown = set(value) - RESOURCE_FIELDS
    if unknown:
        raise ValidationError("resources", f"unknown field(s): {', '.join(sorted(unknown))}")
    out = {}
    for key in ("partition", "account", "gpu_type", "gres", "constraint"):
        val = value.get(key)
        if val is not None:
            if not isinstance(val, str) or not SLURM_WORD.match(val):
                raise ValidationError(f"resources.{key}", f"expected a Slurm name, got {val!r}")
            out[key] = val
    for key, minimum in (("cpus", 1), ("gpus", 0)):
        val = value.get(key)
        if val is not None:
            if isinstance(val, bool) or not isinstance(val, int) or val < minimum:
                raise ValidationError(f"resources.{key}", f"expected an integer of at least {minimum}, got {val!r}")
            out[key] = val
    memory = value.get("memory_gb")
    if memory is not None:
        if isinstance(memory, bool) or not isinstance(memory, (int, float)) or memory <= 0:
            raise ValidationError("resources.memory_gb", f"expected a positive number, got {memory!r}")
        out["memory_gb"] = float(memory)
    return out


def parse_launch_request(body) -> LaunchRequest:
    """Check a launch request field by field; raise ValidationError naming the first bad field."""
    check_fields(body, LAUNCH_FIELDS)
    kind = body.get("kind")
    if kind is None:
        raise ValidationError("kind", f"required (one of: {', '.join(KINDS)})")
    if not isinstance(kind, str) or get_kind(kind) is None:
        raise ValidationError("kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    model = body.get("model")
    if model is None:
        raise ValidationError("model", "required (a Hugging Face repo id such as org/name)")
    if not isinstance(model, str):
        raise ValidationError("model", f"expected a repo id such as org/name, got {model!r}")
    validate_repo_id(model)
    revision = body.get("revision")
    if revision is not None:
        validate_revision(revision)
    tier = _optional_str(body, "tier", re.compile(r"^[A-Za-z0-9_.\- ]{1,100}$"), "a tier name such as Small or gpu.Small")
    name = _optional_str(body, "name", re.compile(r"^[A-Za-z0-9_.\- ]{1,100}$"),
                         "a name of up to 100 letters, digits, spaces, '.', '_' or '-'")
    image = _optional_str(body, "image", re.compile(r"^[A-Za-z0-9_.\-/:@]{1,200}$"), "an image file name or tag")
    time_limit = parse_time(body["time"]) if body.get("time") is not None else None
    engine_args = body.get("engine_args") or []
    if not isinstance(engine_args, list) or not all(isinstance(arg, str) for arg in engine_args):
        raise ValidationError("engine_args", "expected a list of strings")
    if len(engine_args) > MAX_ENGINE_ARGS or any("\x00" in arg for arg in engine_args):
        raise ValidationError("engine_args", f"at most {MAX_ENGINE_ARGS} arguments, without NUL characters")
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise ValidationError("force", f"expected true or false, got {force!r}")
    return LaunchRequest(kind=kind, model=model, revision=revision, tier=tier, time=time_limit, name=name,
                         resources=parse_resources(body.get("resources")), engine_args=list(engine_args),
                         force=force, image=image)


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


def plan_launch(request: LaunchRequest, site) -> LaunchPlan:
    """Decide model snapshot, tier, resources, runtime and server arguments, with a clear error for each refusal.

    `site` is the resolved site (or the portal's settings, see resolved_site)."""
    site = resolved_site(site)
    config = site.config
    kind = get_kind(request.kind)
    model = find_revision(request.model, request.revision, cache_dir=config.cache_dir, home_dir=config.home_dir)
    if model.kind and model.kind != kind.name:
        raise ValidationError("model", f"{model.repo_id} is a {model.kind} model, not {kind.name}: "
                                       f"launch it as {model.kind}")
    runtime = site.runtime(kind, site.engine_for(kind, model.meta.get("format")))
    runtime.check_args(request.engine_args)
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
    arguments = runtime.engine.launch_arguments(str(model.path), model.repo_id, resources.gpus, resources.cpus or 1,
                                                model_file, request.engine_args)
    return LaunchPlan(request, runtime, model, tier, reason, resources, arguments, image,
                      exporters=site.exporters_for(resources.gpus),
                      scheduler_arguments=site.arguments(resources, Path("<job dir>"), "<job name>"))


# --- the job script -----------------------------------------------------------------------------------

_jinja = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(Path(__file__).resolve().parent.parent / "templates" / "jobs")),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
_jinja.filters["q"] = lambda value: shlex.quote(str(value))


def render_job_script(service: Service, plan: LaunchPlan) -> str:
    """The job script for `plan`, from templates/jobs/<runtime>.sh.j2 (every user value shell-quoted)."""
    model_root = plan.model.path.parent.parent  # models--org--name: the snapshot's links point into its blobs
    return _jinja.get_template(f"{plan.runtime.runtime}.sh.j2").render(
        service=service, runtime=plan.runtime, job_dir=service.job_dir, model_path=str(plan.model.path),
        model_root=str(model_root), arguments=plan.arguments, gpus=plan.resources.gpus,
        image_path=str(plan.image.path) if plan.image else "", exporters=plan.exporters)


def resources_dict(resources: Resources) -> dict:
    return {key: value for key, value in vars(resources).items() if value not in (None, {}, 0) or key == "time"}
