"""The proxy benchmark's report: per target, scenario 1 (one client: latency added to direct) and scenario 2 (C
streams: throughput against direct, TTFT against nginx), the upstream's own counts, the targets met, and the run's
circumstances (versions, machine)."""
from __future__ import annotations

import contextlib
import os
import platform
import time
from typing import Dict, List

from .load import latency_summary
from .machine import CpuMeter

NOISY_FOREIGN_PCT = 15.0  # CPU (% of a core) used by processes outside the benchmark above which a window is redone
MEASURE_ATTEMPTS = 3  # at most, per window


def report(bench, configs: List[dict], elapsed: float) -> dict:
    """Print the tables and the targets met; the results as one dict (for --json)."""
    args = bench.args
    by_name = {t.name: t for t in bench.targets}
    results: Dict[str, dict] = {}
    for t in bench.targets:
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
                bench.notes.append(f"{name} at {concurrency} streams: other processes used "
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
    if bench.redone:
        bench.notes.append(f"{bench.redone} measurement windows were redone because other processes were busy")
    for note in bench.notes:
        print(f"note: {note}")
    print(f"\ntotal time {elapsed:.0f} s")
    return {"meta": meta(args, elapsed), "results": results, "targets": targets, "notes": bench.notes}


def meta(args, elapsed: float) -> dict:
    from importlib import metadata

    versions = {}
    for name in ("gunicorn", "uvicorn", "uvloop", "httptools", "a2wsgi", "flask", "werkzeug"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "elapsed_s": round(elapsed, 1), "cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "args": vars(args)}


def merge_counts(into: Dict[str, int], more: Dict[str, int]) -> None:
    for key, value in more.items():
        into[key] = into.get(key, 0) + value


def ratio(a, b):
    return None if a is None or not b else a / b


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def sub(a, b):
    return None if a is None or b is None else a - b
