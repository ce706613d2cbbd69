"""Streaming-proxy benchmark: direct vs the portal (per gunicorn configuration) vs nginx, in one run.

Everything runs on this machine and every request goes to 127.0.0.1:

  upstream   a small asyncio HTTP/1.1 server (`--serve-upstream`, benchmarks/support/sse_upstream.py), run by the
             portal as a text-generation service (local scheduler): GET /health, POST /v1/chat/completions (a small JSON
             answer, or with "stream": true an SSE stream of --chunks events spread over --stream-seconds,
             chunked transfer encoding, then `data: [DONE]`), GET /stats (its own counters).
  direct     the load generator talks to the upstream itself (the baseline of every ratio).
  nginx      the reference proxy: Debian's nginx (installed with apt-get if missing), our own config in a
             temp dir: proxy_buffering off, proxy_http_version 1.1, keepalive upstream, 2 workers.
  portal     `pilotfish start` under gunicorn, once per --configs entry (class:workers[:threads]), through
             /services/<id>/v1/chat/completions (and the /v1 gateway for the latency scenario). All portals share
             one home and the one upstream service, and all targets are up at once, so the measurements can
             alternate between them (machine-level drift hits every target alike).

Scenarios
  1. latency   one client, keep-alive, sequential non-streaming requests (--warmup, then --requests in
               --batches batches that rotate over the targets): p50/p99 and the latency added to direct.
               Target: portal p50 <= +1.5 ms (nginx adds ~0.4 ms).
  2. streams   C concurrent clients (--concurrency, e.g. 32,256), each on its own keep-alive connection:
               one warm-up round, then --rounds streams back to back. The clients start together, so every
               round begins with a burst of C requests (the worst case for TTFT, e.g. a notebook's gather()).
               Aggregate chunks/s and streams/s as a fraction of direct, TTFT (request sent -> first SSE
               bytes) p50/p95/p99, the portal's TTFT minus nginx's, errors by kind, and the CPU used by the
               proxy, the upstream, the client and by processes outside the benchmark (a shared machine:
               such windows are measured again, and each phase first waits for an idle machine).
               Targets at 256: throughput >= 95 % of direct; TTFT p50 within 100 ms of nginx.

The load generator is one process (this one) on the HTTP/1.1 client connection the proxy itself uses
(portal/http1.py, httptools): a blocking socket for scenario 1, asyncio for scenario 2; its CPU use is reported
next to the others, so a saturated client shows. The upstream is another process. On a 2-core machine all of them
share the cores, so the ratios include the proxy's CPU competition with the rest. Percentiles are nearest-rank
(portal/distribution.py). The parts: benchmarks/support/ (sse_upstream, load, machine, portals, report).

Run:  .venv/bin/python benchmarks/proxy.py [--quick] [--json results.json]
      .venv/bin/python benchmarks/proxy.py --configs uvicorn:1,uvicorn:2 --concurrency 256 --rounds 5
      .venv/bin/python benchmarks/proxy.py --configs "uvicorn:2,gthread:2:256@/path/to/an/older/checkout"
A configuration with @<source tree> runs the portal of that tree (its own gunicorn settings read the worker class
and threads given here), so a change can be measured beside the code before it. Everything it starts (portals,
the upstream service, nginx) is stopped at the end, also on Ctrl-C or error.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # portal, tests.support and benchmarks.support of this checkout

if __name__ == "__main__" and "--serve-upstream" in sys.argv:  # the upstream service needs nothing else
    from benchmarks.support.sse_upstream import serve_upstream
    serve_upstream(sys.argv[1:])
    sys.exit(0)

from benchmarks.support.load import build_request, fetch_json, latency_run, latency_summary, streams_run  # noqa: E402
from benchmarks.support.machine import (CpuMeter, Nginx, ensure_nginx, free_port, kill_leftovers,  # noqa: E402
                                        process_tree, run_bench, set_subreaper)
from benchmarks.support.portals import BenchPortal, parse_configs  # noqa: E402
from benchmarks.support.report import MEASURE_ATTEMPTS, NOISY_FOREIGN_PCT, fmt, merge_counts, report  # noqa: E402
from benchmarks.support.sse_upstream import MODEL, serve_upstream  # noqa: E402
from portal.scheduler import processes  # noqa: E402
from tests.support.portal_process import write_site_config  # noqa: E402
import requests  # noqa: E402

THIS = Path(__file__).resolve()
DEFAULT_CONFIGS = "uvicorn:1,uvicorn:2"
QUIET_BUSY_PCT = 15.0  # machine busy % (all cores) under which a phase may start


class Target:
    def __init__(self, name: str, kind: str, port: int, path: str, token: str, proxy_procs: Callable[[], list],
                 gateway_path: Optional[str] = None, config: Optional[dict] = None):
        self.name, self.kind, self.port, self.path, self.token = name, kind, port, path, token
        self.proxy_procs, self.gateway_path, self.config = proxy_procs, gateway_path, config
        self.samples: List[float] = []
        self.errors: Dict[str, int] = {}
        self.gateway_samples: List[float] = []
        self.gateway_errors: Dict[str, int] = {}
        self.streams: Dict[str, dict] = {}
        self.upstream: Dict[str, int] = {}
        self.latency_meter: Optional[CpuMeter] = None


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="pilotfish-proxy-bench-"))
        self.site: Optional[Path] = None
        self.portals: list = []
        self.nginx: Optional[Nginx] = None
        self.service: Optional[dict] = None
        self.service_key = ""
        self.upstream_port = 0
        self.service_record: Optional[dict] = None
        self.targets: List[Target] = []
        self.notes: List[str] = []
        self.redone = 0  # windows measured again because other processes were busy

    # --- helpers -------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def stream_body(self) -> dict:
        return {"model": MODEL, "messages": [{"role": "user", "content": "Say something."}],
                "max_tokens": self.args.chunks, "stream": True}

    def chat_body(self) -> dict:
        return {"model": MODEL, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 3}

    def upstream_procs(self) -> list:
        return process_tree(self.service_record and self.service_record.get("pid"))

    def upstream_stats(self) -> dict:
        return fetch_json(self.upstream_port, build_request("GET", "/stats", self.upstream_port, self.service_key,
                                                            None))

    def upstream_delta(self, before: dict) -> Dict[str, int]:
        """What the upstream counted since `before` (less the two /stats calls themselves)."""
        after = self.upstream_stats()
        own = {"connections": 1, "requests": 1}
        return {key: after[key] - before[key] - own.get(key, 0) for key in after if key != "pid"}

    # --- setup -----------------------------------------------------------------------------------------
    def start_portal(self, config: dict):
        if self.site is None:
            command = (f"{sys.executable} {THIS} --serve-upstream --chunks {self.args.chunks} "
                       f"--stream-seconds {self.args.stream_seconds}")
            self.site = write_site_config(self.tmp / "site.yaml", scheduler="local",
                                          runtimes={"text-generation": {"command": command}})
        portal = BenchPortal(self.tmp / "home", self.site, config, str(self.args.poll_interval))
        self.portals.append(portal)  # before start(): a half-started portal is torn down too
        return portal.start()

    def use_named_key(self, rates: str) -> None:
        """--as-key RPM:TPM: every portal target is called with one named key holding those rates (made through the
        first portal; all portals share one home and database, so each accepts it, and a tree with key rates and usage
        attribution applies them, as it would to a researcher's key)."""
        rpm, _, tpm = rates.partition(":")
        first = next(portal for portal in self.portals if getattr(portal, "token", None))
        made = requests.post(first.url + "/api/keys", headers={"Authorization": f"Bearer {first.token}"}, timeout=10,
                             json={"name": "proxy-benchmark", "requests_per_minute": int(rpm),
                                   "tokens_per_minute": int(tpm)})
        if made.status_code != 201:
            raise RuntimeError(f"--as-key: {made.status_code} {made.text}")
        for portal in self.portals:
            portal.token = made.json()["key"]
        self.notes.append(f"portal targets called with a named key of {rpm} requests and {tpm} tokens a minute")

    def launch_service(self, portal) -> None:
        response = portal.launch(model=MODEL, time=120)  # minutes: outlives the run
        if response.status_code >= 300:
            raise RuntimeError(f"launch failed: {response.status_code} {response.text}")
        service_id = response.json()["id"]
        job_dir = self.tmp / "home" / "jobs" / service_id
        self.service = {"id": service_id, "job_dir": job_dir}
        with contextlib.suppress(FileNotFoundError, ValueError):
            self.service_record = json.loads((job_dir / "local_job.json").read_text())
        try:
            body = portal.wait_running(service_id, 60)
        except RuntimeError as exc:
            log = (job_dir / "job.log").read_text(errors="replace")[-2000:] if (job_dir / "job.log").exists() else ""
            raise RuntimeError(f"the upstream service did not start: {exc}\n{log}") from None
        self.service_record = json.loads((job_dir / "local_job.json").read_text())
        endpoint = body.get("endpoint") or {}
        host, port = endpoint.get("host"), endpoint.get("port")
        address = socket.gethostbyname(host)
        if not address.startswith("127."):
            raise RuntimeError(f"the service endpoint {host} resolves to {address}, not loopback: refusing to send "
                               "load there (this benchmark only loads 127.0.0.1)")
        self.upstream_port = int(port)
        plain_port = job_dir / "plain_port"  # the upstream's plain HTTP port, beside its TLS one (the service's)
        if plain_port.exists():
            self.upstream_port = int(plain_port.read_text())
            if self.args.service_plain:
                self.route_plain(service_id)
        self.service_key = (job_dir / "service.key").read_text().strip()
        self.log(f"service {service_id} RUNNING at {host}:{port} (upstream pids {[p.pid for p in self.upstream_procs()]})")

    def route_plain(self, service_id: str) -> None:
        """--service-plain: the portals reach the service on the upstream's plain port, without TLS (only to
        measure what TLS costs the portal: the service's record is changed, and every worker told to reload)."""
        import sqlite3

        home = self.tmp / "home"
        with contextlib.closing(sqlite3.connect(home / "pilotfish.db")) as database, database:
            database.execute("UPDATE services SET port = ?, tls_fingerprint = NULL WHERE id = ?",
                             (self.upstream_port, service_id))
        with open(home / "routes.changed", "ab") as mark:
            mark.write(b".")
        self.notes.append("--service-plain: portal to service over plain HTTP (no TLS)")

    def setup(self, configs: List[dict]) -> None:
        args = self.args
        self.log(f"temp dir {self.tmp}")
        for config in configs:
            try:
                portal = self.start_portal(config)
            except Exception as exc:
                self.log(f"{config['label']}: did not start: {exc}")
                self.notes.append(f"{config['label']} did not start: {str(exc)[:300]}")
                continue
            if self.service is None:
                self.launch_service(portal)
            else:
                portal.wait_running(self.service["id"], 30)
            self.log(f"{config['label']} on port {portal.port}")
        if self.service is None:
            raise RuntimeError("no portal configuration started: nothing to measure")
        if args.as_key:
            self.use_named_key(args.as_key)
        self.targets.append(Target("direct", "direct", self.upstream_port, "/v1/chat/completions", self.service_key,
                                   lambda: []))
        if not args.no_nginx:
            try:
                binary = ensure_nginx()
                version = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr.strip()
                self.nginx = Nginx(binary, self.tmp / "nginx", self.upstream_port, free_port(), args.nginx_workers).start()
                self.log(f"{version} on port {self.nginx.port}, {args.nginx_workers} workers")
                self.notes.append(version)
                nginx = self.nginx
                self.targets.append(Target("nginx", "nginx", nginx.port, "/v1/chat/completions", self.service_key,
                                           lambda: process_tree(nginx.proc.pid)))
            except Exception as exc:
                self.log(f"nginx: skipped: {exc}")
                self.notes.append(f"nginx skipped: {exc}")
        for portal in self.portals:
            if portal.proc is None or portal.proc.poll() is not None or not getattr(portal, "token", None):
                continue
            self.targets.append(Target(portal.config["label"], "portal", portal.port,
                                       f"/services/{self.service['id']}/v1/chat/completions", portal.token,
                                       (lambda p=portal: process_tree(p.proc.pid)), "/v1/chat/completions",
                                       portal.config))

    def wait_quiet(self, before: str) -> None:
        """This machine may be shared: wait (bounded) until it is nearly idle, so one target is not measured
        against someone else's test run while the next one is not."""
        import psutil

        deadline = time.monotonic() + self.args.quiet_wait
        while True:
            busy = psutil.cpu_percent(interval=0.5)
            if busy <= QUIET_BUSY_PCT:
                return
            if time.monotonic() > deadline:
                self.notes.append(f"the machine was {busy:.0f} % busy (other processes) before {before}")
                self.log(f"machine still {busy:.0f} % busy before {before}: measuring anyway")
                return
            time.sleep(1.0)

    # --- the scenarios ---------------------------------------------------------------------------------
    def proxy_procs(self, target: Target) -> Callable[[], list]:
        upstream = frozenset(p.pid for p in self.upstream_procs())  # the service may be a portal worker's child
        return lambda: [p for p in target.proxy_procs() if p.pid not in upstream]

    def scenario_latency(self) -> None:
        args = self.args
        batches = max(1, args.batches)
        per_batch = max(1, -(-args.requests // batches))
        body = self.chat_body()
        self.log(f"scenario 1: {per_batch * batches} sequential requests per target in {batches} interleaved "
                 f"batches, after {args.warmup} warm-up")
        for target in self.targets:
            target.latency_meter = CpuMeter(self.proxy_procs(target), self.upstream_procs)
            target.request = build_request("POST", target.path, target.port, target.token, body)
            latency_run(target.port, target.request, args.warmup, 0, time.monotonic() + 60)
            if target.gateway_path:
                target.gateway_request = build_request("POST", target.gateway_path, target.port, target.token, body)
                latency_run(target.port, target.gateway_request, args.warmup, 0, time.monotonic() + 60)
        for batch in range(batches):
            shift = batch % len(self.targets)
            for target in self.targets[shift:] + self.targets[:shift]:
                for attempt in range(1, MEASURE_ATTEMPTS + 1):
                    self.wait_quiet(f"{target.name}, latency batch {batch + 1}")
                    before = self.upstream_stats()
                    target.latency_meter.start()
                    run = latency_run(target.port, target.request, 0, per_batch, time.monotonic() + 60)
                    foreign = target.latency_meter.stop(keep=False)["foreign_cpu_pct"]
                    if foreign > NOISY_FOREIGN_PCT and attempt < MEASURE_ATTEMPTS:
                        self.redone += 1
                        self.log(f"{target.name}, latency batch {batch + 1}: other processes used {foreign:.0f} % of a "
                                 "core meanwhile: measuring it again")
                        continue
                    target.latency_meter.keep()
                    merge_counts(target.upstream, self.upstream_delta(before))
                    target.samples += run["samples"]
                    merge_counts(target.errors, run["errors"])
                    break
                if target.gateway_path:
                    run = latency_run(target.port, target.gateway_request, 0, per_batch, time.monotonic() + 60)
                    target.gateway_samples += run["samples"]
                    merge_counts(target.gateway_errors, run["errors"])
        for target in self.targets:
            lat = latency_summary(target.samples, target.errors)
            self.log(f"{target.name}: 1 client p50 {fmt(lat['p50_ms'], 3)} ms p99 {fmt(lat['p99_ms'], 3)} ms"
                     + (f" errors {lat['errors']}" if lat["errors"] else ""))

    def scenario_streams(self) -> None:
        args = self.args
        request_body = self.stream_body()
        for index, concurrency in enumerate(args.concurrency):
            shift = index % len(self.targets)
            for target in self.targets[shift:] + self.targets[:shift]:
                request = build_request("POST", target.path, target.port, target.token, request_body)
                best = None
                for attempt in range(1, MEASURE_ATTEMPTS + 1):
                    self.wait_quiet(f"{target.name} at {concurrency} streams")
                    meter = CpuMeter(self.proxy_procs(target), self.upstream_procs)
                    before = self.upstream_stats()
                    run = asyncio.run(streams_run(target.port, request, concurrency, args.rounds, args.chunks + 1,
                                                  args.stream_timeout, meter.start))
                    run.update(meter.stop())
                    run["attempt"] = attempt
                    upstream = self.upstream_delta(before)
                    time.sleep(0.5)
                    if best is None or run["foreign_cpu_pct"] < best[0]["foreign_cpu_pct"]:
                        best = (run, upstream)
                    if run["foreign_cpu_pct"] <= NOISY_FOREIGN_PCT:
                        break
                    self.redone += 1
                    self.log(f"{target.name} at {concurrency} streams: other processes used "
                             f"{run['foreign_cpu_pct']:.0f} % of a core meanwhile"
                             + (": measuring it again" if attempt < MEASURE_ATTEMPTS else ""))
                run, upstream = best
                merge_counts(target.upstream, upstream)
                target.streams[str(concurrency)] = run
                self.log(f"{target.name}: {concurrency} streams x {args.rounds}: {run['completed']}/{run['streams']} ok, "
                         f"{run['chunks_per_s']:.0f} chunks/s, TTFT p50 {fmt(run['ttft_p50_ms'], 1)} ms "
                         f"p95 {fmt(run['ttft_p95_ms'], 1)} ms, cpu % of a core: proxy {run['proxy_cpu_pct']} "
                         f"upstream {run['upstream_cpu_pct']} client {run['client_cpu_pct']} others "
                         f"{run['foreign_cpu_pct']}" + (f", errors {run['errors']}" if run["errors"] else ""))

    def run(self) -> dict:
        started = time.time()
        configs = parse_configs(self.args.configs)
        self.setup(configs)
        self.scenario_latency()
        self.scenario_streams()
        return self.report(configs, time.time() - started)

    # --- teardown -------------------------------------------------------------------------------------
    def teardown(self) -> None:
        if self.nginx:
            with contextlib.suppress(Exception):
                self.nginx.stop()
        live = [p for p in self.portals if p.proc is not None and p.proc.poll() is None and getattr(p, "token", None)]
        if self.service and live:
            with contextlib.suppress(Exception):
                live[0].request("POST", f"/api/services/{self.service['id']}/stop", timeout=10)
        record = self.service_record
        if record:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and processes.alive(record):
                time.sleep(0.2)
            if processes.alive(record):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(record["pid"], signal.SIGKILL)
        for portal in self.portals:
            with contextlib.suppress(Exception):
                portal.stop()
        killed = kill_leftovers(self.tmp)
        if killed:
            self.log(f"teardown: killed {killed} leftover processes")
        if self.args.keep_temp:
            self.log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def report(self, configs: List[dict], elapsed: float) -> dict:
        return report(self, configs, elapsed)



def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--serve-upstream" in argv:
        serve_upstream(argv)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--serve-upstream", action="store_true",
                        help="run the synthetic upstream (used as the service command; reads PILOTFISH_PORT, "
                             "PILOTFISH_API_KEY, PILOTFISH_MODEL)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true",
                        help="a short run (~2 min): 200 requests, 1 round of streams")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="portal configurations, class:workers[:threads][@source tree], comma-separated; this "
                             "tree runs uvicorn workers (threads: its Flask thread pool) "
                             f"(default {DEFAULT_CONFIGS})")
    parser.add_argument("--concurrency", default="32,256", help="concurrent streams (comma-separated)")
    parser.add_argument("--rounds", type=int, default=None, help="measured streams per client (default 3, quick 1)")
    parser.add_argument("--requests", type=int, default=None, help="sequential requests (default 500, quick 200)")
    parser.add_argument("--warmup", type=int, default=50, help="sequential warm-up requests (default 50)")
    parser.add_argument("--chunks", type=int, default=40, help="SSE events per stream, before [DONE] (default 40)")
    parser.add_argument("--stream-seconds", type=float, default=2.0, help="length of a stream (default 2)")
    parser.add_argument("--stream-timeout", type=float, default=120.0,
                        help="time bound of one streaming phase, seconds (default 120)")
    parser.add_argument("--nginx-workers", type=int, default=2, help="nginx worker processes (default 2)")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx reference")
    parser.add_argument("--as-key", metavar="RPM:TPM",
                        help="call the portals with a named key of these rates (e.g. 10000000:10000000: never "
                             "reached, but every request goes through the key's rate and usage accounting) instead "
                             "of the portal token")
    parser.add_argument("--service-plain", action="store_true",
                        help="the portals reach the service over plain HTTP instead of TLS with its pinned "
                             "certificate (as every service is reached): to measure TLS's cost")
    parser.add_argument("--batches", type=int, default=None,
                        help="scenario 1 runs in this many batches, alternating the targets (default 5, quick 2)")
    parser.add_argument("--poll-interval", type=float, default=5.0,
                        help="the portals' reconciler poll interval, seconds (default 5, the production default)")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="before each phase wait up to this many seconds for the machine to be idle (default 60)")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temp dir (portal and nginx logs)")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.requests = args.requests or (200 if args.quick else 500)
    args.batches = args.batches or (2 if args.quick else 5)
    if args.quick:
        args.warmup = min(args.warmup, 30)

    set_subreaper()

    return run_bench(Bench(args), args.json)


if __name__ == "__main__":
    sys.exit(main())
