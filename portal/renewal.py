"""Renewal: a service that outlives one job's time limit, at the same id and URLs.

Before the current job's time limit (portal/lifetimes.py decides when: `successor_due`), the reconciler submits the
next generation: the first job's script again, in a folder of its own (`generation-N` inside the service's), with the
service's key and certificate. It follows that successor (its job, endpoint and health probe, with the services');
once it answers, `hand_over` makes it the service's current job, so each proxy's next route reload sends new requests
to it, while the job it replaced finishes the requests it has for up to `drain_timeout` seconds (never past its own
time limit) and is then cancelled. Each step is an event of the service. A service whose job ends before its
successor answered takes the successor at once and is UNHEALTHY until it answers (`take_over_late`). Successors that
end before they answer, RENEWAL_ATTEMPTS in a row, or one the scheduler refuses, end the renewal.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Dict, List, Optional

from .lifetimes import duration_words, job_end, successor_due, successor_minutes
from .models import Service, ServiceJob, State, generation_dir, utcnow
from .scheduler import JobInfo, JobState, Resources, SchedulerUnreachable, SubmissionRejected
from .scheduler.job_files import read_endpoint, read_exit_code
from .services import current_scheduler, end_job, job_name, log_excerpt, note_event, transition, write_private
from .states import JobFacts, after_job

log = logging.getLogger(__name__)
RENEWAL_ATTEMPTS = 2  # successors in a row that end before they answer: the service stops renewing


def _clock(moment: datetime) -> str:
    return f"{moment:%H:%M:%S} UTC"


def submit_successor(service: Service, session_end: Optional[datetime]) -> ServiceJob:
    """Submit the next generation of a renewed service: its first job's script again, in a folder of its own, with
    the service's resources (the time limit cut to what is left of the renewal). Raises SubmissionRejected or
    SchedulerUnreachable; the caller commits."""
    generation = max([service.generation] + [job.generation for job in service.jobs]) + 1
    run_dir = Path(generation_dir(service.job_dir, generation))
    run_dir.mkdir(mode=0o700, exist_ok=True)
    script = run_dir / "job.sh"
    write_private(script, (Path(service.job_dir) / "job.sh").read_text(), 0o700)
    now = utcnow()
    minutes = successor_minutes(service, now, session_end)
    resources = Resources(**{**service.resources, "time": minutes})
    job_id = current_scheduler().submit(script, run_dir, job_name(service), resources)
    successor = ServiceJob(service_id=service.id, generation=generation, phase=ServiceJob.SUCCESSOR, job_id=job_id,
                           time_limit=minutes, submitted_at=now, health_failures=0)
    service.jobs.append(successor)
    ends = job_end(service)
    note_event(service, f"renewal: generation {generation} submitted as job {job_id} ({minutes} min; job "
                        f"{service.job_id} ends at {_clock(ends) if ends else 'its time limit'})")
    return successor


def _swap_jobs(service: Service, job: ServiceJob) -> None:
    """The service's current job becomes `job`'s, and `job` holds the one it replaced."""
    for name in ServiceJob.JOB_FIELDS:
        current = getattr(service, name)
        setattr(service, name, getattr(job, name))
        setattr(job, name, current)


def hand_over(service: Service, successor: ServiceJob, drain_seconds: float) -> None:
    """The successor answers its health check: it becomes the service's current job (new requests go to it from the
    proxies' next route reload on); the job it replaced drains: it finishes the requests it has for up to
    `drain_seconds`, and no later than its own time limit. The caller commits and tells the proxies."""
    now = utcnow()
    _swap_jobs(service, successor)
    previous = successor
    previous.phase = ServiceJob.DRAINING
    previous.drain_until = min(now + timedelta(seconds=drain_seconds), job_end(previous) or now)
    drain = max(0.0, (previous.drain_until - now).total_seconds())
    note_event(service, f"generation {service.generation} (job {service.job_id} on {service.node or 'a node'}) "
                        f"took over from job {previous.job_id}, which finishes its open requests for up to "
                        f"{duration_words(drain)}")


def take_over_late(service: Service, successor: ServiceJob, words: str) -> None:
    """The service's job ended (`words`: how) before its successor answered: the successor becomes the current job
    at once and the service is UNHEALTHY until it answers (the reconciler follows it as any job)."""
    _swap_jobs(service, successor)
    successor.phase, successor.ended_at, successor.reason = ServiceJob.ENDED, utcnow(), words
    transition(service, State.UNHEALTHY, f"job {successor.job_id} ended ({words}) before its successor answered: "
                                         f"waiting for generation {service.generation} (job {service.job_id})")


def submit_due_successors(services: List[Service], others: List[ServiceJob], drain_seconds: float,
                          session_end: Optional[datetime]) -> None:
    """Submit a successor for each renewed service whose job nears its time limit. A successor refused by the
    scheduler ends the renewal; one the scheduler did not answer for is tried again next cycle. New successors are
    added to `others`."""
    now = utcnow()
    coming = {job.service_id for job in others if job.phase == ServiceJob.SUCCESSOR}
    for service in services:
        if service.id in coming or not successor_due(service, now, drain_seconds, session_end):
            continue
        failed = [job for job in service.jobs if job.phase == ServiceJob.FAILED and job.generation > service.generation]
        if len(failed) >= RENEWAL_ATTEMPTS:
            service.renew = False
            note_event(service, f"renewal stopped: {len(failed)} successors in a row ended before they answered")
            continue
        try:
            successor = submit_successor(service, session_end)
        except SchedulerUnreachable as exc:
            log.warning("service %s: successor not submitted, tried again next cycle: %s", service.id, exc)
            continue
        except SubmissionRejected as exc:
            service.renew = False
            note_event(service, f"renewal stopped: {service.scheduler} rejected the successor job: {exc}")
            continue
        others.append(successor)
        log.info("service %s: generation %d submitted as job %s", service.id, successor.generation, successor.job_id)


def follow_other_jobs(others: List[ServiceJob], infos: Dict[str, JobInfo]) -> None:
    """A renewed service's other jobs, from the scheduler's news (`infos`): a successor's start and endpoint (its
    health is probed with the services'), or its end before it answered; a draining job cancelled at the end of its
    drain; any of them ended with their service. A cancel the scheduler does not answer is tried again next cycle."""
    now = utcnow()
    for job in others:
        if not job.is_live:
            continue  # ended in this cycle (a late takeover)
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
                end_job(job, ServiceJob.FAILED, words, cancel=False)
                note_event(service, f"renewal: generation {job.generation} ended before it answered: {words}")
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
