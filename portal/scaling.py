"""Scaling rules for replicas (portal/replicas.py keeps them): how a launch writes its replica counts, each worker's
requests in flight as a file, and when to add or remove a job. Plain Python: no Flask, no database.

Replicas: a service served by several jobs at once, between a minimum and a maximum, at one id and one set of URLs.

- As users write it (`parse_replicas`): "2" (two jobs), "1:3" (one to three), or {"min": 1, "max": 3,
  "target_in_flight": 4}.
- The proxies route each request to the serving job with the fewest requests in flight (in that worker), and send a
  request whose connection a job refuses (nothing sent yet) to another one.
- Each worker writes its requests in flight per service to `PILOTFISH_HOME/load/<pid>.json` about once a second
  while it has any (`LoadFile`); the reconciler adds them up (`read_load`).
- The reconciler (`keep_replicas`) keeps at least `min` jobs, adds one when requests in flight per serving job stay
  above `target_in_flight` for `scale_up_window` seconds (up to `max`), and removes the newest after
  `scale_down_window` seconds quiet (in flight at most half of what one job fewer could take), down to `min`; a
  removed job drains like a renewal's replaced one. A replica that stops answering is cancelled and replaced; when the
  service's current job dies, a serving replica takes over (`promote`) and the service stays RUNNING.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from .errors import ValidationError

log = logging.getLogger(__name__)
REPLICAS_MAX = 16
TARGET_IN_FLIGHT_DEFAULT = 4
REPLICAS_SHAPE = "^[0-9]{1,2}(:[0-9]{1,2})?$"
REPLICAS_WORDS = (f"a number of jobs (2), a range (1:3, or 0:2: no job while unused), or {{min, max, "
                  f"target_in_flight}}: up to {REPLICAS_MAX} jobs; a job is added while requests in flight per job "
                  f"stay above target_in_flight (default {TARGET_IN_FLIGHT_DEFAULT})")
LOAD_FOLDER = "load"
WAKE_FOLDER = "wake"  # in PILOTFISH_HOME: a file per service scaled to zero that a request asked for
LOAD_FRESH_SECONDS = 5.0  # a worker's load file older than this is not counted (the worker is gone or quiet)


def parse_replicas(value, field: str = "replicas") -> Tuple[int, int, int]:
    """(min, max, target_in_flight) of a launch's `replicas`; anything else is a ValidationError naming `field`."""
    target = TARGET_IN_FLIGHT_DEFAULT
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and re.fullmatch(REPLICAS_SHAPE, value):
        low, _, top = value.partition(":")
        low, high = int(low), int(top or low)
    elif isinstance(value, dict) and set(value) <= {"min", "max", "target_in_flight"} and "max" in value:
        low, high, target = value.get("min", 1), value["max"], value.get("target_in_flight", target)
        if not all(isinstance(number, int) and not isinstance(number, bool) for number in (low, high, target)):
            raise ValidationError(field, f"expected whole numbers for min, max and target_in_flight, got {value!r}")
    else:
        raise ValidationError(field, f"expected {REPLICAS_WORDS}, got {value!r}")
    if low < 0:
        raise ValidationError(field, f"min must be at least 0 (0: no job while unused), got {low}")
    if high < max(1, low):
        raise ValidationError(field, f"max ({high}) must be at least min ({low}) and at least 1")
    if high > REPLICAS_MAX:
        raise ValidationError(field, f"max must be at most {REPLICAS_MAX}, got {high}")
    if not 1 <= target <= 10000:
        raise ValidationError(field, f"target_in_flight must be between 1 and 10000, got {target}")
    return low, high, target


# --- requests in flight, across the workers ---------------------------------------------------------------------

class LoadFile:
    """One worker's requests in flight per service, written to PILOTFISH_HOME/load/<pid>.json (atomically) when asked;
    the directory asks about once a second while anything is in flight, and once more when it drops to nothing."""

    def __init__(self, home):
        self.folder = Path(home) / LOAD_FOLDER
        self.path = self.folder / f"{os.getpid()}.json"
        self.written: Dict[str, int] = {}

    def write(self, counts: Dict[str, int]) -> None:
        counts = {service_id: count for service_id, count in counts.items() if count}
        if counts == self.written and not counts:
            return
        try:
            self.folder.mkdir(mode=0o700, exist_ok=True)
            partial = self.path.with_suffix(".tmp")
            partial.write_text(json.dumps(counts))
            os.replace(partial, self.path)
            self.written = counts
        except OSError as exc:  # best effort: scaling waits for the next write
            log.warning("could not write %s: %s", self.path, exc)


def read_load(home, now: Optional[float] = None) -> Dict[str, int]:
    """Requests in flight per service, all workers together (files written in the last LOAD_FRESH_SECONDS)."""
    now = time.time() if now is None else now
    total: Dict[str, int] = {}
    for path in (Path(home) / LOAD_FOLDER).glob("*.json"):
        try:
            if now - path.stat().st_mtime > LOAD_FRESH_SECONDS:
                continue
            for service_id, count in json.loads(path.read_text()).items():
                total[service_id] = total.get(service_id, 0) + int(count)
        except (OSError, ValueError, TypeError, AttributeError):
            continue
    return total


# --- the scaling decision ----------------------------------------------------------------------------------------

@dataclass
class Trend:
    """How long a service's load has been above its target, or quiet (monotonic seconds; None: not now)."""
    above_since: Optional[float] = None
    quiet_since: Optional[float] = None


def scale_step(low: int, high: int, target: int, serving: int, coming: int, in_flight: int, now: float, trend: Trend,
               up_window: float, down_window: float) -> Tuple[int, str]:
    """(jobs to add, or -1 to remove one, or 0; why) for a service with `serving` jobs answering and `coming` on
    their way up, `in_flight` requests in flight in all."""
    total = serving + coming
    if total < low:
        trend.above_since = trend.quiet_since = None
        return low - total, f"below the minimum of {low}"
    per_job = in_flight / serving if serving else 0.0
    if serving and per_job > target and total < high and not coming:
        trend.quiet_since = None
        trend.above_since = now if trend.above_since is None else trend.above_since
        if now - trend.above_since >= up_window:
            trend.above_since = None
            return 1, f"{per_job:.1f} requests in flight per job, over {target} for {up_window:g} s"
        return 0, ""
    trend.above_since = None
    if serving > low and not coming and in_flight <= target * (serving - 1) / 2:
        trend.quiet_since = now if trend.quiet_since is None else trend.quiet_since
        if now - trend.quiet_since >= down_window:
            trend.quiet_since = None
            return -1, f"{in_flight} requests in flight for {serving} jobs, quiet for {down_window:g} s"
        return 0, ""
    trend.quiet_since = None
    return 0, ""


# --- waking a service scaled to zero -----------------------------------------------------------------------------

def request_wake(home, service_id: str) -> None:
    """A request came for a service with no job (SCALED_TO_ZERO): ask the reconciler, in whichever worker leads, to
    start one (best effort: a failure is logged)."""
    from . import change_marks
    try:
        folder = Path(home) / WAKE_FOLDER
        folder.mkdir(mode=0o700, exist_ok=True)
        (folder / service_id).touch()
    except OSError as exc:
        log.warning("could not ask to wake service %s: %s", service_id, exc)
        return
    change_marks.move(Path(home) / change_marks.RECONCILER_WAKE)


def take_wakes(home) -> set:
    """The services a request asked to wake since the last call (their marks are removed)."""
    woken = set()
    for path in (Path(home) / WAKE_FOLDER).glob("*"):
        try:
            path.unlink()
        except OSError:
            continue
        woken.add(path.name)
    return woken
