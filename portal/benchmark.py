"""Load benchmark of a text-generation service: N clients at once, each sending its next request as soon as the
last one ended, measuring time to first token, inter-token latency, end-to-end latency (p50/p95/p99), output
tokens/s (tokens received over wall time), requests/s and errors by kind; a sweep over client counts finds the
highest load that meets a time-to-first-token target.

`run_load` is the load generator: one asyncio task and one keep-alive connection per client (each request and its
answer: portal/benchmark_requests.py, on the HTTP/1.1 client connection the proxy uses, portal/http1.py), so the
concurrency is the one asked for; the most requests seen in flight at once is measured and reported. (Measured
against threads with a urllib3 pool: at 64 clients asyncio used a third of the CPU, and at 256 clients threads
saturated a core at 280 requests/s where asyncio kept 470 with a 10 ms TTFT.) Distributions are summarized with
nearest-rank percentiles (portal/distribution.py). `python -m portal.benchmark RUN_DIR` runs a stored benchmark
(spec.json in, progress.json and result.json out) in a process of its own (portal/benchmark_runs.py starts it), so
the client never competes with the portal's workers.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .benchmark_requests import LoadSpec, Sample, Target, send
from .distribution import distribution

CREDENTIAL_ENV = "PILOTFISH_BENCH_CREDENTIAL"
SWEEP_PERCENTILE = 95  # the sweep's TTFT target applies to this percentile
perf = time.perf_counter


# --- a load -----------------------------------------------------------------------------------------------

def run_load(spec: LoadSpec, credential: str, on_progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Run one load and return its figures (see `summarize`). `on_progress(done, total)` is called about
    twice a second. Runs its own event loop: call it from a thread that has none."""
    return asyncio.run(_run_load(spec, credential, on_progress))


async def _run_load(spec: LoadSpec, credential: str, on_progress) -> dict:
    target = Target(spec, credential)
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
            samples[index], connection = await send(target, connection, index, origin)
            counts["in_flight"] -= 1
            counts["done"] += 1
        if connection is not None:
            connection.close()

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
