"""The service lifecycle: validate a launch request, render and submit its job, state transitions, stop, delete."""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import List, Optional

import jinja2
from flask import current_app

from .catalog.kinds import KINDS, get_kind, runtime_for
from .db import db
from .errors import ConflictError, NotFoundError, RejectedError, UnavailableError, ValidationError
from .models import Event, Service, State, utcnow
from .scheduler import JobQuery, Resources, SchedulerUnreachable, SubmissionRejected
from .scheduler.job_files import read_tail

LAUNCH_FIELDS = {"kind", "model", "revision", "name", "time", "resources", "engine_args"}
RESOURCE_FIELDS = {"partition", "account", "cpus", "memory_gb", "gpus", "gpu_type", "gres", "constraint"}
SLURM_WORD = re.compile(r"^[A-Za-z0-9_.,:=+\-\[\]|&()*]{1,200}$")
MODEL_NAME = re.compile(r"^[^\x00-\x1f\x7f]{1,300}$")
DEFAULT_TIME_MINUTES = 60
MAX_ENGINE_ARGS = 100
SUBMISSION_GRACE = timedelta(minutes=2)


@dataclass
class LaunchRequest:
    kind: str
    model: str
    time: int
    resources: Resources
    revision: Optional[str] = None
    name: Optional[str] = None
    engine_args: List[str] = field(default_factory=list)


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


def parse_resources(value, defaults: dict) -> Resources:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ValidationError("resources", "expected an object")
    unknown = set(value) - RESOURCE_FIELDS
    if unknown:
        raise ValidationError("resources", f"unknown field(s): {', '.join(sorted(unknown))}")
    merged = {**defaults, **{key: val for key, val in value.items() if val is not None}}
    out = {}
    for key in ("partition", "account", "gpu_type", "gres", "constraint"):
        val = merged.get(key)
        if val is not None:
            if not isinstance(val, str) or not SLURM_WORD.match(val):
                raise ValidationError(f"resources.{key}", f"expected a Slurm name, got {val!r}")
            out[key] = val
    for key, minimum in (("cpus", 1), ("gpus", 0)):
        val = merged.get(key)
        if val is not None:
            if isinstance(val, bool) or not isinstance(val, int) or val < minimum:
                raise ValidationError(f"resources.{key}", f"expected an integer of at least {minimum}, got {val!r}")
            out[key] = val
    memory = merged.get("memory_gb")
    if memory is not None:
        if isinstance(memory, bool) or not isinstance(memory, (int, float)) or memory <= 0:
            raise ValidationError("resources.memory_gb", f"expected a positive number, got {memory!r}")
        out["memory_gb"] = float(memory)
    return Resources(time=0, **out)


def parse_launch_request(body, config) -> LaunchRequest:
    """Check a launch request field by field; raise ValidationError naming the first bad field."""
    if not isinstance(body, dict):
        raise ValidationError("body", "expected a JSON object")
    unknown = set(body) - LAUNCH_FIELDS
    if unknown:
        raise ValidationError(sorted(unknown)[0], f"unknown field (expected some of: {', '.join(sorted(LAUNCH_FIELDS))})")
    kind = body.get("kind")
    if kind is None:
        raise ValidationError("kind", f"required (one of: {', '.join(KINDS)})")
    if not isinstance(kind, str) or get_kind(kind) is None:
        raise ValidationError("kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    model = body.get("model")
    if model is None:
        raise ValidationError("model", "required (a Hugging Face repo id such as org/name)")
    if not isinstance(model, str) or not MODEL_NAME.match(model) or not model.strip():
        raise ValidationError("model", f"expected a model name, got {model!r}")
    revision = _optional_str(body, "revision", re.compile(r"^[A-Za-z0-9_.\-/]{1,100}$"), "a revision (branch, tag or commit)")
    name = _optional_str(body, "name", re.compile(r"^[A-Za-z0-9_.\- ]{1,100}$"),
                         "a name of up to 100 letters, digits, spaces, '.', '_' or '-'")
    defaults = dict(config.default_resources)
    default_time = defaults.pop("time", DEFAULT_TIME_MINUTES)
    time_limit = parse_time(body["time"] if body.get("time") is not None else default_time)
    resources = parse_resources(body.get("resources"), defaults)
    resources.time = time_limit
    engine_args = body.get("engine_args") or []
    if not isinstance(engine_args, list) or not all(isinstance(arg, str) for arg in engine_args):
        raise ValidationError("engine_args", "expected a list of strings")
    if len(engine_args) > MAX_ENGINE_ARGS or any("\x00" in arg for arg in engine_args):
        raise ValidationError("engine_args", f"at most {MAX_ENGINE_ARGS} arguments, without NUL characters")
    return LaunchRequest(kind=kind, model=model, time=time_limit, resources=resources, revision=revision,
                         name=name, engine_args=list(engine_args))


# --- the job script -----------------------------------------------------------------------------------

_jinja = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(Path(__file__).resolve().parent.parent / "templates" / "jobs")),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
_jinja.filters["q"] = lambda value: shlex.quote(str(value))


def render_job_script(service: Service, runtime) -> str:
    return _jinja.get_template("service.sh.j2").render(service=service, runtime=runtime, job_dir=service.job_dir)


def job_name(service: Service) -> str:
    return f"pilotfish-{service.id}"


def job_query(service: Service) -> JobQuery:
    return JobQuery(job_id=service.job_id, name=job_name(service), submitted_at=service.submitted_at or service.created_at,
                    job_dir=Path(service.job_dir))


def _write_private(path: Path, text: str, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


# --- state --------------------------------------------------------------------------------------------

def transition(service: Service, to_state: str, reason: str) -> bool:
    """Move a service to `to_state`, recording an event with the reason. Returns False if nothing changed."""
    if service.state == to_state:
        return False
    now = utcnow()
    db.session.add(Event(service_id=service.id, at=now, from_state=service.state, to_state=to_state, reason=reason))
    service.state = to_state
    service.reason = reason
    if to_state == State.RUNNING and service.ready_at is None:
        service.ready_at = now
    if to_state in State.TERMINAL:
        service.ended_at = now
    return True


def log_excerpt(service: Service, lines: int = 5, max_chars: int = 800) -> str:
    """The last meaningful lines of a job's log, for failure reasons."""
    text = read_tail(Path(service.job_dir) / "job.log", 8192)
    kept = [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]
    excerpt = " | ".join(kept)
    return excerpt[-max_chars:]


# --- operations used by the API, the UI and the CLI ---------------------------------------------------

def _scheduler():
    return current_app.extensions["pilotfish.scheduler"]


def _wake_reconciler() -> None:
    reconciler = current_app.extensions.get("pilotfish.reconciler")
    if reconciler is not None:
        reconciler.wake()


def launch(body) -> Service:
    """Validate, record, render and submit a service. Raises a PortalError for bad input or a refused job."""
    config = current_app.config["PILOTFISH"]
    request = parse_launch_request(body, config)
    kind = get_kind(request.kind)
    runtime = runtime_for(config, kind)
    cap = config.job_time_limit_cap
    if cap is not None and request.time > cap:
        request.resources.time = request.time = cap

    service_id = secrets.token_hex(6)
    job_dir = config.jobs_dir / service_id
    service = Service(
        id=service_id,
        name=request.name or f"{request.kind}-{request.model.rsplit('/', 1)[-1]}"[:100],
        kind=request.kind,
        model=request.model,
        revision=request.revision,
        state=State.SUBMITTED,
        reason="submitting",
        scheduler=config.scheduler,
        job_dir=str(job_dir),
        resources_json=_resources_json(request.resources),
        engine_args_json=json.dumps(request.engine_args),
        time_limit=request.time,
        api_key=secrets.token_urlsafe(32),
    )
    job_dir.mkdir(parents=True, mode=0o700)
    _write_private(job_dir / "service.key", service.api_key)
    script = job_dir / "job.sh"
    _write_private(script, render_job_script(service, runtime), 0o700)
    db.session.add(service)
    db.session.commit()

    try:
        job_id = _scheduler().submit(script, job_dir, job_name(service), request.resources)
    except SubmissionRejected as exc:
        transition(service, State.FAILED, f"{config.scheduler} rejected the job: {exc}")
        db.session.commit()
        raise RejectedError(f"{config.scheduler} rejected the job: {exc}", service=service.to_dict())
    except SchedulerUnreachable as exc:
        transition(service, State.FAILED, f"could not submit: {exc}")
        db.session.commit()
        raise UnavailableError(f"could not submit: {exc}", service=service.to_dict())
    service.job_id = job_id
    service.submitted_at = utcnow()
    db.session.add(Event(service_id=service.id, at=service.submitted_at, from_state=None, to_state=State.SUBMITTED,
                         reason=f"submitted to {config.scheduler} as job {job_id}"))
    service.reason = f"submitted as job {job_id}"
    db.session.commit()
    _wake_reconciler()
    return service


def _resources_json(resources: Resources) -> str:
    data = {key: value for key, value in vars(resources).items() if value not in (None, {}, 0) or key == "time"}
    return json.dumps(data)


def list_services(state: Optional[str] = None) -> List[Service]:
    query = Service.query
    if state:
        states = [part.strip().upper() for part in state.split(",") if part.strip()]
        bad = [part for part in states if part not in State.ALL and part not in ("LIVE", "ENDED")]
        if bad:
            raise ValidationError("state", f"expected some of {', '.join(State.ALL)}, LIVE or ENDED, got {bad[0]!r}")
        expanded = set()
        for part in states:
            expanded.update(State.LIVE if part == "LIVE" else State.TERMINAL if part == "ENDED" else (part,))
        query = query.filter(Service.state.in_(sorted(expanded)))
    return query.order_by(Service.created_at.desc()).all()


def get_service(id_or_prefix: str) -> Service:
    """A service by its id or any unique prefix of it."""
    if not re.fullmatch(r"[0-9a-f]{1,16}", id_or_prefix or ""):
        raise NotFoundError(f"no service {id_or_prefix!r}")
    service = db.session.get(Service, id_or_prefix)
    if service is not None:
        return service
    matches = Service.query.filter(Service.id.startswith(id_or_prefix)).limit(5).all()
    if not matches:
        raise NotFoundError(f"no service {id_or_prefix!r}")
    if len(matches) > 1:
        raise ValidationError("id", f"{id_or_prefix!r} matches several services: {', '.join(m.id for m in matches)}")
    return matches[0]


def stop(service: Service) -> Service:
    """Cancel the service's job. The reconciler records STOPPED once the scheduler confirms."""
    if not service.is_live:
        return service
    if not service.job_id:
        transition(service, State.STOPPED, "stopped by user before its job was submitted")
        db.session.commit()
        return service
    try:
        _scheduler().cancel(service.job_id, Path(service.job_dir))
    except SchedulerUnreachable as exc:
        raise UnavailableError(f"could not stop: {exc}")
    except SubmissionRejected as exc:
        raise RejectedError(f"the scheduler refused to cancel job {service.job_id}: {exc}")
    service.stop_requested = True
    db.session.commit()
    _wake_reconciler()
    return service


def delete(service: Service) -> None:
    """Remove a service that has ended, with its job directory."""
    if service.is_live:
        raise ConflictError(f"service {service.id} is {service.state}: stop it before deleting it")
    shutil.rmtree(service.job_dir, ignore_errors=True)
    db.session.delete(service)
    db.session.commit()


def read_log(service: Service, tail: int = 200) -> str:
    if tail < 1 or tail > 100000:
        raise ValidationError("tail", "expected a number of lines between 1 and 100000")
    text = read_tail(Path(service.job_dir) / "job.log", max_bytes=max(16384, tail * 400))
    lines = text.splitlines()
    return "\n".join(lines[-tail:]) + ("\n" if lines else "")
