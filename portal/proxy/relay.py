"""The relay: a request to a chosen service, its answer streamed back to the caller as it arrives.

Relay is the part of a worker's Proxy that does not decide where a request goes (portal/proxy/routing.py does):
it writes the request on a pooled connection (upstream.py) with the caller's credential replaced by the service's
own key and hop-by-hop headers dropped, streams a large or chunked body as it arrives (a small one is sent in one
write, and sent once more on a new connection if a kept-alive one turns out closed), relays the answer as it
arrives (its AnswerPump writes each part from the service connection's parser callback straight to the caller's
connection; the relay's task only wakes when the caller's buffer is full, the answer ends or the service goes
quiet), counts the request in flight and its activity (directory.py), records it (recording.py), applies the usage
protocol (usage.py), and turns a failure into an answer naming the service (answers.py). It also holds the
worker's view of the service directory (routes) and runs database work in a thread, off the event loop.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from typing import Dict, Optional, Tuple

from . import recording
from .answers import Answer, not_running, openai_error
from .directory import (DIRECTORY_MAX_AGE, REVISION_HEADER, ROUTABLE, SERVICE_HEADER, Route, ServiceDirectory,
                        stored_state)
from ..http_server import AnswerBody, answer_body
from .incoming import ClientGone, Incoming, SpooledBody
from .upstream import UpstreamConnection, UpstreamFailed, UpstreamPool
from .usage import usage_reader
from ..node_local import node_local_dir
from ..rate_limits import RateLimits
from ..usage_ledger import usage_ledger

log = logging.getLogger(__name__)

HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"te",
              b"trailer", b"trailers", b"transfer-encoding", b"upgrade"}
REQUEST_DROP = HOP_BY_HOP | {b"host", b"authorization", b"cookie", b"content-length", b"x-csrf-token", b"expect"}
# The portal's own date (as nginx) and its own marks of which service answered (directory.Route.answer_marks).
RESPONSE_DROP = HOP_BY_HOP | {b"set-cookie", b"content-length", b"date", b"server", SERVICE_HEADER, REVISION_HEADER}
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
UNSENT = frozenset({"refused", "connect_timeout", "impostor"})  # failures before anything reached the service
CHUNK = 64 * 1024


class Relay:
    """One worker's relay to the services: the connection pool, the directory, forwarding, answering."""

    def __init__(self, app):
        self.app = app
        self.directory: ServiceDirectory = app.extensions["pilotfish.directory"]
        config = app.config["PILOTFISH"]
        self.home = config.home
        self.connect_timeout = config.proxy_connect_timeout
        self.read_timeout = config.proxy_read_timeout
        self.pool = UpstreamPool()
        self.endpoint_load: Dict[tuple, int] = {}  # requests in flight per (host, port), in this worker
        self._refreshing: Optional[asyncio.Future] = None
        self.ledger = usage_ledger(app)  # who used what (portal/usage_ledger.py): each request, each busy spell
        # named keys' rates, shared by the workers on this node (portal/rate_limits.py), kept off the network file system
        self.rate_limits = RateLimits(node_local_dir(self.home))
        self.directory.on_busy = self.ledger.busy

    # database work, off the event loop
    def _in_app(self, function, *args):
        with self.app.app_context():
            return function(*args)

    async def in_thread(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(None, self._in_app, function, *args)

    async def routes(self, fresh: bool = False) -> Dict[str, Route]:
        """The live services: the cached ones, reloaded in a thread when asked to or never loaded. A cache past its
        time (DIRECTORY_TTL) is still answered from while a reload runs, but never one older than DIRECTORY_MAX_AGE:
        after a quiet spell the request waits for the reload instead of routing to a service that may have ended."""
        directory = self.directory
        if fresh or not directory.loaded or directory.changed:
            return await self.in_thread(directory.routes, True)
        if directory.stale:
            if self._refreshing is None:
                self._refreshing = asyncio.ensure_future(self.in_thread(directory.routes, True))
                self._refreshing.add_done_callback(self._refreshed)
            if directory.age > DIRECTORY_MAX_AGE:
                return await asyncio.shield(self._refreshing)
        return directory.cached

    def _refreshed(self, future: asyncio.Future) -> None:
        self._refreshing = None
        if not future.cancelled() and future.exception() is not None:
            log.error("could not reload the service directory: %s", future.exception())

    # answering
    async def reply(self, incoming: Incoming, answer: Answer, endpoint: str) -> Tuple[int, int]:
        recording.count_answer(endpoint, answer.status)
        incoming.started = True
        await incoming.send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
        await incoming.send({"type": "http.response.body", "body": answer.body, "more_body": False})
        return answer.status, len(answer.body)

    async def forward(self, incoming: Incoming, route: Route, target: bytes, body, payload,
                      endpoint: str) -> Tuple[int, int]:
        """Send the request to `route`; the answer streams back to the caller as it arrives."""
        method = incoming.method
        upstream_path = target.partition(b"?")[0].decode("latin-1")
        asked = payload.get("model") if isinstance(payload, dict) else None  # an adapter's requests are its own
        record = recording.start(route.id, asked if route.adapters and route.serves(asked) else route.model,
                                 incoming.principal or "owner", self.ledger)
        grant = incoming.grant
        if grant is not None and grant.tokens_per_minute:
            record.spend = functools.partial(self.rate_limits.spend, grant.name)
        usage = usage_reader(method, upstream_path, record.count_tokens)
        if usage is not None and isinstance(body, bytes):
            body = usage.ask(body, payload)
        directory = self.directory
        directory.begin(route.id)
        conn = None
        status = sent = 0
        load = self.endpoint_load
        place = None
        try:
            # The job of the service with the fewest requests in flight here; one that refuses the connection (nothing
            # sent yet) gives way to the next.
            order = route.endpoints
            if len(order) > 1:
                order = sorted(order, key=lambda where: load.get(where, 0))
            for index, where in enumerate(order):
                load[where] = load.get(where, 0) + 1
                place = where
                try:
                    conn, status = await self._send_request(incoming, route, where, target, body)
                    break
                except UpstreamFailed as failure:
                    load[where] -= 1
                    place = None
                    if failure.kind in UNSENT and index + 1 < len(order):
                        log.info("service %s: %s:%d %s; trying its next job", route.id, *where, failure.kind)
                        continue
                    record.failed(failure.metric_kind)
                    log.warning("service %s at %s:%d: %s%s", route.id, *where, failure.kind,
                                f" ({failure.detail})" if failure.detail else "")
                    return await self.reply(incoming, await self._failure_answer(route, failure, where), endpoint)
            out, content_type, stream, encoding, length = answer_headers(conn.headers)
            out.extend(route.answer_marks)
            record.answered(endpoint, status, stream)
            if usage is not None and not usage.expect(status, content_type, stream, encoding, length):
                usage = None
            if method == "HEAD":
                conn.keep_alive = False  # a HEAD answer has no body, whatever its headers say
                conn.complete = True
            incoming.started = True
            await incoming.send({"type": "http.response.start", "status": status, "headers": out})
            pump = AnswerPump(conn, answer_body(incoming.send, method), usage, record)
            try:
                pump.start()
                read_timeout = self.read_timeout
                while True:
                    if conn.held:
                        await pump.body.flush()
                        conn.release()
                    if conn.complete:
                        break
                    try:
                        await conn.until_held_or_complete(read_timeout)
                    except UpstreamFailed as failure:
                        if not incoming.gone:
                            record.failed(failure.metric_kind)
                            log.info("stream from service %s ended early: %s", route.id,
                                     failure.detail or failure.kind)
                        return status, pump.sent  # the caller's connection is closed: the answer shows as cut short
            finally:
                conn.sink = None
                sent = pump.sent
            await incoming.send({"type": "http.response.body", "body": pump.rest(), "more_body": False})
            return status, pump.sent
        except ClientGone:
            return 499, sent
        finally:
            incoming.stop_watching()
            if conn is not None:
                if conn.complete and conn.keep_alive and not (conn.lost or conn.chunks or conn.request_cut):
                    self.pool.release(conn)
                else:
                    conn.close()
            if usage is not None:
                usage.finish()
            record.finish()
            directory.end(route.id)
            if place is not None:
                load[place] -= 1

    async def _send_request(self, incoming: Incoming, route: Route, place: tuple, target: bytes, body):
        """Write the request to the service's job at `place` (host, port) (a fresh connection once more if a kept-alive
        one turns out closed); (connection, status) when the answer's head is in."""
        host, port = place
        lines = [b"%s %s HTTP/1.1" % (incoming.method.encode(), target), b"Host: %s:%d" % (host.encode(), port)]
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
            conn, reused = await self.pool.connect(host, port, self.connect_timeout, route.tls_fingerprint,
                                                   new=attempt > 1)
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

    async def _failure_answer(self, route: Route, failure: UpstreamFailed, place: tuple) -> Answer:
        if failure.kind in ("refused", "connection", "connect_timeout", "impostor"):
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
        if failure.kind == "impostor":  # nothing was sent to it: neither the request nor the service's key
            return openai_error(502, f"service {route.id} ({route.model}) is not answering at {place[0]}:{place[1]}"
                                     f": another program holds its port ({failure.detail})",
                                "upstream_error", "upstream_impostor")
        detail = f" ({failure.detail})" if failure.detail else ""
        verb = "refused the connection" if failure.kind == "refused" else "closed the connection"
        return openai_error(502, f"service {route.id} ({route.model}) {verb} at {place[0]}:{place[1]}{detail}",
                            "upstream_error", "upstream_unreachable")


class AnswerPump:
    """A service's answer body on its way to the caller, moved by the service connection's parser callbacks (no task
    wakes per part): the usage protocol applied to each part, the parts of one read written to the caller's
    AnswerBody together, the service's connection held when the caller cannot take more (the relay flushes, then
    releases it). The parts of the read that completes the answer are left in `pending` for the relay, which sends
    them with the answer's end in one write."""

    __slots__ = ("conn", "body", "usage", "record", "sent", "first", "pending")

    def __init__(self, conn: UpstreamConnection, body: AnswerBody, usage, record):
        self.conn, self.body, self.usage, self.record = conn, body, usage, record
        self.sent = 0
        self.first = True
        self.pending: list = []

    def start(self) -> None:
        """Take what came with the answer's head, then every part as it is parsed."""
        conn = self.conn
        while conn.chunks:
            self.feed(conn.chunks.popleft())
        conn.buffered = 0
        conn.sink = self
        self.read_done()

    def feed(self, data: bytes) -> None:
        if self.first:
            self.first = False
            self.record.first_byte()
        if self.usage is not None:
            data = self.usage.pass_on(data)
            if not data:
                return
        self.pending.append(data)

    def read_done(self) -> None:
        pending = self.pending
        if pending and not self.conn.complete:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            self.sent += len(data)
            if not self.body.write(data):
                self.conn.hold()

    def rest(self) -> bytes:
        """What is still to send when the answer has ended."""
        rest = b"".join(self.pending)
        self.pending.clear()
        if self.usage is not None:
            rest += self.usage.remainder()
        self.sent += len(rest)
        return rest


def answer_headers(headers):
    """(headers for the caller, content type, an event stream?, content encoding, content length) of a service's
    answer."""
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
    stream = content_type.startswith("text/event-stream")
    if stream:
        if not accel:
            out.append((b"x-accel-buffering", b"no"))
        if not cache:
            out.append((b"cache-control", b"no-cache"))
    return out, content_type, stream, encoding, length
