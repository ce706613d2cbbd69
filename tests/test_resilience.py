"""What the portal survives on the real test Slurm: its own restart, slurmctld going away, several workers."""
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest
import requests

from portal.scheduler import JobQuery, Resources, SchedulerUnreachable
from portal.scheduler.slurm import SlurmScheduler
from tests.conftest import REPO, wait_for


def job_query_for(service, portal):
    return JobQuery(service["job_id"], f"pilotfish-{service['id']}", datetime.utcnow(),
                    portal.home / "jobs" / service["id"])

pytestmark = pytest.mark.slurm


def test_restart_finds_services_again(slurm_cluster, start_portal):
    portal = start_portal("slurm")
    kept = portal.launch(name="kept").json()
    cancelled = portal.launch(name="cancelled-while-down").json()
    for service in (kept, cancelled):
        portal.wait_state(service["id"], "RUNNING", timeout=60)

    portal.kill()
    subprocess.run(["scancel", cancelled["job_id"]], check=True, timeout=30)
    time.sleep(2)

    again = start_portal("slurm", home=portal.home, site=portal.site_config)
    assert again.service(kept["id"])["state"] == "RUNNING"
    stopped = again.wait_state(cancelled["id"], ("STOPPED", "FAILED"), timeout=30)
    assert stopped["state"] == "STOPPED"
    assert "cancelled outside the portal" in stopped["reason"]
    # The kept service is still probed and stays RUNNING; it can be stopped from the new portal.
    time.sleep(3)
    assert again.service(kept["id"])["state"] == "RUNNING"
    again.request("POST", f"/api/services/{kept['id']}/stop")
    assert again.wait_state(kept["id"], "STOPPED", timeout=30)["reason"] == "stopped by user"


def _stop_slurmctld():
    subprocess.run(["pkill", "-x", "slurmctld"], timeout=30)
    wait_for(lambda: subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode != 0,
             timeout=30, what="slurmctld to exit")


def _start_cluster():
    subprocess.run([str(REPO / "tests" / "cluster" / "start.sh")], check=True, timeout=600, capture_output=True)


def test_slurmctld_outage_is_reported_and_recovered(slurm_cluster, start_portal, tmp_path):
    portal = start_portal("slurm")
    service = portal.launch(name="through-the-outage").json()
    portal.wait_state(service["id"], "RUNNING", timeout=60)
    try:
        _stop_slurmctld()
        # The API keeps answering and says the scheduler is unreachable.
        def reported():
            body = portal.request("GET", "/api/services", timeout=10).json()
            condition = body["conditions"].get("scheduler", {})
            return condition if condition.get("ok") is False else None
        condition = wait_for(reported, timeout=90, interval=1, what="the scheduler condition to turn unreachable")
        assert "unreachable" in condition["message"].lower()
        assert requests.get(portal.url + "/health", timeout=10).json()["scheduler"] == "unreachable"
        # The listing does not wait on the scheduler: with slurmctld down, squeue gives up only after about
        # MessageTimeout-1 s (9 s with the test cluster's 10), and a listing on a slow, busy machine takes far less.
        started = time.monotonic()
        listing = portal.request("GET", "/api/services", timeout=10)
        assert listing.status_code == 200 and time.monotonic() - started < 5
        assert portal.service(service["id"])["state"] == "RUNNING"
        # Launching now fails with a clear 503, and records why.
        refused = portal.launch(name="while-down")
        assert refused.status_code == 503, refused.text
        assert "unreachable" in refused.json()["error"].lower()
        assert portal.service(refused.json()["service"]["id"])["state"] == "FAILED"
        # Each scheduler command reports the outage as such, not as a rejected job.
        scheduler = SlurmScheduler(timeout=30)
        (tmp_path / "none.sh").write_text("#!/bin/bash\ntrue\n")
        job = job_query_for(service, portal)
        calls = {
            "submit": lambda: scheduler.submit(tmp_path / "none.sh", tmp_path, "pilotfish-x", Resources(time=1)),
            "query": lambda: scheduler.query([job]),
            "cancel": lambda: scheduler.cancel(service["job_id"], tmp_path),
        }
        with ThreadPoolExecutor(3) as pool:
            futures = {name: pool.submit(call) for name, call in calls.items()}
        for name, future in futures.items():
            assert isinstance(future.exception(), SchedulerUnreachable), (name, future.exception())
    finally:
        _start_cluster()
    wait_for(lambda: portal.request("GET", "/api/services").json()["conditions"]["scheduler"]["ok"], timeout=90,
             interval=1, what="the scheduler condition to recover")
    portal.request("POST", f"/api/services/{service['id']}/stop")
    assert portal.wait_state(service["id"], "STOPPED", timeout=60)["reason"] == "stopped by user"


def test_two_workers_run_exactly_one_reconciler(slurm_cluster, start_portal):
    portal = start_portal("slurm", workers=2)
    service = portal.launch(name="two-workers").json()
    portal.wait_state(service["id"], "RUNNING", timeout=60)
    leaders = [line for line in portal.log_text().splitlines() if "reconciler: worker pid" in line]
    assert len(leaders) == 1, leaders
    leader_pid = portal.request("GET", "/api/status").json()["reconciler"]["leader_pid"]
    assert str(leader_pid) in leaders[0]

    # Kill the leading worker: gunicorn replaces it and exactly one worker leads again.
    os.kill(leader_pid, signal.SIGKILL)
    def new_leader():
        lines = [line for line in portal.log_text().splitlines() if "reconciler: worker pid" in line]
        return lines if len(lines) == 2 else None
    lines = wait_for(new_leader, timeout=30, what="another worker to take the lead")
    assert str(leader_pid) not in lines[1]
    portal.request("POST", f"/api/services/{service['id']}/stop")
    assert portal.wait_state(service["id"], "STOPPED", timeout=30)["reason"] == "stopped by user"
    time.sleep(3)
    lines = [line for line in portal.log_text().splitlines() if "reconciler: worker pid" in line]
    assert len(lines) == 2, lines
