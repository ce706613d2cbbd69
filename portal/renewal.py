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
from datetime import datetime
from typing import List, Optional

from .lifetimes import duration_words, job_end, successor_due
from .models import Service, ServiceJob, State, utcnow
from .scheduler import SchedulerUnreachable, SubmissionRejected
from .service_jobs import drain, submit_job, swap_in
from .services import note_event, transition

log = logging.getLogger(__name__)
RENEWAL_ATTEMPTS = 2  # successors in a row that end before they answer: the service stops renewing


def _clock(moment: datetime) -> str:
    return f"{moment:%H:%M:%S} UTC"


def submit_successor(service: Service, session_end: Optional[datetime]) -> ServiceJob:
    """Submit the next generation of a renewed service (service_jobs.submit_job), recorded as an event."""
    successor = submit_job(service, ServiceJob.SUCCESSOR, session_end)
    ends = job_end(service)
    note_event(service, f"renewal: generation {successor.generation} submitted as job {successor.job_id} "
                        f"({successor.time_limit} min; job {service.job_id} ends at "
                        f"{_clock(ends) if ends else 'its time limit'})")
    return successor


def hand_over(service: Service, successor: ServiceJob, drain_seconds: float) -> None:
    """The successor answers its health check: it becomes the service's current job (new requests go to it from the
    proxies' next route reload on); the job it replaced drains: it finishes the requests it has for up to
    `drain_seconds`, and no later than its own time limit. The caller commits and tells the proxies."""
    swap_in(service, successor)
    seconds = drain(service, successor, drain_seconds, job_end(successor) or utcnow())
    note_event(service, f"generation {service.generation} (job {service.job_id} on {service.node or 'a node'}) "
                        f"took over from job {successor.job_id}, which finishes its open requests for up to "
                        f"{duration_words(seconds)}")


def take_over_late(service: Service, successor: ServiceJob, words: str) -> None:
    """The service's job ended (`words`: how) before its successor answered: the successor becomes the current job
    at once and the service is UNHEALTHY until it answers (the reconciler follows it as any job)."""
    swap_in(service, successor)
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
