"""Replicas under load, on the real test Slurm through a real portal (two workers) and the OpenAI-shaped stand-in:
a service with replicas 1:2 is held above its target_in_flight until a second job serves. Reports the time from the
scale-up decision (the event that submits the replica) to the replica serving, split by phase (queued, job start to
endpoint, endpoint to answering its health check, and to the proxies routing to it), and how the requests then share
the two jobs (least busy per worker).

Run: .venv/bin/python benchmarks/replicas.py [--rounds 3] [--clients 6] [--up-window 3]
Needs the test Slurm (tests/cluster/start.sh).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from portal.distribution import percentile  # noqa: E402
from tests.support.portal_process import PortalFactory, wait_for  # noqa: E402
from tests.support.streaming_load import StreamingLoad  # noqa: E402

UPSTREAM = f"{sys.executable} {ROOT / 'tests' / 'support' / 'openai_upstream.py'} --token-delay 0.05"


def epoch(iso):
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).replace(tzinfo=timezone.utc).timestamp() if iso else None


def serving(service: dict) -> list:
    replicas = [job["job_id"] for job in service["jobs"] if job["phase"] == "replica" and job["ready_at"]]
    return ([service["job_id"]] if service["state"] == "RUNNING" else []) + replicas


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="scale-ups measured, each on a new service (default 3)")
    parser.add_argument("--clients", type=int, default=6, help="streaming clients holding the load (default 6)")
    parser.add_argument("--up-window", type=float, default=3, help="scale_up_window in seconds (default 3)")
    args = parser.parse_args()

    rows, shares = [], []
    with tempfile.TemporaryDirectory(prefix="pilotfish-replicas-") as folder:
        factory = PortalFactory(Path(folder))
        try:
            portal = factory("slurm", workers=2, scale_up_window=args.up_window, scale_down_window=600,
                             drain_timeout=2, runtimes={"text-generation": {"command": UPSTREAM}})
            for _ in range(args.rounds):
                launched = portal.launch(name="scale-up", replicas={"min": 1, "max": 2, "target_in_flight": 2}).json()
                portal.wait_state(launched["id"], "RUNNING", timeout=120)
                with StreamingLoad(f"{portal.url}/v1", portal.token, clients=args.clients, tokens=40) as load:
                    service = wait_for(lambda: (lambda s: s if len(serving(s)) == 2 else None)(
                        portal.service(launched["id"])), timeout=180, what="a second job")
                    routed_at = time.time()
                    time.sleep(10)
                first = next(e for e in service["events"] if e["reason"].startswith("replica generation")
                             and "submitted as job" in e["reason"])
                replica = next(job for job in service["jobs"] if job["phase"] == "replica")
                decided = epoch(first["at"])
                row = {"queued": epoch(replica["job_started_at"]) - decided,
                       "to_endpoint": epoch(replica["endpoint_at"]) - epoch(replica["job_started_at"]),
                       "to_ready": epoch(replica["ready_at"]) - epoch(replica["endpoint_at"]),
                       "to_routed": max(0.0, min(s.started for s in load.streams
                                                 if s.job == replica["job_id"]) - epoch(replica["ready_at"]))
                       if any(s.job == replica["job_id"] for s in load.streams) else None}
                row["total"] = sum(value for value in row.values() if value is not None)
                rows.append(row)
                shares.append(Counter(s.job for s in load.streams if s.started > routed_at and s.whole))
                portal.request("POST", f"/api/services/{launched['id']}/stop")
                portal.wait_state(launched["id"], "STOPPED", timeout=60)
        finally:
            factory.close()

    print(f"\nscale-up, decision to serving (s), {len(rows)} rounds, scale_up_window {args.up_window:g} s "
          f"(before the decision):")
    print(f"{'':<12}" + "".join(f"{name:>13}" for name in ("queued", "to endpoint", "to health", "to routed",
                                                             "total")))
    for index, row in enumerate(rows, 1):
        print(f"{'round ' + str(index):<12}" + "".join(
            f"{row[key]:>13.2f}" if row[key] is not None else f"{'-':>13}"
            for key in ("queued", "to_endpoint", "to_ready", "to_routed", "total")))
    print(f"{'median':<12}" + "".join(f"{percentile([r[key] for r in rows if r[key] is not None], 50):>13.2f}"
                                      for key in ("queued", "to_endpoint", "to_ready", "to_routed", "total")))
    print("\nrequests per job once both serve (least busy per worker):")
    for index, share in enumerate(shares, 1):
        total = sum(share.values())
        print(f"  round {index}: " + ", ".join(f"job {job}: {count} ({count / total:.0%})"
                                               for job, count in share.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
