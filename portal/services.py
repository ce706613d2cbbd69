"""The service lifecycle: launch (plan, record, submit), state transitions, stop, delete, logs."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from datetime import timedelta
from pathlib import Path
from typing import List, Optional

from flask import current_app

from . import provenance
from .db import db
from .errors import ConflictError, NotFoundError, RejectedError, UnavailableError, ValidationError
from .launching import parse_launch_request, plan_launch, render_job_script, resources_dict
from .lifetimes import parse_renewal
from .models import Event, Service, ServiceJob, State, utcnow
from .scheduler import JobQuery, SchedulerUnreachable, SubmissionRejected
from .scheduler.job_files import read_tail
from .service_tls import make_certificate
from .states import check_move

SUBMISSION_GRACE = timedelta(minutes=2)


def job_name(service: Service) -> str:
    return f"pilotfish-{service.id}"


def job_query(job) -> JobQuery:
    """What the scheduler is asked of a job: a service's current one, or another of a renewed service (ServiceJob)."""
    service = job if isinstance(job, Service) else job.service
    return JobQuery(job_id=job.job_id, name=job_name(service), submitted_at=job.submitted_at or service.created_at,
                    job_dir=Path(job.run_dir))


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


# --- state --------------------------------------------------------------------------------------------

def transition(service: Service, to_state: str, reason: str) -> bool:
    """Move a service to `to_state`, recording an event with the reason. Returns False if nothing changed; raises
    IllegalTransition for a move portal.states.TRANSITIONS does not allow."""
    if service.state == to_state:
        return False
    check_move(service.state, to_state)
    to_state = State(to_state).value  # the column holds the plain string
    now = utcnow()
    db.session.add(Event(service_id=service.id, at=now, from_state=service.state, to_state=to_state, reason=reason))
    service.state = to_state
    service.reason = reason
    if to_state == State.RUNNING and service.ready_at is None:
        service.ready_at = now
    if to_state in State.TERMINAL:
        service.ended_at = now
    return True


def log_excerpt(job, lines: int = 5, max_chars: int = 800) -> str:
    """The last meaningful lines of a job's log (a service's current job, or a ServiceJob), for failure reasons."""
    text = read_tail(Path(job.run_dir) / "job.log", 8192)
    kept = [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]
    excerpt = " | ".join(kept)
    return excerpt[-max_chars:]


# --- operations used by the API, the UI and the CLI ---------------------------------------------------

def current_scheduler():
    return current_app.extensions["pilotfish.scheduler"]


def _wake_reconciler() -> None:
    reconciler = current_app.extensions.get("pilotfish.reconciler")
    if reconciler is not None:
        reconciler.wake()


def dry_run(body, principal: Optional[str]) -> dict:
    """What a launch would do, without recording or submitting anything. `principal`: who asks (see plan_launch)."""
    config = current_app.config["PILOTFISH"]
    plan = plan_launch(parse_launch_request(body), config, principal)
    service = Service(id="dryrun000000", kind=plan.request.kind, model=plan.model.repo_id,
                      revision=plan.model.revision, job_dir=str(config.jobs_dir / "<id>"), engine_args_json="[]")
    return {**plan.to_dict(), "job_script": render_job_script(service, plan)}


def launch(body, principal: Optional[str]) -> Service:
    """Validate, plan, record, render and submit a service. Raises a PortalError for bad input or a refused job.
    `principal`: who asks ("owner" or "key:<name>"); flags that run code or read files are the owner's alone."""
    config = current_app.config["PILOTFISH"]
    plan = plan_launch(parse_launch_request(body), config, principal)
    request = plan.request

    service_id = secrets.token_hex(6)
    job_dir = config.jobs_dir / service_id
    service = Service(
        id=service_id,
        name=request.name or f"{request.kind}-{request.model.rsplit('/', 1)[-1]}"[:100],
        kind=request.kind,
        engine=plan.runtime.engine.name,
        health_path=plan.runtime.health_path,
        model=plan.model.repo_id,
        revision=plan.model.revision,
        tier=plan.tier.ref if plan.tier else None,
        state=State.SUBMITTED,
        reason="submitting",
        scheduler=config.scheduler,
        job_dir=str(job_dir),
        resources_json=json.dumps(resources_dict(plan.resources)),
        engine_args_json=json.dumps(request.engine_args),
        adapters_json=json.dumps([adapter.name for adapter in plan.adapters]),
        time_limit=plan.resources.time,
        api_key=secrets.token_urlsafe(32),
        idle_timeout=plan.idle_timeout,
        lease_seconds=request.lease,
    )
    service.renew, service.renew_until = parse_renewal(request.renew, utcnow())
    if request.replicas:
        service.replicas_min, service.replicas_max, service.target_in_flight = request.replicas
    job_dir.mkdir(parents=True, mode=0o700)
    write_private(job_dir / "service.key", service.api_key)
    service.tls_fingerprint = make_certificate(job_dir, service_id)
    script = job_dir / "job.sh"
    write_private(script, render_job_script(service, plan), 0o700)
    provenance.record(service, plan, current_scheduler().arguments(plan.resources, job_dir, job_name(service)),
                      sha256_cache(config))
    db.session.add(service)
    db.session.commit()
    tier_note = f"tier {service.tier}: {plan.tier_reason}" if plan.tier else "explicit resources"
    if plan.idle_timeout:
        tier_note += f"; {plan.idle_timeout_reason}"
    if request.lease:
        tier_note += f"; a lease of {request.lease} s"
    if request.replicas:
        tier_note += f"; {service.replicas_min} to {service.replicas_max} jobs ({service.target_in_flight} requests " \
                     f"in flight per job)"
    if service.renew:
        tier_note += "; renewed before its time limit" + (
            f" until {service.renew_until:%Y-%m-%d %H:%M} UTC" if service.renew_until else " until stopped")

    try:
        job_id = current_scheduler().submit(script, job_dir, job_name(service), plan.resources)
    except SubmissionRejected as exc:
        service.state = None  # the first event records the refusal
        transition(service, State.FAILED, f"{config.scheduler} rejected the job: {exc}")
        db.session.commit()
        _wake_reconciler()  # services by state changed
        raise RejectedError(f"{config.scheduler} rejected the job: {exc}", service=service.to_dict())
    except SchedulerUnreachable as exc:
        service.state = None
        transition(service, State.FAILED, f"could not submit: {exc}")
        db.session.commit()
        _wake_reconciler()
        raise UnavailableError(f"could not submit: {exc}", service=service.to_dict())
    service.job_id = job_id
    service.submitted_at = utcnow()
    db.session.add(Event(service_id=service.id, at=service.submitted_at, from_state=None, to_state=State.SUBMITTED,
                         reason=f"submitted to {config.scheduler} as job {job_id} ({tier_note})"))
    service.reason = f"submitted as job {job_id}"
    db.session.commit()
    _wake_reconciler()
    return service


def sha256_cache(config) -> Path:
    """Where the sha256s of model files without a blob name (and of images) are remembered (portal/provenance.py)."""
    return config.home / provenance.CACHE_NAME


def read_provenance(service: Service) -> dict:
    """The service's provenance (sha256s computed once where they were not yet known), recipe and methods paragraph."""
    return provenance.read(service, sha256_cache(current_app.config["PILOTFISH"]))


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


def stop(service: Service, reason: Optional[str] = None) -> Service:
    """Cancel the service's job. The reconciler records STOPPED once the scheduler confirms, with `reason` when the
    portal itself stops it ("idle for 30 min", recorded at once as an event too), else "stopped by user"."""
    if not service.is_live:
        return service
    if not service.job_id:  # a job it set aside (scaled to zero) is ended by the reconciler's next cycle
        transition(service, State.STOPPED, reason or ("stopped by user" if service.state == State.SCALED_TO_ZERO
                                                      else "stopped by user before its job was submitted"))
        db.session.commit()
        _wake_reconciler()
        return service
    try:
        for job in service.jobs:  # a renewed service's successor and draining predecessors go with it
            if job.is_live:
                end_job(job, ServiceJob.ENDED, f"the service was stopped ({reason or 'stopped by user'})")
        current_scheduler().cancel(service.job_id, Path(service.run_dir))
    except SchedulerUnreachable as exc:
        raise UnavailableError(f"could not stop: {exc}")
    except SubmissionRejected as exc:
        raise RejectedError(f"the scheduler refused to cancel job {service.job_id}: {exc}")
    if reason and not service.stop_requested:
        note_event(service, f"stopping: {reason}")
        service.stop_reason = reason
    service.stop_requested = True
    db.session.commit()
    _wake_reconciler()
    return service


def renew_lease(service: Service) -> Service:
    """Renew a live service's lease from now (its holder's heartbeat); ConflictError for a service without a lease, or
    that has ended or is stopping."""
    if not service.lease_seconds:
        raise ConflictError(f"service {service.id} has no lease (launch it with a lease to renew one)")
    if not service.is_live:
        raise ConflictError(f"service {service.id} has ended ({service.state}: {service.reason or 'no reason given'})")
    if service.stop_requested:
        raise ConflictError(f"service {service.id} is stopping ({service.stop_reason or 'stopped by user'})")
    service.lease_renewed_at = utcnow()
    db.session.commit()
    return service


def delete(service: Service) -> None:
    """Remove a service that has ended, with its job directory."""
    if service.is_live:
        raise ConflictError(f"service {service.id} is {service.state}: stop it before deleting it")
    shutil.rmtree(service.job_dir, ignore_errors=True)
    db.session.delete(service)
    db.session.commit()
    _wake_reconciler()  # services by state changed


def prune() -> List[str]:
    """Remove every ended service with its job directory; returns the ids removed."""
    removed = []
    for service in Service.query.filter(Service.state.in_(State.TERMINAL)).all():
        shutil.rmtree(service.job_dir, ignore_errors=True)
        db.session.delete(service)
        removed.append(service.id)
    db.session.commit()
    if removed:
        _wake_reconciler()
    return removed


def read_job_script(service: Service) -> str:
    """The job script submitted for the service ('' once its job directory is gone)."""
    return read_tail(Path(service.run_dir) / "job.sh", max_bytes=256 * 1024)


def read_log(service: Service, tail: int = 200) -> str:
    if tail < 1 or tail > 100000:
        raise ValidationError("tail", "expected a number of lines between 1 and 100000")
    text = read_tail(Path(service.run_dir) / "job.log", max_bytes=max(16384, tail * 400))
    lines = text.splitlines()
    return "\n".join(lines[-tail:]) + ("\n" if lines else "")


# --- renewal: the jobs of a service that outlives one job's time limit --------------------------------------------

def note_event(service: Service, reason: str) -> None:
    """An event that changes no state: a renewal's step."""
    db.session.add(Event(service_id=service.id, at=utcnow(), from_state=service.state, to_state=service.state,
                         reason=reason))


def end_job(job: ServiceJob, phase: str, reason: str, cancel: bool = True) -> None:
    """End another job of a renewed service (drained, stopped with its service, or failed): cancelled if it may still
    run. Raises SchedulerUnreachable or SubmissionRejected when the cancel fails (nothing recorded then)."""
    if cancel and job.job_id:
        current_scheduler().cancel(job.job_id, Path(job.run_dir))
    job.phase, job.ended_at, job.reason = phase, utcnow(), reason
