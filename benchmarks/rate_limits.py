"""What a rate-limited key's request costs the proxy's event loop: microseconds per `RateLimits.admit` (and `spend`),
in one process and with other processes admitting against the same file at once (gunicorn's workers).

Target: at most 10 µs per admit in one process (a small share of what the proxy spends on a request); the figure with
processes admitting at once shows what waiting for the shared lock adds. Keys without a rate never call it.

Run: .venv/bin/python benchmarks/rate_limits.py [--calls 200000] [--processes 2] [--keys 50]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from portal.rate_limits import RateLimits  # noqa: E402

TARGET_US = 10.0


def per_call(home: str, calls: int, keys: int, what: str = "admit") -> float:
    """Microseconds per call of `what` over `calls` calls spread over `keys` keys (limits high enough to admit all)."""
    limits = RateLimits(home)
    names = [f"key-{index}" for index in range(keys)]
    for name in names:  # the file mapped and each key's slot found: the steady state
        limits.admit(name, 10_000_000, 10_000_000)
    call = limits.admit if what == "admit" else limits.spend
    arguments = [(name, 10_000_000, 10_000_000) if what == "admit" else (name, 1) for name in names]
    started = time.perf_counter()
    for index in range(calls):
        call(*arguments[index % keys])
    return (time.perf_counter() - started) / calls * 1e6


def _worker(home: str, calls: int, keys: int, out) -> None:
    out.put(per_call(home, calls, keys))


def contended(home: str, calls: int, keys: int, processes: int) -> list:
    """µs per admit in each of `processes` processes admitting at once."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    workers = [context.Process(target=_worker, args=(home, calls, keys, out)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    figures = [out.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--keys", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pilotfish-rates-") as home:
        alone = [per_call(home, args.calls, args.keys) for _ in range(args.rounds)]
        spend = [per_call(home, args.calls, args.keys, "spend") for _ in range(args.rounds)]
        shared = contended(home, args.calls, args.keys, args.processes)
    figures = {"admit_us": round(statistics.median(alone), 2), "admit_us_min": round(min(alone), 2),
               "spend_us": round(statistics.median(spend), 2),
               f"admit_us_{args.processes}_processes": [round(value, 2) for value in shared],
               "target_us": TARGET_US}
    print(f"admit: {figures['admit_us']} µs per call (median of {args.rounds} rounds, best {figures['admit_us_min']})")
    print(f"spend: {figures['spend_us']} µs per call")
    print(f"admit with {args.processes} processes at once: "
          f"{', '.join(f'{value:.2f}' for value in shared)} µs per call")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    ok = figures["admit_us"] <= TARGET_US
    print(f"target {TARGET_US} µs: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
