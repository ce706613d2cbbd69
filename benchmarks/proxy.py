"""Streaming-proxy benchmark: direct vs the portal (per gunicorn configuration) vs nginx, in one run.

Everything runs on this machine and every request goes to 127.0.0.1:

  upstream   a small asyncio HTTP/1.1 server in this file (`--serve-upstream`), launched by the portal as a
             text-generation service (local scheduler): GET /health, POST /v1/chat/completions (a small JSON
             answer, or with "stream": true an SSE stream of --chunks events spread over --stream-seconds,
             chunked transfer encoding, then `data: [DONE]`), GET /stats (its own counters).
  direct     the load generator talks to the upstream itself (the baseline of every ratio).
  nginx      the reference proxy: Debian's nginx (installed with apt-get if missing), our own config in a
             temp dir: proxy_buffering off, proxy_http_version 1.1, keepalive upstream, 2 workers.
  portal     `pilotfish start` under gunicorn, once per --configs entry (class:workers[:threads]), through
             /services/<id>/v1/chat/completions (and the /v1 gateway for the latency scenario). All portals share
             one home and the one upstream service, and all targets are up at once, so the measurements can
             alternate between them (machine-level drift hits every target alike).

Scenarios
  1. latency   one client, keep-alive, sequential non-streaming requests (--warmup, then --requests in
               --batches batches that rotate over the targets): p50/p99 and the latency added to direct.
               Target: portal p50 <= +1.5 ms (nginx adds ~0.4 ms).
  2. streams   C concurrent clients (--concurrency, e.g. 32,256), each on its own keep-alive connection:
               one warm-up round, then --rounds streams back to back. The clients start together, so every
               round begins with a burst of C requests (the worst case for TTFT, e.g. a notebook's gather()).
               Aggregate chunks/s and streams/s as a fraction of direct, TTFT (request sent -> first SSE
               bytes) p50/p95/p99, the portal's TTFT minus nginx's, errors by kind, and the CPU used by the
               proxy, the upstream, the client and by processes outside the benchmark (a shared machine:
               such windows are measured again, and each phase first waits for an idle machine).
               Targets at 256: throughput >= 95 % of direct; TTFT p50 within 100 ms of nginx.

The load generator is one asyncio process (this one) with raw sockets (no HTTP library); its CPU use is
reported next to the others, so a saturated client shows. The upstream is another process. On a 2-core
machine all of them share the cores, so the ratios include the proxy's CPU competition with the rest.

Run:  .venv/bin/python benchmarks/proxy.py [--quick] [--json results.json]
      .venv/bin/python benchmarks/proxy.py --configs uvicorn:1,uvicorn:2 --concurrency 256 --rounds 5
      .venv/bin/python benchmarks/proxy.py --configs "uvicorn:2,gthread:2:256@/path/to/an/older/checkout"
A configuration with @<source tree> runs the portal of that tree (its own gunicorn settings read the worker class
and threads given here), so a change can be measured beside the code before it. Everything it starts (portals,
the upstream service, nginx) is stopped at the end, also on Ctrl-C or error.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()
LOOPBACK = "127.0.0.1"
MODEL = "test/tiny"  # a model of the test site cache (tests/conftest.py stages it)
DEFAULT_CONFIGS = "uvicorn:1,uvicorn:2"
QUIET_BUSY_PCT = 15.0  # machine busy % (all cores) under which a phase may start
NOISY_FOREIGN_PCT = 15.0  # CPU (% of a core) used by processes outside the benchmark above which a window is redone
MEASURE_ATTEMPTS = 3  # at most, per window
perf = time.perf_counter


# ======================================================================================================
# The synthetic upstream (runs as the portal service's command)
# ======================================================================================================

def serve_upstream(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(prog="proxy.py --serve-upstream", allow_abbrev=False)
    parser.add_argument("--serve-upstream", action="store_true")
    parser.add_argument("--chunks", type=int, default=40, help="SSE events per stream (before [DONE])")
    parser.add_argument("--stream-seconds", type=float, default=2.0, help="how long a stream lasts")
    parser.add_argument("--bind", default=LOOPBACK, help="address to listen on (the job's --host is ignored)")
    args, _ = parser.parse_known_args(argv)  # the job script adds --model, --host, --port ...: not needed here
    port = int(os.environ["PILOTFISH_PORT"])
    key = os.environ.get("PILOTFISH_API_KEY", "")
    model = os.environ.get("PILOTFISH_MODEL", MODEL)
    expected_auth = f"Bearer {key}".encode() if key else None
    stats = {"pid": os.getpid(), "connections": 0, "requests": 0, "streams_started": 0, "streams_completed": 0,
             "streams_aborted": 0}
    model_json = json.dumps(model)

    def head(status: int, reason: str, content_type: bytes, length: Optional[int], keep: bool) -> bytes:
        lines = [b"HTTP/1.1 %d %s" % (status, reason.encode()), b"Content-Type: " + content_type]
        lines.append(b"Content-Length: %d" % length if length is not None else b"Transfer-Encoding: chunked")
        if content_type == b"text/event-stream":
            lines.append(b"Cache-Control: no-cache")
        if not keep:
            lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def json_response(status: int, body: dict, keep: bool) -> bytes:
        data = json.dumps(body).encode()
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}.get(status, "Error")
        return head(status, reason, b"application/json", len(data), keep) + data

    def completion(req: dict) -> dict:
        return {"id": f"chatcmpl-{stats['requests']}", "object": "chat.completion", "created": int(time.time()),
                "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok0 tok1 tok2 "},
                                              "finish_reason": "length"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}

    async def read_chunked(reader) -> bytes:
        parts = []
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readline()

    async def stream(reader, writer, req: dict, keep: bool) -> bool:
        loop = asyncio.get_running_loop()
        n = max(1, int(req.get("max_tokens") or args.chunks))
        seconds = float(req.get("stream_seconds") or args.stream_seconds)
        interval = seconds / n
        stats["streams_started"] += 1
        prefix = ('data: {"id":"chatcmpl-%d","object":"chat.completion.chunk","created":%d,"model":%s,'
                  '"choices":[{"index":0,"delta":{"content":"' % (stats["requests"], int(time.time()), model_json)).encode()
        suffix = b'"},"finish_reason":null}]}\n\n'
        writer.write(head(200, "OK", b"text/event-stream", None, keep))
        start = loop.time()
        transport = writer.transport
        for i in range(n + 1):
            delay = start + i * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if transport.is_closing() or reader.at_eof():
                stats["streams_aborted"] += 1
                return False
            if i < n:
                event = prefix + b"tok%d " % i + suffix
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            else:
                done = b"data: [DONE]\n\n"
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            try:
                await writer.drain()
            except ConnectionError:
                stats["streams_aborted"] += 1
                return False
        stats["streams_completed"] += 1
        return True

    async def handle(reader, writer):
        stats["connections"] += 1
        try:
            while True:
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = raw[:-4].split(b"\r\n")
                try:
                    method, target, version = lines[0].split(b" ", 2)
                except ValueError:
                    writer.write(json_response(400, {"error": "bad request line"}, False))
                    return
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                    body = await read_chunked(reader)
                else:
                    body = await reader.readexactly(int(headers.get(b"content-length", b"0") or 0))
                connection = headers.get(b"connection", b"").lower()
                keep = connection != b"close" if version == b"HTTP/1.1" else connection == b"keep-alive"
                stats["requests"] += 1
                path = target.split(b"?", 1)[0]
                if path == b"/health":
                    writer.write(json_response(200, {"status": "ok"}, keep))
                elif expected_auth is not None and headers.get(b"authorization") != expected_auth:
                    writer.write(json_response(401, {"error": "missing or wrong API key"}, keep))
                elif path == b"/stats":
                    writer.write(json_response(200, stats, keep))
                elif path == b"/v1/models":
                    writer.write(json_response(200, {"object": "list", "data": [{"id": model, "object": "model"}]}, keep))
                elif path == b"/v1/chat/completions" and method == b"POST":
                    try:
                        req = json.loads(body or b"{}")
                        assert isinstance(req, dict)
                    except (ValueError, AssertionError):
                        writer.write(json_response(400, {"error": "body is not a JSON object"}, keep))
                    else:
                        if req.get("stream"):
                            if not await stream(reader, writer, req, keep):
                                return
                        else:
                            writer.write(json_response(200, completion(req), keep))
                else:
                    writer.write(json_response(404, {"error": f"no route {path.decode('latin-1')}"}, keep))
                if not keep:
                    await writer.drain()
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, args.bind, port, backlog=4096)
        print(f"bench upstream: listening on {args.bind}:{port} pid {os.getpid()} "
              f"({args.chunks} chunks / {args.stream_seconds:g} s per stream)", flush=True)
        async with server:
            await server.serve_forever()

    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))  # no shutdown noise from open streams
    asyncio.run(main())


# ======================================================================================================
# Load generator: an incremental HTTP/1.1 response parser over raw sockets
# ======================================================================================================

HEAD, SIZE, DATA, DATA_END, TRAILER, LENGTH, UNTIL_EOF, DONE = range(8)


class ResponseParser:
    """Feed it bytes; it tells when the response is complete. Counts SSE events (blank-line separated)
    and notes when the first body bytes arrived."""

    __slots__ = ("buf", "state", "status", "keep_alive", "remaining", "t_first", "events", "last", "body_bytes",
                 "body", "keep_body")

    def __init__(self, keep_body: bool = False):
        self.buf = bytearray()
        self.state = HEAD
        self.status = 0
        self.keep_alive = True
        self.remaining = 0
        self.t_first: Optional[float] = None
        self.events = 0
        self.last = b""
        self.body_bytes = 0
        self.keep_body = keep_body
        self.body = bytearray()

    def _payload(self, data: bytes, now: float) -> None:
        if not data:
            return
        if self.t_first is None:
            self.t_first = now
        self.events += (self.last + data).count(b"\n\n")
        self.last = data[-1:]
        self.body_bytes += len(data)
        if self.keep_body:
            self.body += data

    def feed(self, data: bytes, now: float) -> bool:
        buf = self.buf
        buf += data
        pos = 0
        while True:
            state = self.state
            if state == HEAD:
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    break
                lines = bytes(buf[pos:end]).split(b"\r\n")
                pos = end + 4
                parts = lines[0].split(b" ", 2)
                self.status = int(parts[1])
                version = parts[0]
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip().lower()
                connection = headers.get(b"connection", b"")
                self.keep_alive = connection != b"close" if version == b"HTTP/1.1" else connection == b"keep-alive"
                if self.status in (204, 304) or 100 <= self.status < 200:
                    self.state = DONE
                elif b"chunked" in headers.get(b"transfer-encoding", b""):
                    self.state = SIZE
                elif b"content-length" in headers:
                    self.remaining = int(headers[b"content-length"])
                    self.state = LENGTH if self.remaining else DONE
                else:
                    self.state = UNTIL_EOF
                    self.keep_alive = False
            elif state == SIZE:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                size = int(bytes(buf[pos:end]).split(b";")[0], 16)
                pos = end + 2
                if size:
                    self.remaining, self.state = size, DATA
                else:
                    self.state = TRAILER
            elif state == DATA:
                take = min(len(buf) - pos, self.remaining)
                if take <= 0:
                    break
                self._payload(bytes(buf[pos:pos + take]), now)
                pos += take
                self.remaining -= take
                if not self.remaining:
                    self.state = DATA_END
            elif state == DATA_END:
                if len(buf) - pos < 2:
                    break
                pos += 2
                self.state = SIZE
            elif state == TRAILER:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                self.state = DONE if end == pos else TRAILER
                pos = end + 2
            elif state == LENGTH:
                take = min(len(buf) - pos, self.remaining)
                if take <= 0:
                    break
                self._payload(bytes(buf[pos:pos + take]), now)
                pos += take
                self.remaining -= take
                if not self.remaining:
                    self.state = DONE
            elif state == UNTIL_EOF:
                self._payload(bytes(buf[pos:]), now)
                pos = len(buf)
                break
            else:  # DONE
                break
        del buf[:pos]
        return self.state == DONE

    def eof(self) -> bool:
        if self.state == UNTIL_EOF:
            self.state = DONE
        return self.state == DONE


class StreamFailed(Exception):
    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


class ClientProtocol(asyncio.Protocol):
    def __init__(self):
        self.transport = None
        self.parser: Optional[ResponseParser] = None
        self.future: Optional[asyncio.Future] = None
        self.lost = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        parser = self.parser
        if parser is None:
            return
        try:
            complete = parser.feed(data, perf())
        except (ValueError, IndexError):
            self.parser = None
            self.future.set_exception(StreamFailed("malformed_response"))
            self.transport.close()
            return
        if complete:
            self.parser = None
            self.future.set_result(parser)

    def connection_lost(self, exc):
        self.lost = True
        parser, self.parser = self.parser, None
        if parser is not None and not self.future.done():
            if parser.eof():
                self.future.set_result(parser)
            elif parser.state == HEAD and parser.status == 0 and not parser.buf:
                self.future.set_exception(StreamFailed("closed_before_response"))
            else:
                self.future.set_exception(StreamFailed("reset_mid_stream"))

    def start(self) -> asyncio.Future:
        self.parser = ResponseParser()
        self.future = asyncio.get_running_loop().create_future()
        return self.future


def build_request(method: str, path: str, port: int, token: str, body: Optional[dict]) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {LOOPBACK}:{port}", f"Authorization: Bearer {token}",
             "User-Agent: pilotfish-proxy-bench", "Accept: */*"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def percentile(values: List[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[index]


# --- scenario 1: one client, sequential, blocking socket (the least client overhead) ----------------------

def latency_run(port: int, request: bytes, warmup: int, count: int, deadline: float) -> dict:
    """`count` sequential requests on one keep-alive connection: latencies in ms and errors by kind."""
    errors: Dict[str, int] = {}
    samples: List[float] = []
    sock = None
    try:
        for index in range(warmup + count):
            if time.monotonic() > deadline:
                errors["timeout"] = errors.get("timeout", 0) + 1
                break
            if sock is None:
                sock = socket.create_connection((LOOPBACK, port), timeout=30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            parser = ResponseParser()
            started = perf()
            try:
                sock.sendall(request)
                while True:
                    data = sock.recv(65536)
                    if not data:
                        if parser.eof():
                            break
                        raise StreamFailed("closed_mid_response")
                    if parser.feed(data, perf()):
                        break
                elapsed = perf() - started
            except (OSError, StreamFailed) as exc:
                kind = exc.kind if isinstance(exc, StreamFailed) else type(exc).__name__
                errors[kind] = errors.get(kind, 0) + 1
                sock.close()
                sock = None
                continue
            if parser.status != 200:
                errors[f"http_{parser.status}"] = errors.get(f"http_{parser.status}", 0) + 1
            elif index >= warmup:
                samples.append(elapsed * 1000)
            if not parser.keep_alive:
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
            "min_ms": min(samples) if samples else None, "errors": errors}


# --- scenario 2: C concurrent streaming clients -------------------------------------------------------

async def streams_run(port: int, request: bytes, concurrency: int, rounds: int, expected_events: int,
                      timeout: float, on_measure_start: Callable[[], None]) -> dict:
    loop = asyncio.get_running_loop()
    protocols: List[Optional[ClientProtocol]] = [None] * concurrency

    async def one_stream(slot: int, deadline: float) -> dict:
        started = perf()
        protocol = protocols[slot]
        try:
            if protocol is None or protocol.lost:
                try:
                    _, protocol = await asyncio.wait_for(
                        loop.create_connection(ClientProtocol, LOOPBACK, port), max(0.1, deadline - perf()))
                except asyncio.TimeoutError:
                    raise StreamFailed("connect_timeout")
                except OSError as exc:
                    raise StreamFailed(f"connect_{type(exc).__name__}")
                protocols[slot] = protocol
            future = protocol.start()
            protocol.transport.write(request)
            try:
                parser = await asyncio.wait_for(future, max(0.1, deadline - perf()))
            except asyncio.TimeoutError:
                raise StreamFailed("timeout")
        except StreamFailed as exc:
            if protocol is not None and protocol.transport is not None:
                protocol.transport.close()
            protocols[slot] = None
            return {"ok": False, "kind": exc.kind, "events": 0, "ttft": None, "total": perf() - started}
        ended = perf()
        if not parser.keep_alive:
            protocol.transport.close()
            protocols[slot] = None
        record = {"ok": True, "kind": None, "events": parser.events, "total": ended - started,
                  "ttft": (parser.t_first - started) if parser.t_first is not None else None}
        if parser.status != 200:
            record.update(ok=False, kind=f"http_{parser.status}")
        elif parser.events < expected_events:
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
    for protocol in protocols:
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
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


# ======================================================================================================
# Processes: CPU accounting, nginx, portals, the service
# ======================================================================================================

def process_tree(pid: Optional[int], exclude: frozenset = frozenset()) -> list:
    import psutil

    if not pid:
        return []
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in procs if p.pid not in exclude]


def cpu_seconds(procs: list) -> float:
    import psutil

    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def foreign_cpu() -> Dict[int, tuple]:
    """CPU seconds of every process that is neither this benchmark's (itself and its descendants, the portals,
    nginx, the upstream) nor a kernel thread: someone else's load on a shared machine."""
    import psutil

    ours = {os.getpid()}
    with contextlib.suppress(psutil.NoSuchProcess):
        ours.update(p.pid for p in psutil.Process().children(recursive=True))
    found = {}
    for proc in psutil.process_iter(["pid", "ppid", "create_time", "cpu_times"]):
        info = proc.info
        if info["pid"] in ours or info["pid"] in (0, 2) or info["ppid"] == 2 or info["cpu_times"] is None:
            continue
        times = info["cpu_times"]
        found[info["pid"]] = (info["create_time"], times.user + times.system + getattr(times, "children_user", 0)
                              + getattr(times, "children_system", 0))
    return found


class CpuMeter:
    """CPU seconds used by the proxy, the upstream, this client, other processes and the machine over measured
    windows."""

    def __init__(self, proxy_procs: Callable[[], list], upstream_procs: Callable[[], list]):
        self.proxy_procs, self.upstream_procs = proxy_procs, upstream_procs
        self.totals = {"wall": 0.0, "proxy": 0.0, "upstream": 0.0, "client": 0.0, "foreign": 0.0, "busy": 0.0,
                       "all": 0.0}

    @staticmethod
    def _machine():
        import psutil

        times = psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0), sum(times)

    def start(self) -> None:
        self.proxy, self.upstream = self.proxy_procs(), self.upstream_procs()
        self.foreign0 = foreign_cpu()
        self.t0 = perf()
        self.c0 = (cpu_seconds(self.proxy), cpu_seconds(self.upstream), time.process_time()) + self._machine()

    def stop(self, keep: bool = True) -> dict:
        """The window's percentages; added to the totals unless keep is False (a window measured again)."""
        wall = perf() - self.t0
        c1 = (cpu_seconds(self.proxy), cpu_seconds(self.upstream), time.process_time()) + self._machine()
        foreign = 0.0
        for pid, (created, cpu) in foreign_cpu().items():
            before = self.foreign0.get(pid)
            foreign += cpu - before[1] if before and before[0] == created else cpu
        window = {"wall": wall, "proxy": c1[0] - self.c0[0], "upstream": c1[1] - self.c0[1], "client": c1[2] - self.c0[2],
                  "foreign": max(0.0, foreign), "busy": c1[3] - self.c0[3], "all": c1[4] - self.c0[4]}
        self.window = window
        if keep:
            self.keep()
        return self.percentages(window)

    def keep(self) -> None:
        """Add the last window to the totals."""
        for key, value in self.window.items():
            self.totals[key] += value

    @staticmethod
    def percentages(t: dict) -> dict:
        """CPU in % of one core (so 200 % is both cores of a 2-core machine); machine busy in % of all cores."""
        pct = lambda key: round(100 * t[key] / t["wall"], 1) if t["wall"] > 0 else None  # noqa: E731
        return {"proxy_cpu_pct": pct("proxy"), "upstream_cpu_pct": pct("upstream"), "client_cpu_pct": pct("client"),
                "foreign_cpu_pct": pct("foreign"),  # processes outside this benchmark (a shared machine)
                "machine_busy_pct": round(100 * t["busy"] / t["all"], 1) if t["all"] > 0 else None}


def ensure_nginx() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found:
        return found
    print("nginx not found: installing the Debian package (apt-get install -y nginx) ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "nginx"]
    if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"apt-get install nginx failed:\n{result.stderr[-2000:]}")
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(found):
        raise RuntimeError("nginx installed but not found on PATH")
    return found


class Nginx:
    def __init__(self, binary: str, workdir: Path, upstream_port: int, port: int, workers: int):
        self.binary, self.dir, self.upstream_port, self.port, self.workers = binary, workdir, upstream_port, port, workers
        self.proc: Optional[subprocess.Popen] = None

    def config(self) -> str:
        d = self.dir
        user = "user root;" if os.geteuid() == 0 else ""
        return f"""{user}
worker_processes {self.workers};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_timeout 75s;
    keepalive_requests 100000;
    upstream service {{
        server {LOOPBACK}:{self.upstream_port};
        keepalive 512;
        keepalive_requests 100000;
        keepalive_timeout 75s;
    }}
    server {{
        listen {LOOPBACK}:{self.port} backlog=4096;
        location / {{
            proxy_pass http://service;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""

    def start(self) -> "Nginx":
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "nginx.conf"
        conf.write_text(self.config())
        log = open(self.dir / "stdout.log", "ab")
        self.proc = subprocess.Popen([self.binary, "-p", str(self.dir), "-c", str(conf), "-e", str(self.dir / "error.log")],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: "
                                   f"{(self.dir / 'error.log').read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port), timeout=1):
                return self
            time.sleep(0.1)
        raise RuntimeError("nginx did not listen within 15 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def parse_configs(text: str) -> List[dict]:
    configs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        item, _, tree = item.partition("@")
        parts = item.split(":")
        worker_class = parts[0]
        if worker_class == "sync":
            raise SystemExit("--configs: sync workers serialize streams; not a candidate")
        workers = int(parts[1]) if len(parts) > 1 else 2
        threads = int(parts[2]) if len(parts) > 2 else 32
        label = f"portal {worker_class} {workers}x{threads}" if worker_class == "gthread" else f"portal {worker_class} {workers}w"
        if tree:
            label += f" @{Path(tree).name}"
        configs.append({"worker_class": worker_class, "workers": workers, "threads": threads, "label": label,
                        "tree": tree or None})
    return configs


def set_subreaper() -> None:
    """Orphaned service processes (their portal stopped) become our children, so we reap them at the end."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def reap_children() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


# ======================================================================================================
# The run
# ======================================================================================================

def load_test_helpers():
    """The test suite's portal helpers (tests/conftest.py): a staged site cache with the test models."""
    from tests.conftest import PortalProcess, write_site_config

    return PortalProcess, write_site_config


def make_bench_portal(home: Path, site: Path, config: dict, poll_interval: str):
    PortalProcess, _ = load_test_helpers()

    class BenchPortal(PortalProcess):
        """`pilotfish start` under one gunicorn configuration (PortalProcess, but with the production poll interval
        instead of the tests' 1 s, the worker class from the config, and errors instead of pytest failures)."""

        def __init__(self):
            super().__init__(home, site, workers=config["workers"])
            self.config = config
            slug = config["label"].replace(" ", "-")
            self.log_path = home.parent / f"{slug}-{self.port}.log"

        def start(self):
            import requests

            env = dict(os.environ, PILOTFISH_HOME=str(self.home), PILOTFISH_SITE_CONFIG=str(self.site_config),
                       PILOTFISH_POLL_INTERVAL=poll_interval, PILOTFISH_WORKER_CLASS=config["worker_class"],
                       PILOTFISH_THREADS=str(config["threads"]))
            tree = config.get("tree")
            if tree:  # another source tree of the portal (e.g. a baseline checkout), compared in the same run
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
            self.log = open(self.log_path, "ab")
            self.proc = subprocess.Popen([sys.executable, "-m", "portal.cli", "start", "--port", str(self.port),
                                          "--workers", str(self.workers)], env=env, stdout=self.log,
                                         stderr=subprocess.STDOUT, start_new_session=True, cwd=tree or str(ROOT))
            deadline = time.monotonic() + 60
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{config['label']} exited with {self.proc.returncode}:\n"
                                       f"{self.log_path.read_text(errors='replace')[-2000:]}")
                with contextlib.suppress(requests.RequestException):
                    if requests.get(self.url + "/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{config['label']} did not answer /health within 60 s (log {self.log_path})")
                time.sleep(0.2)
            self.token = (self.home / "token").read_text().strip()
            return self

        def wait_running(self, service_id: str, timeout: float) -> dict:
            deadline = time.monotonic() + timeout
            while True:
                body = self.service(service_id)
                if body["state"] == "RUNNING":
                    return body
                if body["state"] in ("FAILED", "STOPPED", "TIMEOUT", "CANCELLED") or time.monotonic() > deadline:
                    raise RuntimeError(f"service {service_id} is {body['state']} ({body.get('reason')})")
                time.sleep(0.2)

    return BenchPortal()


class Target:
    def __init__(self, name: str, kind: str, port: int, path: str, token: str, proxy_procs: Callable[[], list],
                 gateway_path: Optional[str] = None, config: Optional[dict] = None):
        self.name, self.kind, self.port, self.path, self.token = name, kind, port, path, token
        self.proxy_procs, self.gateway_path, self.config = proxy_procs, gateway_path, config
        self.samples: List[float] = []
        self.errors: Dict[str, int] = {}
        self.gateway_samples: List[float] = []
        self.gateway_errors: Dict[str, int] = {}
        self.streams: Dict[str, dict] = {}
        self.upstream: Dict[str, int] = {}
        self.latency_meter: Optional[CpuMeter] = None


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="pilotfish-proxy-bench-"))
        self.site: Optional[Path] = None
        self.portals: list = []
        self.nginx: Optional[Nginx] = None
        self.service: Optional[dict] = None
        self.service_key = ""
        self.upstream_port = 0
        self.service_record: Optional[dict] = None
        self.targets: List[Target] = []
        self.notes: List[str] = []
        self.redone = 0  # windows measured again because other processes were busy

    # --- helpers -------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def stream_body(self) -> dict:
        return {"model": MODEL, "messages": [{"role": "user", "content": "Say something."}],
                "max_tokens": self.args.chunks, "stream": True}

    def chat_body(self) -> dict:
        return {"model": MODEL, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 3}

    def upstream_procs(self) -> list:
        return process_tree(self.service_record and self.service_record.get("pid"))

    def upstream_stats(self) -> dict:
        request = build_request("GET", "/stats", self.upstream_port, self.service_key, None)
        with socket.create_connection((LOOPBACK, self.upstream_port), timeout=5) as sock:
            sock.sendall(request)
            parser = ResponseParser(keep_body=True)
            while not parser.feed(sock.recv(65536), perf()):
                pass
        return json.loads(bytes(parser.body))

    def upstream_delta(self, before: dict) -> Dict[str, int]:
        """What the upstream counted since `before` (less the two /stats calls themselves)."""
        after = self.upstream_stats()
        own = {"connections": 1, "requests": 1}
        return {key: after[key] - before[key] - own.get(key, 0) for key in after if key != "pid"}

    # --- setup -----------------------------------------------------------------------------------------
    def start_portal(self, config: dict):
        if self.site is None:
            _, write_site_config = load_test_helpers()
            command = (f"{sys.executable} {THIS} --serve-upstream --chunks {self.args.chunks} "
                       f"--stream-seconds {self.args.stream_seconds}")
            self.site = write_site_config(self.tmp / "site.yaml", scheduler="local",
                                          runtimes={"text-generation": {"command": command}})
        portal = make_bench_portal(self.tmp / "home", self.site, config, str(self.args.poll_interval))
        self.portals.append(portal)  # before start(): a half-started portal is torn down too
        return portal.start()

    def launch_service(self, portal) -> None:
        response = portal.launch(model=MODEL, time=120)  # minutes: outlives the run
        if response.status_code >= 300:
            raise RuntimeError(f"launch failed: {response.status_code} {response.text}")
        service_id = response.json()["id"]
        job_dir = self.tmp / "home" / "jobs" / service_id
        self.service = {"id": service_id, "job_dir": job_dir}
        with contextlib.suppress(FileNotFoundError, ValueError):
            self.service_record = json.loads((job_dir / "local_job.json").read_text())
        try:
            body = portal.wait_running(service_id, 60)
        except RuntimeError as exc:
            log = (job_dir / "job.log").read_text(errors="replace")[-2000:] if (job_dir / "job.log").exists() else ""
            raise RuntimeError(f"the upstream service did not start: {exc}\n{log}") from None
        self.service_record = json.loads((job_dir / "local_job.json").read_text())
        endpoint = body.get("endpoint") or {}
        host, port = endpoint.get("host"), endpoint.get("port")
        address = socket.gethostbyname(host)
        if not address.startswith("127."):
            raise RuntimeError(f"the service endpoint {host} resolves to {address}, not loopback: refusing to send "
                               "load there (this benchmark only loads 127.0.0.1)")
        self.upstream_port = int(port)
        self.service_key = (job_dir / "service.key").read_text().strip()
        self.log(f"service {service_id} RUNNING at {host}:{port} (upstream pids {[p.pid for p in self.upstream_procs()]})")

    def setup(self, configs: List[dict]) -> None:
        args = self.args
        self.log(f"temp dir {self.tmp}")
        for config in configs:
            try:
                portal = self.start_portal(config)
            except Exception as exc:
                self.log(f"{config['label']}: did not start: {exc}")
                self.notes.append(f"{config['label']} did not start: {str(exc)[:300]}")
                continue
            if self.service is None:
                self.launch_service(portal)
            else:
                portal.wait_running(self.service["id"], 30)
            self.log(f"{config['label']} on port {portal.port}")
        if self.service is None:
            raise RuntimeError("no portal configuration started: nothing to measure")
        self.targets.append(Target("direct", "direct", self.upstream_port, "/v1/chat/completions", self.service_key,
                                   lambda: []))
        if not args.no_nginx:
            try:
                binary = ensure_nginx()
                version = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr.strip()
                self.nginx = Nginx(binary, self.tmp / "nginx", self.upstream_port, free_port(), args.nginx_workers).start()
                self.log(f"{version} on port {self.nginx.port}, {args.nginx_workers} workers")
                self.notes.append(version)
                nginx = self.nginx
                self.targets.append(Target("nginx", "nginx", nginx.port, "/v1/chat/completions", self.service_key,
                                           lambda: process_tree(nginx.proc.pid)))
            except Exception as exc:
                self.log(f"nginx: skipped: {exc}")
                self.notes.append(f"nginx skipped: {exc}")
        for portal in self.portals:
            if portal.proc is None or portal.proc.poll() is not None or not getattr(portal, "token", None):
                continue
            self.targets.append(Target(portal.config["label"], "portal", portal.port,
                                       f"/services/{self.service['id']}/v1/chat/completions", portal.token,
                                       (lambda p=portal: process_tree(p.proc.pid)), "/v1/chat/completions",
                                       portal.config))

    def wait_quiet(self, before: str) -> None:
        """This machine may be shared: wait (bounded) until it is nearly idle, so one target is not measured
        against someone else's test run while the next one is not."""
        import psutil

        deadline = time.monotonic() + self.args.quiet_wait
        while True:
            busy = psutil.cpu_percent(interval=0.5)
            if busy <= QUIET_BUSY_PCT:
                return
            if time.monotonic() > deadline:
                self.notes.append(f"the machine was {busy:.0f} % busy (other processes) before {before}")
                self.log(f"machine still {busy:.0f} % busy before {before}: measuring anyway")
                return
            time.sleep(1.0)

    # --- the scenarios ---------------------------------------------------------------------------------
    def proxy_procs(self, target: Target) -> Callable[[], list]:
        upstream = frozenset(p.pid for p in self.upstream_procs())  # the service may be a portal worker's child
        return lambda: [p for p in target.proxy_procs() if p.pid not in upstream]

    def scenario_latency(self) -> None:
        args = self.args
        batches = max(1, args.batches)
        per_batch = max(1, -(-args.requests // batches))
        body = self.chat_body()
        self.log(f"scenario 1: {per_batch * batches} sequential requests per target in {batches} interleaved "
                 f"batches, after {args.warmup} warm-up")
        for target in self.targets:
            target.latency_meter = CpuMeter(self.proxy_procs(target), self.upstream_procs)
            target.request = build_request("POST", target.path, target.port, target.token, body)
            latency_run(target.port, target.request, args.warmup, 0, time.monotonic() + 60)
            if target.gateway_path:
                target.gateway_request = build_request("POST", target.gateway_path, target.port, target.token, body)
                latency_run(target.port, target.gateway_request, args.warmup, 0, time.monotonic() + 60)
        for batch in range(batches):
            shift = batch % len(self.targets)
            for target in self.targets[shift:] + self.targets[:shift]:
                for attempt in range(1, MEASURE_ATTEMPTS + 1):
                    self.wait_quiet(f"{target.name}, latency batch {batch + 1}")
                    before = self.upstream_stats()
                    target.latency_meter.start()
                    run = latency_run(target.port, target.request, 0, per_batch, time.monotonic() + 60)
                    foreign = target.latency_meter.stop(keep=False)["foreign_cpu_pct"]
                    if foreign > NOISY_FOREIGN_PCT and attempt < MEASURE_ATTEMPTS:
                        self.redone += 1
                        self.log(f"{target.name}, latency batch {batch + 1}: other processes used {foreign:.0f} % of a "
                                 "core meanwhile: measuring it again")
                        continue
                    target.latency_meter.keep()
                    merge_counts(target.upstream, self.upstream_delta(before))
                    target.samples += run["samples"]
                    merge_counts(target.errors, run["errors"])
                    break
                if target.gateway_path:
                    run = latency_run(target.port, target.gateway_request, 0, per_batch, time.monotonic() + 60)
                    target.gateway_samples += run["samples"]
                    merge_counts(target.gateway_errors, run["errors"])
        for target in self.targets:
            lat = latency_summary(target.samples, target.errors)
            self.log(f"{target.name}: 1 client p50 {fmt(lat['p50_ms'], 3)} ms p99 {fmt(lat['p99_ms'], 3)} ms"
                     + (f" errors {lat['errors']}" if lat["errors"] else ""))

    def scenario_streams(self) -> None:
        args = self.args
        request_body = self.stream_body()
        for index, concurrency in enumerate(args.concurrency):
            shift = index % len(self.targets)
            for target in self.targets[shift:] + self.targets[:shift]:
                request = build_request("POST", target.path, target.port, target.token, request_body)
                best = None
                for attempt in range(1, MEASURE_ATTEMPTS + 1):
                    self.wait_quiet(f"{target.name} at {concurrency} streams")
                    meter = CpuMeter(self.proxy_procs(target), self.upstream_procs)
                    before = self.upstream_stats()
                    run = asyncio.run(streams_run(target.port, request, concurrency, args.rounds, args.chunks + 1,
                                                  args.stream_timeout, meter.start))
                    run.update(meter.stop())
                    run["attempt"] = attempt
                    upstream = self.upstream_delta(before)
                    time.sleep(0.5)
                    if best is None or run["foreign_cpu_pct"] < best[0]["foreign_cpu_pct"]:
                        best = (run, upstream)
                    if run["foreign_cpu_pct"] <= NOISY_FOREIGN_PCT:
                        break
                    self.redone += 1
                    self.log(f"{target.name} at {concurrency} streams: other processes used "
                             f"{run['foreign_cpu_pct']:.0f} % of a core meanwhile"
                             + (": measuring it again" if attempt < MEASURE_ATTEMPTS else ""))
                run, upstream = best
                merge_counts(target.upstream, upstream)
                target.streams[str(concurrency)] = run
                self.log(f"{target.name}: {concurrency} streams x {args.rounds}: {run['completed']}/{run['streams']} ok, "
                         f"{run['chunks_per_s']:.0f} chunks/s, TTFT p50 {fmt(run['ttft_p50_ms'], 1)} ms "
                         f"p95 {fmt(run['ttft_p95_ms'], 1)} ms, cpu % of a core: proxy {run['proxy_cpu_pct']} "
                         f"upstream {run['upstream_cpu_pct']} client {run['client_cpu_pct']} others "
                         f"{run['foreign_cpu_pct']}" + (f", errors {run['errors']}" if run["errors"] else ""))

    def run(self) -> dict:
        started = time.time()
        configs = parse_configs(self.args.configs)
        self.setup(configs)
        self.scenario_latency()
        self.scenario_streams()
        return self.report(configs, time.time() - started)

    # --- teardown -------------------------------------------------------------------------------------
    def teardown(self) -> None:
        import psutil

        if self.nginx:
            with contextlib.suppress(Exception):
                self.nginx.stop()
        live = [p for p in self.portals if p.proc is not None and p.proc.poll() is None and getattr(p, "token", None)]
        if self.service and live:
            with contextlib.suppress(Exception):
                live[0].request("POST", f"/api/services/{self.service['id']}/stop", timeout=10)
        record = self.service_record
        if record:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self._service_alive(record):
                time.sleep(0.2)
            if self._service_alive(record):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(record["pid"], signal.SIGKILL)
        for portal in self.portals:
            with contextlib.suppress(Exception):
                portal.stop()
        reap_children()
        leftovers = [p for p in psutil.process_iter(["pid", "cmdline"])
                     if p.pid != os.getpid() and str(self.tmp) in " ".join(p.info["cmdline"] or [])]
        for proc in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        if leftovers:
            self.log(f"teardown: killed {len(leftovers)} leftover processes")
        reap_children()
        if self.args.keep_temp:
            self.log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    @staticmethod
    def _service_alive(record: dict) -> bool:
        import psutil

        try:
            proc = psutil.Process(record["pid"])
            return abs(proc.create_time() - record["create_time"]) < 1 and proc.status() != psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, KeyError):
            return False

    # --- report ---------------------------------------------------------------------------------------
    def report(self, configs: List[dict], elapsed: float) -> dict:
        args = self.args
        by_name = {t.name: t for t in self.targets}
        results: Dict[str, dict] = {}
        for t in self.targets:
            results[t.name] = {"kind": t.kind, "port": t.port, "path": t.path, "config": t.config,
                               "latency": {**latency_summary(t.samples, t.errors),
                                           **(CpuMeter.percentages(t.latency_meter.totals) if t.latency_meter else {})},
                               "streams": t.streams, "upstream": t.upstream}
            if t.gateway_path:
                results[t.name]["latency_gateway"] = latency_summary(t.gateway_samples, t.gateway_errors)
        direct = results.get("direct", {})
        nginx = results.get("nginx", {})

        print(f"\n=== 1. one client, sequential non-streaming POST /v1/chat/completions ({len(by_name['direct'].samples)} "
              f"requests per target in {args.batches} interleaved batches, after {args.warmup} warm-up) ===")
        print(f"{'target':26} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8} {'p50 x':>6} "
              f"{'/v1 p50':>8} {'/v1 +p50':>8} {'proxy%':>7} {'upstr%':>7} {'client%':>7} {'others%':>7} errors")
        d50, d99 = direct["latency"]["p50_ms"], direct["latency"]["p99_ms"]
        for name, r in results.items():
            lat = r["latency"]
            lat["added_p50_ms"], lat["added_p99_ms"] = sub(lat["p50_ms"], d50), sub(lat["p99_ms"], d99)
            gw = r.get("latency_gateway", {})
            gw["added_p50_ms"] = sub(gw.get("p50_ms"), d50) if gw else None
            print(f"{name:26} {fmt(lat['p50_ms'], 3):>8} {fmt(lat['p99_ms'], 3):>8} {fmt(lat['added_p50_ms'], 3):>8} "
                  f"{fmt(lat['added_p99_ms'], 3):>8} {fmt(ratio(lat['p50_ms'], d50), 2):>6} "
                  f"{fmt(gw.get('p50_ms'), 3):>8} {fmt(gw.get('added_p50_ms'), 3):>8} "
                  f"{fmt(lat.get('proxy_cpu_pct'), 0):>7} {fmt(lat.get('upstream_cpu_pct'), 0):>7} "
                  f"{fmt(lat.get('client_cpu_pct'), 0):>7} {fmt(lat.get('foreign_cpu_pct'), 0):>7} {lat['errors'] or '-'}")

        for concurrency in args.concurrency:
            key = str(concurrency)
            base = direct.get("streams", {}).get(key, {})
            ref = nginx.get("streams", {}).get(key, {})
            print(f"\n=== 2. {concurrency} concurrent streams x {args.rounds} rounds ({args.chunks}+1 SSE events over "
                  f"{args.stream_seconds:g} s each; all clients start together, after 1 warm-up round) ===")
            print(f"{'target':26} {'ok/all':>9} {'chunks/s':>9} {'x direct':>8} {'streams/s':>9} {'TTFT p50':>9} "
                  f"{'p95':>8} {'p99':>8} {'max':>8} {'p50-ngx':>8} {'p95-ngx':>8} {'proxy%':>7} {'upstr%':>7} "
                  f"{'client%':>7} {'others%':>7} errors")
            for name, r in results.items():
                run = r["streams"].get(key)
                if not run:
                    continue
                run["throughput_vs_direct"] = ratio(run["chunks_per_s"], base.get("chunks_per_s"))
                run["streams_vs_direct"] = ratio(run["streams_per_s"], base.get("streams_per_s"))
                run["ttft_p50_minus_nginx_ms"] = sub(run["ttft_p50_ms"], ref.get("ttft_p50_ms"))
                run["ttft_p95_minus_nginx_ms"] = sub(run["ttft_p95_ms"], ref.get("ttft_p95_ms"))
                errors = dict(run["errors"])
                if run.get("warmup_errors"):
                    errors["(warm-up)"] = run["warmup_errors"]
                print(f"{name:26} {run['completed']:>4}/{run['streams']:<4} {run['chunks_per_s']:>9.0f} "
                      f"{fmt(run['throughput_vs_direct'], 3):>8} {run['streams_per_s']:>9.1f} "
                      f"{fmt(run['ttft_p50_ms'], 1):>9} {fmt(run['ttft_p95_ms'], 1):>8} {fmt(run['ttft_p99_ms'], 1):>8} "
                      f"{fmt(run['ttft_max_ms'], 1):>8} {fmt(run['ttft_p50_minus_nginx_ms'], 1):>8} "
                      f"{fmt(run['ttft_p95_minus_nginx_ms'], 1):>8} {fmt(run['proxy_cpu_pct'], 0):>7} "
                      f"{fmt(run['upstream_cpu_pct'], 0):>7} {fmt(run['client_cpu_pct'], 0):>7} "
                      f"{fmt(run['foreign_cpu_pct'], 0):>7} {errors or '-'}")
                if (run.get("foreign_cpu_pct") or 0) > NOISY_FOREIGN_PCT:
                    self.notes.append(f"{name} at {concurrency} streams: other processes used "
                                      f"{run['foreign_cpu_pct']:.0f} % of a core in every attempt: treat this row with care")

        print("\n=== the upstream's view, per target: TCP connections it accepted, requests, streams ===")
        for name, r in results.items():
            up = r["upstream"]
            print(f"{name:26} connections {up.get('connections')}, requests {up.get('requests')}, streams started "
                  f"{up.get('streams_started')}, completed {up.get('streams_completed')}, aborted {up.get('streams_aborted')}")

        targets: Dict[str, dict] = {}
        top = str(256 if 256 in args.concurrency else max(args.concurrency)) if args.concurrency else None
        print(f"\n=== targets (portal): p50 added <= 1.5 ms; at {top} streams throughput >= 95 % of direct and "
              "TTFT p50 <= nginx's + 100 ms; no errors ===")
        for config in configs:
            r = results.get(config["label"])
            if r is None:
                print(f"{config['label']:26} not measured (did not start)")
                continue
            added = r["latency"].get("added_p50_ms")
            checks = {"added_p50_le_1.5ms": {"value": added, "met": added is not None and added <= 1.5}}
            run = r["streams"].get(top) if top else None
            if run:
                value = run.get("throughput_vs_direct")
                checks[f"throughput_ge_95pct_at_{top}"] = {"value": value, "met": value is not None and value >= 0.95}
                value = run.get("ttft_p50_minus_nginx_ms")
                checks[f"ttft_p50_within_100ms_of_nginx_at_{top}"] = {"value": value,  # met None: no nginx
                                                                      "met": None if value is None else value <= 100}
            errors = sum(r["latency"]["errors"].values()) + sum(sum(x["errors"].values()) for x in r["streams"].values())
            checks["no_errors"] = {"value": errors, "met": errors == 0}
            targets[config["label"]] = checks
            print(f"{config['label']:26} " + "; ".join(
                f"{name} {'n/a' if c['met'] is None else 'MET' if c['met'] else 'NOT MET'} ({fmt(c['value'], 3)})"
                for name, c in checks.items()))
        print("CPU columns: % of one core used by the proxy, the upstream, this load generator, and by processes "
              "outside the benchmark (others%: a shared machine; such windows are measured again, up to "
              f"{MEASURE_ATTEMPTS} times).")
        if self.redone:
            self.notes.append(f"{self.redone} measurement windows were redone because other processes were busy")
        for note in self.notes:
            print(f"note: {note}")
        print(f"\ntotal time {elapsed:.0f} s")
        return {"meta": self.meta(elapsed), "results": results, "targets": targets, "notes": self.notes}

    def meta(self, elapsed: float) -> dict:
        from importlib import metadata

        versions = {}
        for name in ("gunicorn", "uvicorn", "uvloop", "httptools", "a2wsgi", "flask", "werkzeug"):
            with contextlib.suppress(metadata.PackageNotFoundError):
                versions[name] = metadata.version(name)
        return {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "elapsed_s": round(elapsed, 1), "cpus": os.cpu_count(),
                "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
                "args": vars(self.args)}


def merge_counts(into: Dict[str, int], more: Dict[str, int]) -> None:
    for key, value in more.items():
        into[key] = into.get(key, 0) + value


def ratio(a, b):
    return None if a is None or not b else a / b


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def sub(a, b):
    return None if a is None or b is None else a - b


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--serve-upstream" in argv:
        serve_upstream(argv)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--serve-upstream", action="store_true",
                        help="run the synthetic upstream (used as the service command; reads PILOTFISH_PORT, "
                             "PILOTFISH_API_KEY, PILOTFISH_MODEL)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true",
                        help="a short run (~2 min): 200 requests, 1 round of streams")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="portal configurations, class:workers[:threads][@source tree], comma-separated; this "
                             "tree runs uvicorn workers (threads: its Flask thread pool) "
                             f"(default {DEFAULT_CONFIGS})")
    parser.add_argument("--concurrency", default="32,256", help="concurrent streams (comma-separated)")
    parser.add_argument("--rounds", type=int, default=None, help="measured streams per client (default 3, quick 1)")
    parser.add_argument("--requests", type=int, default=None, help="sequential requests (default 500, quick 200)")
    parser.add_argument("--warmup", type=int, default=50, help="sequential warm-up requests (default 50)")
    parser.add_argument("--chunks", type=int, default=40, help="SSE events per stream, before [DONE] (default 40)")
    parser.add_argument("--stream-seconds", type=float, default=2.0, help="length of a stream (default 2)")
    parser.add_argument("--stream-timeout", type=float, default=120.0,
                        help="time bound of one streaming phase, seconds (default 120)")
    parser.add_argument("--nginx-workers", type=int, default=2, help="nginx worker processes (default 2)")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx reference")
    parser.add_argument("--batches", type=int, default=None,
                        help="scenario 1 runs in this many batches, alternating the targets (default 5, quick 2)")
    parser.add_argument("--poll-interval", type=float, default=5.0,
                        help="the portals' reconciler poll interval, seconds (default 5, the production default)")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="before each phase wait up to this many seconds for the machine to be idle (default 60)")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temp dir (portal and nginx logs)")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.requests = args.requests or (200 if args.quick else 500)
    args.batches = args.batches or (2 if args.quick else 5)
    if args.quick:
        args.warmup = min(args.warmup, 30)

    sys.path.insert(0, str(ROOT))
    set_subreaper()

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: ignored when started with `&`
        signal.signal(signum, interrupted)
    bench = Bench(args)
    code = 0
    try:
        report = bench.run()
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str))
            print(f"results written to {args.json}")
    except KeyboardInterrupt:
        print("\ninterrupted: tearing down", file=sys.stderr)
        code = 130
    except Exception:
        traceback.print_exc()
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the teardown short
        bench.teardown()
    return code


if __name__ == "__main__":
    sys.exit(main())
