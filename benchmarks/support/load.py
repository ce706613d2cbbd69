"""The proxy benchmark's load generator: HTTP/1.1 answers parsed by the client connection the proxy and
`pilotfish bench` use (portal/http1.py's TimedConnection), with the time each read arrived.

Scenario 1 (latency): one client, sequential requests on one keep-alive connection, over a blocking socket (the
least client overhead): the connection is fed by hand. Scenario 2 (streams): C concurrent clients on asyncio, each
on its own keep-alive connection, counting SSE events and timing the first body bytes (TTFT).
Percentiles are portal/distribution.py's (nearest rank).
"""
from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Callable, Dict, List, Optional

from portal.distribution import percentile
from portal.http1 import RequestFailed, TimedConnection, connect

LOOPBACK = "127.0.0.1"
perf = time.perf_counter


class Answer:
    """What is kept of an answer's body as it arrives: when its first bytes came, SSE events (blank-line separated)
    counted, and the body itself if asked."""

    __slots__ = ("first", "events", "last", "body")

    def __init__(self, keep_body: bool = False):
        self.first: Optional[float] = None
        self.events = 0
        self.last = b""
        self.body = bytearray() if keep_body else None

    def feed(self, data: bytes, now: float) -> None:
        if not data:
            return
        if self.first is None:
            self.first = now
        self.events += (self.last + data).count(b"\n\n")
        self.last = data[-1:]
        if self.body is not None:
            self.body += data


class StreamFailed(Exception):
    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


def build_request(method: str, path: str, port: int, token: str, body: Optional[dict]) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {LOOPBACK}:{port}", f"Authorization: Bearer {token}",
             "User-Agent: pilotfish-proxy-bench", "Accept: */*"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


# --- over a blocking socket -------------------------------------------------------------------------------

def blocking_connection() -> TimedConnection:
    """A TimedConnection to feed by hand from a blocking socket (it needs an event loop only to be made)."""
    async def make() -> TimedConnection:
        return TimedConnection()
    return asyncio.run(make())


def exchange(sock: socket.socket, conn: TimedConnection, request: bytes, answer: Answer) -> None:
    """Send `request` on `sock` and read the whole answer into `answer`; StreamFailed if it breaks off."""
    conn.begin(lambda status: answer)
    sock.sendall(request)
    while not conn.complete:
        data = sock.recv(65536)
        if not data:
            conn.connection_lost(None)
            if conn.complete:
                break
            raise StreamFailed("closed_mid_response")
        conn.data_received(data)
        if conn.failure is not None:
            raise StreamFailed("malformed_response")


def fetch_json(port: int, request: bytes) -> dict:
    """One request on a new connection; the answer's JSON body."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        answer = Answer(keep_body=True)
        exchange(sock, blocking_connection(), request, answer)
    return json.loads(bytes(answer.body))


# --- scenario 1: one client, sequential, blocking socket (the least client overhead) ----------------------

def latency_run(port: int, request: bytes, warmup: int, count: int, deadline: float) -> dict:
    """`count` sequential requests on one keep-alive connection: latencies in ms and errors by kind."""
    errors: Dict[str, int] = {}
    samples: List[float] = []
    sock = conn = None
    try:
        for index in range(warmup + count):
            if time.monotonic() > deadline:
                errors["timeout"] = errors.get("timeout", 0) + 1
                break
            if sock is None:
                sock = socket.create_connection((LOOPBACK, port), timeout=30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = blocking_connection()
            started = perf()
            try:
                exchange(sock, conn, request, Answer())
                elapsed = perf() - started
            except (OSError, StreamFailed) as exc:
                kind = exc.kind if isinstance(exc, StreamFailed) else type(exc).__name__
                errors[kind] = errors.get(kind, 0) + 1
                sock.close()
                sock = None
                continue
            if conn.status != 200:
                errors[f"http_{conn.status}"] = errors.get(f"http_{conn.status}", 0) + 1
            elif index >= warmup:
                samples.append(elapsed * 1000)
            if not conn.keep_alive:
                errors["server_closed_keepalive"] = errors.get("server_closed_keepalive", 0) + 1
                sock.close()
                sock = None
    finally:
        if sock is not None:
            sock.close()
    return {"samples": samples, "errors": errors}


def latency_summary(samples: List[float], errors: Dict[str, int]) -> dict:
    return {"requests": len(samples), "p50_ms": percentile(samples, 50), "p90_ms": percentile(samples, 90),
            "p99_ms": percentile(samples, 99), "mean_ms": sum(samples) / len(samples) if samples else None,
            "min_ms": percentile(samples, 0), "errors": errors}


# --- scenario 2: C concurrent streaming clients -------------------------------------------------------

async def streams_run(port: int, request: bytes, concurrency: int, rounds: int, expected_events: int,
                      timeout: float, on_measure_start: Callable[[], None]) -> dict:
    connections: List[Optional[TimedConnection]] = [None] * concurrency

    async def one_stream(slot: int, deadline: float) -> dict:
        started = perf()
        conn = connections[slot]
        answer = Answer()
        try:
            if conn is None or conn.lost:
                try:
                    conn = await connect(TimedConnection, LOOPBACK, port, max(0.1, deadline - perf()))
                except RequestFailed as exc:
                    raise StreamFailed("connect_timeout" if exc.kind == "connect_timeout" else f"connect_{exc.detail}")
                connections[slot] = conn
            conn.begin(lambda status: answer)
            conn.write(request)
            try:
                await conn.answer(max(0.1, deadline - perf()))
            except RequestFailed as exc:
                if exc.kind == "connection":  # closed before the answer ended
                    raise StreamFailed("reset_mid_stream" if conn.got_head else "closed_before_response")
                raise StreamFailed("malformed_response" if exc.kind == "bad_response" else exc.kind)
        except StreamFailed as exc:
            if conn is not None:
                conn.close()
            connections[slot] = None
            return {"ok": False, "kind": exc.kind, "events": 0, "ttft": None, "total": perf() - started}
        ended = perf()
        if not conn.keep_alive:
            conn.close()
            connections[slot] = None
        record = {"ok": True, "kind": None, "events": answer.events, "total": ended - started,
                  "ttft": (answer.first - started) if answer.first is not None else None}
        if conn.status != 200:
            record.update(ok=False, kind=f"http_{conn.status}")
        elif answer.events < expected_events:
            record.update(ok=False, kind="incomplete_stream")
        return record

    async def client(slot: int, count: int, deadline: float, into: List[dict]):
        for _ in range(count):
            into.append(await one_stream(slot, deadline))

    warm: List[dict] = []
    await asyncio.gather(*(client(slot, 1, perf() + timeout, warm) for slot in range(concurrency)))
    on_measure_start()
    records: List[dict] = []
    started = perf()
    await asyncio.gather(*(client(slot, rounds, started + timeout, records) for slot in range(concurrency)))
    wall = perf() - started
    for conn in connections:
        if conn is not None:
            conn.close()
    await asyncio.sleep(0.05)
    ok = [r for r in records if r["ok"]]
    errors: Dict[str, int] = {}
    for r in records:
        if not r["ok"]:
            errors[r["kind"]] = errors.get(r["kind"], 0) + 1
    ttfts = [r["ttft"] * 1000 for r in ok if r["ttft"] is not None]
    totals = [r["total"] for r in ok]
    events = sum(r["events"] for r in records)
    warm_errors: Dict[str, int] = {}
    for r in warm:
        if not r["ok"]:
            warm_errors[r["kind"]] = warm_errors.get(r["kind"], 0) + 1
    return {"concurrency": concurrency, "rounds": rounds, "streams": len(records), "completed": len(ok),
            "wall_s": wall, "chunks_per_s": events / wall, "streams_per_s": len(ok) / wall,
            "ttft_p50_ms": percentile(ttfts, 50), "ttft_p95_ms": percentile(ttfts, 95),
            "ttft_p99_ms": percentile(ttfts, 99), "ttft_max_ms": max(ttfts) if ttfts else None,
            "duration_p50_s": percentile(totals, 50), "duration_p99_s": percentile(totals, 99),
            "errors": errors, "warmup_errors": warm_errors}
