"""Portal metrics for Prometheus: the instruments, and their /metrics output (one process's, or every worker's).

Every worker of a gunicorn portal counts its own requests; in multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by
the gunicorn master through `prepare_multiprocess_dir`) each worker writes its values to files there and a scrape
adds them up, so counters are exact whichever worker answers. prometheus_client fixes where values live when it is
first imported, which is why it is imported here only when the instruments are built, never at module import.

The proxy is the hot path: labelled children are resolved once per service and route class, so a request costs a
few counter and histogram updates (what it records: portal/proxy/recording.py; token usage: portal/proxy/usage.py).
"""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
CYCLE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SERVICE_STATES = ("SUBMITTED", "PENDING", "STARTING", "RUNNING", "UNHEALTHY", "STOPPED", "FAILED", "TIMEOUT")

# Route classes for pilotfish_requests_total, by Flask endpoint (then by blueprint).
ENDPOINT_CLASSES = {"proxy.service_proxy": "service", "proxy.gateway": "gateway", "proxy.gateway_models": "gateway",
                    "api.health": "health", "api.metrics_text": "metrics", "static": "static"}
BLUEPRINT_CLASSES = {"api": "api", "auth": "auth", "ui": "ui"}


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
        self.batch_lines = Counter("pilotfish_batch_lines",
                                   "Batch lines done, by model and outcome (completed: answered; failed: in the error "
                                   "file)", ["model", "outcome"], registry=registry)
        self.batch_tokens = Counter("pilotfish_batch_tokens", "Tokens of batch lines' answers, by model and kind "
                                    "(prompt, completion)", ["model", "kind"], registry=registry)
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
                     states: Optional[Dict[str, int]]) -> None:
        """One reconcile cycle: its duration, the scheduler commands it ran, and services by state afterwards (None:
        unchanged since the last count)."""
        self.cycle_seconds.observe(seconds)
        if scheduler_calls:
            self.scheduler_calls.inc(scheduler_calls)
        if not scheduler_ok:
            self.scheduler_failures.inc()
        for state, child in ([] if states is None else self._state_children.items()):
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

def exposition(families: Iterable = ()) -> Tuple[bytes, str]:
    """The metrics in the Prometheus text format: this process's, or every worker's added up, then `families`
    (metric families computed for this scrape, such as the services' cost from the database)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = instruments().registry
    if os.environ.get(MULTIPROCESS_ENV):
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    body = generate_latest(registry)
    families = list(families)
    if families:
        scrape = CollectorRegistry(auto_describe=False)
        scrape.register(_Families(families))
        body += generate_latest(scrape)
    return body, CONTENT_TYPE_LATEST


class _Families:
    """A collector of metric families made for one scrape."""

    def __init__(self, families: list):
        self.families = families

    def collect(self):
        return iter(self.families)


COST_GAUGES = (("gpu_hours", "pilotfish_service_gpu_hours", "GPU-hours allocated to a service's jobs (by their times)"),
               ("cpu_hours", "pilotfish_service_cpu_hours", "CPU-hours allocated to a service's jobs (by their times)"),
               ("idle_share", "pilotfish_service_idle_ratio",
                "Share of a service's running time without a request in flight (0 to 1)"))


def cost_families(costs: Iterable[Tuple[str, str, dict]]) -> list:
    """Gauges per service (labels service, model) from (service id, model, cost) as portal/service_cost.py gives
    them; a service that has not run long enough to have an idle ratio has none."""
    from prometheus_client.core import GaugeMetricFamily

    costs = list(costs)
    families = []
    for field, name, words in COST_GAUGES:
        family = GaugeMetricFamily(name, words, labels=["service", "model"])
        for service_id, model, cost in costs:
            if cost.get(field) is not None:
                family.add_metric([service_id, model], cost[field])
        families.append(family)
    return families


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
