"""The background loop that moves services through their states: one scheduler query per cycle, concurrent health probes.

It cycles only while something can change: every poll_interval while a service is live (fast_poll_interval while
one comes up or is unwell), so a job's end is seen within poll_interval; with no live service it waits until a
launch or a stop wakes it (in this worker at once; in the other worker through the wake mark, seen within
fast_poll_interval), with a cycle every IDLE_CYCLE_SECONDS for housekeeping. A cycle in which nothing changed
writes nothing: no database row, no discovery file. Each cycle also stops, as a user would, the services idle past
their idle timeout or whose lease lapsed (portal/lifetimes.py decides).
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, List, Optional

import urllib3
from sqlalchemy import select

from . import change_marks
from .batches.tracking import live_tasks as live_batch_tasks, track as track_batches
from .catalog.inventory import refresh_in_background
from .site import KINDS, runtime_for
from .db import db
from .errors import PortalError
from .lifetimes import due_stop
from .models import Condition, Service, ServiceJob, State, utcnow
from .monitoring import CycleMonitor, serving_targets, write_portal_target
from .proxy import routes_changed
from .scheduler import JobInfo, JobState, SchedulerUnreachable
from .scheduler.job_files import read_endpoint, read_exit_code
from .renewal import hand_over, submit_due_successors, take_over_late
from .replicas import Replicas, promote, take_over_requeued
from .service_jobs import follow_jobs, forget_endpoint
from .services import SUBMISSION_GRACE, job_query, log_excerpt, stop, transition
from .service_tls import client_context
from .states import IMPOSTOR, REFUSED, REQUEUED_FROM, JobFacts, after_job, after_probe

log = logging.getLogger(__name__)
SCHEDULER_CONDITION = "scheduler"
WAKE_MARK = change_marks.RECONCILER_WAKE  # in PILOTFISH_HOME: moved when a worker that does not lead wakes it
IDLE_CYCLE_SECONDS = 60.0  # with no live service, a cycle this often though nothing woke the reconciler
LOCK_RETRY_SECONDS = 2.0  # a worker that does not lead tries the lock this often (takes over when the leader goes)
CONDITION_REFRESH = timedelta(seconds=60)  # an unchanged condition's checked_at is rewritten at most this often
LIVE_SERVICES = select(Service).where(Service.state.in_(State.LIVE))  # built once: a cycle only runs it
# A renewed service's other jobs still to follow: its successor on the way up, its predecessors draining.
OTHER_LIVE_JOBS = select(ServiceJob).where(ServiceJob.phase.in_(ServiceJob.LIVE_PHASES))


@dataclass
class CycleReport:
    services: int = 0
    scheduler_calls: int = 0
    probes: int = 0
    transitions: int = 0
    seconds: float = 0.0
    scheduler_ok: bool = True
    busy: bool = False  # a service is on its way up (or unwell): poll fast
    batches: int = 0  # live batches (portal/batches/tracking.py): polled as live services are


def _refused(exc: BaseException) -> bool:
    """Whether a failed request met a closed port (nothing listens): ConnectionRefusedError somewhere in its causes
    (urllib3 raises NewConnectionError from it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ConnectionRefusedError):
            return True
        nested = getattr(exc, "reason", None) or (exc.args[0] if exc.args and isinstance(exc.args[0], BaseException)
                                                  else None)
        exc = nested or exc.__cause__ or exc.__context__
    return False


def set_condition(name: str, ok: bool, message: Optional[str]) -> datetime:
    """Record a condition; an unchanged one only has its checked_at renewed, at most every CONDITION_REFRESH (so a
    quiet cycle writes nothing). Returns its checked_at."""
    now = utcnow()
    condition = db.session.get(Condition, name)
    if condition is None:
        condition = Condition(name=name, ok=ok, message=message, since=now, checked_at=now)
        db.session.add(condition)
    elif condition.ok != ok or condition.message != message or not condition.checked_at \
            or now - condition.checked_at >= CONDITION_REFRESH:
        if condition.ok != ok:
            condition.since = now
        condition.ok, condition.message, condition.checked_at = ok, message, now
    return condition.checked_at


def conditions() -> Dict[str, dict]:
    return {condition.name: condition.to_dict() for condition in Condition.query.all()}


def wake_mark(home: Path) -> tuple:
    """The wake mark's state; it differs after every `touch_wake_mark`."""
    return change_marks.state(Path(home) / WAKE_MARK)


def touch_wake_mark(home: Path) -> None:
    """Move the wake mark, so the reconciler of whichever worker leads cycles within fast_poll_interval."""
    change_marks.move(Path(home) / WAKE_MARK)


class Reconciler:
    """Runs `cycle()` in one worker of the portal (the one holding the lock file): every poll_interval while a
    service is live, else when woken (see the module's description)."""

    def __init__(self, app):
        self.app = app
        self.config = app.config["PILOTFISH"]
        self.scheduler = app.extensions["pilotfish.scheduler"]
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock_fd: Optional[int] = None
        self._monitor = CycleMonitor(self.config.home)
        self._replicas = Replicas(self.config)  # replica keeping, with each service's load trend
        self.cycles = 0  # cycles run by this worker
        self._live: Optional[frozenset] = None  # (id, state) of the live services after the last cycle
        self._counted_at = float("-inf")  # when the services-by-state metric was last counted (monotonic)
        self._conditions: Dict[str, tuple] = {}  # name: (ok, message, monotonic time) of what this worker last wrote
        # Health paths are fixed once the site config is read; probes share one bounded pool for the portal's life.
        # For services recorded without their own health path.
        self._health_paths = {name: runtime_for(self.config, kind).health_path for name, kind in KINDS.items()}
        self._probe_pool = ThreadPoolExecutor(max_workers=self.config.health_concurrency,
                                              thread_name_prefix="pilotfish-probe")
        # Health probes go straight to the node, never through a proxy; TLS services are checked against their pin.
        self._probe_http = urllib3.PoolManager(num_pools=max(64, 4 * self.config.health_concurrency), maxsize=1,
                                               retries=False)

    # --- the loop -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pilotfish-reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)
        self._probe_pool.shutdown(wait=False)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def wake(self) -> None:
        """Cycle now: something changed (a launch, a stop, a deletion). In a worker that does not lead, through the
        wake mark, which the leader checks every fast_poll_interval."""
        self._wake.set()
        if not self.is_leader:
            touch_wake_mark(self.config.home)

    @property
    def is_leader(self) -> bool:
        return self._lock_fd is not None

    def _try_lock(self) -> bool:
        fd = os.open(self.config.reconciler_lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        log.info("reconciler: worker pid %d leads", os.getpid())
        refresh_in_background(self.app)  # the model inventory is rescanned at every portal start
        write_portal_target(self.config.home)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.is_leader and not self._try_lock():
                self._stop.wait(LOCK_RETRY_SECONDS)  # another worker reconciles; take over if it goes away
                continue
            woken = self._wake.is_set()
            self._wake.clear()
            mark = wake_mark(self.config.home)  # read before the cycle: a wake during it is not lost
            report = None
            try:
                with self.app.app_context():
                    report = self.cycle(recount=woken)
            except Exception:  # the loop must survive anything one cycle meets
                log.exception("reconcile cycle failed")
                self._conditions.clear()  # what it wrote may not have been committed
            if report is None or report.services or report.batches:
                interval = self.config.fast_poll_interval if report and report.busy else self.config.poll_interval
            else:
                interval = IDLE_CYCLE_SECONDS  # nothing live: nothing changes until a launch wakes us
            self._sleep(interval, mark)

    def _sleep(self, seconds: float, mark: tuple) -> None:
        """Until `seconds` have passed, wake() is called in this worker, or the wake mark moves (another worker's
        wake(), checked every fast_poll_interval: a stat, nothing more)."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or self._wake.wait(min(self.config.fast_poll_interval, left)):
                return
            if wake_mark(self.config.home) != mark:
                self._wake.set()
                return

    # --- one cycle ------------------------------------------------------------------------------------

    def cycle(self, recount: bool = True) -> CycleReport:
        """Bring every live service up to date. Must run inside an app context. The services-by-state metric is
        counted again when `recount`, when a service moved, when the live services differ from the last cycle's, and
        at least every IDLE_CYCLE_SECONDS."""
        started = time.monotonic()
        self.cycles += 1
        report = CycleReport()
        calls_before = getattr(self.scheduler, "calls", 0)
        services = db.session.scalars(LIVE_SERVICES).all()
        others = db.session.scalars(OTHER_LIVE_JOBS).all()
        report.services = len(services)
        tracked = [service for service in services if service.job_id] + [job for job in others if job.job_id]
        batches, batch_tasks = live_batch_tasks()  # asked in the same query
        infos: Dict[str, JobInfo] = {}
        if tracked or batch_tasks:
            try:
                infos = self.scheduler.query([job_query(job) for job in tracked] + batch_tasks)
                self._set_condition(SCHEDULER_CONDITION, True, None)
            except SchedulerUnreachable as exc:
                report.scheduler_ok = False
                self._set_condition(SCHEDULER_CONDITION, False, str(exc))
                log.warning("scheduler unreachable: %s", exc)
        elif SCHEDULER_CONDITION not in self._conditions and db.session.get(Condition, SCHEDULER_CONDITION) is None:
            self._set_condition(SCHEDULER_CONDITION, True, None)

        now = utcnow()
        for service in services:
            if not service.job_id:
                if service.state != State.SCALED_TO_ZERO and service.created_at < now - SUBMISSION_GRACE:
                    report.transitions += transition(service, State.FAILED,
                                                     "submission did not complete (the portal stopped while submitting)")
                continue
            info = infos.get(service.job_id)
            if info is None:
                continue
            if info.state.finished and not service.stop_requested and service.state in State.ROUTABLE:
                mine = [job for job in others if job.service_id == service.id]
                replica = next((job for job in mine if job.serving), None)
                successor = next((job for job in mine if job.phase == ServiceJob.SUCCESSOR), None)
                if replica is not None:  # a replica serves on: it becomes the current job
                    promote(service, replica, f"it ended ({info.detail or info.state.value})", cancel=False)
                elif successor is not None:
                    take_over_late(service, successor, info.detail or info.state.value)
                if replica is not None or successor is not None:
                    report.transitions += 1
                    continue
            if info.state is JobState.PENDING and service.state in REQUEUED_FROM and not service.stop_requested:
                replica = next((job for job in others if job.service_id == service.id and job.serving), None)
                if replica is not None:  # requeued (preempted): a serving replica takes over, it comes back as one
                    take_over_requeued(service, replica)
                    report.transitions += 1
                    continue
            report.transitions += self._apply(service, info)

        report.transitions += follow_jobs(others, infos)
        to_probe = [service for service in services
                    if service.state in State.PROBED and service.port]
        jobs = [job for job in others if job.phase in (ServiceJob.SUCCESSOR, ServiceJob.REPLICA) and job.port
                and job.service.state in State.ROUTABLE]
        if to_probe or jobs:
            report.probes = len(to_probe) + len(jobs)
            results = self._probe_all(to_probe + jobs)
            for service, (ok, detail) in zip(to_probe, results):
                report.transitions += self._apply_probe(service, ok, detail)
            for job, (ok, detail) in zip(jobs, results[len(to_probe):]):
                if job.phase == ServiceJob.REPLICA:
                    report.transitions += self._replicas.probed(job, ok, detail)
                elif ok:
                    job.ready_at = utcnow()
                    hand_over(job.service, job, self.config.drain_timeout)
                    report.transitions += 1  # the proxies route to the successor from their next reload
        for service in services:  # an unwell current job gives way to a serving replica, cancelled
            replica = next((job for job in others if job.service_id == service.id and job.serving), None)
            if service.state == State.UNHEALTHY and replica is not None and not service.stop_requested:
                promote(service, replica, service.reason or "unhealthy", cancel=True)
                report.transitions += 1
        submit_due_successors(services, others, self.config.drain_timeout, self._session_end())
        report.transitions += self._replicas.keep(services, others, self._session_end())
        served = serving_targets(services)  # read before the commit expires the rows
        live = frozenset((service.id, service.state) for service in services)
        report.busy = any(service.state in State.FAST_POLL for service in services) \
            or any(job.phase == ServiceJob.SUCCESSOR or (job.phase == ServiceJob.REPLICA and not job.serving)
                   for job in others)
        moment = utcnow()
        expired = [(service, reason) for service in services if (reason := due_stop(service, moment))]
        db.session.commit()  # writes only what changed (an unchanged cycle flushes nothing)
        report.batches = track_batches(self.scheduler, self.config, batches, infos).batches
        db.session.commit()
        for service, reason in expired:
            self._stop_unused(service, reason)
        if report.transitions:
            routes_changed(self.config.home)  # every worker's proxy reloads before its next request
        report.scheduler_calls = getattr(self.scheduler, "calls", 0) - calls_before
        report.seconds = time.monotonic() - started
        recount = recount or bool(report.transitions) or live != self._live \
            or time.monotonic() - self._counted_at >= IDLE_CYCLE_SECONDS
        self._live = live
        if recount:
            self._counted_at = time.monotonic()
        self._monitor.after_cycle(report, served, recount)
        return report

    def _session_end(self) -> Optional[datetime]:
        """When the portal's own job ends (naive UTC; None outside a job): nothing it starts outlives it."""
        deadline = self.config.job_deadline
        return datetime.fromtimestamp(deadline, timezone.utc).replace(tzinfo=None) if deadline is not None else None

    def _stop_unused(self, service: Service, reason: str) -> None:
        """Stop a service idle past its idle timeout or whose lease lapsed, the way its user would (portal.services):
        its job is cancelled and it ends STOPPED with `reason`; a scheduler that does not answer is tried again next
        cycle."""
        log.info("stopping service %s: %s", service.id, reason)
        try:
            stop(service, reason)
        except PortalError as exc:
            db.session.rollback()
            log.warning("could not stop service %s (%s): %s", service.id, reason, exc.message)

    def _set_condition(self, name: str, ok: bool, message: Optional[str]) -> None:
        """set_condition, without even reading the row while it is what this worker wrote under CONDITION_REFRESH
        ago (only the leading worker writes conditions)."""
        known = self._conditions.get(name)
        now = time.monotonic()
        if known and known[:2] == (ok, message) and now - known[2] < CONDITION_REFRESH.total_seconds():
            return
        checked_at = set_condition(name, ok, message)
        self._conditions[name] = (ok, message, now - max(0.0, (utcnow() - checked_at).total_seconds()))

    def _apply(self, service: Service, info: JobInfo) -> int:
        """Follow the job's news (the rules: portal.states.after_job); a running job also tells where it runs."""
        if info.state is JobState.RUNNING and info.node and service.node != info.node:
            service.node = info.node
        facts = JobFacts(job_id=service.job_id, state=info.state, detail=info.detail, node=info.node,
                         known_node=service.node, stop_requested=service.stop_requested,
                         stop_reason=service.stop_reason, time_limit=service.time_limit)
        if info.state.finished:  # a failure's reason names the server's exit code and its last log lines
            facts = replace(facts, exit_code=read_exit_code(Path(service.run_dir)), log_excerpt=log_excerpt(service))
        move = after_job(service.state, facts)
        changed = 0
        if move is not None:
            if move[0] == State.STARTING:
                service.job_started_at = utcnow()
            if move[0] == State.PENDING and service.state in REQUEUED_FROM:
                forget_endpoint(service)  # requeued (preempted): it listens elsewhere when it runs again
            changed = transition(service, *move)
        if info.state is JobState.RUNNING and service.job_started_at is None:
            service.job_started_at = utcnow()  # a renewal's successor that took over before it started
        if info.state is JobState.RUNNING and not service.port:
            endpoint = read_endpoint(service.run_dir)
            if endpoint:
                service.host, service.port = endpoint
                service.endpoint_at = utcnow()
        return changed

    def _probe_all(self, jobs: list) -> List[tuple]:
        """Probe each service's current job (a Service) or a renewal's successor (a ServiceJob, with its service's key
        and certificate)."""
        targets = []
        for job in jobs:
            service = job if isinstance(job, Service) else job.service
            targets.append((job.host, job.port, service.health_path or self._health_paths.get(service.kind, "/health"),
                            service.api_key, service.tls_fingerprint))
        if len(targets) == 1:  # one service: probed on this thread, without waking a pool thread
            return [self._probe(*targets[0])]
        return list(self._probe_pool.map(lambda target: self._probe(*target), targets))

    def _probe(self, host: str, port: int, path: str, key: str, pin: Optional[str]) -> tuple:
        """(healthy, detail) of one GET of the health path with the service's key; over TLS when the service has a
        certificate, and only if the peer presents that one (else the detail is states.IMPOSTOR)."""
        scheme = "https" if pin else "http"
        pool_kwargs = {"assert_fingerprint": pin, "cert_reqs": "CERT_NONE", "ssl_context": client_context()} \
            if pin else None
        try:
            pool = self._probe_http.connection_from_host(host, port, scheme, pool_kwargs=pool_kwargs)
            response = pool.urlopen("GET", path, headers={"Authorization": f"Bearer {key}"}, retries=False,
                                    timeout=self.config.health_timeout, redirect=False)
        except urllib3.exceptions.SSLError:
            return False, IMPOSTOR
        except urllib3.exceptions.HTTPError as exc:
            return False, REFUSED if _refused(exc) else type(exc).__name__
        except OSError as exc:
            return False, REFUSED if _refused(exc) else type(exc).__name__
        return response.status == 200, f"HTTP {response.status}"

    def _apply_probe(self, service: Service, ok: bool, detail: str) -> int:
        """Count the probe's failure or success and move the service (the rules: portal.states.after_probe)."""
        step = after_probe(service.state, ok, detail, service.health_failures, self.config.unhealthy_after)
        if service.health_failures != step.failures:  # an unchanged row stays clean: the commit has nothing to flush
            service.health_failures = step.failures
        return transition(service, *step.move) if step.move else 0
