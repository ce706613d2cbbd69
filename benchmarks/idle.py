"""What an idle portal costs: CPU seconds of its whole process tree (gunicorn master and workers, every thread) over a
quiet interval, with no service and with one RUNNING service (the tiny test service on the local scheduler).

Target (README "Tuning"): at most 0.3 CPU-seconds a minute (0.5 % of one core) in both cases, at the default
poll_interval (5 s). CPU time, not wall time, so other load on the machine does not change the figure.

Run: .venv/bin/python benchmarks/idle.py [--seconds 60] [--workers 2] [--poll-interval 5] [--only none|service]
Portals are started by the tests' helpers (tests/support/portal_process.py); each is stopped with its services.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.portal_process import PortalFactory  # noqa: E402

TARGET_PER_MINUTE = 0.3


def _cpu_seconds(pid: int, thread) -> float:
    """A thread's CPU time: from schedstat in nanoseconds where the kernel keeps it, else in clock ticks (10 ms)."""
    try:
        return int(Path(f"/proc/{pid}/task/{thread.id}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return thread.user_time + thread.system_time


def thread_times(root_pid: int) -> dict:
    """{(pid, tid): (process role, thread name, CPU seconds)} of the process tree under root_pid."""
    found = {}
    root = psutil.Process(root_pid)
    for process in [root] + root.children():  # the master and its workers (not the local jobs under them)
        try:
            threads = process.threads()
            role = "master" if process.pid == root_pid else f"worker {process.pid}"
        except psutil.Error:
            continue
        for thread in threads:
            try:
                name = Path(f"/proc/{process.pid}/task/{thread.id}/comm").read_text().strip()
            except OSError:
                name = "?"
            found[(process.pid, thread.id)] = (role, name, _cpu_seconds(process.pid, thread))
    return found


def python_thread_names(pids) -> dict:
    """{tid: Python thread name}, from py-spy when it is installed (after the measurement: it stops the process)."""
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    names = {}
    for pid in pids if py_spy else ():
        try:
            out = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        names.update((int(tid), name) for tid, name in re.findall(r'^Thread (\d+) \(\w+\): "([^"]*)"', out, re.M))
    return names


def measure(portal, seconds: float) -> dict:
    before = thread_times(portal.proc.pid)
    time.sleep(seconds)
    after = thread_times(portal.proc.pid)
    names = python_thread_names({pid for pid, _ in after})
    return {key: (role, names.get(key[1], name), cpu - before.get(key, (role, name, 0.0))[2])
            for key, (role, name, cpu) in after.items()}


def report(title: str, used: dict, seconds: float) -> float:
    total = sum(cpu for _, _, cpu in used.values())
    per_minute = total * 60 / seconds
    print(f"\n{title}")
    print(f"  {'process':<16} {'thread':<32} {'CPU-s/min':>9}")
    for (pid, tid), (role, name, cpu) in sorted(used.items()):
        if cpu * 60 / seconds >= 0.001:
            label = f"{name} ({tid})"
            print(f"  {role:<16} {label:<32} {cpu * 60 / seconds:9.3f}")
    verdict = "met" if per_minute <= TARGET_PER_MINUTE else "NOT met"
    print(f"  total {per_minute:.3f} CPU-s/min = {per_minute / 60 * 100:.2f} % of a core "
          f"(target {TARGET_PER_MINUTE}: {verdict})")
    return per_minute


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each quiet interval")
    parser.add_argument("--settle", type=float, default=10.0, help="quiet seconds before measuring")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--poll-interval", default="5", help="PILOTFISH_POLL_INTERVAL (the tests use 1)")
    parser.add_argument("--only", choices=("none", "service"), help="measure one case only")
    args = parser.parse_args()

    results = {}
    for case in ("none", "service"):
        if args.only and case != args.only:
            continue
        factory = PortalFactory(Path(tempfile.mkdtemp(prefix="pilotfish-idle-")))
        try:
            portal = factory("local", workers=args.workers, env={"PILOTFISH_POLL_INTERVAL": args.poll_interval})
            if case == "service":
                launched = portal.launch(model="test/tiny")
                launched.raise_for_status()
                portal.wait_state(launched.json()["id"], "RUNNING", timeout=60)
            time.sleep(args.settle)
            used = measure(portal, args.seconds)
        finally:
            factory.close()
        title = "no service" if case == "none" else "one RUNNING service"
        results[case] = report(f"{title}: {args.workers} workers, poll_interval {args.poll_interval} s, "
                               f"{args.seconds:g} s", used, args.seconds)
    return 0 if all(value <= TARGET_PER_MINUTE for value in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
