"""The HTTP/1.1 server side of each worker: uvicorn's httptools protocol with the limits uvicorn leaves out.

uvicorn bounds neither a request's head (httptools keeps any amount of header bytes, in any number of fields) nor
the time it takes to arrive (its keep-alive timeout only runs between requests). PortalHttpProtocol adds both:
a head larger than MAX_HEAD_BYTES or with more than MAX_HEADER_FIELDS fields is answered 431 and the connection
closed; a head not complete within client_read_timeout seconds of the connection or of its first byte is answered
408 and closed (a new connection that sent nothing is just closed). The time limit comes from the application
(`PortalApp.client_read_timeout`, portal/asgi.py), read when a connection opens.
"""
from __future__ import annotations

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

MAX_HEAD_BYTES = 64 * 1024  # request line and headers
MAX_HEADER_FIELDS = 100
DEFAULT_HEAD_TIMEOUT = 30.0


class HeadTooLarge(Exception):
    pass


class PortalHttpProtocol(HttpToolsProtocol):
    """httptools' protocol with a size and count limit on request heads and a time limit for them to arrive."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_timeout = getattr(self.app, "client_read_timeout", DEFAULT_HEAD_TIMEOUT)
        self.in_head = True  # between a request's first byte (or the connection's start) and its head's end
        self.head_bytes = 0
        self.head_fields = self.head_size = 0  # the head's fields, and their bytes (with the request line's URL)
        self.head_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.head_timer = self.loop.call_later(self.head_timeout, self.head_timed_out)

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self.in_head:  # what httptools holds of an unfinished head (on_header counts a finished one exactly)
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, HeadTooLarge):
                return self.refuse(431, "Request Header Fields Too Large")
            self.logger.warning("Invalid HTTP request received.")
            return self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            return self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self.in_head and self.head_bytes > MAX_HEAD_BYTES:
            self.refuse(431, "Request Header Fields Too Large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head = True
        self.head_fields = self.head_size = 0
        if self.head_timer is None:
            self.head_bytes = 0
            self.head_timer = self.loop.call_later(self.head_timeout, self.head_timed_out)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > MAX_HEAD_BYTES:
            raise HeadTooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_fields += 1
        self.head_size += len(name) + len(value) + 4
        if self.head_fields > MAX_HEADER_FIELDS or self.head_size > MAX_HEAD_BYTES:
            raise HeadTooLarge()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or not self.in_head:
            return
        if self.head_bytes or getattr(self, "url", b"") or self.headers:  # a request was under way
            self.refuse(408, "Request Timeout")
        else:
            self.transport.close()

    def refuse(self, status: int, reason: str) -> None:
        """Answer with `status` and close, without a request reaching the application."""
        self._cancel_head_timer()
        self.in_head = False
        if self.transport.is_closing():
            return
        body = b'{"error": "%s"}' % reason.lower().encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, reason.encode(), len(body), body))
        self.transport.close()


class AnswerBody:
    """The body of an answer whose head went out through ASGI `send`, written by a callback as its parts arrive
    (the proxy writes a service's answer as each read of it is parsed). `write` takes a part at once and says
    whether the caller can take more; when it cannot, `flush` waits until it can. The end of the body goes
    through `send` as usual. This is the ASGI form, for any server: each part goes out when `flush` sends it."""

    __slots__ = ("send", "pending")

    def __init__(self, send):
        self.send = send
        self.pending = []

    def write(self, data: bytes) -> bool:
        self.pending.append(data)
        return False

    async def flush(self) -> None:
        if self.pending:
            data = b"".join(self.pending)
            self.pending.clear()
            await self.send({"type": "http.response.body", "body": data, "more_body": True})


class DirectAnswerBody(AnswerBody):
    """AnswerBody on this server's own connection (uvicorn's request cycle): each part is written to the caller's
    connection as it comes, framed as the answer's head chose (chunked, or counted against its Content-Length, as
    the cycle's `send` does), so a relayed stream costs no task switch per part. `write` says False once the
    connection's write buffer is full; `flush` then waits for it to drain."""

    __slots__ = ("cycle",)

    def __init__(self, send, cycle: RequestResponseCycle):
        super().__init__(send)
        self.cycle = cycle

    def write(self, data: bytes) -> bool:
        cycle = self.cycle
        if cycle.disconnected or cycle.response_complete:
            return True  # the caller is gone: the proxy's watch on the connection ends the relay
        if cycle.chunked_encoding:
            cycle.transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            if len(data) > cycle.expected_content_length:
                raise RuntimeError("Response content longer than Content-Length")
            cycle.expected_content_length -= len(data)
            cycle.transport.write(data)
        return not cycle.flow.write_paused

    async def flush(self) -> None:
        cycle = self.cycle
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()


def answer_body(send, method: str) -> AnswerBody:
    """How to write the body of the answer just started through `send`: straight to the connection when `send` is
    this server's (not for HEAD, whose answer has no body), else through ASGI."""
    cycle = getattr(send, "__self__", None)
    if isinstance(cycle, RequestResponseCycle) and cycle.response_started and method != "HEAD":
        return DirectAnswerBody(send, cycle)
    return AnswerBody(send)
