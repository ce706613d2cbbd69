"""Connections to the services: a hand-written HTTP/1.1 client on httptools, and a pool of keep-alive connections.

UpstreamConnection writes one request at a time and parses the answer as it arrives into a status, headers and
body chunks handed out to the relay; both directions have flow control (a slow caller lets at most
READ_BUFFER_LIMIT bytes pile up before the service is paused; a service that stops reading pauses the upload, and
one that answers before the whole body is sent stops it). UpstreamPool keeps idle connections per service address,
one pool per worker process and event loop. Failures are UpstreamFailed with a kind the answers and metrics use.
"""
from __future__ import annotations

import asyncio
import collections
from typing import Dict, List, Optional, Tuple

import httptools

READ_BUFFER_LIMIT = 1024 * 1024  # upstream bytes held for a slow caller before the upstream is paused
IDLE_PER_SERVICE = 256  # keep-alive connections kept per service


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
