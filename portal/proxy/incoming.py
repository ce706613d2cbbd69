"""The caller's request as the ASGI server hands it over, and a request body spooled to a temporary file.

Incoming wraps one ASGI request (scope, receive, send) with what the relay needs: method, headers, length or
chunked, content type, the body read whole (up to a limit) or block by block as it arrives, and, once the body is
read, a watch for the caller going away that closes the connection to the service (the engine then aborts).
SpooledBody is an upload the gateway kept (memory, then disk) to read its form fields before sending it on.
ClientGone and BodyTooLarge are how reading it fails.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, List, Optional, Tuple

if TYPE_CHECKING:
    from .upstream import UpstreamConnection


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


def raw_tail(scope, skip: int) -> bytes:
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
