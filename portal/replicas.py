"""Replicas kept by the reconciler (the rules: portal/scaling.py): at least the minimum, one more while requests in
flight per job stay above the target, one fewer after a quiet spell (it drains like a renewal's replaced job), a
replica that stops answering cancelled and replaced, and a serving replica taking over when the service's current
job dies (`promote`), so the service stays RUNNING; with a minimum of 0, no job while unused (`scale_to_zero`) until a
request asks for one (`wake`)."""
from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Dict, List, Optional

from .models import Service, ServiceJob, State, utcnow
from .scaling import TARGET_IN_FLIGHT_DEFAULT, Trend, read_load, scale_step, take_wakes
from .scheduler import SchedulerUnreachable, SubmissionRejected
from .service_jobs import drain, forget_endpoint, set_aside, submit_current, submit_job, swap_in
from .services import end_job, note_event, transition
from .states import IMPOSTOR, REFUSED

log = logging.getLogger(__name__)


def promote(service: Service, replica: ServiceJob, words: str, cancel: bool) -> None:
    """The service's current job died (`words`: how): a serving replica becomes its current job; the dead one is
    recorded as failed (and cancelled when `cancel`: it may still run). The service is RUNNING."""
    swap_in(service, replica)
    end_job(replica, ServiceJob.FAILED, words, cancel=cancel)
    reason = (f"replica generation {service.generation} (job {service.job_id} on {service.node or 'a node'}) took "
              f"over from job {replica.job_id}: {words}")
    if not transition(service, State.RUNNING, reason):
        note_event(service, reason)


def take_over_requeued(service: Service, replica: ServiceJob) -> None:
    """The service's current job was requeued (preempted): a serving replica becomes its current job, and the requeued
    one a replica, followed back from the queue."""
    forget_endpoint(service)
    swap_in(service, replica)
    replica.job_started_at = replica.ready_at = None
    note_event(service, f"job {replica.job_id} was requeued (preempted): replica generation {service.generation} "
                        f"(job {service.job_id}) took over; job {replica.job_id} comes back as a replica")


def scale_to_zero(service: Service, why: str, drain_seconds: float) -> None:
    """A quiet service with a minimum of 0 gives up its last job (it drains, then is cancelled): SCALED_TO_ZERO until a
    request wakes it."""
    job = set_aside(service)
    seconds = drain(service, job, drain_seconds)
    transition(service, State.SCALED_TO_ZERO, f"no job while unused ({why}); job {job.job_id} finishes its open "
                                              f"requests for up to {seconds:g} s; the next request starts a job")


def wake(service: Service, session_end: Optional[datetime]) -> None:
    """A request came for a service scaled to zero: its next job is submitted (SUBMITTED, then as a launch's)."""
    submit_current(service, session_end)
    transition(service, State.SUBMITTED, f"woken by a request: generation {service.generation} submitted as job "
                                         f"{service.job_id}")


class Replicas:
    """The reconciler's replica keeping, with each service's load trend between cycles."""

    def __init__(self, config):
        self.config = config
        self.trends: Dict[str, Trend] = {}

    def keep(self, services: List[Service], others: List[ServiceJob], session_end: Optional[datetime]) -> int:
        """Add or remove replicas of the services that have them (see scale_step); returns the number of route
        changes (a removed replica drains: the proxies stop sending it requests)."""
        scaled = [service for service in services if service.replicas_max]
        if not scaled:
            self.trends.clear()
            return 0
        load = read_load(self.config.home)
        woken = take_wakes(self.config.home)
        now = time.monotonic()
        changes = 0
        for service in scaled:
            if service.state == State.SCALED_TO_ZERO and service.id in woken and not service.stop_requested:
                try:
                    wake(service, session_end)
                except (SchedulerUnreachable, SubmissionRejected) as exc:
                    log.warning("service %s: not woken (%s), tried again at the next request", service.id, exc)
                    continue
                changes += 1
                self.trends.pop(service.id, None)
                continue
            if service.state != State.RUNNING or service.stop_requested:
                continue
            replicas = [job for job in others if job.service_id == service.id and job.phase == ServiceJob.REPLICA]
            serving = 1 + sum(job.serving for job in replicas)
            coming = sum(not job.serving for job in replicas)
            trend = self.trends.setdefault(service.id, Trend())
            step, why = scale_step(service.replicas_min, service.replicas_max, service.target_in_flight or
                                   TARGET_IN_FLIGHT_DEFAULT, serving, coming, load.get(service.id, 0), now, trend,
                                   self.config.scale_up_window, self.config.scale_down_window)
            for _ in range(max(0, step)):
                try:
                    replica = submit_job(service, ServiceJob.REPLICA, session_end,
                                         avoid=[node for node in [service.node] + [job.node for job in replicas]
                                                if node])
                except (SchedulerUnreachable, SubmissionRejected) as exc:
                    log.warning("service %s: replica not submitted (%s), tried again next cycle", service.id, exc)
                    break
                others.append(replica)
                note_event(service, f"replica generation {replica.generation} submitted as job {replica.job_id} "
                                    f"({why})")
            if step < 0 and not any(job.serving for job in replicas):
                scale_to_zero(service, why, self.config.drain_timeout)
                changes += 1
            elif step < 0:
                newest = max((job for job in replicas if job.serving), key=lambda job: job.generation)
                seconds = drain(service, newest, self.config.drain_timeout)
                note_event(service, f"replica generation {newest.generation} (job {newest.job_id}) removed ({why}); "
                                    f"it finishes its open requests for up to {seconds:g} s")
                changes += 1
        for gone in set(self.trends) - {service.id for service in scaled}:
            del self.trends[gone]
        return changes

    def probed(self, replica: ServiceJob, ok: bool, detail: str) -> int:
        """A replica's health probe: the first success makes it serve; once serving, a refused connection, another
        program on its port, or `unhealthy_after` failures end it (cancelled; replaced while below the minimum).
        Returns 1 when its routes change."""
        service = replica.service
        if ok:
            replica.health_failures = 0
            if replica.ready_at is None:
                replica.ready_at = utcnow()
                note_event(service, f"replica generation {replica.generation} (job {replica.job_id} on "
                                    f"{replica.node or 'a node'}) serves")
                return 1
            return 0
        if replica.ready_at is None:
            return 0  # still loading its model
        replica.health_failures += 1
        if detail in (REFUSED, IMPOSTOR) or replica.health_failures >= self.config.unhealthy_after:
            try:
                end_job(replica, ServiceJob.FAILED, f"stopped answering ({detail})")
            except (SchedulerUnreachable, SubmissionRejected) as exc:
                log.warning("service %s: replica job %s not cancelled: %s", service.id, replica.job_id, exc)
                return 0
            note_event(service, f"replica generation {replica.generation} (job {replica.job_id}) stopped answering "
                                f"({detail}): cancelled")
            return 1
        return 0
