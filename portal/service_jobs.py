"""A service's jobs besides its current one (ServiceJob rows): a renewal's successor, replicas, and jobs draining their
open requests. Each runs the service's first job script again in a folder of its own (`generation-N` inside the
service's), with the service's key and certificate; the reconciler follows them in its one scheduler query
(`follow_jobs`: start, endpoint, an end before they answered, a drain's end), probes them with the services, and
`swap_in` makes one of them the service's current job (a renewal's handover, a replica taking over from a dead job).
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Dict, List, Optional

from .lifetimes import successor_minutes
from .models import Service, ServiceJob, State, generation_dir, utcnow
from .scheduler import JobInfo, JobState, Resources, SchedulerUnreachable, SubmissionRejected
from .scheduler.job_files import read_endpoint, read_exit_code
from .services import current_scheduler, end_job, job_name, log_excerpt, note_event, write_private
from .states import JobFacts, after_job

log = logging.getLogger(__name__)
WHAT = {ServiceJob.SUCCESSOR: "successor", ServiceJob.REPLICA: "replica"}  # a job's role, in events


def submit_job(service: Service, phase: str, session_end: Optional[datetime], avoid=()) -> ServiceJob:
    """Submit another job of `service` (a renewal's successor, or a replica): its first job's script again, in a
    folder of its own, with the service's resources (the time limit cut to what is left of a renewal, and of the
    portal's own session), away from the nodes in `avoid` if its partitions have others (else anywhere). Raises
    SubmissionRejected or SchedulerUnreachable; the caller commits."""
    try:
        generation, job_id, minutes, now = _submit(service, session_end, sorted(set(avoid)))
    except SubmissionRejected:
        if not avoid:
            raise
        generation, job_id, minutes, now = _submit(service, session_end)  # no other node: anywhere
    job = ServiceJob(service_id=service.id, generation=generation, phase=phase, job_id=job_id, time_limit=minutes,
                     submitted_at=now, health_failures=0)
    service.jobs.append(job)
    return job


def _submit(service: Service, session_end: Optional[datetime], avoid=()) -> tuple:
    """Submit the service's next generation (not on the nodes in `avoid`); (generation, job id, time limit in
    minutes, when)."""
    generation = max([service.generation] + [job.generation for job in service.jobs]) + 1
    run_dir = Path(generation_dir(service.job_dir, generation))
    run_dir.mkdir(mode=0o700, exist_ok=True)
    script = run_dir / "job.sh"
    write_private(script, (Path(service.job_dir) / "job.sh").read_text(), 0o700)
    now = utcnow()
    minutes = successor_minutes(service, now, session_end)
    resources = Resources(**{**service.resources, "time": minutes, "exclude": ",".join(avoid) or None})
    job_id = current_scheduler().submit(script, run_dir, job_name(service), resources)
    return generation, job_id, minutes, now


def submit_current(service: Service, session_end: Optional[datetime]) -> None:
    """Submit a new current job for a service that has none (scaled to zero). Raises SubmissionRejected or
    SchedulerUnreachable; the caller moves its state and commits."""
    generation, job_id, minutes, now = _submit(service, session_end)
    set_job(service, generation=generation, job_id=job_id, time_limit=minutes, submitted_at=now)


def set_job(service: Service, **fields) -> None:
    """The service's current job becomes the one `fields` describe (the other job fields cleared)."""
    for name in ServiceJob.JOB_FIELDS:
        setattr(service, name, fields.get(name, 0 if name == "health_failures" else None))


def set_aside(service: Service) -> ServiceJob:
    """The service's current job moved to a row of its own (to drain it); the service keeps no job."""
    job = ServiceJob(service_id=service.id, phase=ServiceJob.DRAINING,
                     **{name: getattr(service, name) for name in ServiceJob.JOB_FIELDS})
    service.jobs.append(job)
    set_job(service, generation=service.generation, time_limit=service.time_limit)
    return job


def swap_in(service: Service, job: ServiceJob) -> None:
    """`job` becomes the service's current job, and its row holds the one it replaced."""
    for name in ServiceJob.JOB_FIELDS:
        current = getattr(service, name)
        setattr(service, name, getattr(job, name))
        setattr(job, name, current)


def drain(service: Service, job: ServiceJob, seconds: float, ends: Optional[datetime] = None) -> float:
    """`job` takes no new requests (from the proxies' next route reload on) and finishes those it has for up to
    `seconds` (no later than `ends`), then is cancelled (follow_jobs). Returns the drain's length in seconds."""
    now = utcnow()
    job.phase = ServiceJob.DRAINING
    job.drain_until = now + timedelta(seconds=seconds)
    if ends is not None:
        job.drain_until = min(job.drain_until, ends)
    return max(0.0, (job.drain_until - now).total_seconds())


def forget_endpoint(job) -> None:
    """A job that was requeued (preempted) will listen elsewhere when it runs again: its endpoint is forgotten (the
    file too, so the old one is not read back), for the service's current job or another alike."""
    try:
        (Path(job.run_dir) / "endpoint.json").unlink()
    except FileNotFoundError:
        pass
    job.host = job.port = job.endpoint_at = None
    job.health_failures = 0


def follow_jobs(others: List[ServiceJob], infos: Dict[str, JobInfo]) -> int:
    """A service's other jobs, from the scheduler's news (`infos`): the start and endpoint of a successor or replica
    (its health is probed with the services'), or its end (before it answered, or while serving); a draining job
    cancelled at the end of its drain; any of them ended with their service; one requeued (preempted) followed back
    from the queue. A cancel the scheduler does not answer is tried again next cycle. Returns the number of route
    changes (a serving replica requeued)."""
    now = utcnow()
    changes = 0
    for job in others:
        if not job.is_live:
            continue  # ended in this cycle (a takeover)
        service, info = job.service, infos.get(job.job_id)
        try:
            if not service.is_live:
                end_job(job, ServiceJob.ENDED, f"the service ended ({service.state})")
            elif job.phase == ServiceJob.DRAINING:
                if info is not None and info.state.finished:
                    end_job(job, ServiceJob.ENDED, f"its job ended ({info.detail or info.state.value})", cancel=False)
                elif job.drain_until is None or now >= job.drain_until:
                    end_job(job, ServiceJob.ENDED, "cancelled after its drain")
                    note_event(service, f"job {job.job_id} (generation {job.generation}) cancelled after its drain")
            elif info is not None and info.state.finished:
                facts = JobFacts(job_id=job.job_id, state=info.state, detail=info.detail, node=info.node,
                                 known_node=job.node, time_limit=job.time_limit,
                                 exit_code=read_exit_code(Path(job.run_dir)), log_excerpt=log_excerpt(job))
                words = after_job(State.RUNNING, facts)[1]
                what, when = WHAT.get(job.phase, "job"), "while serving" if job.ready_at else "before it answered"
                end_job(job, ServiceJob.FAILED, words, cancel=False)
                note_event(service, f"{what} generation {job.generation} (job {job.job_id}) ended {when}: {words}")
            elif info is not None and info.state is JobState.PENDING and job.job_started_at is not None:
                changes += job.serving
                forget_endpoint(job)
                job.job_started_at = job.ready_at = None
                note_event(service, f"{WHAT.get(job.phase, 'job')} generation {job.generation} (job {job.job_id}) was "
                                    f"requeued (preempted): waiting in the queue again")
            elif info is not None and info.state is JobState.RUNNING:
                if info.node and job.node != info.node:
                    job.node = info.node
                if job.job_started_at is None:
                    job.job_started_at = now
                if not job.port:
                    endpoint = read_endpoint(job.run_dir)
                    if endpoint:
                        job.host, job.port = endpoint
                        job.endpoint_at = now
        except (SchedulerUnreachable, SubmissionRejected) as exc:
            log.warning("service %s: job %s not cancelled, tried again next cycle: %s", service.id, job.job_id, exc)
    return changes
