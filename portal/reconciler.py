"""The background loop that moves services through their states: one scheduler query per cycle, concurrent health probes."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

import urllib3

from .catalog.inventory import refresh_in_background
from .site import KINDS, runtime_for
from .db import db
from .models import Condition, Service, State, utcnow
from .monitoring import CycleMonitor, serving_targets, write_portal_target
from .proxy import routes_changed
from .scheduler import JobInfo, JobState, SchedulerUnreachable
from .scheduler.job_files import read_exit_code
from .services import SUBMISSION_GRACE, job_query, log_excerpt, transition
from .service_tls import client_context
from .states import IMPOSTOR, REFUSED, JobFacts, after_job, after_probe

log = logging.getLogger(__name__)
SCHEDULER_CONDITION = "scheduler"


@dataclass
class CycleReport:
    services: int = 0
    scheduler_calls: int = 0
    probes: int = 0
    transitions: int = 0
    seconds: float = 0.0
    scheduler_ok: bool = True
    busy: bool = False  # a service is on its way up (or unwell): poll fast


def read_endpoint(job_dir: str) -> Optional[tuple]:
    """(host, port) from the endpoint.json the job wrote, or None while it is absent or incomplete."""
    try:
        data = json.loads((Path(job_dir) / "endpoint.json").read_text())
        host, port = str(data["host"]), int(data["port"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    if not host or not 0 < port < 65536:
        return None
    return host, port


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


def set_condition(name: str, ok: bool, message: Optional[str]) -> None:
    now = utcnow()
    condition = db.session.get(Condition, name)
    if condition is None:
        condition = Condition(name=name, ok=ok, message=message, since=now, checked_at=now)
        db.session.add(condition)
    else:
        if condition.ok != ok:
            condition.since = now
        condition.ok, condition.message, condition.checked_at = ok, message, now


def conditions() -> Dict[str, dict]:
    return {condition.name: condition.to_dict() for condition in Condition.query.all()}


class Reconciler:
    """Runs `cycle()` every few seconds in one worker of the portal (the one holding the lock file)."""

    def __init__(self, app):
        self.app = app
        self.config = app.config["PILOTFISH"]
        self.scheduler = app.extensions["pilotfish.scheduler"]
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock_fd: Optional[int] = None
        self._monitor = CycleMonitor(self.config.home)
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
        self._wake.set()

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
                self._stop.wait(2.0)  # another worker reconciles; take over if it goes away
                continue
            busy = False
            try:
                with self.app.app_context():
                    busy = self.cycle().busy
            except Exception:  # the loop must survive anything one cycle meets
                log.exception("reconcile cycle failed")
            interval = self.config.fast_poll_interval if busy else self.config.poll_interval
            self._wake.wait(interval)
            self._wake.clear()

    # --- one cycle ------------------------------------------------------------------------------------

    def cycle(self) -> CycleReport:
        """Bring every live service up to date. Must run inside an app context."""
        started = time.monotonic()
        report = CycleReport()
        calls_before = getattr(self.scheduler, "calls", 0)
        services = Service.query.filter(Service.state.in_(State.LIVE)).all()
        report.services = len(services)
        tracked = [service for service in services if service.job_id]
        infos: Dict[str, JobInfo] = {}
        if tracked:
            try:
                infos = self.scheduler.query(job_query(service) for service in tracked)
                set_condition(SCHEDULER_CONDITION, True, None)
            except SchedulerUnreachable as exc:
                report.scheduler_ok = False
                set_condition(SCHEDULER_CONDITION, False, str(exc))
                log.warning("scheduler unreachable: %s", exc)
        elif db.session.get(Condition, SCHEDULER_CONDITION) is None:
            set_condition(SCHEDULER_CONDITION, True, None)

        now = utcnow()
        for service in services:
            if not service.job_id:
                if service.created_at < now - SUBMISSION_GRACE:
                    report.transitions += transition(service, State.FAILED,
                                                     "submission did not complete (the portal stopped while submitting)")
                continue
            info = infos.get(service.job_id)
            if info is not None:
                report.transitions += self._apply(service, info)

        to_probe = [service for service in services
                    if service.state in State.PROBED and service.port]
        if to_probe:
            report.probes = len(to_probe)
            results = self._probe_all(to_probe)
            for service, (ok, detail) in zip(to_probe, results):
                report.transitions += self._apply_probe(service, ok, detail)
        served = serving_targets(services)  # read before the commit expires the rows
        db.session.commit()
        if report.transitions:
            routes_changed(self.config.home)  # every worker's proxy reloads before its next request
        report.busy = any(service.state in State.FAST_POLL for service in services)
        report.scheduler_calls = getattr(self.scheduler, "calls", 0) - calls_before
        report.seconds = time.monotonic() - started
        self._monitor.after_cycle(report, served)
        return report

    def _apply(self, service: Service, info: JobInfo) -> int:
        """Follow the job's news (the rules: portal.states.after_job); a running job also tells where it runs."""
        if info.state is JobState.RUNNING and info.node and service.node != info.node:
            service.node = info.node
        facts = JobFacts(job_id=service.job_id, state=info.state, detail=info.detail, node=info.node,
                         known_node=service.node, stop_requested=service.stop_requested, time_limit=service.time_limit)
        if info.state.finished:  # a failure's reason names the server's exit code and its last log lines
            facts = replace(facts, exit_code=read_exit_code(Path(service.job_dir)), log_excerpt=log_excerpt(service))
        move = after_job(service.state, facts)
        changed = 0
        if move is not None:
            if move[0] == State.STARTING:
                service.job_started_at = utcnow()
            changed = transition(service, *move)
        if info.state is JobState.RUNNING and not service.port:
            endpoint = read_endpoint(service.job_dir)
            if endpoint:
                service.host, service.port = endpoint
                service.endpoint_at = utcnow()
        return changed

    def _probe_all(self, services: List[Service]) -> List[tuple]:
        targets = [(service.host, service.port, service.health_path or self._health_paths.get(service.kind, "/health"),
                    service.api_key, service.tls_fingerprint) for service in services]
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
        service.health_failures = step.failures
        return transition(service, *step.move) if step.move else 0
