"""Connections to the services: the HTTP/1.1 client connection on httptools (portal/http1.py, shared with the load
generators), and a pool of keep-alive connections.

UpstreamConnection is that connection kept in a pool: it writes one request at a time and parses the answer as it
arrives into a status, headers and body chunks handed out to the relay, with flow control both ways (a slow caller
lets at most READ_BUFFER_LIMIT bytes pile up before the service is paused; a service that stops reading pauses the
upload, and one that answers before the whole body is sent stops it). UpstreamPool keeps idle connections per
service address, one pool per worker process and event loop. Failures are UpstreamFailed with a kind the answers
and metrics use.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ..http1 import READ_BUFFER_LIMIT, ClientConnection, RequestFailed, connect
from ..service_tls import WrongCertificate, check_peer, client_context

__all__ = ["IDLE_PER_SERVICE", "READ_BUFFER_LIMIT", "UpstreamConnection", "UpstreamFailed", "UpstreamPool"]

IDLE_PER_SERVICE = 256  # keep-alive connections kept per service
UpstreamFailed = RequestFailed  # kind: refused, connect_timeout, timeout, connection, interrupted, impostor


class UpstreamConnection(ClientConnection):
    """One HTTP/1.1 connection to a service, forgotten by its pool when it closes."""

    def __init__(self, key, pool: "UpstreamPool"):
        self.key = key
        self.pool = pool
        super().__init__()

    def connection_lost(self, exc) -> None:
        self.pool.forget(self)
        super().connection_lost(exc)


class UpstreamPool:
    """Idle keep-alive connections per service address (one pool per worker process and event loop)."""

    def __init__(self):
        self.idle: Dict[tuple, List[UpstreamConnection]] = {}

    async def connect(self, host: str, port: int, timeout: float, pin: Optional[str] = None,
                      new: bool = False) -> Tuple[UpstreamConnection, bool]:
        """(connection, reused): an idle connection if there is a live one (unless `new`), else a new one. With `pin`
        (the service's certificate fingerprint) the connection is TLS, and a peer without that certificate is
        UpstreamFailed "impostor" before anything is sent to it."""
        key = (host, port, pin)
        idle = None if new else self.idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.lost:
                conn.start()
                return conn, True
        conn = await connect(lambda: UpstreamConnection(key, self), host, port, timeout,
                             client_context() if pin else None)
        if pin:
            try:
                check_peer(conn.transport.get_extra_info("ssl_object"), pin)
            except WrongCertificate as exc:
                conn.close()
                raise UpstreamFailed("impostor", str(exc)) from None
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
