"""Reconciler cost and readiness delay on the real test Slurm.

1. Scheduler calls per reconcile cycle and cycle time with 1, 10, 100 and 1000 services in the database
   (half live with real Slurm jobs, half finished): the call count must not grow with the services.
2. Delay from "the service answers its health check" to RUNNING in the API, over repeated launches
   of the tiny test service through a real portal (target p95 < 2 s).

Run: .venv/bin/python benchmarks/reconcile.py [--sizes 1,10,100,1000] [--launches 20]
Needs the test cluster (tests/cluster/start.sh). Cancels every job it submits. Percentiles are nearest-rank
(portal/distribution.py); portals are started by the tests' helpers (tests/support/portal_process.py).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from portal.app import create_app  # noqa: E402
from portal.db import db  # noqa: E402
from portal.distribution import percentile  # noqa: E402
from portal.models import Service, State, utcnow  # noqa: E402
from portal.reconciler import Reconciler  # noqa: E402


def seed(n: int, home: Path) -> list:
    """n services: half finished, half live with a real (sleeping) Slurm job each."""
    live = n - n // 2
    job_ids, rows = [], []
    for index in range(n):
        service_id = f"{index:012x}"
        job_dir = home / "jobs" / service_id
        job_dir.mkdir(parents=True)
        row = Service(id=service_id, name=f"bench-{index}", kind="text-generation", model="bench/model",
                      state=State.PENDING if index < live else State.STOPPED, scheduler="slurm",
                      job_dir=str(job_dir), time_limit=10, api_key="k", submitted_at=utcnow())
        if index < live:
            out = subprocess.run(["sbatch", "--parsable", f"--job-name=pilotfish-{service_id}", "--time=10",
                                  "--mem=10M", f"--output={job_dir}/job.log", "--wrap", "sleep 600"],
                                 capture_output=True, text=True, check=True)
            row.job_id = out.stdout.strip().split(";")[0]
            job_ids.append(row.job_id)
        rows.append(row)
    db.session.add_all(rows)
    db.session.commit()
    return job_ids


def measure_cycles(sizes, cycles=5):
    print("services  live  scheduler_calls/cycle  cycle_ms(p50)  cycle_ms(max)")
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            app = create_app({"home": Path(tmp) / "home", "scheduler": "slurm"})
            with app.app_context():
                job_ids = seed(n, Path(tmp) / "home")
                reconciler = Reconciler(app)
                try:
                    reports = [reconciler.cycle() for _ in range(cycles)]
                finally:
                    for start in range(0, len(job_ids), 200):
                        subprocess.run(["scancel", *job_ids[start:start + 200]], capture_output=True)
                calls = {report.scheduler_calls for report in reports}
                times = [report.seconds * 1000 for report in reports]
                print(f"{n:8d}  {len(job_ids):4d}  {','.join(map(str, sorted(calls))):>21}  "
                      f"{percentile(times, 50):13.1f}  {max(times):13.1f}")


def measure_ready_delay(launches: int):
    from tests.support.portal_process import PortalFactory

    delays = []
    with tempfile.TemporaryDirectory() as tmp:
        factory = PortalFactory(Path(tmp))
        portal = factory("slurm")
        try:
            for _ in range(launches):
                service = portal.launch(engine_args=["--delay", "2"]).json()
                while True:
                    body = portal.service(service["id"])
                    if body["state"] in ("RUNNING", "FAILED"):
                        seen = time.time()
                        break
                    time.sleep(0.05)
                log = portal.request("GET", f"/api/services/{service['id']}/logs?tail=50").json()["log"]
                listening = float(re.search(r"listening on \d+ at ([\d.]+)", log).group(1))
                delays.append(seen - listening)
                portal.request("POST", f"/api/services/{service['id']}/stop")
        finally:
            factory.close()
    print(f"health answered -> RUNNING in the API, {len(delays)} launches: "
          f"p50 {percentile(delays, 50):.2f} s, p95 {percentile(delays, 95):.2f} s, max {max(delays):.2f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,10,100,1000", help="service counts to measure (comma-separated)")
    parser.add_argument("--launches", type=int, default=20, help="launches for the readiness delay")
    args = parser.parse_args()
    measure_cycles([int(size) for size in args.sizes.split(",")])
    if args.launches:
        measure_ready_delay(args.launches)


if __name__ == "__main__":
    main()
