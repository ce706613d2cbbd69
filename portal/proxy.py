"""Streaming reverse proxy to each service (/services/<id>/...) and the OpenAI-compatible /v1 gateway.

The proxy runs on the event loop of each portal worker (`portal/asgi.py` hands it the requests to those paths):
one coroutine per request, a pool of keep-alive connections per service, bodies streamed both ways with flow
control, the caller's credential replaced by the service's own key. Anything the proxy does not accept (no valid
credential, a CSRF token missing) goes on to Flask, whose `authenticate` answers it; Flask also serves /v1/models.
The database is only read off the loop (the service directory refreshes in a thread; see ServiceDirectory).
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import httptools
from flask import Blueprint, current_app, jsonify
from werkzeug.formparser import MultiPartParser
from werkzeug.http import parse_options_header

from . import metrics
from .auth import CSRF_HEADER, NEEDS_LOOKUP, bearer_from_header, principal_from_bearer, principal_from_cookie
from .db import db
from .models import Service, State, utcnow

log = logging.getLogger(__name__)
bp = Blueprint("proxy", __name__)

HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"te",
              b"trailer", b"trailers", b"transfer-encoding", b"upgrade"}
REQUEST_DROP = HOP_BY_HOP | {b"host", b"authorization", b"cookie", b"content-length", b"x-csrf-token", b"expect"}
RESPONSE_DROP = HOP_BY_HOP | {b"set-cookie", b"content-length", b"date", b"server"}  # the portal's own date, as nginx
ROUTABLE = (State.RUNNING, State.UNHEALTHY)
STARTING = (State.SUBMITTED, State.PENDING, State.STARTING)
SERVICE_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
GATEWAY_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
CHUNK = 64 * 1024
MAX_JSON_BODY = 32 * 1024 * 1024
SPOOL_IN_MEMORY = 1024 * 1024
SMALL_BODY = 64 * 1024  # request bodies up to this size are read whole: sent in one write, and sent again if need be
READ_BUFFER_LIMIT = 1024 * 1024  # upstream bytes held for a slow caller before the upstream is paused
IDLE_PER_SERVICE = 256  # keep-alive connections kept per service
DIRECTORY_TTL = 1.0
ROUTES_CHANGED_FILE = "routes.changed"  # touched after every committed state change (routes_changed)
ACTIVITY_FLUSH_SECONDS = 10.0
SERVICE_ENDPOINT, GATEWAY_ENDPOINT = "proxy.service_proxy", "proxy.gateway"


# --- answers the portal makes itself ---------------------------------------------------------------------

@dataclass
class Answer:
    status: int
    body: bytes
    headers: List[Tuple[bytes, bytes]]


def json_answer(status: int, payload, headers: Optional[list] = None) -> Answer:
    body = json.dumps(payload).encode()
    return Answer(status, body, [(b"content-type", b"application/json"),
                                 (b"content-length", str(len(body)).encode())] + (headers or []))


def openai_error(status: int, message: str, type_: str, code: Optional[str] = None, param: Optional[str] = None,
                 retry_after: Optional[int] = None, **extra) -> Answer:
    """An error in the shape the openai client parses: {"error": {"message", "type", "param", "code"}}."""
    return json_answer(status, {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}},
                       [(b"retry-after", str(retry_after).encode())] if retry_after is not None else None)


# --- where services answer ---------------------------------------------------------------------------------

@dataclass
class Route:
    id: str
    state: str
    model: str
    kind: str
    host: Optional[str]
    port: Optional[int]
    api_key: str


def routes_changed(home) -> None:
    """Tell every worker's directory that a service's route changed (the reconciler calls it after committing a
    state change): their next request reloads before it routes, instead of using the cached directory."""
    path = Path(home) / ROUTES_CHANGED_FILE
    try:
        with open(path, "a"):
            os.utime(path)
    except OSError:
        log.exception("could not mark the service directory changed")


class ServiceDirectory:
    """Where each live service answers, cached for a second so the hot path does not query the database; a state
    change the reconciler commits (routes_changed) makes the next request reload first."""

    def __init__(self, home=None):
        self._routes: Dict[str, Route] = {}
        self._loaded = 0.0
        self._changed_file = str(Path(home) / ROUTES_CHANGED_FILE) if home is not None else None
        self._seen_change = self._change_mark()
        self._lock = threading.Lock()  # counters and activity: held for microseconds on the hot path
        self._refresh_lock = threading.Lock()  # reloading from the database: never blocks the counters
        self.in_flight: Dict[str, int] = {}
        self._activity: Dict[str, float] = {}
        self._flushed: Dict[str, float] = {}

    @property
    def cached(self) -> Dict[str, Route]:
        return self._routes

    @property
    def loaded(self) -> bool:
        return self._loaded > 0

    @property
    def stale(self) -> bool:
        return time.monotonic() - self._loaded > DIRECTORY_TTL

    def _change_mark(self) -> int:
        if self._changed_file is None:
            return 0
        try:
            return os.stat(self._changed_file).st_mtime_ns
        except OSError:
            return 0

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
                                            Service.port, Service.api_key).filter(
                        Service.state.in_(State.LIVE)).all()
                    db.session.remove()
                    self._routes = {row.id: Route(*row) for row in rows}
                    self._loaded = time.monotonic()
                    self._seen_change = mark
        return self._routes

    def begin(self, service_id: str) -> None:
        with self._lock:
            self.in_flight[service_id] = self.in_flight.get(service_id, 0) + 1

    def end(self, service_id: str) -> bool:
        """A request finished: count it out and note the activity; True when it is due to be written down."""
        now = time.time()
        with self._lock:
            self.in_flight[service_id] = max(0, self.in_flight.get(service_id, 1) - 1)
            self._activity[service_id] = now
            due = now - self._flushed.get(service_id, 0) >= ACTIVITY_FLUSH_SECONDS
            if due:
                self._flushed[service_id] = now
        return due

    @staticmethod
    def record_activity(service_id: str) -> None:
        """Write a service's last activity (needs an app context; best effort)."""
        try:
            Service.query.filter_by(id=service_id).update({"last_activity": utcnow()})
            db.session.commit()
        except Exception:  # activity is best effort; never fail a request over it
            db.session.rollback()
            log.exception("could not record activity of %s", service_id)
        finally:
            db.session.remove()


def running_models(routes: Dict[str, Route]) -> List[dict]:
    seen = {}
    for route in routes.values():
        if route.state == State.RUNNING and route.model not in seen:
            seen[route.model] = {"id": route.model, "object": "model", "created": 0, "owned_by": "pilotfish"}
    return list(seen.values())


@bp.get("/v1/models")
def gateway_models():
    return jsonify(object="list", data=running_models(current_app.extensions["pilotfish.directory"].routes()))


def not_running(service_id: str, state: Optional[str], reason: Optional[str] = None) -> Answer:
    if state is None:
        return openai_error(404, f"no service {service_id!r}", "not_found_error", "service_not_found")
    if state in STARTING:
        return openai_error(503, f"service {service_id} is {state}: it is not answering yet, retry shortly",
                            "service_unavailable", "service_not_running", state=state, retry_after=5)
    if state == State.UNHEALTHY:
        return openai_error(503, f"service {service_id} is UNHEALTHY", "service_unavailable", "service_not_running",
                            state=state, retry_after=5)
    reason = (reason or "").split("; last log lines:")[0]  # the log is one call away (GET .../logs)
    because = f" ({reason})" if reason else ""
    return openai_error(503, f"service {service_id} is {state}{because}: it has ended, launch it again",
                        "service_unavailable", "service_not_running", state=state)


def stored_state(service_id: str) -> Tuple[Optional[str], Optional[str]]:
    """(state, reason) of a service as stored, (None, None) for no such service (needs an app context)."""
    try:
        row = db.session.query(Service.state, Service.reason).filter_by(id=service_id).first() \
            if len(service_id) <= 16 else None
        return (row.state, row.reason) if row else (None, None)
    finally:
        db.session.remove()


def last_ended(model: str) -> str:
    """', its last service 3fa2... FAILED (the server crashed: ...)' for a model whose service ended in the last hour,
    else '' (needs an app context)."""
    try:
        row = db.session.query(Service.id, Service.state, Service.reason).filter(
            Service.model == model, Service.state.in_(State.TERMINAL),
            Service.ended_at >= utcnow() - timedelta(hours=1)).order_by(Service.ended_at.desc()).first()
    finally:
        db.session.remove()
    if row is None:
        return ""
    reason = (row.reason or "").split("; last log lines:")[0]
    return f": its last service {row.id} {row.state}" + (f" ({reason})" if reason else "")


# --- connections to services ---------------------------------------------------------------------------------

class UpstreamFailed(Exception):
    """kind: refused, connect_timeout, timeout (no answer in time), connection (closed before answering),
    interrupted (closed mid-answer)."""

    METRIC_KINDS = {"connect_timeout": "timeout"}  # pilotfish_proxy_upstream_errors_total{kind}

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(kind, detail)
        self.kind, self.detail = kind, detail

    @property
    def metric_kind(self) -> str:
        return self.METRIC_KINDS.get(self.kind, self.kind)


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to a service: writes a request, parses the answer (httptools) into a status, headers
    and body chunks handed out as they arrive; pauses the service when a slow caller lets too much pile up."""

    def __init__(self, key, pool: "UpstreamPool"):
        self.key = key
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: Optional[asyncio.Transport] = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.lost_reason = ""
        self._write_paused = False
        self._drained: Optional[asyncio.Future] = None
        self._reading_paused = False
        self.start()

    def start(self) -> None:
        """Ready for the next answer on this connection."""
        self.status = 0
        self.headers: List[Tuple[bytes, bytes]] = []
        self.chunks: collections.deque = collections.deque()
        self.buffered = 0
        self.got_head = False
        self.complete = False
        self.keep_alive = False
        self.request_cut = False  # the service answered before the whole request body was sent
        self.waiter: Optional[asyncio.Future] = None

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._lose("the service switched protocols")
        except httptools.HttpParserError as exc:
            self._lose(f"malformed answer from the service ({exc})")

    def connection_lost(self, exc) -> None:
        self.pool.forget(self)
        self.lost = True
        self.lost_reason = self.lost_reason or (type(exc).__name__ if exc else "closed by the service")
        self._wake()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if self.status >= 200 or self.status == 101:
            self.got_head = True
            self._wake()
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(None)  # an answer before the whole body: stop sending it
        else:  # an interim answer (100 Continue): the real one follows
            self.headers = []

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > READ_BUFFER_LIMIT and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.got_head:
            self.complete = True
            self._wake()

    # for the proxy
    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _lose(self, reason: str) -> None:
        self.lost_reason = reason
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.lost = True
        self._wake()

    def write(self, data: bytes) -> None:
        """Send (nothing once the connection is closing: uvloop raises there, and the answer tells what happened)."""
        if self.lost or self.transport.is_closing():
            self.lost = True
            return
        self.transport.write(data)

    async def drain(self) -> None:
        if self._write_paused and not self.lost:
            self._drained = self.loop.create_future()
            await self._drained

    async def _wait(self, timeout: float) -> None:
        self.waiter = waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    async def head(self, timeout: float) -> None:
        """Until the status and headers are in; UpstreamFailed("timeout" or "connection") otherwise."""
        while not self.got_head:
            if self.lost:
                raise UpstreamFailed("connection", self.lost_reason)
            try:
                await self._wait(timeout)
            except TimeoutError:
                raise UpstreamFailed("timeout") from None

    async def chunk(self, timeout: float) -> Optional[bytes]:
        """The body received since the last call, None at its end; UpstreamFailed if it stops short."""
        while not self.chunks:
            if self.complete:
                return None
            if self.lost:
                raise UpstreamFailed("interrupted", self.lost_reason)
            try:
                await self._wait(timeout)
            except TimeoutError:
                raise UpstreamFailed("timeout") from None
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join([chunks.popleft() for _ in range(len(chunks))])
        self.buffered = 0
        if self._reading_paused and not self.lost:
            self._reading_paused = False
            self.transport.resume_reading()
        return data


class UpstreamPool:
    """Idle keep-alive connections per service address (one pool per worker process and event loop)."""

    def __init__(self):
        self.idle: Dict[tuple, List[UpstreamConnection]] = {}

    async def connect(self, host: str, port: int, timeout: float) -> Tuple[UpstreamConnection, bool]:
        """(connection, reused): an idle connection if there is a live one, else a new one."""
        key = (host, port)
        idle = self.idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.lost:
                conn.start()
                return conn, True
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(lambda: UpstreamConnection(key, self), host, port),
                                             timeout)
        except asyncio.TimeoutError:
            raise UpstreamFailed("connect_timeout") from None
        except OSError as exc:
            raise UpstreamFailed("refused", type(exc).__name__) from None
        return conn, False

    def release(self, conn: UpstreamConnection) -> None:
        idle = self.idle.setdefault(conn.key, [])
        if len(idle) < IDLE_PER_SERVICE:
            idle.append(conn)
        else:
            conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection closed (by the service, or the service ended): no longer kept."""
        idle = self.idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
            if not idle:
                del self.idle[conn.key]


# --- one request -----------------------------------------------------------------------------------------------

class ClientGone(Exception):
    pass


class BodyTooLarge(Exception):
    pass


class Incoming:
    """The caller's request as the ASGI server hands it over (scope, receive, send), with what the proxy needs."""

    __slots__ = ("scope", "receive", "send", "method", "headers", "length", "chunked", "content_type", "gone",
                 "body_read", "started", "_watcher")

    def __init__(self, scope, receive, send):
        self.scope, self.receive, self.send = scope, receive, send
        self.method: str = scope["method"]
        self.headers: List[Tuple[bytes, bytes]] = scope["headers"]
        self.length: Optional[int] = None
        self.chunked = False
        self.content_type = b""
        for name, value in self.headers:
            if name == b"content-length":
                self.length = int(value) if value.isdigit() else None
            elif name == b"transfer-encoding":
                self.chunked = b"chunked" in value.lower()
            elif name == b"content-type":
                self.content_type = value
        self.gone = False
        self.started = False  # the answer's status line went out
        self.body_read = self.length == 0 or (self.length is None and not self.chunked)
        self._watcher: Optional[asyncio.Task] = None

    def header(self, name: bytes) -> Optional[bytes]:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def mimetype(self) -> str:
        return self.content_type.partition(b";")[0].strip().lower().decode("latin-1")

    async def read(self, limit: int) -> bytes:
        """The whole body (BodyTooLarge past `limit` bytes)."""
        parts, size = [], 0
        while not self.body_read:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            data = message.get("body", b"")
            size += len(data)
            if size > limit:
                raise BodyTooLarge()
            parts.append(data)
            self.body_read = not message.get("more_body", False)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def blocks(self):
        """The body as it arrives."""
        while not self.body_read:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            self.body_read = not message.get("more_body", False)
            data = message.get("body", b"")
            if data:
                yield data

    def watch_disconnect(self, conn: UpstreamConnection) -> None:
        """Once the body is read: a caller that goes away closes the upstream connection (the engine aborts)."""

        async def watch():
            while True:
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    self.gone = True
                    conn.close()
                    return

        self._watcher = asyncio.ensure_future(watch())

    def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None


class SpooledBody:
    """A request body kept in a temporary file (the gateway read its form fields), sent on from there."""

    def __init__(self, spool, size: int):
        self.spool, self.size = spool, size


def _raw_tail(scope, skip: int) -> bytes:
    """The request target after its first `skip` path segments, as the caller sent it (still %-encoded), with the
    query string."""
    raw = scope.get("raw_path") or scope["path"].encode()
    cut = 0
    for _ in range(skip):
        cut = raw.find(b"/", cut + 1)
        if cut < 0:
            cut = len(raw)
            break
    tail = raw[cut:] or b"/"
    query = scope.get("query_string")
    return tail + b"?" + query if query else tail


class Proxy:
    """The proxy and gateway of one worker: authentication, routing, forwarding, metrics, activity."""

    def __init__(self, app):
        self.app = app
        self.directory: ServiceDirectory = app.extensions["pilotfish.directory"]
        config = app.config["PILOTFISH"]
        self.connect_timeout = config.proxy_connect_timeout
        self.read_timeout = config.proxy_read_timeout
        self.pool = UpstreamPool()
        self._refreshing: Optional[asyncio.Future] = None
        self._background: set = set()  # tasks nobody awaits (activity writes), held until they end

    # database work, off the event loop
    def _in_app(self, function, *args):
        with self.app.app_context():
            return function(*args)

    async def in_thread(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(None, self._in_app, function, *args)

    async def routes(self, fresh: bool = False) -> Dict[str, Route]:
        """The live services: the cached ones, reloaded in a thread when asked to or never loaded; a stale cache is
        still answered from while a reload runs."""
        directory = self.directory
        if fresh or not directory.loaded or directory.changed:
            return await self.in_thread(directory.routes, True)
        if directory.stale and self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self.in_thread(directory.routes, True))
            self._refreshing.add_done_callback(self._refreshed)
        return directory.cached

    def _refreshed(self, future: asyncio.Future) -> None:
        self._refreshing = None
        if not future.cancelled() and future.exception() is not None:
            log.error("could not reload the service directory: %s", future.exception())

    # who is asking
    async def principal(self, incoming: Incoming) -> Optional[str]:
        """The caller ("owner" or "key:<name>") if the proxy can accept the request; None lets Flask answer it."""
        authorization = incoming.header(b"authorization")
        if authorization is not None:
            token = bearer_from_header(authorization.decode("latin-1"))
            if token is not None:
                principal = principal_from_bearer(token, self.app, cached_only=True)
                if principal is NEEDS_LOOKUP:
                    principal = await self.in_thread(principal_from_bearer, token)
                return principal
        cookie = incoming.header(b"cookie")
        if cookie is not None:
            csrf = incoming.header(CSRF_HEADER.lower().encode())
            return principal_from_cookie(self.app, cookie.decode("latin-1"), incoming.method,
                                         csrf.decode("latin-1") if csrf is not None else None)
        return None

    # answering
    async def reply(self, incoming: Incoming, answer: Answer, endpoint: str) -> Tuple[int, int]:
        metrics.instruments().count_request(endpoint, answer.status)
        incoming.started = True
        await incoming.send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
        await incoming.send({"type": "http.response.body", "body": answer.body, "more_body": False})
        return answer.status, len(answer.body)

    async def service(self, incoming: Incoming, service_id: str, path: str, skip: int) -> Tuple[int, int]:
        """/services/<id>/<path>: to that service, whatever it is."""
        routes = await self.routes()
        route = routes.get(service_id)
        if route is None or route.state not in ROUTABLE or not route.port:
            route = (await self.routes(fresh=True)).get(service_id)
        if route is None or route.state not in ROUTABLE or not route.port:
            state, reason = (route.state, None) if route is not None else await self.in_thread(stored_state, service_id)
            return await self.reply(incoming, not_running(service_id, state, reason), SERVICE_ENDPOINT)
        body = None
        if path.endswith("completions") and metrics.wants_json_body(incoming.method, incoming.mimetype,
                                                                     incoming.length):
            body = await incoming.read(metrics.USAGE_BODY_LIMIT)  # so a stream can ask for usage (metrics.ProxyWatch)
        elif incoming.length is not None and 0 < incoming.length <= SMALL_BODY:
            body = await incoming.read(SMALL_BODY)
        return await self.forward(incoming, route, _raw_tail(incoming.scope, skip), body, None, SERVICE_ENDPOINT)

    async def gateway(self, incoming: Incoming, path: str, skip: int) -> Tuple[int, int]:
        """/v1/<path>: to a running service of the body's `model` (the one with the fewest requests in flight)."""
        model, payload, body, error = await self.model_of(incoming)
        if error is not None:
            return await self.reply(incoming, error, GATEWAY_ENDPOINT)
        routes = await self.routes()
        if path.startswith("models/") and incoming.method == "GET":
            model = path[len("models/"):]
            found = [entry for entry in running_models(routes) if entry["id"] == model]
            if found:
                return await self.reply(incoming, json_answer(200, found[0]), GATEWAY_ENDPOINT)
        if not model or not isinstance(model, str):
            return await self.reply(incoming, openai_error(
                400, "model: required, to choose the service (GET /v1/models lists them)", "invalid_request_error",
                "model_required", param="model"), GATEWAY_ENDPOINT)
        candidates = [route for route in routes.values() if route.model == model]
        if not any(route.state == State.RUNNING for route in candidates):
            routes = await self.routes(fresh=True)
            candidates = [route for route in routes.values() if route.model == model]
        ready = [route for route in candidates if route.state == State.RUNNING and route.port]
        if not ready:
            ready = [route for route in candidates if route.state == State.UNHEALTHY and route.port]
        if not ready:
            if candidates:
                states = sorted({route.state for route in candidates})
                answer = openai_error(503, f"model {model!r} is not ready yet ({', '.join(states)}): retry shortly",
                                      "service_unavailable", "model_not_ready", param="model", retry_after=5)
            else:
                available = sorted(entry["id"] for entry in running_models(routes))
                ended = await self.in_thread(last_ended, model)
                answer = openai_error(404, f"model {model!r} is not served here{ended}; available: "
                                           f"{', '.join(available) if available else 'none (launch a service first)'}",
                                      "not_found_error", "model_not_found", param="model")
            return await self.reply(incoming, answer, GATEWAY_ENDPOINT)
        in_flight = self.directory.in_flight
        route = min(ready, key=lambda r: in_flight.get(r.id, 0))
        return await self.forward(incoming, route, _raw_tail(incoming.scope, skip), body, payload, GATEWAY_ENDPOINT)

    async def model_of(self, incoming: Incoming):
        """(model, decoded JSON or None, body to send on or None, error Answer or None) of a /v1 request."""
        mimetype = incoming.mimetype
        if mimetype == "application/json" or (mimetype == "" and (incoming.length or incoming.chunked)):
            if incoming.length and incoming.length > MAX_JSON_BODY:
                return None, None, None, openai_error(413, "request body too large", "invalid_request_error")
            try:
                raw = await incoming.read(MAX_JSON_BODY)
            except BodyTooLarge:
                return None, None, None, openai_error(413, "request body too large", "invalid_request_error")
            try:
                payload = json.loads(raw or b"{}")
                model = payload.get("model")
            except (ValueError, AttributeError):
                return None, None, None, openai_error(400, "the body is not a JSON object", "invalid_request_error")
            return model, payload, raw, None
        if mimetype == "multipart/form-data":
            # Spool the upload (memory up to 1 MB, then disk), read only the form fields, then send it on as it was.
            spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
            size = 0
            async for data in incoming.blocks():
                spool.write(data)
                size += len(data)
            _, params = parse_options_header(incoming.content_type.decode("latin-1"))
            try:
                model = await self.in_thread(_form_model, spool, params.get("boundary", ""), size)
            except ValueError:
                spool.close()
                return None, None, None, openai_error(400, "malformed multipart body", "invalid_request_error")
            return model, None, SpooledBody(spool, size), None
        return None, None, None, None

    async def forward(self, incoming: Incoming, route: Route, target: bytes, body, payload,
                      endpoint: str) -> Tuple[int, int]:
        """Send the request to `route`; the answer streams back to the caller as it arrives."""
        method = incoming.method
        upstream_path = target.partition(b"?")[0].decode("latin-1")
        watch = metrics.watch_proxy(route.id, route.model, method, upstream_path)
        if isinstance(body, bytes):
            body = watch.prepare(body, payload)
        directory = self.directory
        directory.begin(route.id)
        conn = None
        status = sent = 0
        try:
            try:
                conn, status = await self._send_request(incoming, route, target, body)
            except UpstreamFailed as failure:
                watch.failed(failure.metric_kind)
                return await self.reply(incoming, await self._failure_answer(route, failure), endpoint)
            metrics.instruments().count_request(endpoint, status)
            out, content_type, encoding, length = _answer_headers(conn.headers)
            watch.answered(status, content_type, encoding, length)
            if method == "HEAD":
                conn.keep_alive = False  # a HEAD answer has no body, whatever its headers say
                conn.complete = True
            incoming.started = True
            await incoming.send({"type": "http.response.start", "status": status, "headers": out})
            send = incoming.send
            read_timeout = self.read_timeout
            while True:
                try:
                    data = await conn.chunk(read_timeout)
                except UpstreamFailed as failure:
                    if not incoming.gone:
                        watch.failed(failure.metric_kind)
                        log.info("stream from service %s ended early: %s", route.id, failure.detail or failure.kind)
                    return status, sent  # the caller's connection is closed: the answer shows as cut short
                if data is None:
                    break
                data = watch.pass_on(data)
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                    sent += len(data)
            rest = watch.remainder()
            await send({"type": "http.response.body", "body": rest, "more_body": False})
            return status, sent + len(rest)
        except ClientGone:
            return 499, sent
        finally:
            incoming.stop_watching()
            if conn is not None:
                if conn.complete and conn.keep_alive and not (conn.lost or conn.chunks or conn.request_cut):
                    self.pool.release(conn)
                else:
                    conn.close()
            if isinstance(body, SpooledBody):
                body.spool.close()
            watch.finish()
            if directory.end(route.id):
                task = asyncio.ensure_future(self.in_thread(directory.record_activity, route.id))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _send_request(self, incoming: Incoming, route: Route, target: bytes, body):
        """Write the request (a fresh connection once more if a kept-alive one turns out closed); (connection,
        status) when the answer's head is in."""
        lines = [b"%s %s HTTP/1.1" % (incoming.method.encode(), target), b"Host: %s:%d" % (route.host.encode(),
                                                                                            route.port)]
        connection_tokens = ()
        for name, value in incoming.headers:
            if name == b"connection":
                connection_tokens = {token.strip().lower() for token in value.split(b",")}
        for name, value in incoming.headers:
            if name not in REQUEST_DROP and name not in connection_tokens:
                lines.append(name + b": " + value)
        lines.append(b"Authorization: Bearer " + route.api_key.encode())
        streamed = None
        if isinstance(body, bytes):
            lines.append(b"Content-Length: %d" % len(body))
        elif isinstance(body, SpooledBody):
            lines.append(b"Content-Length: %d" % body.size)
        elif not incoming.body_read:
            streamed = "length" if incoming.length is not None else "chunked"
            lines.append(b"Content-Length: %d" % incoming.length if streamed == "length"
                         else b"Transfer-Encoding: chunked")
        elif incoming.method not in BODYLESS_METHODS:
            lines.append(b"Content-Length: 0")
        head = b"\r\n".join(lines) + b"\r\n\r\n"
        replayable = streamed is None
        for attempt in (1, 2):
            conn, reused = await self.pool.connect(route.host, route.port, self.connect_timeout)
            try:
                if isinstance(body, bytes):
                    conn.write(head + body)
                else:
                    conn.write(head)
                    # The service may answer before it has the whole body (an error): then the rest is not sent.
                    if isinstance(body, SpooledBody):
                        body.spool.seek(0)
                        while True:
                            data = body.spool.read(CHUNK)
                            if not data:
                                break
                            if conn.lost or conn.got_head:
                                conn.request_cut = True
                                break
                            conn.write(data)
                            await conn.drain()
                    elif streamed is not None:
                        async for data in incoming.blocks():
                            if conn.lost or conn.got_head:
                                conn.request_cut = True
                                break
                            conn.write(b"%x\r\n%s\r\n" % (len(data), data) if streamed == "chunked" else data)
                            await conn.drain()
                        if streamed == "chunked" and not conn.request_cut:
                            conn.write(b"0\r\n\r\n")
                incoming.watch_disconnect(conn)
                await conn.head(self.read_timeout)
                return conn, conn.status
            except UpstreamFailed as failure:
                conn.close()
                incoming.stop_watching()
                if incoming.gone:
                    raise ClientGone() from None
                if failure.kind == "connection" and reused and replayable and attempt == 1:
                    continue  # the service had closed this idle connection: once more on a new one
                raise
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    async def _failure_answer(self, route: Route, failure: UpstreamFailed) -> Answer:
        if failure.kind in ("refused", "connection", "connect_timeout"):
            # The service may have just ended (a crash the reconciler has recorded): say so, in its words.
            current = (await self.routes(fresh=True)).get(route.id)
            if current is None or current.state not in ROUTABLE:
                state, reason = (current.state, None) if current is not None else \
                    await self.in_thread(stored_state, route.id)
                if state is not None:
                    return not_running(route.id, state, reason)
        if failure.kind in ("timeout", "connect_timeout"):
            seconds = self.read_timeout if failure.kind == "timeout" else self.connect_timeout
            return openai_error(504, f"service {route.id} ({route.model}) did not answer within {seconds:g} s",
                                "upstream_timeout", "upstream_timeout")
        detail = f" ({failure.detail})" if failure.detail else ""
        verb = "refused the connection" if failure.kind == "refused" else "closed the connection"
        return openai_error(502, f"service {route.id} ({route.model}) {verb} at {route.host}:{route.port}{detail}",
                            "upstream_error", "upstream_unreachable")


def _answer_headers(headers):
    """(headers for the caller, content type, content encoding, content length) of a service's answer."""
    out = []
    content_type = encoding = ""
    length = None
    chunked = accel = cache = False
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            length = value.decode("latin-1")
        elif lower == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif lower == b"content-type":
            content_type = value.decode("latin-1")
        elif lower == b"content-encoding":
            encoding = value.decode("latin-1")
        elif lower == b"x-accel-buffering":
            accel = True
        elif lower == b"cache-control":
            cache = True
        if lower not in RESPONSE_DROP:
            out.append((name, value))
    if length is not None and not chunked:
        out.append((b"content-length", length.encode()))
    if content_type.startswith("text/event-stream"):
        if not accel:
            out.append((b"x-accel-buffering", b"no"))
        if not cache:
            out.append((b"cache-control", b"no-cache"))
    return out, content_type, encoding, length


class _Discard:
    def write(self, data):
        return len(data)

    def seek(self, *args):
        return 0

    def read(self, *args):
        return b""


def _form_model(spool, boundary: str, size: int):
    """The `model` field of a spooled multipart body (ValueError if it is malformed)."""
    spool.seek(0)
    form, _ = MultiPartParser(stream_factory=lambda *a, **k: _Discard()).parse(spool, boundary.encode(), size)
    return form.get("model")


def init_proxy(app) -> None:
    app.extensions["pilotfish.directory"] = ServiceDirectory(app.config["PILOTFISH"].home)
    app.register_blueprint(bp)
