"""Renewal under load: a renewed service with short jobs (the stand-in service on the real test Slurm, through a real
portal with two workers) serves streaming clients (the official `openai` client through the gateway) across several
generations. Reports requests failed and streams cut during each handover (target: 0), the time to first token and
the stream time at p50/p99 during handovers against steady state (as ratios), and each successor's way up, phase by
phase (submitted to running, to its endpoint, to answering its health check).

A handover's window: from 2 s before the event that records it to the end of the replaced job's drain.

Run: .venv/bin/python benchmarks/renewal.py [--seconds 150] [--clients 16] [--tokens 20] [--token-delay 0.05]
     [--time 1] [--drain 8]
Needs the test Slurm (tests/cluster/start.sh).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from portal.distribution import percentile  # noqa: E402
from tests.support.portal_process import PortalFactory  # noqa: E402
from tests.support.streaming_load import StreamingLoad  # noqa: E402

UPSTREAM = f"{sys.executable} {ROOT / 'tests' / 'support' / 'openai_upstream.py'}"
TAKEOVER = " took over from job "


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).replace(tzinfo=timezone.utc).timestamp()


def span(start, end):
    return round(epoch(end) - epoch(start), 1) if start and end else None


def summary(streams, label: str) -> dict:
    ttft = [s.ttft for s in streams if s.ttft is not None]
    seconds = [s.seconds for s in streams]
    return {"window": label, "streams": len(streams), "failed": sum(bool(s.error) for s in streams),
            "cut": sum(not s.error and not s.whole for s in streams),
            "ttft_p50_ms": round(1000 * (percentile(ttft, 50) or 0), 1),
            "ttft_p99_ms": round(1000 * (percentile(ttft, 99) or 0), 1),
            "stream_p50_ms": round(1000 * (percentile(seconds, 50) or 0), 1),
            "stream_p99_ms": round(1000 * (percentile(seconds, 99) or 0), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=150, help="how long the load runs (default 150)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=20, help="tokens per stream (default 20)")
    parser.add_argument("--token-delay", type=float, default=0.05, help="seconds between tokens (default 0.05)")
    parser.add_argument("--time", type=int, default=1, help="each job's time limit in minutes (default 1)")
    parser.add_argument("--drain", type=float, default=8, help="drain_timeout in seconds (default 8)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pilotfish-renewal-") as folder:
        factory = PortalFactory(Path(folder))
        try:
            portal = factory("slurm", workers=2, drain_timeout=args.drain, runtimes={
                "text-generation": {"command": f"{UPSTREAM} --token-delay {args.token_delay}"}})
            launched = portal.launch(name="renewal-bench", time=args.time, renew=True).json()
            service_id = launched["id"]
            portal.wait_state(service_id, "RUNNING", timeout=120)
            print(f"service {service_id}: job {launched['job_id']} running; {args.clients} clients for "
                  f"{args.seconds:.0f} s", flush=True)
            with StreamingLoad(f"{portal.url}/v1", portal.token, clients=args.clients, tokens=args.tokens) as load:
                time.sleep(args.seconds)
            service = portal.service(service_id)
        finally:
            factory.close()

    handovers = []  # (from, to) of each handover's window
    jobs = {job["job_id"]: job for job in service["jobs"]}
    for event in service["events"]:
        if TAKEOVER in (event["reason"] or ""):
            replaced = event["reason"].split(TAKEOVER)[1].split(",")[0]
            at = epoch(event["at"])
            drain_until = jobs.get(replaced, {}).get("drain_until")
            handovers.append((at - 2, epoch(drain_until) if drain_until else at + args.drain))
    during = [s for s in load.streams if any(start <= s.started <= end for start, end in handovers)]
    steady = [s for s in load.streams if s not in during]
    rows = [summary(steady, "steady"), summary(during, "during handovers")]
    print(f"\n{len(handovers)} handovers in {args.seconds:.0f} s, {len(load.streams)} streams, "
          f"answered by job: {dict(load.by_job)}")
    print(f"{'window':<18}{'streams':>8}{'failed':>7}{'cut':>5}{'TTFT p50':>10}{'TTFT p99':>10}{'stream p50':>12}"
          f"{'stream p99':>12}")
    for row in rows:
        print(f"{row['window']:<18}{row['streams']:>8}{row['failed']:>7}{row['cut']:>5}{row['ttft_p50_ms']:>8} ms"
              f"{row['ttft_p99_ms']:>8} ms{row['stream_p50_ms']:>10} ms{row['stream_p99_ms']:>10} ms")
    if rows[0]["ttft_p99_ms"] and rows[1]["streams"]:
        print(f"during / steady: TTFT p99 {rows[1]['ttft_p99_ms'] / rows[0]['ttft_p99_ms']:.2f}, stream p99 "
              f"{rows[1]['stream_p99_ms'] / rows[0]['stream_p99_ms']:.2f}")
    print("\nsuccessors (s): generation, submitted -> running, -> endpoint, -> answering, submitted -> took over")
    phases = []
    for job in [j for j in service["jobs"] if j["generation"] > 1] + [service]:
        generation = job["generation"]
        took_over = next((epoch(e["at"]) for e in service["events"]
                          if (e["reason"] or "").startswith(f"generation {generation} (")), None)
        row = {"generation": generation, "queued": span(job["submitted_at"], job["job_started_at"]),
               "to_endpoint": span(job["job_started_at"], job.get("endpoint_at")) if job.get("endpoint_at") else None,
               "to_ready": span(job["job_started_at"], job["ready_at"]),
               "to_takeover": round(took_over - epoch(job["submitted_at"]), 1) if took_over else None}
        phases.append(row)
        print(f"  {row['generation']:>3}  {row['queued']}  {row['to_endpoint']}  {row['to_ready']}  {row['to_takeover']}")
    if args.json:
        print(json.dumps({"windows": rows, "handovers": len(handovers), "successors": phases,
                          "by_job": dict(load.by_job)}, indent=2))
    return 0 if not load.failed and not load.cut else 1


if __name__ == "__main__":
    sys.exit(main())
