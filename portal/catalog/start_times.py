"""When a tier's job would start: the scheduler's own estimate for each tier (`sbatch --test-only` on Slurm, now on the
local scheduler), asked concurrently, cached briefly and never waited on for long; and the recommendation's advice when
another tier that fits the model would start sooner than the recommended one."""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Dict, List, Optional, Sequence, Tuple

from ..scheduler import Resources, Scheduler, SchedulerError, SchedulerUnreachable
from .tiers import ResourceSpecs, Tier, all_tiers, model_fits, tier_resources

log = logging.getLogger(__name__)

CACHE_SECONDS = 30.0  # an estimate (or its failure) is reused this long
TIMEOUT = 5.0  # the scheduler's command is given this long; nobody waits on it longer
PAGE_WAIT = 2.0  # the launch page waits at most this long; what is still out shows as unavailable
NOW_WITHIN = timedelta(minutes=1)  # an estimate this close is "now"
SOONER_BY = timedelta(minutes=5)  # another tier is worth naming when it starts at least this much sooner
WORKERS = 4  # scheduler commands at once, per portal worker


@dataclass
class StartEstimate:
    """The scheduler's estimate of a job's start (`at`, aware), or why there is none (`problem`, in words)."""
    at: Optional[datetime] = None
    problem: Optional[str] = None
    refused: bool = False  # the scheduler said it would not run such a job (not merely that it did not answer)
    detail: str = ""  # the scheduler's words when it refused

    def as_dict(self, now: Optional[datetime] = None) -> dict:
        """The estimate for the API: {"at" (ISO 8601), "in_seconds", "now", "text", "problem"}."""
        now = now or datetime.now(timezone.utc)
        if self.at is None:
            return {"at": None, "in_seconds": None, "now": False, "text": self.problem, "problem": self.problem}
        seconds = max(0, int((self.at - now).total_seconds()))
        return {"at": self.at.isoformat(timespec="seconds"), "in_seconds": seconds,
                "now": self.at - now <= NOW_WITHIN, "text": describe_start(self.at, now), "problem": None}


def describe_start(at: datetime, now: Optional[datetime] = None) -> str:
    """A start time for people: "now", "in about 12 min (07:40)", "in about 3 h (11:05)", "in 2 days (2026-12-03
    07:40)"; the clock time is the portal's local time."""
    now = now or datetime.now(timezone.utc)
    ahead = at - now
    if ahead <= NOW_WITHIN:
        return "now"
    local = at.astimezone()
    minutes = round(ahead.total_seconds() / 60)
    if minutes < 120:
        return f"in about {minutes} min ({local:%H:%M})"
    if ahead < timedelta(days=2):
        return f"in about {round(minutes / 60)} h ({local:%H:%M})"
    return f"in {ahead.days} days ({local:%Y-%m-%d %H:%M})"


def _ask(scheduler: Scheduler, resources: Resources, timeout: float) -> StartEstimate:
    try:
        at = scheduler.estimate_start(resources, timeout=timeout)
    except SchedulerUnreachable as exc:
        return StartEstimate(problem=f"estimate unavailable: {exc}")
    except SchedulerError as exc:
        return StartEstimate(problem=f"estimate unavailable: the scheduler would not run it: {exc}", refused=True,
                             detail=str(exc))
    except Exception as exc:  # an estimate is advice: whatever breaks it must not break the answer it is part of
        log.exception("start estimate failed")
        return StartEstimate(problem=f"estimate unavailable: {type(exc).__name__}")
    if at is None:
        return StartEstimate(problem=f"estimate unavailable: the {scheduler.name} scheduler gives no estimates")
    return StartEstimate(at=at)


class StartEstimates:
    """Estimates of one portal worker: each asked once per CACHE_SECONDS (failures too), in a small pool of threads,
    the same question asked only once at a time; a caller waits at most `wait` seconds, and never for a question
    already out longer than `timeout` (a hung scheduler costs one wait, not one per request)."""

    def __init__(self, ttl: float = CACHE_SECONDS, timeout: float = TIMEOUT, workers: int = WORKERS, clock=time.monotonic):
        self.ttl, self.timeout, self.clock = ttl, timeout, clock
        self._workers = workers
        self._pool: Optional[ThreadPoolExecutor] = None  # started on first use (after gunicorn forked)
        self._cache: Dict[tuple, Tuple[float, StartEstimate]] = {}
        self._pending: Dict[tuple, Tuple[float, Future]] = {}
        self._lock = threading.Lock()

    def _key(self, scheduler: Scheduler, resources: Resources) -> tuple:
        return (scheduler.name, id(scheduler), *scheduler.arguments(resources))

    def _store(self, key: tuple, future: Future) -> None:
        with self._lock:
            self._pending.pop(key, None)
            self._cache[key] = (self.clock() + self.ttl, future.result())

    def estimate(self, scheduler: Scheduler, resources: Sequence[Resources],
                 wait_for: Optional[float] = None) -> List[StartEstimate]:
        """An estimate for each of `resources`, in order; what is not known within `wait_for` seconds (default: the
        timeout) is "estimate unavailable", and lands in the cache for the next caller when it comes."""
        wait_for = self.timeout if wait_for is None else min(wait_for, self.timeout)
        started = self.clock()
        keys = [self._key(scheduler, item) for item in resources]
        found: Dict[tuple, StartEstimate] = {}
        waiting: Dict[tuple, Tuple[float, Future]] = {}
        asked: List[tuple] = []
        with self._lock:
            now = self.clock()
            for key in [key for key, (expires, _estimate) in self._cache.items() if expires <= now]:
                del self._cache[key]
            for key, item in zip(keys, resources):
                if key in found or key in waiting:
                    continue
                if key in self._cache:
                    found[key] = self._cache[key][1]
                    continue
                if key not in self._pending:
                    if self._pool is None:
                        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="start-estimate")
                    self._pending[key] = (now, self._pool.submit(_ask, scheduler, item, self.timeout))
                    asked.append(key)
                waiting[key] = self._pending[key]
        for key in asked:  # outside the lock: a question already answered calls back at once
            waiting[key][1].add_done_callback(lambda done, key=key: self._store(key, done))
        live = [future for asked, future in waiting.values() if asked + self.timeout > started]
        if live:
            wait(live, timeout=max(0.0, started + wait_for - self.clock()))
        for key, (_asked, future) in waiting.items():
            found[key] = future.result() if future.done() else StartEstimate(
                problem=f"estimate unavailable: the scheduler did not answer within {wait_for:g} s")
        return [found[key] for key in keys]


def estimates_of(app) -> StartEstimates:
    """The worker's estimates (one per application)."""
    return app.extensions.setdefault("pilotfish.start_estimates", StartEstimates())


def tier_starts(app, specs: ResourceSpecs, tiers: Sequence[Tier],
                wait_for: Optional[float] = None) -> Dict[str, StartEstimate]:
    """Each tier's estimate (its resources for the site's default time), by reference."""
    scheduler = app.extensions["pilotfish.scheduler"]
    found = estimates_of(app).estimate(scheduler, [tier_resources(tier, specs.time_default) for tier in tiers],
                                       wait_for)
    return {tier.ref: estimate for tier, estimate in zip(tiers, found)}


def fitting_tiers(specs: ResourceSpecs, size_gb: Optional[float], chosen: Optional[Tier] = None) -> List[Tier]:
    """The tiers a model of `size_gb` fits, in every partition (default partition first), with `chosen` (the
    recommendation, which may be the site's choice for the model whatever its size) among them."""
    found = [tier for tier in all_tiers(specs) if model_fits(tier, size_gb)]
    if chosen is not None and all(tier.ref != chosen.ref for tier in found):
        found.insert(0, chosen)
    return found


def sooner_advice(chosen: Tier, starts: Dict[str, StartEstimate], now: Optional[datetime] = None) -> Optional[dict]:
    """{"tier", "reason"} naming the tier that fits and would start soonest, when it starts at least SOONER_BY before
    the recommended `chosen` (or `chosen` would not run at all); None when the recommendation starts soon enough or
    nothing is known."""
    now = now or datetime.now(timezone.utc)
    mine = starts.get(chosen.ref)
    others = [(estimate.at, ref) for ref, estimate in starts.items() if ref != chosen.ref and estimate.at is not None]
    if mine is None or not others:
        return None
    at, ref = min(others, key=lambda item: item[0])
    when = describe_start(at, now)
    if mine.at is None:
        if not mine.refused:
            return None
        return {"tier": ref, "reason": f"{chosen.ref} would not run ({mine.detail}); {ref} also fits and would start "
                                       f"{when}"}
    if at + SOONER_BY > mine.at or mine.at - now <= NOW_WITHIN:
        return None
    return {"tier": ref, "reason": f"{ref} also fits and would start sooner: {when}, while {chosen.ref} would start "
                                   f"{describe_start(mine.at, now)}"}
