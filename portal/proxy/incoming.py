"""The caller's request as the ASGI server hands it over, and a request body spooled to a temporary file.

Incoming wraps one ASGI request (scope, receive, send) with what the relay needs: method, headers, length or
chunked, content type, the body read whole (up to a limit) or block by block as it arrives, and, once the body is
read, a watch for the caller going away that closes the connection to the service (the engine then aborts).
SpooledBody is an upload the gateway kept (memory, then disk) to read its form fields before sending it on: in
the worker's Spool (a private folder of PILOTFISH_HOME, with a cap on what all its uploads hold at once). Every
read counts the body against the request's limit (max_upload_mb), chunked bodies included. ClientGone,
BodyTooLarge and SpoolFull are how reading it fails.
"""
from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple

if TYPE_CHECKING:
    from .upstream import UpstreamConnection


class ClientGone(Exception):
    pass


class BodyTooLarge(Exception):
    pass


class SpoolFull(Exception):
    pass


SPOOL_IN_MEMORY = 1024 * 1024
UNLIMITED = 1 << 62


class Incoming:
    """The caller's request as the ASGI server hands it over (scope, receive, send), with what the proxy needs."""

    __slots__ = ("scope", "receive", "send", "method", "headers", "length", "chunked", "content_type", "gone",
                 "body_read", "started", "_watcher", "limit", "spool", "received", "principal", "grant")

    def __init__(self, scope, receive, send, limit: int = UNLIMITED, spool: Optional[Spool] = None):
        self.scope, self.receive, self.send = scope, receive, send
        self.limit, self.spool, self.received = limit, spool, 0
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
        self.principal: Optional[str] = None  # who is asking ("owner", "key:<name>"), once the proxy accepted it
        self.grant = None  # what a named key may do (portal.keys.KeyGrant); None for the owner

    def header(self, name: bytes) -> Optional[bytes]:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def mimetype(self) -> str:
        return self.content_type.partition(b";")[0].strip().lower().decode("latin-1")

    async def read(self, limit: int) -> bytes:
        """The whole body (BodyTooLarge past `limit` bytes, or past the request's limit)."""
        parts = []
        limit = min(limit, self.limit)
        while not self.body_read:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            data = message.get("body", b"")
            self.received += len(data)
            if self.received > limit:
                raise BodyTooLarge()
            parts.append(data)
            self.body_read = not message.get("more_body", False)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def blocks(self):
        """The body as it arrives (BodyTooLarge once past the request's limit)."""
        while not self.body_read:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            self.body_read = not message.get("more_body", False)
            data = message.get("body", b"")
            if data:
                self.received += len(data)
                if self.received > self.limit:
                    raise BodyTooLarge()
                yield data

    async def spooled(self) -> SpooledBody:
        """The whole body kept in the worker's spool (memory up to 1 MB, then a file of its private folder)."""
        spool = self.spool or Spool(None, UNLIMITED)
        body = SpooledBody(tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY, dir=spool.folder), 0, spool)
        try:
            async for data in self.blocks():
                spool.take(body, len(data))
                body.spool.write(data)
        except BaseException:
            body.close()
            raise
        return body

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

    def __init__(self, spool, size: int, budget: Optional[Spool] = None):
        self.spool, self.size, self.budget = spool, size, budget

    def close(self) -> None:
        self.spool.close()
        if self.budget is not None:
            self.budget.held -= self.size
            self.budget = None


class Spool:
    """Where one worker keeps uploads it reads before sending them on: a folder (None: the system's temporary
    folder) and a cap on the bytes all of them hold at once (SpoolFull past it)."""

    def __init__(self, folder: Optional[Path], cap: int):
        self.folder, self.cap, self.held = folder, cap, 0

    def take(self, body: SpooledBody, size: int) -> None:
        if self.held + size > self.cap:
            raise SpoolFull()
        self.held += size
        body.size += size


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
