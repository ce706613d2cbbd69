"""A service's busy time through a portal of two workers on the real test Slurm: streams that run at the same time
through both workers count that time once (portal/usage_ledger.py), so the idle share is not halved by the number of
workers. Which worker takes a connection is the kernel's choice: a burst whose streams all went to one worker proves
nothing and is sent again (each worker's load file says what it had in flight)."""
from __future__ import annotations

import json
import sys
import threading
import time

import pytest
from openai import OpenAI

from tests.conftest import REPO, wait_for

pytestmark = pytest.mark.slurm
UPSTREAM = f"{sys.executable} {REPO / 'tests' / 'support' / 'openai_upstream.py'} --token-delay 0.1"
STREAMS, TOKENS = 12, 41  # each stream about 4 s (40 gaps of 0.1 s), all at once
BURSTS = 5


@pytest.fixture(scope="module")
def portal(slurm_cluster, start_module_portal):
    return start_module_portal("slurm", workers=2, runtimes={"text-generation": {"command": UPSTREAM}})


def busy_seconds(portal, service_id: str) -> float:
    return portal.request("GET", f"/api/services/{service_id}/cost").json()["busy_seconds"]


def workers_in_flight(portal, service_id: str) -> set:
    """The workers (pids) whose load file shows a request of the service in flight now."""
    found = set()
    for path in (portal.home / "load").glob("*.json"):
        try:
            if json.loads(path.read_text()).get(service_id):
                found.add(path.stem)
        except (OSError, ValueError):
            pass
    return found


def test_streams_through_both_workers_at_once_count_their_time_once(portal):
    service = portal.launch(name="busy").json()
    portal.wait_state(service["id"], "RUNNING", timeout=90)
    client = OpenAI(base_url=f"{portal.url}/v1", api_key=portal.token, max_retries=0, timeout=60)

    def stream():
        chunks = client.chat.completions.create(model="test/tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=TOKENS, stream=True)
        assert sum(1 for _ in chunks) >= TOKENS

    for _ in range(BURSTS):
        before = busy_seconds(portal, service["id"])
        seen, started = set(), time.time()
        threads = [threading.Thread(target=stream) for _ in range(STREAMS)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            seen |= workers_in_flight(portal, service["id"])
            time.sleep(0.2)
        wall = time.time() - started
        # Both flushes (each worker's, FLUSH_SECONDS after its last spell) are in once the time stops growing.
        added = wait_for(lambda: (lambda now: now if now >= 0.8 * wall else None)(
            busy_seconds(portal, service["id"]) - before), timeout=15, what="the burst's busy time")
        deadline = time.time() + 4
        while time.time() < deadline:
            added = busy_seconds(portal, service["id"]) - before
            time.sleep(0.5)
        if len(seen) >= 2:
            break
    else:
        pytest.fail(f"in {BURSTS} bursts of {STREAMS} streams, the kernel never gave both workers one")
    # About the burst's wall time: summed per worker (each busy the whole time) it would be about twice that.
    assert 0.8 * wall <= added <= 1.3 * wall, (added, wall, seen)
    print(f"busy time of {STREAMS} streams through {len(seen)} workers: {added:.2f} s in {wall:.2f} s", file=sys.stderr)
    portal.request("POST", f"/api/services/{service['id']}/stop")
