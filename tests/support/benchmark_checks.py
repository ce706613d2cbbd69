"""Run a stored benchmark through a portal's API and check its figures hang together (for any engine)."""
from __future__ import annotations

import time

import pytest


def run_benchmark(portal, service: str, timeout: float = 180, **params) -> dict:
    """POST /api/benchmarks, then follow the run until it ends; returns the full run (per-request lists too)."""
    response = portal.request("POST", "/api/benchmarks", json={"service": service, **params})
    assert response.status_code == 202, response.text
    run = response.json()
    deadline = time.monotonic() + timeout
    while run["state"] == "RUNNING":
        if time.monotonic() > deadline:
            pytest.fail(f"benchmark {run['id']} still running after {timeout:g} s: {run.get('progress')}")
        time.sleep(0.3)
        run = portal.request("GET", f"/api/benchmarks/{run['id']}").json()
    return run


def check_load_figures(figures: dict, clients: int, requests: int, max_tokens: int = None) -> None:
    """A load's figures: the concurrency asked for, every request answered, tokens/s = tokens / wall time,
    percentiles in order, and per-request lists of the right length."""
    assert figures["failed"] == 0, figures["errors"]
    assert figures["completed"] == requests
    assert figures["max_in_flight"] == clients
    assert figures["wall_seconds"] > 0
    assert figures["output_tokens_per_second"] == pytest.approx(figures["output_tokens"] / figures["wall_seconds"],
                                                                rel=1e-3)
    assert figures["requests_per_second"] == pytest.approx(requests / figures["wall_seconds"], rel=1e-3)
    if max_tokens is not None and figures["token_source"] == "usage":
        assert figures["output_tokens"] == requests * max_tokens
    for name in ("ttft_seconds", "latency_seconds"):
        dist = figures[name]
        assert dist["count"] == requests, name
        assert 0 <= dist["p50"] <= dist["p95"] <= dist["p99"] <= dist["max"], (name, dist)
    assert figures["ttft_seconds"]["max"] <= figures["latency_seconds"]["max"]
    per_request = figures.get("per_request")
    if per_request is not None:
        assert all(len(values) == requests for values in per_request.values())
        assert all(ttft <= latency for ttft, latency in zip(per_request["ttft"], per_request["latency"]))
        assert max(start + latency for start, latency in zip(per_request["start"], per_request["latency"])) == \
            pytest.approx(figures["wall_seconds"], abs=1e-5)
