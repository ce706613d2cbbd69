"""Where the services answer: the service directory each worker routes on, and what is stored about a service.

ServiceDirectory caches the live services (id, state, model, kind, host, port, key) for DIRECTORY_TTL so the hot
path does not query the database; the reconciler calls routes_changed after committing a state change, which
touches ROUTES_CHANGED_FILE in the portal's home, and every worker's next request then reloads before it routes.
The directory also counts requests in flight per service (the gateway picks the least busy) and notes each service's
last activity (what idle stops and leases count from, portal/lifetimes.py), written to the database at most every
ACTIVITY_FLUSH_SECONDS per service, by one timer on the event loop that runs only while a request is in flight or an
activity is not written yet. It notes a request in flight as activity at each of its turns (a 40-minute stream is not
idle) and writes what ended since the last write once its time comes, so the database holds each service's last
request to the second; with nothing in flight and nothing to write, no timer is set. The same timer reports the busy
time so far of services with a request in flight (on_busy: the usage ledger), as their last request ending does.
stored_state, start_wait and not_served_detail read what the database says of a service or model that is not routable,
for the answers. Database work needs an app context and runs off the event loop (the relay's in_thread, or the loop's
executor with the directory's app).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from flask import current_app

from .. import change_marks
from ..catalog.inventory import adapter_base
from ..db import db
from ..models import Service, ServiceJob, State, utcnow
from ..scaling import LoadFile
from ..states import without_log_lines

log = logging.getLogger(__name__)

ROUTABLE = State.ROUTABLE
DIRECTORY_TTL = 1.0  # past this, the next request starts a reload (and is answered from the cache meanwhile)
DIRECTORY_MAX_AGE = 2.0  # past this, requests wait for the reload: never routed on older information
ROUTES_CHANGED_FILE = "routes.changed"  # touched after every committed state change (routes_changed)
ACTIVITY_FLUSH_SECONDS = 10.0
LOAD_WRITE_SECONDS = 1.0
SERVICE_HEADER = b"x-pilotfish-service"  # on every relayed answer: the service that answered
REVISION_HEADER = b"x-pilotfish-model-revision"  # and its model's revision (docs/provenance.md)


@dataclass
class Route:
    id: str
    state: str
    model: str
    kind: str
    host: Optional[str]
    port: Optional[int]
    api_key: str
    tls_fingerprint: Optional[str] = None  # its certificate's pin (portal/service_tls.py); None: plain HTTP
    replicas: Tuple[Tuple[str, int], ...] = ()  # (host, port) of its serving replicas besides host and port
    revision: Optional[str] = None  # the model's revision (a snapshot's commit), if it has one
    adapters: Tuple[str, ...] = ()  # the LoRA adapters it serves beside its model: names a request may give too

    def __post_init__(self):
        # What every answer relayed from it carries (relay.py): which service answered, and the model's revision.
        marks = [(SERVICE_HEADER, self.id.encode("latin-1", "replace"))]
        if self.revision:
            marks.append((REVISION_HEADER, self.revision.encode("latin-1", "replace")))
        self.answer_marks: Tuple[Tuple[bytes, bytes], ...] = tuple(marks)

    def serves(self, model) -> bool:
        """Whether a request naming `model` is for it: its model, or one of its adapters."""
        return model == self.model or model in self.adapters

    @property
    def endpoints(self) -> Tuple[Tuple[str, int], ...]:
        """Where it answers: its current job first, then its serving replicas."""
        return ((self.host, self.port),) + self.replicas if self.port else self.replicas


def adapter_names(stored: Optional[str]) -> Tuple[str, ...]:
    """A service's adapters as stored (a JSON list of names)."""
    try:
        names = json.loads(stored or "[]")
    except ValueError:
        return ()
    return tuple(name for name in names if isinstance(name, str)) if isinstance(names, list) else ()


def routes_changed(home) -> None:
    """Tell every worker's directory that a service's route changed (the reconciler calls it after committing a
    state change): their next request reloads before it routes, instead of using the cached directory."""
    change_marks.move(Path(home) / ROUTES_CHANGED_FILE)


class ServiceDirectory:
    """Where each live service answers, cached for a second so the hot path does not query the database; a state
    change the reconciler commits (routes_changed) makes the next request reload first."""

    def __init__(self, home=None, app=None):
        self.app = app  # for the activity timer's database writes (None: only the relay writes activity)
        self._routes: Dict[str, Route] = {}
        self._loaded = 0.0
        self._changed_file = str(Path(home) / ROUTES_CHANGED_FILE) if home is not None else None
        self._seen_change = self._change_mark()
        self._lock = threading.Lock()  # counters and activity: held for microseconds on the hot path
        self._refresh_lock = threading.Lock()  # reloading from the database: never blocks the counters
        self.in_flight: Dict[str, int] = {}
        self._activity: Dict[str, float] = {}  # service id: when it last had a request (epoch seconds)
        self._flushed: Dict[str, float] = {}  # service id: when its activity was last written
        self._pending: set = set()  # services whose last activity is not written yet
        self._busy = 0  # requests in flight, all services together
        # Busy time: since when each service has had a request in flight here, and who is told each busy spell
        # (service id, start and end in epoch seconds) when it ends (the usage ledger, portal/usage_ledger.py).
        self._busy_since: Dict[str, float] = {}
        self.on_busy: Optional[Callable[[str, float, float], None]] = None
        self._timer: Optional[asyncio.TimerHandle] = None  # the activity timer, set only while it has work
        # Requests in flight per service, for the reconciler's replica scaling (portal/scaling.py): written about
        # every LOAD_WRITE_SECONDS while anything is in flight, and once more when nothing is.
        self._load = LoadFile(home) if home is not None else None
        self._load_timer: Optional[asyncio.TimerHandle] = None

    @property
    def cached(self) -> Dict[str, Route]:
        return self._routes

    @property
    def loaded(self) -> bool:
        return self._loaded > 0

    @property
    def age(self) -> float:
        """Seconds since the routes were loaded."""
        return time.monotonic() - self._loaded

    @property
    def stale(self) -> bool:
        return self.age > DIRECTORY_TTL

    def _change_mark(self) -> tuple:
        return change_marks.state(self._changed_file) if self._changed_file is not None else ()

    @property
    def changed(self) -> bool:
        """A state change was committed since the last load: the cache must not be routed on."""
        return self._change_mark() != self._seen_change

    def routes(self, fresh: bool = False) -> Dict[str, Route]:
        """The live services (needs an app context); `fresh` reloads now (so a just-launched service is found)."""
        if fresh or self.stale or self.changed:
            with self._refresh_lock:
                if fresh or self.stale or self.changed:
                    mark = self._change_mark()  # read before the rows: a change committed after it reloads again
                    rows = db.session.query(Service.id, Service.state, Service.model, Service.kind, Service.host,
                                            Service.port, Service.api_key, Service.tls_fingerprint,
                                            Service.revision, Service.adapters_json).filter(
                        Service.state.in_(State.LIVE)).all()
                    replicas: Dict[str, list] = {}
                    for service_id, host, port in db.session.query(
                            ServiceJob.service_id, ServiceJob.host, ServiceJob.port).filter(
                            ServiceJob.phase == ServiceJob.REPLICA, ServiceJob.ready_at.isnot(None),
                            ServiceJob.port.isnot(None)).order_by(ServiceJob.generation):
                        replicas.setdefault(service_id, []).append((host, port))
                    db.session.remove()
                    self._routes = {row.id: Route(*row[:-2], replicas=tuple(replicas.get(row.id, ())),
                                                  revision=row.revision, adapters=adapter_names(row.adapters_json))
                                    for row in rows}
                    self._loaded = time.monotonic()
                    self._seen_change = mark
        return self._routes

    def begin(self, service_id: str) -> None:
        """A request starts: count it in flight (its activity is noted while it lasts, see _tick)."""
        with self._lock:
            count = self.in_flight.get(service_id, 0)
            if not count:
                self._busy_since[service_id] = time.monotonic()
            self.in_flight[service_id] = count + 1
            self._busy += 1
        if self._timer is None:
            self._set_timer(ACTIVITY_FLUSH_SECONDS)
        if self._load_timer is None and self._load is not None:
            self._write_load()

    def end(self, service_id: str) -> None:
        """A request finished: count it out and note the activity, which the activity timer writes at once when the
        service's last write is ACTIVITY_FLUSH_SECONDS old, else once that time comes."""
        now = time.time()
        spell = None
        with self._lock:
            count = max(0, self.in_flight.get(service_id, 1) - 1)
            self.in_flight[service_id] = count
            if not count and service_id in self._busy_since:
                spell = time.monotonic() - self._busy_since.pop(service_id)
            self._busy = max(0, self._busy - 1)
            self._activity[service_id] = now
            self._pending.add(service_id)
            delay = max(0.0, self._flushed.get(service_id, 0) + ACTIVITY_FLUSH_SECONDS - now)
        if spell is not None and self.on_busy is not None:
            self.on_busy(service_id, now - spell, now)
        timer = self._timer
        if timer is not None and timer.when() - delay <= asyncio.get_running_loop().time():
            return  # the timer comes first anyway: it writes this too
        if timer is not None:
            timer.cancel()
        self._set_timer(delay)

    def _write_load(self) -> None:
        """Write the requests in flight per service, and again in LOAD_WRITE_SECONDS while any are."""
        self._load_timer = None
        with self._lock:
            counts = dict(self.in_flight) if self._busy else {}
        self._load.write(counts)
        if counts:
            try:
                self._load_timer = asyncio.get_running_loop().call_later(LOAD_WRITE_SECONDS, self._write_load)
            except RuntimeError:
                pass  # outside an event loop: written on each request only

    def _set_timer(self, delay: float) -> None:
        """Set the activity timer on this thread's event loop (none outside one, or without an app to write with)."""
        if self.app is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(max(0.0, delay), self._tick)

    def _tick(self) -> None:
        """The activity timer: note the services with requests in flight as active now, write every activity whose
        time has come (in a thread), and set the timer again for the next one, if any."""
        self._timer = None
        now = time.time()
        due: List[Tuple[str, float]] = []
        spells: List[Tuple[str, float]] = []  # busy time so far of services still busy (a long stream counts as it runs)
        next_at = None
        with self._lock:
            if self._busy:
                moment = time.monotonic()
                for service_id, count in self.in_flight.items():
                    if count:
                        self._activity[service_id] = now
                        self._pending.add(service_id)
                        since = self._busy_since.get(service_id)
                        if since is not None:
                            spells.append((service_id, moment - since))
                            self._busy_since[service_id] = moment
            for service_id in list(self._pending):
                ready = self._flushed.get(service_id, 0) + ACTIVITY_FLUSH_SECONDS
                if ready <= now:
                    at = self._activity[service_id]
                    due.append((service_id, at))
                    self._flushed[service_id] = now
                    self._pending.discard(service_id)
                    if not self.in_flight.get(service_id):
                        continue  # written: nothing more until its next request
                    ready = now + ACTIVITY_FLUSH_SECONDS
                next_at = ready if next_at is None else min(next_at, ready)
        if spells and self.on_busy is not None:
            for service_id, seconds in spells:
                self.on_busy(service_id, now - seconds, now)
        if due:
            asyncio.get_running_loop().run_in_executor(None, self._write_in_app, due)
        if next_at is not None:
            self._set_timer(next_at - now)

    def _write_in_app(self, activity: List[Tuple[str, float]]) -> None:
        with self.app.app_context():
            for service_id, at in activity:
                self.record_activity(service_id, at)

    @staticmethod
    def record_activity(service_id: str, at: Optional[float] = None) -> None:
        """Write a service's last activity (`at`, epoch seconds; default now), never moving it back (needs an app
        context; best effort)."""
        moment = datetime.fromtimestamp(at, timezone.utc).replace(tzinfo=None) if at is not None else utcnow()
        try:
            Service.query.filter(Service.id == service_id, (Service.last_activity.is_(None)) |
                                 (Service.last_activity < moment)).update({"last_activity": moment},
                                                                          synchronize_session=False)
            db.session.commit()
        except Exception:  # activity is best effort; never fail a request over it
            db.session.rollback()
            log.exception("could not record activity of %s", service_id)
        finally:
            db.session.remove()


def stored_state(service_id: str) -> Tuple[Optional[str], Optional[str]]:
    """(state, reason) of a service as stored, (None, None) for no such service (needs an app context)."""
    try:
        row = db.session.query(Service.state, Service.reason).filter_by(id=service_id).first() \
            if len(service_id) <= 16 else None
        return (row.state, row.reason) if row else (None, None)
    finally:
        db.session.remove()


START_WAIT_FIRST = 10  # seconds: the Retry-After of a service that never answered yet
START_WAIT_OVERDUE = 5  # seconds: the least Retry-After of one that takes longer than its last start did
START_WAIT_MAX = 60  # the longest Retry-After clients honour (the openai client backs off on its own beyond it)
START_WAIT_MARGIN = 2  # seconds added to an estimate: a retry a little late costs less than one a little early


def start_wait(service_id: str) -> int:
    """The Retry-After, in seconds, of a request to a service that is starting or scaled to zero (needs an app
    context): how long its last start took, from submission to its first answer (an earlier job of its own: the one
    before a scale to zero, a renewal's or a replica's), less how long the current one has been starting (one scaled
    to zero: plus the reconciler's wait before it submits the job), plus START_WAIT_MARGIN. START_WAIT_FIRST when none
    of its jobs answered yet; once the time is past, half the last start (at least START_WAIT_OVERDUE): a client that
    retries twice, as the openai client does, then waits for a start half as long again as the last. At most
    START_WAIT_MAX."""
    try:
        service = db.session.query(Service.state, Service.submitted_at).filter_by(id=service_id).first() \
            if len(service_id) <= 16 else None
        last = db.session.query(ServiceJob.submitted_at, ServiceJob.ready_at).filter(
            ServiceJob.service_id == service_id, ServiceJob.submitted_at.isnot(None),
            ServiceJob.ready_at.isnot(None)).order_by(ServiceJob.generation.desc()).first()
    finally:
        db.session.remove()
    if service is None or last is None:
        return START_WAIT_FIRST
    expected = (last.ready_at - last.submitted_at).total_seconds()
    if service.state == State.SCALED_TO_ZERO:
        left = expected + current_app.config["PILOTFISH"].fast_poll_interval + START_WAIT_MARGIN
    elif service.submitted_at is not None:
        left = expected - (utcnow() - service.submitted_at).total_seconds() + START_WAIT_MARGIN
    else:
        left = expected + START_WAIT_MARGIN
    if left < 1:
        left = max(START_WAIT_OVERDUE, expected / 2)
    return min(START_WAIT_MAX, math.ceil(left))


def not_served_detail(model: str) -> str:
    """What to add to "model X is not served here" (needs an app context): ', its last service 3fa2... FAILED (the
    server crashed: ...)' for a model or adapter whose service ended in the last hour; for a LoRA adapter served by
    nothing lately, ' (a LoRA adapter of B: launch B with adapters [X])'; else ''."""
    try:
        rows = db.session.query(Service.id, Service.state, Service.reason, Service.model, Service.adapters_json).filter(
            Service.state.in_(State.TERMINAL), Service.ended_at >= utcnow() - timedelta(hours=1)).order_by(
            Service.ended_at.desc()).all()
        for row in rows:
            if row.model == model or model in json.loads(row.adapters_json or "[]"):
                reason = without_log_lines(row.reason)
                of = "" if row.model == model else f", which served it beside {row.model},"
                return f": its last service {row.id}{of} {row.state}" + (f" ({reason})" if reason else "")
        base = adapter_base(model)
    finally:
        db.session.remove()
    return f" (a LoRA adapter of {base}: launch {base} with adapters [{model}])" if base else ""

