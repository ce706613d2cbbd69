"""One request of a load benchmark (portal/benchmark.py): its bytes, its exchange on the client's keep-alive
connection (portal/http1.py's TimedConnection, the HTTP/1.1 client the proxy uses too), and what the answer says,
read as its bytes arrive: time to first token (the first server-sent event with content), the gaps between content
events, tokens (from the usage the engine reports, else content events counted), and errors by kind.

Error kinds: http_<status> (with the server's message), refused, timeout (no byte for `timeout` seconds, or no
connection within CONNECT_TIMEOUT), connection (closed before the answer ended), incomplete_stream (a stream without
its `data: [DONE]`), bad_response (an answer that could not be parsed or read).
"""
from __future__ import annotations

import json
import ssl
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple
from urllib.parse import urlsplit

from .http1 import RequestFailed, TimedConnection, connect
from .service_tls import WrongCertificate, check_peer, client_context

APIS = ("completions", "chat")
CONNECT_TIMEOUT = 10.0
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
    tls_pin: Optional[str] = None  # an https service's certificate fingerprint (portal/service_tls.py), checked


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


class EventStream:
    """An answer's body as server-sent events, fed as bytes arrive: content events (tokens) and their times."""

    def __init__(self, sample: Sample, sent: float):
        self.sample, self.sent = sample, sent
        self.buffer = bytearray()
        self.scanned = 0  # where the search for the next blank line resumes: each byte is searched once
        self.last: Optional[float] = None
        self.content_events = 0
        self.usage = None
        self.done = False

    def feed(self, data: bytes, now: float) -> None:
        buffer = self.buffer
        buffer += data.replace(b"\r\n", b"\n") if b"\r" in data else data
        start = 0
        while True:
            cut = buffer.find(b"\n\n", self.scanned)
            if cut < 0:
                break
            for line in bytes(buffer[start:cut]).split(b"\n"):
                if line.startswith(b"data:"):
                    self._event(line[5:].strip(), now)
            start = self.scanned = cut + 2
        del buffer[:start]
        self.scanned = max(0, len(buffer) - 1)

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


class JsonAnswer:
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


class ErrorAnswer:
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


class Target:
    """Where the requests go, and the bytes of each one."""

    def __init__(self, spec: LoadSpec, credential: str):
        url = urlsplit(spec.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url: expected an http(s) URL, got {spec.base_url!r}")
        self.spec = spec
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.pin = spec.tls_pin
        if url.scheme != "https":
            self.ssl = None
        else:
            self.ssl = client_context() if self.pin else ssl.create_default_context()
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
                return ErrorAnswer(sample)
            return EventStream(sample, sent) if self.spec.stream else JsonAnswer(sample, sent)
        return choose


async def _connect(target: Target) -> TimedConnection:
    try:
        connection = await connect(TimedConnection, target.host, target.port, CONNECT_TIMEOUT, target.ssl)
    except RequestFailed as failed:
        if failed.kind == "connect_timeout":
            raise RequestFailed("timeout") from None
        raise RequestFailed("refused" if failed.detail == "ConnectionRefusedError" else "connection") from None
    if target.pin:
        try:
            check_peer(connection.transport.get_extra_info("ssl_object"), target.pin)
        except WrongCertificate:
            connection.close()
            raise RequestFailed("connection") from None
    return connection


async def send(target: Target, connection: Optional[TimedConnection], index: int,
               origin: float) -> Tuple[Sample, Optional[TimedConnection]]:
    """One request on the client's connection (opened, or opened again, as needed); the connection to reuse."""
    sent = perf()
    sample = Sample(start=sent - origin)
    try:
        if connection is None or connection.lost:
            connection = await _connect(target)
        connection.begin(target.sink_for(sample, sent))
        connection.write(target.request(index))
        await connection.answer(target.spec.timeout)
        try:
            connection.answer_sink.finish()
        except (ValueError, UnicodeDecodeError):
            raise RequestFailed("bad_response") from None
        if not connection.keep_alive:  # the server closes the connection after this answer
            connection.close()
            connection = None
    except RequestFailed as exc:
        if sample.error is None or exc.kind != "connection":
            sample.error = exc.kind
        if connection is not None:
            connection.close()
        connection = None
    sample.latency = perf() - sent
    return sample, connection
