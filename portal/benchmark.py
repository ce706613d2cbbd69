"""Load benchmark of a text-generation service: N clients at once, each sending its next request as soon as the
last one ended, measuring time to first token, inter-token latency, end-to-end latency (p50/p95/p99), output
tokens/s (tokens received over wall time), requests/s and errors by kind; a sweep over client counts finds the
highest load that meets a time-to-first-token target.

`run_load` is the load generator: one asyncio task and one keep-alive connection per client, with a small
incremental HTTP/1.1 parser, so the concurrency is the one asked for; the most requests seen in flight at once is
measured and reported. (Measured against threads with a urllib3 pool: at 64 clients asyncio used a third of the
CPU, and at 256 clients threads saturated a core at 280 requests/s where asyncio kept 470 with a 10 ms TTFT.) `python -m portal.benchmark RUN_DIR` runs a stored benchmark (spec.json in, progress.json and
result.json out) in a process of its own, so the client never competes with the portal's workers.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import ssl
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

APIS = ("completions", "chat")
CREDENTIAL_ENV = "PILOTFISH_BENCH_CREDENTIAL"
CONNECT_TIMEOUT = 10.0
PERCENTILES = (50, 90, 95, 99)
SWEEP_PERCENTILE = 95  # the sweep's TTFT target applies to this percentile
PROMPT_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
                "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango")
perf = time.perf_counter


@dataclass
class LoadSpec:
    """One load: `clients` at once sending `requests` in all to the OpenAI API at `base_url`."""
    base_url: str  # e.g. http://host:port/services/<id>/v1
    model: str
    clients: int
    requests: int
    prompt_len: int = 128  # words per prompt (about a token each), varied per request so no two prompts match
    max_tokens: int = 64
    stream: bool = True
    api: str = "completions"  # /v1/completions, or "chat" for /v1/chat/completions
    ignore_eos: bool = True  # vLLM: generate max_tokens every time, so runs compare
    timeout: float = 300.0  # seconds to wait for each answer's next byte


@dataclass
class Sample:
    """One request as the client saw it; times in seconds, `start` from the beginning of the load."""
    start: float
    latency: float = 0.0
    ttft: Optional[float] = None
    output_tokens: int = 0
    prompt_tokens: Optional[int] = None
    from_usage: bool = False
    gaps: List[float] = field(default_factory=list)  # between consecutive content events
    error: Optional[str] = None
    error_message: Optional[str] = None  # what the server said, for an HTTP error


# --- one request ------------------------------------------------------------------------------------------

def prompt_for(index: int, words: int) -> str:
    return f"{index}: " + " ".join(PROMPT_WORDS[(index + i) % len(PROMPT_WORDS)] for i in range(max(words - 1, 0)))


def request_body(spec: LoadSpec, index: int) -> bytes:
    body: dict = {"model": spec.model, "max_tokens": spec.max_tokens, "stream": spec.stream}
    prompt = prompt_for(index, spec.prompt_len)
    if spec.api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    if spec.ignore_eos:
        body["ignore_eos"] = True
    return json.dumps(body).encode()


def _has_content(event: dict) -> bool:
    for choice in event.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning_content")):
            return True
    return False


def _usage_tokens(usage) -> tuple:
    """(completion tokens, prompt tokens) of a usage object, None where absent."""
    if not isinstance(usage, dict):
        return None, None
    completion, prompt = usage.get("completion_tokens"), usage.get("prompt_tokens")
    return (completion if isinstance(completion, int) else None, prompt if isinstance(prompt, int) else None)


class _EventStream:
    """An answer's body as server-sent events, fed as bytes arrive: content events (tokens) and their times."""

    def __init__(self, sample: Sample, sent: float):
        self.sample, self.sent = sample, sent
        self.buffer = b""
        self.last: Optional[float] = None
        self.content_events = 0
        self.usage = None
        self.done = False

    def feed(self, data: bytes, now: float) -> None:
        self.buffer += data.replace(b"\r\n", b"\n") if b"\r" in data else data
        while True:
            cut = self.buffer.find(b"\n\n")
            if cut < 0:
                return
            event, self.buffer = self.buffer[:cut], self.buffer[cut + 2:]
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._event(line[5:].strip(), now)

    def _event(self, payload: bytes, now: float) -> None:
        if payload == b"[DONE]":
            self.done = True
            return
        parsed = json.loads(payload)
        if not isinstance(parsed, dict):
            return
        if parsed.get("usage"):
            self.usage = parsed["usage"]
        if _has_content(parsed):
            self.content_events += 1
            if self.last is None:
                self.sample.ttft = now - self.sent
            else:
                self.sample.gaps.append(now - self.last)
            self.last = now

    def finish(self) -> None:
        completion, prompt = _usage_tokens(self.usage)
        self.sample.from_usage = completion is not None
        self.sample.output_tokens = completion if completion is not None else self.content_events
        self.sample.prompt_tokens = prompt
        if not self.done:
            self.sample.error = "incomplete_stream"


class _JsonAnswer:
    """A whole JSON answer (not streamed): only its usage counts."""

    def __init__(self, sample: Sample, sent: float):
        self.sample = sample
        self.parts: List[bytes] = []

    def feed(self, data: bytes, now: float) -> None:
        self.parts.append(data)

    def finish(self) -> None:
        answer = json.loads(b"".join(self.parts))
        completion, prompt = _usage_tokens(answer.get("usage") if isinstance(answer, dict) else None)
        self.sample.from_usage = completion is not None
        self.sample.output_tokens = completion or 0
        self.sample.prompt_tokens = prompt


class _ErrorAnswer:
    """An error answer: its message is kept (the first of each kind is reported)."""

    LIMIT = 4096

    def __init__(self, sample: Sample):
        self.sample = sample
        self.data = b""

    def feed(self, data: bytes, now: float) -> None:
        if len(self.data) < self.LIMIT:
            self.data += data[:self.LIMIT - len(self.data)]

    def finish(self) -> None:
        text = self.data.decode("utf-8", "replace")
        try:
            answer = json.loads(text)
            error = answer.get("error", answer) if isinstance(answer, dict) else answer
            text = error.get("message") or text if isinstance(error, dict) else str(error)
        except ValueError:
            pass
        self.sample.error_message = " ".join(str(text).split())[:300] or None


class _ExchangeFailed(Exception):
    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


HEAD, SIZE, DATA, DATA_END, TRAILER, LENGTH, UNTIL_EOF, COMPLETE = range(8)


class _Exchange:
    """One HTTP/1.1 response, parsed as its bytes arrive (chunked, Content-Length or until the connection closes);
    the body goes to the sink chosen once the status is known."""

    def __init__(self, future: asyncio.Future, make_sink: Callable[[int], object]):
        self.future = future
        self.make_sink = make_sink
        self.sink = None
        self.buffer = b""
        self.state = HEAD
        self.remaining = 0
        self.keep_alive = True
        self.last_data = perf()

    def feed(self, data: bytes) -> None:
        now = self.last_data = perf()
        self.buffer += data
        try:
            self._advance(now)
        except _ExchangeFailed as exc:
            self._fail(exc.kind)
        except (ValueError, UnicodeDecodeError):
            self._fail("bad_response")

    def _advance(self, now: float) -> None:
        while self.buffer and self.state != COMPLETE:
            if self.state == HEAD:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, self.buffer = self.buffer[:end].decode("latin-1"), self.buffer[end + 4:]
                self._start(head)
            elif self.state == SIZE:
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    return
                size = int(self.buffer[:end].split(b";")[0].strip() or b"0", 16)
                self.buffer = self.buffer[end + 2:]
                self.state, self.remaining = (DATA, size) if size else (TRAILER, 0)
            elif self.state in (DATA, LENGTH):
                take = self.buffer[:self.remaining]
                self.buffer = self.buffer[len(take):]
                self.remaining -= len(take)
                self.sink.feed(take, now)
                if not self.remaining:
                    if self.state == DATA:
                        self.state = DATA_END
                    else:
                        self._complete()
            elif self.state == DATA_END:
                if len(self.buffer) < 2:
                    return
                self.buffer = self.buffer[2:]
                self.state = SIZE
            elif self.state == TRAILER:
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    return
                line, self.buffer = self.buffer[:end], self.buffer[end + 2:]
                if not line:
                    self._complete()
            elif self.state == UNTIL_EOF:
                data, self.buffer = self.buffer, b""
                self.sink.feed(data, now)

    def _start(self, head: str) -> None:
        lines = head.split("\r\n")
        version, _, rest = lines[0].partition(" ")
        status = int(rest.split(" ", 1)[0])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        connection = headers.get("connection", "")
        self.keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        self.sink = self.make_sink(status)
        if "chunked" in headers.get("transfer-encoding", ""):
            self.state = SIZE
        elif "content-length" in headers:
            self.remaining = int(headers["content-length"])
            self.state = LENGTH
            if not self.remaining:
                self._complete()
        else:
            self.state, self.keep_alive = UNTIL_EOF, False

    def _complete(self) -> None:
        self.state = COMPLETE
        try:
            self.sink.finish()
        except (ValueError, UnicodeDecodeError):
            self._fail("bad_response")
            return
        if not self.future.done():
            self.future.set_result(self.keep_alive)

    def _fail(self, kind: str) -> None:
        self.state = COMPLETE
        if not self.future.done():
            self.future.set_exception(_ExchangeFailed(kind))

    def closed(self) -> None:
        if self.state == UNTIL_EOF:
            self.keep_alive = False
            self._complete()
        elif self.state != COMPLETE:
            self._fail("connection")


class _Connection(asyncio.Protocol):
    """One client's keep-alive connection."""

    def __init__(self):
        self.transport = None
        self.exchange: Optional[_Exchange] = None
        self.lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.feed(data)

    def connection_lost(self, exc) -> None:
        self.lost = True
        if self.exchange is not None:
            self.exchange.closed()


class _Target:
    """Where the requests go, and the bytes of each one."""

    def __init__(self, spec: LoadSpec, credential: str):
        url = urlsplit(spec.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url: expected an http(s) URL, got {spec.base_url!r}")
        self.spec = spec
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        path = url.path.rstrip("/") + ("/chat/completions" if spec.api == "chat" else "/completions")
        accept = "text/event-stream" if spec.stream else "application/json"
        self.head = (f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {credential}\r\n"
                     f"Content-Type: application/json\r\nAccept: {accept}\r\nUser-Agent: pilotfish-bench\r\n")

    def request(self, index: int) -> bytes:
        body = request_body(self.spec, index)
        return (self.head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    def sink_for(self, sample: Sample, sent: float) -> Callable[[int], object]:
        def choose(status: int):
            if status != 200:
                sample.error = f"http_{status}"
                return _ErrorAnswer(sample)
            return _EventStream(sample, sent) if self.spec.stream else _JsonAnswer(sample, sent)
        return choose


async def _connect(target: _Target) -> _Connection:
    loop = asyncio.get_running_loop()
    try:
        _, connection = await asyncio.wait_for(
            loop.create_connection(_Connection, target.host, target.port, ssl=target.ssl), CONNECT_TIMEOUT)
    except asyncio.TimeoutError:
        raise _ExchangeFailed("timeout")
    except ConnectionRefusedError:
        raise _ExchangeFailed("refused")
    except OSError:
        raise _ExchangeFailed("connection")
    return connection


async def _send(target: _Target, connection: Optional[_Connection], index: int,
                origin: float) -> Tuple[Sample, Optional[_Connection]]:
    """One request on the client's connection (opened, or opened again, as needed); the connection to reuse."""
    sent = perf()
    sample = Sample(start=sent - origin)
    try:
        if connection is None or connection.lost:
            connection = await _connect(target)
        future = asyncio.get_running_loop().create_future()
        exchange = connection.exchange = _Exchange(future, target.sink_for(sample, sent))
        connection.transport.write(target.request(index))
        while not future.done():
            idle = perf() - exchange.last_data
            if idle >= target.spec.timeout:
                raise _ExchangeFailed("timeout")
            await asyncio.wait((future,), timeout=target.spec.timeout - idle)
        if not future.result():  # the server closes the connection after this answer
            connection.transport.close()
            connection = None
    except _ExchangeFailed as exc:
        if sample.error is None or exc.kind != "connection":
            sample.error = exc.kind
        if connection is not None:
            connection.transport.close()
        connection = None
    sample.latency = perf() - sent
    return sample, connection


# --- a load -----------------------------------------------------------------------------------------------

def run_load(spec: LoadSpec, credential: str, on_progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Run one load and return its figures (see `summarize`). `on_progress(done, total)` is called about
    twice a second. Runs its own event loop: call it from a thread that has none."""
    return asyncio.run(_run_load(spec, credential, on_progress))


async def _run_load(spec: LoadSpec, credential: str, on_progress) -> dict:
    target = _Target(spec, credential)
    samples: List[Optional[Sample]] = [None] * spec.requests
    next_index = itertools.count().__next__
    counts = {"in_flight": 0, "max_in_flight": 0, "done": 0}
    origin = perf()

    async def client():
        connection = None
        while True:
            index = next_index()
            if index >= spec.requests:
                break
            counts["in_flight"] += 1
            if counts["in_flight"] > counts["max_in_flight"]:
                counts["max_in_flight"] = counts["in_flight"]
            samples[index], connection = await _send(target, connection, index, origin)
            counts["in_flight"] -= 1
            counts["done"] += 1
        if connection is not None:
            connection.transport.close()

    async def report():
        while True:
            await asyncio.sleep(0.5)
            on_progress(counts["done"], spec.requests)

    cpu_before = time.process_time()
    reporter = asyncio.ensure_future(report()) if on_progress is not None else None
    await asyncio.gather(*(client() for _ in range(spec.clients)))
    cpu = time.process_time() - cpu_before
    if reporter is not None:
        reporter.cancel()
        on_progress(counts["done"], spec.requests)
    await asyncio.sleep(0)  # let the transports close
    done = [sample for sample in samples if sample is not None]
    wall = max((sample.start + sample.latency for sample in done), default=0.0)
    return summarize(spec, done, wall, counts["max_in_flight"], cpu)


def percentile(values: List[float], q: float) -> Optional[float]:
    """Nearest-rank percentile (a value that was measured), None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def distribution(values: List[float]) -> dict:
    figures = {"count": len(values), "mean": _round(sum(values) / len(values)) if values else None}
    for q in PERCENTILES:
        figures[f"p{q}"] = _round(percentile(values, q))
    figures["max"] = _round(max(values)) if values else None
    return figures


def _round(value: Optional[float], digits: int = 6) -> Optional[float]:
    return None if value is None else round(value, digits)


def summarize(spec: LoadSpec, samples: List[Sample], wall: float, max_in_flight: int, cpu_seconds: float) -> dict:
    """The figures of one load; per_request holds one list per field (in request order) for plots."""
    ok = [sample for sample in samples if sample.error is None]
    errors: Dict[str, int] = {}
    examples: Dict[str, str] = {}
    for sample in samples:
        if sample.error:
            errors[sample.error] = errors.get(sample.error, 0) + 1
            if sample.error_message and sample.error not in examples:
                examples[sample.error] = sample.error_message
    output_tokens = sum(sample.output_tokens for sample in samples)
    counted = [sample for sample in samples if sample.output_tokens or sample.error is None]
    from_usage = sum(1 for sample in counted if sample.from_usage)
    token_source = "usage" if counted and from_usage == len(counted) else "chunks" if not from_usage else "mixed"
    if not counted or (not spec.stream and not from_usage):
        token_source = "none"  # nothing received, or answers without usage (then tokens cannot be counted)
    prompt_tokens = [sample.prompt_tokens for sample in ok if sample.prompt_tokens is not None]
    return {
        "clients": spec.clients,
        "requests": spec.requests,
        "completed": len(ok),
        "failed": len(samples) - len(ok),
        "errors": errors,
        "error_examples": examples,
        "max_in_flight": max_in_flight,
        "wall_seconds": _round(wall),
        "requests_per_second": _round(len(ok) / wall if wall else 0.0, 3),
        "output_tokens": output_tokens,
        "output_tokens_per_second": _round(output_tokens / wall if wall else 0.0, 3),
        "token_source": token_source,
        "prompt_tokens_mean": _round(sum(prompt_tokens) / len(prompt_tokens), 1) if prompt_tokens else None,
        "ttft_seconds": distribution([sample.ttft for sample in ok if sample.ttft is not None]),
        "itl_seconds": distribution([gap for sample in ok for gap in sample.gaps]),
        "latency_seconds": distribution([sample.latency for sample in ok]),
        "client_cpu_seconds": _round(cpu_seconds, 3),
        "settings": {key: value for key, value in asdict(spec).items() if key != "base_url"},
        "per_request": {
            "start": [_round(sample.start) for sample in samples],
            "ttft": [_round(sample.ttft) for sample in samples],
            "latency": [_round(sample.latency) for sample in samples],
            "output_tokens": [sample.output_tokens for sample in samples],
            "error": [sample.error for sample in samples],
        },
    }


def run_sweep(spec: LoadSpec, client_counts: List[int], ttft_target: float, credential: str,
              on_progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Loads at growing client counts (each with at least as many requests as clients), until one misses the
    target: TTFT p95 at most `ttft_target` seconds with no failed request. The best is the highest that met it."""
    points = []
    total = sum(max(spec.requests, count) for count in client_counts)
    finished = 0
    for count in sorted(set(client_counts)):
        point_spec = replace(spec, clients=count, requests=max(spec.requests, count))
        progress = None
        if on_progress is not None:
            progress = (lambda base: lambda done, _total: on_progress(base + done, total))(finished)
        result = run_load(point_spec, credential, progress)
        finished += point_spec.requests
        ttft = result["ttft_seconds"].get(f"p{SWEEP_PERCENTILE}")
        result["meets_target"] = result["failed"] == 0 and ttft is not None and ttft <= ttft_target
        points.append(result)
        if not result["meets_target"]:
            break
    met = [point["clients"] for point in points if point["meets_target"]]
    return {"mode": "sweep", "ttft_target_seconds": ttft_target, "ttft_percentile": SWEEP_PERCENTILE,
            "best_clients": max(met) if met else None, "points": points}


# --- a stored run, in a process of its own ------------------------------------------------------------------

def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def run_stored(run_dir: Path) -> int:
    """Run the benchmark described by run_dir/spec.json; the credential comes from the environment."""
    spec_data = json.loads((run_dir / "spec.json").read_text())
    credential = os.environ.pop(CREDENTIAL_ENV, "")
    spec = LoadSpec(**spec_data["load"])
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if perf() - last[0] >= 0.5 or done == total:
            last[0] = perf()
            _write_json(run_dir / "progress.json", {"done": done, "total": total})

    try:
        if spec_data.get("sweep"):
            result = run_sweep(spec, spec_data["sweep"], spec_data["ttft_target"], credential, progress)
        else:
            result = {"mode": "load", **run_load(spec, credential, progress)}
    except Exception as exc:  # reported in the run, not lost in a log
        _write_json(run_dir / "result.json", {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    _write_json(run_dir / "result.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(run_stored(Path(sys.argv[1])))
