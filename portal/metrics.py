"""Portal metrics for Prometheus: the instruments, what the proxy records per request, token usage, /metrics output.

Every worker of a gunicorn portal counts its own requests; in multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by
the gunicorn master through `prepare_multiprocess_dir`) each worker writes its values to files there and a scrape
adds them up, so counters are exact whichever worker answers. prometheus_client fixes where values live when it is
first imported, which is why it is imported here only when the instruments are built, never at module import.

The proxy is the hot path: labelled children are resolved once per service and route class, a request costs a
few counter and histogram updates, and streams are not decoded: only lines holding a `"usage"` object are parsed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
CYCLE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
USAGE_BODY_LIMIT = 1024 * 1024  # JSON answers (and requests) larger than this are not searched for usage
SERVICE_STATES = ("SUBMITTED", "PENDING", "STARTING", "RUNNING", "UNHEALTHY", "STOPPED", "FAILED", "TIMEOUT")

# Route classes for pilotfish_requests_total, by Flask endpoint (then by blueprint).
ENDPOINT_CLASSES = {"proxy.service_proxy": "service", "proxy.gateway": "gateway", "proxy.gateway_models": "gateway",
                    "api.health": "health", "api.metrics_text": "metrics", "static": "static"}
BLUEPRINT_CLASSES = {"api": "api", "auth": "auth", "ui": "ui"}

USAGE_KEY = b'"usage"'
DONE_EVENT = b"data: [DONE]"
USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
INCLUDE_USAGE = b',"stream_options":{"include_usage":true}}'
_decoder = json.JSONDecoder()


# --- the instruments ------------------------------------------------------------------------------------

class ServiceInstruments:
    """The labelled children of one service, resolved once so a proxied request only updates values."""

    __slots__ = ("seconds", "ttfb", "streams", "prompt_tokens", "completion_tokens", "_errors", "_error_metric",
                 "_labels")

    def __init__(self, parent: "Instruments", service_id: str, model: str):
        self._labels = (service_id, model)
        self.seconds = parent.proxy_seconds.labels(service_id, model)
        self.ttfb = parent.proxy_ttfb.labels(service_id, model)
        self.streams = parent.streams.labels(service_id, model)
        self.prompt_tokens = parent.prompt_tokens.labels(model)
        self.completion_tokens = parent.completion_tokens.labels(model)
        self._error_metric = parent.upstream_errors
        self._errors: Dict[str, object] = {}

    def error(self, kind: str) -> None:
        child = self._errors.get(kind)
        if child is None:
            child = self._errors[kind] = self._error_metric.labels(*self._labels, kind)
        child.inc()


class Instruments:
    """Every metric the portal exports, in a registry of its own (one per process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("pilotfish_requests", "Requests the portal answered, by route class and HTTP status",
                                ["route", "status"], registry=registry)
        self.proxy_seconds = Histogram(
            "pilotfish_proxy_request_seconds", "Proxied requests, from their arrival until the last byte was relayed",
            ["service", "model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.proxy_ttfb = Histogram(
            "pilotfish_proxy_time_to_first_byte_seconds",
            "Proxied requests, from their arrival until the service's first body byte", ["service", "model"],
            buckets=LATENCY_BUCKETS, registry=registry)
        self.streams = Gauge("pilotfish_proxy_streams_in_flight", "Event streams (text/event-stream) being relayed",
                             ["service", "model"], multiprocess_mode="livesum", registry=registry)
        self.upstream_errors = Counter(
            "pilotfish_proxy_upstream_errors",
            "Failures reaching or reading a service, by kind: refused, timeout, connection, interrupted, http_5xx",
            ["service", "model", "kind"], registry=registry)
        self.prompt_tokens = Counter("pilotfish_prompt_tokens", "Prompt tokens, as the services reported them (usage)",
                                     ["model"], registry=registry)
        self.completion_tokens = Counter("pilotfish_completion_tokens",
                                         "Completion tokens, as the services reported them (usage)", ["model"],
                                         registry=registry)
        self.services = Gauge("pilotfish_services", "Services by state", ["state"], multiprocess_mode="livemax",
                              registry=registry)
        self.cycle_seconds = Histogram("pilotfish_reconcile_cycle_seconds", "Duration of the reconciler's cycles",
                                       buckets=CYCLE_BUCKETS, registry=registry)
        self.scheduler_calls = Counter("pilotfish_scheduler_calls",
                                       "Scheduler commands the reconciler ran (squeue, sacct, ...)", registry=registry)
        self.scheduler_failures = Counter("pilotfish_scheduler_failures",
                                          "Reconcile cycles in which the scheduler did not answer", registry=registry)
        self._route_children: Dict[Tuple[Optional[str], int], object] = {}
        self._services: Dict[Tuple[str, str], ServiceInstruments] = {}
        self._state_children = {state: self.services.labels(state) for state in SERVICE_STATES}

    def count_request(self, endpoint: Optional[str], status: int) -> None:
        child = self._route_children.get((endpoint, status))
        if child is None:
            child = self._route_children[(endpoint, status)] = self.requests.labels(route_class(endpoint), str(status))
        child.inc()

    def service(self, service_id: str, model: str) -> ServiceInstruments:
        found = self._services.get((service_id, model))
        if found is None:
            found = self._services[(service_id, model)] = ServiceInstruments(self, service_id, model)
        return found

    def record_cycle(self, seconds: float, scheduler_calls: int, scheduler_ok: bool,
                     states: Dict[str, int]) -> None:
        """One reconcile cycle: its duration, the scheduler commands it ran, and services by state afterwards."""
        self.cycle_seconds.observe(seconds)
        if scheduler_calls:
            self.scheduler_calls.inc(scheduler_calls)
        if not scheduler_ok:
            self.scheduler_failures.inc()
        for state, child in self._state_children.items():
            child.set(states.get(state, 0))


_instruments: Optional[Instruments] = None
_instruments_lock = threading.Lock()


def instruments() -> Instruments:
    """This process's instruments, built on first use."""
    global _instruments
    if _instruments is None:
        with _instruments_lock:
            if _instruments is None:
                _instruments = Instruments()
    return _instruments


def route_class(endpoint: Optional[str]) -> str:
    if endpoint is None:
        return "unmatched"
    if endpoint in ENDPOINT_CLASSES:
        return ENDPOINT_CLASSES[endpoint]
    return BLUEPRINT_CLASSES.get(endpoint.partition(".")[0], "other")


# --- /metrics and gunicorn's multiprocess mode ------------------------------------------------------------

def exposition() -> Tuple[bytes, str]:
    """The metrics in the Prometheus text format: this process's, or every worker's added up."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = instruments().registry
    if os.environ.get(MULTIPROCESS_ENV):
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def prepare_multiprocess_dir() -> Optional[Path]:
    """In gunicorn's master before the workers start: an empty folder for the workers' metric files.

    A folder an admin names with PROMETHEUS_MULTIPROC_DIR is used as it is; otherwise PILOTFISH_HOME/metrics,
    emptied at each start (counters start again from zero, which Prometheus handles as a restart).
    """
    if os.environ.get(MULTIPROCESS_ENV):
        return Path(os.environ[MULTIPROCESS_ENV])
    home = Path(os.environ.get("PILOTFISH_HOME") or Path.home() / ".pilotfish").expanduser()
    folder = home / "metrics"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROCESS_ENV] = str(folder)
    return folder


def worker_exited(pid: int) -> None:
    """A gunicorn worker ended: its gauges (streams in flight) no longer count."""
    if os.environ.get(MULTIPROCESS_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


# --- token usage ----------------------------------------------------------------------------------------

def find_usage(data: bytes) -> Optional[dict]:
    """The last `"usage": {...}` object in a JSON answer or an SSE event, decoded alone (the rest is not parsed)."""
    at = data.rfind(USAGE_KEY)
    while at >= 0:
        found = USAGE_OBJECT.match(data, at)
        if found is not None:
            try:
                usage, _ = _decoder.raw_decode(data[found.end() - 1:].decode("utf-8", "replace"))
            except ValueError:
                return None
            return usage if isinstance(usage, dict) else None
        at = data.rfind(USAGE_KEY, 0, at)
    return None


def token_counts(usage: Optional[dict]) -> Tuple[int, int]:
    """(prompt tokens, completion tokens) of a usage object; missing or odd values count as 0."""
    if not usage:
        return 0, 0
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (prompt if isinstance(prompt, int) and prompt > 0 else 0,
            completion if isinstance(completion, int) and completion > 0 else 0)


def wants_json_body(method: str, mimetype: str, length: Optional[int]) -> bool:
    """A modest JSON POST: read whole before it is sent on (so a stream can ask for usage); others stream through."""
    return method == "POST" and mimetype == "application/json" and length is not None and length <= USAGE_BODY_LIMIT


def ask_for_usage(body: bytes, payload=None) -> Optional[bytes]:
    """For a streamed completion whose caller set no `stream_options`: the same body asking for the usage event.

    None when nothing is to be added (not a stream, the caller chose stream_options, or not a JSON object).
    The bytes are extended rather than re-encoded: what the caller sent reaches the service unchanged.
    `payload` is the body already decoded, if the caller has it.
    """
    if b'"stream"' not in body:
        return None
    if payload is None:
        try:
            payload = json.loads(body)
        except ValueError:
            return None
    if not isinstance(payload, dict) or payload.get("stream") is not True or "stream_options" in payload:
        return None
    stripped = body.rstrip()
    if not stripped.endswith(b"}"):
        return None
    return stripped[:-1] + INCLUDE_USAGE


# --- one proxied request ----------------------------------------------------------------------------------

class ProxyWatch:
    """What the proxy records about one request: latency, time to first byte, stream gauge, errors, tokens.

    For a streamed completion the portal asked the usage event for (`added_usage`), that event is taken out of
    what the caller receives. Lines are scanned only for the bytes `"usage"`; an incomplete last line of a chunk
    is held back until its end arrives (a client cannot use half an event anyway).
    """

    __slots__ = ("service", "started", "completion_call", "added_usage", "scan", "stream", "collected",
                 "collected_size", "carry", "prompt", "completion", "first_byte", "done", "counted")

    def __init__(self, service: ServiceInstruments, scan: bool, completion_call: bool, started: float):
        self.service = service
        self.started = started
        self.completion_call = completion_call  # /v1/completions or /v1/chat/completions: may ask for usage
        self.added_usage = False
        self.scan = scan  # look for usage in the answer
        self.stream = False
        self.collected: Optional[list] = None
        self.collected_size = 0
        self.carry = b""
        self.prompt = self.completion = 0
        self.first_byte = False
        self.done = False
        self.counted = False  # tokens added to the counters (once)

    def prepare(self, body, payload=None):
        """The body to send on: a streamed completion without stream_options also asks for the usage event."""
        if self.completion_call and isinstance(body, bytes):
            extended = ask_for_usage(body, payload)
            if extended is not None:
                self.added_usage = True
                return extended
        return body

    def failed(self, kind: str) -> None:
        self.service.error(kind)

    def answered(self, status: int, content_type: str = "", content_encoding: str = "",
                 length: Optional[str] = None) -> None:
        """The upstream's status and the headers that decide what is recorded (values as sent, or empty)."""
        if status >= 500:
            self.service.error("http_5xx")
        if content_type.startswith("text/event-stream"):
            self.stream = True
            self.service.streams.inc()
        if not self.scan or content_encoding:
            self.scan = False
        elif not self.stream:
            if (status == 200 and content_type.startswith("application/json")
                    and (length is None or (length.isdigit() and int(length) <= USAGE_BODY_LIMIT))):
                self.collected = []
            else:
                self.scan = False

    def pass_on(self, data: bytes) -> bytes:
        """One chunk of the answer as the caller receives it (maybe empty), noting the first byte and any usage."""
        if not self.first_byte:
            self.first_byte = True
            self.service.ttfb.observe(time.perf_counter() - self.started)
        if self.scan:
            if self.stream:
                data = self._scan_events(data)
                if data and DONE_EVENT in data:  # counted before the caller can see the end (and ask /metrics)
                    self._count_tokens()
            elif self.collected is not None:
                self.collected_size += len(data)
                if self.collected_size <= USAGE_BODY_LIMIT:
                    self.collected.append(data)
                else:
                    self.collected = None
        return data

    def remainder(self) -> bytes:
        """What is still held back when the answer ends (an unterminated last line)."""
        rest, self.carry = self.carry, b""
        return rest

    def _scan_events(self, data: bytes) -> bytes:
        if self.carry:
            data, self.carry = self.carry + data, b""
        if not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            data, self.carry = data[:cut], data[cut:]
        if USAGE_KEY in data:
            data = self._take_usage(data)
        return data

    def _take_usage(self, data: bytes) -> bytes:
        lines = data.split(b"\n")
        kept = []
        skip_blank = False
        for line in lines:
            if skip_blank:
                skip_blank = False
                if not line.strip():
                    continue
            if line.startswith(b"data:") and USAGE_OBJECT.search(line):
                try:
                    event = json.loads(line[5:])
                except ValueError:
                    event = None
                if isinstance(event, dict) and isinstance(event.get("usage"), dict):
                    prompt, completion = token_counts(event["usage"])
                    self.prompt, self.completion = prompt, completion  # the last report is the total
                    if self.added_usage:
                        if not event.get("choices"):
                            skip_blank = True
                            continue
                        del event["usage"]
                        line = b"data: " + json.dumps(event, separators=(",", ":")).encode()
            kept.append(line)
        return b"\n".join(kept)

    def finish(self) -> None:
        """Once, when the answer has been relayed (or abandoned)."""
        if self.done:
            return
        self.done = True
        self.service.seconds.observe(time.perf_counter() - self.started)
        if self.stream:
            self.service.streams.dec()
        if self.collected:
            self.prompt, self.completion = token_counts(find_usage(b"".join(self.collected)))
            self.collected = None
        self._count_tokens()

    def _count_tokens(self) -> None:
        if self.counted:
            return
        self.counted = True
        if self.prompt:
            self.service.prompt_tokens.inc(self.prompt)
        if self.completion:
            self.service.completion_tokens.inc(self.completion)


def watch_proxy(service_id: str, model: str, method: str, upstream_path: str) -> ProxyWatch:
    """Start recording one proxied request; usage is looked for in the OpenAI API's POST answers."""
    scan = method == "POST" and upstream_path.startswith("/v1/")
    return ProxyWatch(instruments().service(service_id, model), scan, scan and upstream_path.endswith("completions"),
                      time.perf_counter())
