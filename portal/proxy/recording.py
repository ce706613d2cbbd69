"""What the proxy records about each request, in the portal's Prometheus instruments (portal/metrics.py).

A Record is started per relayed request with its service's labelled instruments (resolved once per service), and
is told what happens: the answer's head (the request counted by route class and status, a 5xx counted as an
upstream error, an event stream counted in flight), the first body byte (time to first byte), a failure to reach
or read the service (by kind), the tokens the usage reader found, and the end (latency; the stream counted out).
It only observes: the bytes relayed are never touched here. The portal's own answers on the proxied paths are
counted with count_answer. A request costs a few counter and histogram updates.
"""
from __future__ import annotations

import time

from ..metrics import Instruments, ServiceInstruments, instruments

SERVICE_ENDPOINT, GATEWAY_ENDPOINT = "proxy.service_proxy", "proxy.gateway"  # route classes (metrics.ENDPOINT_CLASSES)


class Record:
    """One relayed request, from its arrival (`started`, perf_counter) until finish."""

    __slots__ = ("instruments", "service", "started", "stream", "done")

    def __init__(self, instruments: Instruments, service: ServiceInstruments, started: float):
        self.instruments = instruments
        self.service = service
        self.started = started
        self.stream = False
        self.done = False

    def failed(self, kind: str) -> None:
        self.service.error(kind)

    def answered(self, endpoint: str, status: int, stream: bool) -> None:
        """The service's status is in; `stream`: its answer is an event stream (text/event-stream)."""
        self.instruments.count_request(endpoint, status)
        if status >= 500:
            self.service.error("http_5xx")
        if stream:
            self.stream = True
            self.service.streams.inc()

    def first_byte(self) -> None:
        self.service.ttfb.observe(time.perf_counter() - self.started)

    def count_tokens(self, prompt: int, completion: int) -> None:
        """The tokens of the request, as the service reported them (once)."""
        if prompt:
            self.service.prompt_tokens.inc(prompt)
        if completion:
            self.service.completion_tokens.inc(completion)

    def finish(self) -> None:
        """Once, when the answer has been relayed (or abandoned)."""
        if self.done:
            return
        self.done = True
        self.service.seconds.observe(time.perf_counter() - self.started)
        if self.stream:
            self.service.streams.dec()


def start(service_id: str, model: str) -> Record:
    """Start recording one relayed request to a service."""
    found = instruments()
    return Record(found, found.service(service_id, model), time.perf_counter())


def count_answer(endpoint: str, status: int) -> None:
    """An answer the portal made itself (an error, a model entry) on a proxied path."""
    instruments().count_request(endpoint, status)
