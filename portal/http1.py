"""The HTTP/1.1 client connection on httptools, the one both the proxy and the load generators use.

ClientConnection writes one request at a time and parses the answer as it arrives into a status, headers and
body chunks, queued for whoever reads them or handed as they are parsed to a sink (the proxy's relay); both
directions have flow control (a slow reader lets at most READ_BUFFER_LIMIT bytes pile up before the server is
paused, a sink holds the reading until its reader has caught up; a server that stops reading pauses the upload, and
one that answers before the whole body is sent stops it). The proxy pools these (portal/proxy/upstream.py).

TimedConnection is the same connection for measuring (portal/benchmark_requests.py, benchmarks/proxy.py): the body
goes, as it is parsed, to a sink with the time its bytes were read, rather than waiting in the queue for a reader.

Failures are RequestFailed with a kind the proxy's answers and metrics, and the load generators' error counts, use.
"""
from __future__ import annotations

import asyncio
import collections
import ssl as ssl_module
import time
from typing import Callable, List, Optional, Protocol, Tuple

import httptools

READ_BUFFER_LIMIT = 1024 * 1024  # answer bytes held for a slow reader before the server is paused
perf = time.perf_counter


class RequestFailed(Exception):
    """kind: refused (detail: the connect error's name), connect_timeout, timeout (no answer in time), connection
    (closed before answering), interrupted (closed mid-answer); a TimedConnection also gives bad_response."""

    METRIC_KINDS = {"connect_timeout": "timeout"}  # pilotfish_proxy_upstream_errors_total{kind}

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(kind, detail)
        self.kind, self.detail = kind, detail

    @property
    def metric_kind(self) -> str:
        return self.METRIC_KINDS.get(self.kind, self.kind)


async def connect(factory: Callable[[], "ClientConnection"], host: str, port: int, timeout: float,
                  ssl=None) -> "ClientConnection":
    """A new connection made by `factory` (TLS with the `ssl` context); RequestFailed("connect_timeout"), "impostor"
    when the TLS handshake fails, or "refused" with the error's name."""
    loop = asyncio.get_running_loop()
    try:
        _, conn = await asyncio.wait_for(loop.create_connection(factory, host, port, ssl=ssl), timeout)
    except asyncio.TimeoutError:
        raise RequestFailed("connect_timeout") from None
    except ssl_module.SSLError as exc:  # the peer does not speak TLS, or not as a service does
        raise RequestFailed("impostor", f"TLS handshake failed: {exc.reason or type(exc).__name__}") from None
    except OSError as exc:
        raise RequestFailed("refused", type(exc).__name__) from None
    return conn


class Sink(Protocol):
    """What takes an answer's body as it is parsed: `feed` for each part, `read_done` after each read from the
    server (the parts of one read can go on together)."""

    def feed(self, data: bytes) -> None: ...

    def read_done(self) -> None: ...


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class ClientConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to a server: writes a request, parses the answer (httptools) into a status, headers
    and body chunks handed out as they arrive; pauses the server when a slow reader lets too much pile up."""

    def __init__(self):
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
        self.request_cut = False  # the server answered before the whole request body was sent
        self.waiter: Optional[asyncio.Future] = None
        self.sink: Optional[Sink] = None  # takes the body as it is parsed, instead of the queue
        self.held = False  # the sink stopped reading until its reader has caught up (hold, release)
        self.last_read = self.loop.time()

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._lose("the service switched protocols")
        except httptools.HttpParserError as exc:
            self._lose(f"malformed answer from the service ({exc})")
        sink = self.sink
        if sink is not None:
            sink.read_done()

    def connection_lost(self, exc) -> None:
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
        sink = self.sink
        if sink is not None:
            sink.feed(body)
            return
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

    # for the reader
    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _lose(self, reason: str) -> None:
        self.lost_reason = reason
        self.close()

    def close(self) -> None:
        """Drop the connection now: nothing more is sent or awaited (over TLS, no closing handshake either, which
        would keep the connection open while the server goes on writing)."""
        if self.transport is not None:
            self.transport.abort()
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
        """Until the status and headers are in; RequestFailed("timeout" or "connection") otherwise."""
        while not self.got_head:
            if self.lost:
                raise RequestFailed("connection", self.lost_reason)
            try:
                await self._wait(timeout)
            except TimeoutError:
                raise RequestFailed("timeout") from None

    def hold(self) -> None:
        """Stop reading from the server until `release` (the sink's reader cannot take more yet), and wake the reader."""
        if not self.held:
            self.held = True
            if not self._reading_paused and not self.lost and self.transport is not None:
                self._reading_paused = True
                self.transport.pause_reading()
            self._wake()

    def release(self) -> None:
        """Read from the server again after `hold`."""
        self.held = False
        self.last_read = self.loop.time()  # the time held does not count against the server
        if self._reading_paused and not self.lost:
            self._reading_paused = False
            self.transport.resume_reading()

    async def until_held_or_complete(self, timeout: float) -> None:
        """With a sink taking the body: until it holds the reading or the answer is complete. RequestFailed
        "interrupted" if the connection ends first, "timeout" after `timeout` seconds without a byte from the
        server. The body's reads wake nobody: one timer per `timeout`, not one per read."""
        while not (self.held or self.complete):
            if self.lost:
                raise RequestFailed("interrupted", self.lost_reason)
            remaining = self.last_read + timeout - self.loop.time()
            if remaining <= 0:
                raise RequestFailed("timeout")
            try:
                await self._wait(remaining)
            except TimeoutError:
                pass  # a read may have come meanwhile: the loop looks again

    async def chunk(self, timeout: float) -> Optional[bytes]:
        """The body received since the last call, None at its end; RequestFailed if it stops short."""
        while not self.chunks:
            if self.complete:
                return None
            if self.lost:
                raise RequestFailed("interrupted", self.lost_reason)
            try:
                await self._wait(timeout)
            except TimeoutError:
                raise RequestFailed("timeout") from None
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join([chunks.popleft() for _ in range(len(chunks))])
        self.buffered = 0
        if self._reading_paused and not self.lost:
            self._reading_paused = False
            self.transport.resume_reading()
        return data


class TimedConnection(ClientConnection):
    """A ClientConnection for measuring: each answer's body goes, as it is parsed, to the sink `begin` chose for its
    status, with the time the read that brought it arrived; `answer` waits for the end of the answer."""

    choose_sink: Optional[Callable[[int], object]] = None
    answer_sink = None
    failure: Optional[str] = None
    arrived = last_data = 0.0

    def begin(self, choose_sink: Callable[[int], object]) -> None:
        """Ready for the next answer: `choose_sink(status)` returns what takes its body (`feed(data, arrived)`)."""
        self.start()
        self.choose_sink = choose_sink
        self.answer_sink = None
        self.failure = None
        self.arrived = self.last_data = perf()

    def data_received(self, data: bytes) -> None:
        self.arrived = self.last_data = perf()
        ClientConnection.data_received(self, data)

    def connection_lost(self, exc) -> None:
        if self.got_head and not self.complete and self._until_close():
            self.complete = True  # a body without a length ends when the connection does
        ClientConnection.connection_lost(self, exc)

    def _until_close(self) -> bool:
        names = {name.lower(): value.lower() for name, value in self.headers}
        return b"content-length" not in names and b"chunked" not in names.get(b"transfer-encoding", b"")

    def _lose(self, reason: str) -> None:
        self.failure = self.failure or "bad_response"
        ClientConnection._lose(self, reason)

    def on_headers_complete(self) -> None:
        ClientConnection.on_headers_complete(self)
        if self.got_head and self.choose_sink is not None:
            self.answer_sink = self.choose_sink(self.status)

    def on_body(self, body: bytes) -> None:
        if self.failure is None and self.answer_sink is not None:
            try:
                self.answer_sink.feed(body, self.arrived)
            except (ValueError, UnicodeDecodeError):
                self._lose("the answer could not be read")

    async def answer(self, timeout: float) -> None:
        """Until the whole answer is in. RequestFailed: "timeout" when no byte came for `timeout` seconds,
        "bad_response" when it could not be parsed or read, "connection" when the connection closed first."""
        while not self.complete or self.failure is not None:
            if self.failure is not None:
                raise RequestFailed(self.failure, self.lost_reason)
            if self.lost:
                raise RequestFailed("connection", self.lost_reason)
            idle = perf() - self.last_data
            if idle >= timeout:
                raise RequestFailed("timeout")
            try:
                await self._wait(timeout - idle)
            except TimeoutError:
                pass
