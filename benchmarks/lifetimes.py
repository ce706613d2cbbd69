"""A scripted day, compressed: bursts of requests separated by quiet gaps, sent to two services of the same model on
the real test Slurm (through a real portal with two workers): one always on, one with replicas 0:1 (no job while
unused). Reports the job-seconds each held (what GPU-hours would cost on a cluster), the share saved, the requests
that failed, and what the first request after each gap waited (the wake's cost).

Run: .venv/bin/python benchmarks/lifetimes.py [--bursts 4] [--burst 20] [--gap 60] [--quiet 15] [--clients 4]
Needs the test Slurm (tests/cluster/start.sh).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from openai import OpenAI  # noqa: E402

from tests.support.portal_process import PortalFactory  # noqa: E402

UPSTREAM = f"{sys.executable} {ROOT / 'tests' / 'support' / 'openai_upstream.py'} --token-delay 0.02"


def epoch(iso):
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).replace(tzinfo=timezone.utc).timestamp() if iso else None


def job_seconds(service: dict, until: float) -> float:
    """Seconds its jobs ran, all of them together (the current one up to `until`)."""
    total = 0.0
    for job in service["jobs"] + [service]:
        started = epoch(job.get("job_started_at"))
        if started is None or job is service and not service["job_id"]:
            continue
        ended = epoch(job.get("ended_at")) or until
        total += max(0.0, min(ended, until) - started)
    return total


def burst(client: OpenAI, model: str, seconds: float, clients: int, results: list) -> None:
    """`clients` threads sending short chats for `seconds`; each result is (started, seconds, ok)."""
    stop = time.time() + seconds

    def run():
        while time.time() < stop:
            started = time.time()
            try:
                client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=8)
                results.append((started, time.time() - started, True))
            except Exception:
                results.append((started, time.time() - started, False))
    threads = [threading.Thread(target=run) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bursts", type=int, default=4)
    parser.add_argument("--burst", type=float, default=20, help="seconds of requests per burst (default 20)")
    parser.add_argument("--gap", type=float, default=60, help="quiet seconds between bursts (default 60)")
    parser.add_argument("--quiet", type=float, default=15, help="scale_down_window in seconds (default 15)")
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pilotfish-lifetimes-") as folder:
        factory = PortalFactory(Path(folder))
        try:
            portal = factory("slurm", workers=2, scale_down_window=args.quiet, drain_timeout=2,
                             runtimes={"text-generation": {"command": UPSTREAM}})
            # Two models of the same stand-in, so the gateway tells them apart.
            always = portal.launch(name="always-on", model="test/tiny").json()
            elastic = portal.launch(name="zero-when-unused", model="test/slow", replicas="0:1").json()
            for launched in (always, elastic):
                portal.wait_state(launched["id"], "RUNNING", timeout=120)
            client = OpenAI(base_url=f"{portal.url}/v1", api_key=portal.token, max_retries=10, timeout=60)
            started = time.time()
            results = {"always-on": [], "zero-when-unused": []}
            firsts = {"always-on": [], "zero-when-unused": []}
            for index in range(args.bursts):
                if index:
                    time.sleep(args.gap)
                threads = []
                for name, model in (("always-on", "test/tiny"), ("zero-when-unused", "test/slow")):
                    threads.append(threading.Thread(target=burst, args=(client, model, args.burst, args.clients,
                                                                        results[name])))
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                for name in results:
                    burst_start = max(r[0] for r in results[name]) - args.burst - 5
                    first = min((r for r in results[name] if r[0] >= burst_start), key=lambda r: r[0])
                    firsts[name].append(round(first[1], 2))
            ended = time.time()
            services = {name: portal.service(launched["id"]) for name, launched in
                        (("always-on", always), ("zero-when-unused", elastic))}
        finally:
            factory.close()

    day = ended - started
    print(f"\n{args.bursts} bursts of {args.burst:g} s ({args.clients} clients) with {args.gap:g} s gaps: "
          f"{day:.0f} s in all; scale_down_window {args.quiet:g} s")
    print(f"{'service':<18}{'job-seconds':>12}{'share of the day':>18}{'requests':>10}{'failed':>8}"
          f"   first request of each burst (s)")
    held = {}
    for name, service in services.items():
        held[name] = job_seconds(service, ended)
        ok = sum(r[2] for r in results[name])
        print(f"{name:<18}{held[name]:>12.0f}{held[name] / day:>17.0%}{len(results[name]):>10}"
              f"{len(results[name]) - ok:>8}   {firsts[name]}")
    saved = 1 - held["zero-when-unused"] / held["always-on"]
    print(f"saved by scaling to zero: {saved:.0%} of the job time")
    return 0 if all(r[2] for rs in results.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
