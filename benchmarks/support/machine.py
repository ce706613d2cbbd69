"""The proxy benchmark's view of the machine: process trees and their CPU time, CPU used by processes outside the
benchmark (a shared machine), the measured windows' CPU percentages, nginx as the reference proxy, free ports, and
reaping orphaned children."""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, Optional

import psutil

LOOPBACK = "127.0.0.1"
perf = time.perf_counter


def process_tree(pid: Optional[int], exclude: frozenset = frozenset()) -> list:
    if not pid:
        return []
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in procs if p.pid not in exclude]


def cpu_seconds(procs: list) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def foreign_cpu() -> Dict[int, tuple]:
    """CPU seconds of every process that is neither this benchmark's (itself and its descendants, the portals,
    nginx, the upstream) nor a kernel thread: someone else's load on a shared machine."""
    ours = {os.getpid()}
    with contextlib.suppress(psutil.NoSuchProcess):
        ours.update(p.pid for p in psutil.Process().children(recursive=True))
    found = {}
    for proc in psutil.process_iter(["pid", "ppid", "create_time", "cpu_times"]):
        info = proc.info
        if info["pid"] in ours or info["pid"] in (0, 2) or info["ppid"] == 2 or info["cpu_times"] is None:
            continue
        times = info["cpu_times"]
        found[info["pid"]] = (info["create_time"], times.user + times.system + getattr(times, "children_user", 0)
                              + getattr(times, "children_system", 0))
    return found


class CpuMeter:
    """CPU seconds used by the proxy, the upstream, this client, other processes and the machine over measured
    windows."""

    def __init__(self, proxy_procs: Callable[[], list], upstream_procs: Callable[[], list]):
        self.proxy_procs, self.upstream_procs = proxy_procs, upstream_procs
        self.totals = {"wall": 0.0, "proxy": 0.0, "upstream": 0.0, "client": 0.0, "foreign": 0.0, "busy": 0.0,
                       "all": 0.0}

    @staticmethod
    def _machine():
        times = psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0), sum(times)

    def start(self) -> None:
        self.proxy, self.upstream = self.proxy_procs(), self.upstream_procs()
        self.foreign0 = foreign_cpu()
        self.t0 = perf()
        self.c0 = (cpu_seconds(self.proxy), cpu_seconds(self.upstream), time.process_time()) + self._machine()

    def stop(self, keep: bool = True) -> dict:
        """The window's percentages; added to the totals unless keep is False (a window measured again)."""
        wall = perf() - self.t0
        c1 = (cpu_seconds(self.proxy), cpu_seconds(self.upstream), time.process_time()) + self._machine()
        foreign = 0.0
        for pid, (created, cpu) in foreign_cpu().items():
            before = self.foreign0.get(pid)
            foreign += cpu - before[1] if before and before[0] == created else cpu
        window = {"wall": wall, "proxy": c1[0] - self.c0[0], "upstream": c1[1] - self.c0[1], "client": c1[2] - self.c0[2],
                  "foreign": max(0.0, foreign), "busy": c1[3] - self.c0[3], "all": c1[4] - self.c0[4]}
        self.window = window
        if keep:
            self.keep()
        return self.percentages(window)

    def keep(self) -> None:
        """Add the last window to the totals."""
        for key, value in self.window.items():
            self.totals[key] += value

    @staticmethod
    def percentages(t: dict) -> dict:
        """CPU in % of one core (so 200 % is both cores of a 2-core machine); machine busy in % of all cores."""
        pct = lambda key: round(100 * t[key] / t["wall"], 1) if t["wall"] > 0 else None  # noqa: E731
        return {"proxy_cpu_pct": pct("proxy"), "upstream_cpu_pct": pct("upstream"), "client_cpu_pct": pct("client"),
                "foreign_cpu_pct": pct("foreign"),  # processes outside this benchmark (a shared machine)
                "machine_busy_pct": round(100 * t["busy"] / t["all"], 1) if t["all"] > 0 else None}


def ensure_nginx() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found:
        return found
    print("nginx not found: installing the Debian package (apt-get install -y nginx) ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "nginx"]
    if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"apt-get install nginx failed:\n{result.stderr[-2000:]}")
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(found):
        raise RuntimeError("nginx installed but not found on PATH")
    return found


class Nginx:
    def __init__(self, binary: str, workdir: Path, upstream_port: int, port: int, workers: int):
        self.binary, self.dir, self.upstream_port, self.port, self.workers = binary, workdir, upstream_port, port, workers
        self.proc: Optional[subprocess.Popen] = None

    def config(self) -> str:
        d = self.dir
        user = "user root;" if os.geteuid() == 0 else ""
        return f"""{user}
worker_processes {self.workers};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_timeout 75s;
    keepalive_requests 100000;
    upstream service {{
        server {LOOPBACK}:{self.upstream_port};
        keepalive 512;
        keepalive_requests 100000;
        keepalive_timeout 75s;
    }}
    server {{
        listen {LOOPBACK}:{self.port} backlog=4096;
        location / {{
            proxy_pass http://service;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""

    def start(self) -> "Nginx":
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "nginx.conf"
        conf.write_text(self.config())
        log = open(self.dir / "stdout.log", "ab")
        self.proc = subprocess.Popen([self.binary, "-p", str(self.dir), "-c", str(conf), "-e", str(self.dir / "error.log")],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: "
                                   f"{(self.dir / 'error.log').read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port), timeout=1):
                return self
            time.sleep(0.1)
        raise RuntimeError("nginx did not listen within 15 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


class TlsNginx(Nginx):
    """nginx in front of a service as the portal reaches it: TLS to the service (its self-signed certificate not
    checked: the portal pins it instead; sessions reused), keep-alive upstream connections, nothing buffered, and the
    service's key set by nginx itself on every request (the caller sends none). The key is in the config file only
    (the temp dir is private), never on a command line."""

    def __init__(self, binary: str, workdir: Path, upstream_port: int, port: int, workers: int, service_key: str,
                 upstream_host: str = LOOPBACK):
        super().__init__(binary, workdir, upstream_port, port, workers)
        self.service_key, self.upstream_host = service_key, upstream_host

    def config(self) -> str:
        if any(c in self.service_key for c in '"\\;{}$') or not self.service_key.isprintable():
            raise ValueError("the service key has characters an nginx config cannot hold as they are")
        text = super().config()
        text = text.replace(f"server {LOOPBACK}:{self.upstream_port};", f"server {self.upstream_host}:{self.upstream_port};")
        return text.replace("proxy_pass http://service;", f"""proxy_pass https://service;
            proxy_ssl_verify off;
            proxy_ssl_session_reuse on;
            proxy_set_header Authorization "Bearer {self.service_key}";""")

    def start(self) -> "TlsNginx":
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        super().start()
        os.chmod(self.dir / "nginx.conf", 0o600)
        return self


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def set_subreaper() -> None:
    """Orphaned service processes (their portal stopped) become our children, so we reap them at the end."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def run_bench(bench, json_path: Optional[str]) -> int:
    """Run a benchmark (an object with run() and teardown()) to its end: its results to `json_path`, and whatever it
    started stopped also on Ctrl-C, SIGTERM or SIGHUP. The exit code: 0, 130 when interrupted, 1 on an error."""
    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: ignored when started with `&`
        signal.signal(signum, interrupted)
    code = 0
    try:
        results = bench.run()
        if json_path:
            Path(json_path).write_text(json.dumps(results, indent=2, default=str))
            print(f"results written to {json_path}")
    except KeyboardInterrupt:
        print("\ninterrupted: tearing down", file=sys.stderr)
        code = 130
    except Exception:
        traceback.print_exc()
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the teardown short
        bench.teardown()
    return code


def kill_leftovers(folder) -> int:
    """Kill every process (but this one) whose command line names `folder`, reaping them; how many there were."""
    reap_children()
    leftovers = [p for p in psutil.process_iter(["pid", "cmdline"])
                 if p.pid != os.getpid() and str(folder) in " ".join(p.info["cmdline"] or [])]
    for proc in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    reap_children()
    return len(leftovers)


def reap_children() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
