"""What a service cost, in the scheduler's currency: the GPU-hours and CPU-hours allocated to each of its jobs (its
current one and every other, ServiceJob rows), the tokens it answered (the usage table), tokens per GPU-hour, and
the share of its running time it was idle (no request in flight: 1 - busy_seconds / time running).

Each job's hours come from Slurm's accounting where it answers (`Scheduler.allocations`: one `sacct` for all the
jobs asked about, ElapsedRaw x AllocTRES), else from the job's start and end (or now) times and the service's
allocation (its resources' cpus and gpus). Accounting is asked in a background thread, cached CACHE_SECONDS
(failures too) and waited on at most `wait` seconds: a slow or failing sacct never holds a page, it shows the job
times instead. /metrics (`cost_gauges`) reads the database alone.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from datetime import datetime
from typing import Dict, Iterable, List, Optional, Tuple

from sqlalchemy.orm import selectinload

from .models import Service, State, iso, utcnow
from .scheduler import Allocation, JobQuery, Scheduler
from .services import job_query
from .usage_report import service_tokens

CACHE_SECONDS = 30.0  # accounting (or its failure) is reused this long
TIMEOUT = 5.0  # sacct is given this long
PAGE_WAIT = 2.0  # a page or an API answer waits at most this long for it
SACCT, JOB_TIMES = "sacct", "job times"


class Accounting:
    """One worker's view of the scheduler's accounting: each job asked about at most once per CACHE_SECONDS, one
    command for all the jobs of one question, asked in a thread nobody waits on longer than `wait`."""

    def __init__(self, ttl: float = CACHE_SECONDS, timeout: float = TIMEOUT, clock=time.monotonic):
        self.ttl, self.timeout, self.clock = ttl, timeout, clock
        self._pool: Optional[ThreadPoolExecutor] = None  # started on first use (after gunicorn forked)
        self._cache: Dict[Tuple[int, str], Tuple[float, object]] = {}  # (scheduler, job id) -> (expires, answer)
        self._pending: Dict[frozenset, Future] = {}
        self._lock = threading.Lock()

    def lookup(self, scheduler: Scheduler, jobs: List[JobQuery],
               wait: float = PAGE_WAIT) -> Tuple[Dict[str, Allocation], Optional[str]]:
        """({job id: Allocation} of the jobs accounting knows, why it could not be asked, or None)."""
        jobs = [job for job in jobs if job.job_id]
        found: Dict[str, Allocation] = {}
        problem = None
        with self._lock:
            now = self.clock()
            missing = []
            for job in jobs:
                entry = self._cache.get((id(scheduler), job.job_id))
                if entry is None or entry[0] <= now:
                    missing.append(job)
                elif isinstance(entry[1], Allocation):
                    found[job.job_id] = entry[1]
                elif isinstance(entry[1], str):
                    problem = entry[1]
            future = None
            if missing:
                key = frozenset((id(scheduler), job.job_id) for job in missing)
                future = self._pending.get(key)
                if future is None:
                    if self._pool is None:
                        self._pool = ThreadPoolExecutor(1, thread_name_prefix="accounting")
                    future = self._pending[key] = self._pool.submit(self._ask, scheduler, missing, key)
        if future is not None:
            wait_futures([future], timeout=max(0.0, wait))
            if not future.done():
                return found, f"sacct did not answer within {wait:g} s"
            answer = future.result()
            if isinstance(answer, str):
                return found, answer
            found.update({job.job_id: answer[job.job_id] for job in missing if job.job_id in answer})
        return found, problem

    def _ask(self, scheduler: Scheduler, jobs: List[JobQuery], key: frozenset):
        """The scheduler's answer ({job id: Allocation}, or a problem in words), cached for every job asked about."""
        try:
            answer = scheduler.allocations(jobs, timeout=self.timeout)
            if answer is None:
                answer = f"the {scheduler.name} scheduler keeps no accounting"
        except Exception as exc:  # whatever breaks accounting must not break the page it is part of
            answer = str(exc) or type(exc).__name__
        with self._lock:
            expires = self.clock() + self.ttl
            for job in jobs:
                self._cache[(id(scheduler), job.job_id)] = (expires, answer.get(job.job_id) if isinstance(
                    answer, dict) else answer)
            self._pending.pop(key, None)
            for stale in [k for k, (until, _) in self._cache.items() if until <= self.clock() - self.ttl]:
                del self._cache[stale]
        return answer


def accounting_of(app) -> Accounting:
    """The worker's accounting cache (one per application)."""
    return app.extensions.setdefault("pilotfish.accounting", Accounting())


def jobs_of(service: Service) -> list:
    """The service's jobs: its current one (when it has one) and each other (ServiceJob rows), by generation."""
    jobs = [job for job in service.jobs]
    if service.job_id:
        jobs.append(service)
    return sorted(jobs, key=lambda job: job.generation or 1)


def job_span(service: Service, job, now: datetime) -> Tuple[Optional[datetime], Optional[datetime], bool]:
    """(start, end, running) of a job by the portal's records: a job still running ends now; one that never
    started has no span."""
    started = job.job_started_at
    if job is service:
        ended, running = (service.ended_at, False) if service.state in State.TERMINAL else (None, True)
    else:
        ended, running = job.ended_at, job.is_live
        if ended is None and not running:
            ended = job.drain_until or service.ended_at
    if started is None:
        return None, None, False
    if ended is None:
        ended = now if running or service.state not in State.TERMINAL else (service.ended_at or now)
    return started, max(started, ended), running


def _union_seconds(spans: Iterable[Tuple[datetime, datetime]]) -> float:
    """Seconds during which at least one of the spans ran (replicas overlap)."""
    total, reach = 0.0, None
    for start, end in sorted(spans):
        if reach is None or start > reach:
            total += (end - start).total_seconds()
            reach = end
        elif end > reach:
            total += (end - reach).total_seconds()
            reach = end
    return total


def service_cost(service: Service, scheduler: Optional[Scheduler] = None, accounting: Optional[Accounting] = None,
                 wait: float = PAGE_WAIT, now: Optional[datetime] = None, with_tokens: bool = True) -> dict:
    """What `service` cost (needs an app context). Without a scheduler (or an accounting cache), only the job times
    count; without `with_tokens` the usage table is not read (tokens 0)."""
    now = now or utcnow()
    resources = service.resources
    cpus, gpus = int(resources.get("cpus") or 0), int(resources.get("gpus") or 0)
    jobs = jobs_of(service)
    found, problem = {}, None
    if scheduler is not None and accounting is not None:
        found, problem = accounting.lookup(scheduler, [job_query(job) for job in jobs if job.job_id], wait)
    rows, spans = [], []
    for job in jobs:
        started, ended, running = job_span(service, job, now)
        if started is not None:
            spans.append((started, ended))
        allocation = found.get(job.job_id) if job.job_id else None
        if allocation is not None:
            seconds, job_cpus, job_gpus, source = allocation.elapsed_seconds, allocation.cpus, allocation.gpus, SACCT
        else:
            seconds = round((ended - started).total_seconds(), 1) if started is not None else 0.0
            job_cpus, job_gpus, source = cpus, gpus, JOB_TIMES
        rows.append({"generation": job.generation or 1, "job_id": job.job_id, "source": source,
                     "started_at": iso(started), "ended_at": None if running else iso(ended), "running": running,
                     "seconds": seconds, "cpus": job_cpus, "gpus": job_gpus,
                     "cpu_hours": round(seconds * job_cpus / 3600, 6),
                     "gpu_hours": round(seconds * job_gpus / 3600, 6)})
    tokens = service_tokens(service.id) if with_tokens else (0, 0)
    return summary(service, rows, round(_union_seconds(spans), 1), problem, tokens)


def summary(service: Service, jobs: List[dict], running_seconds: float, problem: Optional[str],
            tokens: Tuple[int, int]) -> dict:
    """The cost answer from its jobs' rows and its (prompt, completion) tokens."""
    gpu_hours = round(sum(job["gpu_hours"] for job in jobs), 6)
    cpu_hours = round(sum(job["cpu_hours"] for job in jobs), 6)
    prompt, completion = tokens
    busy = float(service.busy_seconds or 0.0)
    counted = [job for job in jobs if job["seconds"] > 0]
    source = SACCT if counted and all(job["source"] == SACCT for job in counted) else JOB_TIMES
    return {"service": service.id, "source": source, "accounting_problem": problem if source != SACCT else None,
            "gpu_hours": gpu_hours, "cpu_hours": cpu_hours,
            "tokens": {"prompt": prompt, "completion": completion, "total": prompt + completion},
            "tokens_per_gpu_hour": round((prompt + completion) / gpu_hours, 1) if gpu_hours > 0 else None,
            "running_seconds": round(running_seconds, 1), "busy_seconds": round(busy, 1),
            "idle_share": idle_share(busy, running_seconds), "jobs": jobs}


def idle_share(busy_seconds: float, running_seconds: float) -> Optional[float]:
    """1 - busy / running, within [0, 1]; None before the service ran at all."""
    if running_seconds <= 0:
        return None
    return round(min(1.0, max(0.0, 1.0 - busy_seconds / running_seconds)), 4)


def cost_of(app, service: Service, wait: float = PAGE_WAIT) -> dict:
    """`service_cost` with the app's scheduler and accounting cache (what the API, the page and the CLI show)."""
    return service_cost(service, app.extensions["pilotfish.scheduler"], accounting_of(app), wait)


def cost_gauges(now: Optional[datetime] = None) -> List[Tuple[str, str, dict]]:
    """(service id, model, cost by the job times) of each service that ran, for /metrics: the database alone, read
    at each scrape (no scheduler command; needs an app context)."""
    now = now or utcnow()
    return [(service.id, service.model, service_cost(service, now=now, with_tokens=False))
            for service in Service.query.options(selectinload(Service.jobs)).order_by(Service.created_at).all()
            if service.job_started_at is not None or any(job.job_started_at for job in service.jobs)]
