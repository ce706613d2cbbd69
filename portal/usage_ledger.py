"""Who used what, counted off the request path: each worker's UsageLedger adds up the proxied requests per (UTC day,
principal, model, service) in memory, and a background thread of the worker writes the sums to the `usage` table
every FLUSH_SECONDS as additions (rows are aggregates, never one per request), with each service's busy seconds and
each named key's last use.

Busy seconds are the time a service had a request in flight in any worker: each worker notes its busy spells (start
and end, epoch seconds), and a flush adds to busy_seconds only what they add to the spells already counted for the
service in the last BUSY_MEMORY seconds (kept in its row, busy_spells_json, read and written under the database's
write lock, taken first): two workers busy at the same time count that time once, whichever flushes first. A spell
older than that memory (a flush held back for minutes) is counted whole.

The proxy calls `count` on its event loop for every request it relayed: a dictionary update under a lock held for
a microsecond, nothing more (benchmarks/usage_storage.py measures it). A flush takes what was counted, writes it in
one transaction and, if that fails (the database locked past its busy timeout, or away), puts it back to be added
to the next one: nothing is lost and nothing is counted twice. Flushes of several workers add up exactly, since each
adds in the database (`requests = usage.requests + excluded.requests`) under the database's own write lock. The
thread starts with the first count, sleeps while nothing is counted, and the worker flushes once more as it exits
(portal/gunicorn_conf.py's `worker_exit`).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Tuple

from sqlalchemy import update

from .db import db
from .models import Service, Usage

log = logging.getLogger(__name__)

FLUSH_SECONDS = 2.0  # how long counts wait in memory before they are written
EXTENSION = "pilotfish.usage"  # app.extensions[EXTENSION]: the worker's UsageLedger
KEY_PRINCIPAL = "key:"  # a named key's principal: "key:<name>"
DAY_SECONDS = 86400
COUNTED = ("requests", "errors", "prompt_tokens", "completion_tokens")
TOUCH = 1e-3  # seconds: busy spells this close are one
BUSY_MEMORY = 120.0  # seconds: how long a service's counted busy spells are kept to be matched against other workers'


Key = Tuple[str, str, str, str]  # (day, principal, model, service id)


def utc_day(epoch: float) -> str:
    """The UTC day of an instant (epoch seconds), as the usage table keys it: YYYY-MM-DD."""
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))


class UsageLedger:
    """One worker's usage counts, waiting to be written. `clock` gives epoch seconds (tests move it across midnight)."""

    def __init__(self, app=None, clock: Callable[[], float] = time.time, flush_seconds: float = FLUSH_SECONDS):
        self.app = app
        self.clock = clock
        self.flush_seconds = flush_seconds
        self._counts: Dict[Key, List[int]] = {}
        self._busy: Dict[str, List[List[float]]] = {}  # service id -> its busy spells here, [start, end]
        self._last_use: Dict[str, float] = {}  # key name -> epoch seconds
        self._lock = threading.Lock()  # the counts: held for a dictionary update or a swap
        self._flush_lock = threading.Lock()  # one flush at a time (the thread's, a test's, the worker's last)
        self._start_lock = threading.Lock()  # the thread is started once
        self._day = ""
        self._day_ends = 0.0  # epoch seconds when _day is over
        self._pending = False  # something counted since the thread last woke
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.flushes = 0  # flushes that wrote something
        self.failures = 0  # flushes that failed (their counts kept)

    # --- the hot path ------------------------------------------------------------------------------------

    def count(self, principal: str, service_id: str, model: str, failed: bool, prompt_tokens: int,
              completion_tokens: int) -> None:
        """One proxied request of `principal` ("owner", "key:<name>") to a service's model: an error if `failed`,
        with the tokens its answer reported (0 when none)."""
        self.add(principal, service_id, model, 1, 1 if failed else 0, prompt_tokens, completion_tokens)

    def add(self, principal: str, service_id: str, model: str, requests: int, errors: int, prompt_tokens: int,
            completion_tokens: int) -> None:
        """`requests` of `principal` answered by `service_id` (a service's or a batch's id), `errors` of them
        failed, with the tokens their answers reported."""
        now = self.clock()
        if now >= self._day_ends or now < self._day_ends - DAY_SECONDS:
            self._set_day(now)
        key = (self._day, principal, model, service_id)
        with self._lock:
            entry = self._counts.get(key)
            if entry is None:
                self._counts[key] = [requests, errors, prompt_tokens, completion_tokens]
            else:
                entry[0] += requests
                entry[1] += errors
                entry[2] += prompt_tokens
                entry[3] += completion_tokens
            if principal.startswith(KEY_PRINCIPAL):
                self._last_use[principal[4:]] = now
        if not self._pending:
            self._mark_pending()

    def seen(self, principal: str) -> None:
        """A request of `principal` the portal answered itself (a page, an API call): only a key's last use moves."""
        if principal.startswith(KEY_PRINCIPAL):
            with self._lock:
                self._last_use[principal[4:]] = self.clock()
            if not self._pending:
                self._mark_pending()

    def busy(self, service_id: str, start: float, end: float) -> None:
        """A spell (epoch seconds) during which the service had a request in flight in this worker."""
        if end <= start:
            return
        with self._lock:
            spells = self._busy.setdefault(service_id, [])
            if spells and spells[-1][0] <= start <= spells[-1][1] + TOUCH:
                spells[-1][1] = max(spells[-1][1], end)  # it goes on from the last one
            else:
                spells.append([start, end])
        if not self._pending:
            self._mark_pending()

    def _set_day(self, now: float) -> None:
        start = now - now % DAY_SECONDS  # UTC has no leap seconds in epoch time: days are 86400 s long
        self._day, self._day_ends = utc_day(start), start + DAY_SECONDS

    def _mark_pending(self) -> None:
        self._pending = True
        if self._thread is None and self.app is not None:
            self._start()
        self._wake.set()

    # --- writing -----------------------------------------------------------------------------------------

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="usage-flush", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            if self._stop.wait(self.flush_seconds):
                return  # close() flushes
            self._wake.clear()
            self._pending = False
            try:
                self.flush()
            except Exception:  # already logged; the counts wait for the next flush
                pass

    def close(self) -> None:
        """Stop the thread and write what is left (the worker is exiting)."""
        self._stop.set()
        self._wake.set()
        try:
            self.flush()
        except Exception:
            log.warning("usage not written at exit: %d counts lost", len(self._counts))

    def taken(self) -> tuple:
        """Take what was counted (the counts start again from nothing)."""
        with self._lock:
            taken = self._counts, self._busy, self._last_use
            self._counts, self._busy, self._last_use = {}, {}, {}
        return taken

    def put_back(self, counts: Dict[Key, List[int]], busy: Dict[str, List[List[float]]],
                 last_use: Dict[str, float]) -> None:
        """Counts that could not be written, added to those counted since."""
        with self._lock:
            for key, values in counts.items():
                entry = self._counts.get(key)
                if entry is None:
                    self._counts[key] = values
                else:
                    for index, value in enumerate(values):
                        entry[index] += value
            for service_id, spells in busy.items():
                self._busy[service_id] = spells + self._busy.get(service_id, [])
            for name, at in last_use.items():
                self._last_use[name] = max(at, self._last_use.get(name, 0.0))
        self._pending = True
        self._wake.set()

    def flush(self) -> int:
        """Write what was counted (in the app's context); returns the usage rows added to or created. On failure the
        counts are kept for the next flush and the error is raised."""
        with self._flush_lock:
            counts, busy, last_use = self.taken()
            if not counts and not busy and not last_use:
                return 0
            try:
                if self.app is not None:
                    with self.app.app_context():
                        self._write(counts, busy)
                else:
                    self._write(counts, busy)
            except Exception as exc:
                self.failures += 1
                self.put_back(counts, busy, last_use)
                log.warning("usage not written yet, kept for the next try (%d rows): %s", len(counts), exc)
                raise
            self.flushes += 1
            if last_use:
                self._mark_used(last_use)
            return len(counts)

    def _write(self, counts: Dict[Key, List[int]], busy: Dict[str, List[List[float]]]) -> None:
        """One transaction: each count added to its row (created at zero), each service's busy spells to it."""
        try:
            if counts:
                rows = [{"day": day, "principal": principal, "model": model, "service_id": service_id,
                         **dict(zip(COUNTED, values))}
                        for (day, principal, model, service_id), values in counts.items()]
                db.session.execute(_upsert(), rows)
            for service_id, spells in busy.items():
                row = update(Service).where(Service.id == service_id).execution_options(synchronize_session=False)
                db.session.execute(row.values(busy_seconds=Service.busy_seconds))  # the write lock, before reading
                counted = db.session.query(Service.busy_spells_json).filter(Service.id == service_id).scalar()
                if counted is None:
                    continue  # deleted since
                added, kept = spells_added(json.loads(counted or "[]"), spells, self.clock() - BUSY_MEMORY)
                db.session.execute(row.values(busy_seconds=Service.busy_seconds + added,
                                              busy_spells_json=json.dumps(kept)))
            db.session.commit()
        except Exception:
            db.session.rollback()
            raise
        finally:
            db.session.remove()

    def _mark_used(self, last_use: Dict[str, float]) -> None:
        """Each named key's last use, through portal.keys.mark_used (name -> naive UTC datetime) where it exists;
        best effort (a later use writes it again)."""
        from . import keys

        mark_used = getattr(keys, "mark_used", None)
        if mark_used is None:
            return
        used = {name: datetime.fromtimestamp(at, timezone.utc).replace(tzinfo=None) for name, at in last_use.items()}
        try:
            if self.app is not None:
                with self.app.app_context():
                    mark_used(used)
            else:
                mark_used(used)
        except Exception:
            log.exception("last use of %d keys not written", len(used))


def _upsert():
    """INSERT ... ON CONFLICT (day, principal, model, service_id) DO UPDATE SET requests = usage.requests +
    excluded.requests, ...: in the database's own dialect (SQLite or PostgreSQL)."""
    table = Usage.__table__
    if db.engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    statement = insert(table)
    return statement.on_conflict_do_update(
        index_elements=[table.c.day, table.c.principal, table.c.model, table.c.service_id],
        set_={name: table.c[name] + statement.excluded[name] for name in COUNTED})


def init_usage(app) -> UsageLedger:
    """Give the app (one per worker process) its ledger; its thread starts with the first count."""
    ledger = app.extensions[EXTENSION] = UsageLedger(app)
    return ledger


def usage_ledger(app=None) -> UsageLedger:
    """The worker's ledger (of `app`, else of the current app)."""
    if app is None:
        from flask import current_app
        app = current_app
    return app.extensions[EXTENSION]


def merged(spells: List[List[float]]) -> List[List[float]]:
    """The union of spells ([start, end]), as spells in order, none touching another."""
    union: List[List[float]] = []
    for start, end in sorted(spells):
        if union and start <= union[-1][1] + TOUCH:
            union[-1][1] = max(union[-1][1], end)
        else:
            union.append([start, end])
    return union


def spells_added(counted: List[List[float]], spells: List[List[float]], forget_before: float) -> Tuple[float, list]:
    """(the seconds `spells` add to the spells already `counted`, the union to keep: its spells that end after
    `forget_before`)."""
    before = merged(counted)
    after = merged(before + spells)
    added = sum(end - start for start, end in after) - sum(end - start for start, end in before)
    return max(0.0, added), [[round(start, 3), round(end, 3)] for start, end in after if end > forget_before]
