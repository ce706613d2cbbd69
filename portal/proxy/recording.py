"""What the proxy records about each request, in the portal's Prometheus instruments (portal/metrics.py).

A Record is started per relayed request with its service's labelled instruments (resolved once per service), and
is told what happens: the answer's head (the request counted by route class and status, a 5xx counted as an
upstream error, an event stream counted in flight), the first body byte (time to first byte), a failure to reach
or read the service (by kind), the tokens the usage reader found, and the end (latency; the stream counted out;
the request counted for its principal in the usage ledger). It only observes: the bytes relayed are never touched
here. The portal's own answers on the proxied paths are counted with count_answer (not in the ledger: no service
answered them). A request costs a few counter and histogram updates and one dictionary update.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from ..metrics import Instruments, ServiceInstruments, instruments
from ..usage_ledger import UsageLedger

SERVICE_ENDPOINT, GATEWAY_ENDPOINT = "proxy.service_proxy", "proxy.gateway"  # route classes (metrics.ENDPOINT_CLASSES)


class Record:
    """One relayed request, from its arrival (`started`, perf_counter) until finish, and who made it (`principal`):
    at the finish it is counted once in the worker's usage ledger (portal/usage_ledger.py), and its tokens are
    spent from its key's rate (`spend`, portal/rate_limits.py) when the key has a token rate."""

    __slots__ = ("instruments", "service", "started", "stream", "done", "principal", "service_id", "model", "ledger",
                 "status", "broken", "prompt", "completion", "spend")

    def __init__(self, instruments: Instruments, service: ServiceInstruments, started: float, principal: str,
                 service_id: str, model: str, ledger: Optional[UsageLedger]):
        self.instruments = instruments
        self.service = service
        self.started = started
        self.stream = False
        self.done = False
        self.principal, self.service_id, self.model, self.ledger = principal, service_id, model, ledger
        self.status = 0
        self.broken = False  # the service could not be reached or read
        self.prompt = self.completion = 0
        self.spend: Optional[Callable[[int], None]] = None

    def failed(self, kind: str) -> None:
        self.broken = True
        self.service.error(kind)

    def answered(self, endpoint: str, status: int, stream: bool) -> None:
        """The service's status is in; `stream`: its answer is an event stream (text/event-stream)."""
        self.status = status
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
        self.prompt, self.completion = prompt, completion
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
        if self.ledger is not None:  # an error: no answer, or one with a 4xx/5xx status
            self.ledger.count(self.principal, self.service_id, self.model, self.broken or not 0 < self.status < 400,
                              self.prompt, self.completion)
        if self.spend is not None and (self.prompt or self.completion):
            self.spend(self.prompt + self.completion)


def start(service_id: str, model: str, principal: str = "owner", ledger: Optional[UsageLedger] = None) -> Record:
    """Start recording one relayed request of `principal` to a service (counted in `ledger` at its finish)."""
    found = instruments()
    return Record(found, found.service(service_id, model), time.perf_counter(), principal, service_id, model, ledger)


def count_answer(endpoint: str, status: int) -> None:
    """An answer the portal made itself (an error, a model entry) on a proxied path."""
    instruments().count_request(endpoint, status)
