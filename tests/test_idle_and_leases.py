"""Services that live as long as they are used, on the real test Slurm through a real portal (two gunicorn workers)
and the tiny stand-in service: an idle timeout of one minute stops a service a minute after its last request, not
before, and a stream in flight counts as use; a lease whose holder crashed ends its service; one that keeps beating
keeps it. One test, so the minute of waiting is spent once (about two and a half minutes)."""
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import requests

from portal.client import connect
from tests.conftest import REPO, wait_for

pytestmark = pytest.mark.slurm

PILOTFISH = str(Path(sys.executable).parent / "pilotfish")
LEASE = 30  # seconds: the shortest lease there is (its heartbeat beats every 10 s)
STREAM_SECONDS = 70  # longer than the idle timeout: a stream in flight must keep its service

# A notebook kernel that launches a leased service, then dies without a word (SIGKILL: no cleanup runs).
KERNEL = """
import sys, time
from portal.client import connect
handle = connect(url=sys.argv[1], token=sys.argv[2]).launch("text-generation", "test/tiny", name="lease-crashed",
                                                             lease=%d, wait=False)
print(handle.id, flush=True)
time.sleep(3600)
""" % LEASE


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).replace(tzinfo=timezone.utc).timestamp()


def event(service: dict, prefix: str) -> dict:
    found = [event for event in service["events"] if (event["reason"] or "").startswith(prefix)]
    assert found, service["events"]
    return found[0]


def cli(portal, *args):
    env = dict(os.environ, PILOTFISH_URL=portal.url, PILOTFISH_TOKEN=portal.token)
    result = subprocess.run([PILOTFISH, *args], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_idle_services_stop_a_minute_after_their_last_request_and_leases_hold_while_they_beat(slurm_cluster,
                                                                                              start_portal):
    portal = start_portal("slurm", workers=2)
    idle = portal.launch(name="idle", idle_timeout="1m").json()
    assert idle["idle_timeout"] == 1 and idle["events"][0]["reason"].endswith(
        "stops after 1 min without a request (asked at launch))")
    kernel = subprocess.Popen([sys.executable, "-c", KERNEL, portal.url, portal.token], stdout=subprocess.PIPE,
                              text=True, cwd=str(REPO))
    try:
        crashed_id = kernel.stdout.readline().strip()
        kept = connect(url=portal.url, token=portal.token).launch("text-generation", "test/tiny", name="lease-kept",
                                                                  lease=LEASE, wait=False)
        for service_id in (idle["id"], crashed_id, kept.id):
            portal.wait_state(service_id, "RUNNING", timeout=90)
    finally:
        kernel.kill()  # the kernel crashes: its heartbeat ends with it
        kernel.wait(timeout=10)
    crashed_at = time.time()

    # A stream longer than the idle timeout keeps the service (the workers note a request in flight as activity).
    auth = {"Authorization": f"Bearer {portal.token}"}
    started = time.time()
    with requests.get(f"{portal.url}/services/{idle['id']}/stream?seconds={STREAM_SECONDS}", headers=auth,
                      stream=True, timeout=30) as stream:
        assert stream.status_code == 200
        assert stream.raw.read() == b"token\n" * STREAM_SECONDS
    assert time.time() - started >= STREAM_SECONDS - 1
    assert portal.service(idle["id"])["state"] == "RUNNING"

    # Meanwhile the crashed kernel's lease lapsed: its service ended, in words; the beating one lives on.
    crashed = portal.wait_state(crashed_id, "STOPPED", timeout=5)
    silent = int(re.fullmatch(r"lease expired \(no heartbeat for (\d+) s\)", crashed["reason"]).group(1))
    assert LEASE <= silent <= LEASE + 15, crashed["reason"]
    decided = epoch(event(crashed, "stopping: lease expired")["at"])
    assert decided - crashed_at <= LEASE + 5, (decided, crashed_at)
    assert portal.service(kept.id)["state"] == "RUNNING"

    # One short request a few seconds after the stream: the idle minute counts from it.
    time.sleep(5)
    assert portal.request("GET", f"/services/{idle['id']}/hello").status_code == 200
    last_request = time.time()
    time.sleep(12)  # the worker writes the request's end within ACTIVITY_FLUSH_SECONDS
    shown = portal.service(idle["id"])
    assert abs(epoch(shown["last_activity"]) - last_request) < 1.5, (shown["last_activity"], last_request)
    assert abs(epoch(shown["stops_at"]) - (last_request + 60)) < 1.5 and shown["stop_reason_expected"] == \
        "idle for 1 min"
    listed = [line for line in cli(portal, "ls").splitlines() if line.startswith(idle["id"])]
    assert "STOPS IN" in cli(portal, "ls").splitlines()[0] and re.search(r"\b[34][0-9]s$", listed[0]), listed
    assert re.search(r"^stops in +[34][0-9]s if unused \(idle for 1 min\)$", cli(portal, "details", idle["id"]),
                     re.MULTILINE)

    stopped = portal.wait_state(idle["id"], "STOPPED", timeout=75)
    assert stopped["reason"] == "idle for 1 min"
    idle_for = epoch(event(stopped, "stopping: idle for 1 min")["at"]) - last_request
    assert 59.5 <= idle_for <= 65, idle_for
    print(f"\nidle stop decided {idle_for:.1f} s after the last request (idle_timeout 60 s); crashed kernel's lease "
          f"ended {decided - crashed_at:.1f} s after the crash (lease {LEASE} s, {silent} s without a heartbeat)")

    # The lease that kept beating (more than four lease lengths by now) still holds its service.
    assert time.time() - crashed_at > 4 * LEASE
    heartbeat = kept._heartbeat
    assert portal.service(kept.id)["state"] == "RUNNING" and heartbeat.beats >= 10
    kept.stop()  # and the heartbeat ends with it
    assert portal.wait_state(kept.id, "STOPPED", timeout=30)["reason"] == "stopped by user"
    wait_for(lambda: not heartbeat.is_alive(), timeout=5, what="the heartbeat thread to end")
