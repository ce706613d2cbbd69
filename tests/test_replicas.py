"""Replicas on the real test Slurm through a real portal (two gunicorn workers) and the OpenAI-shaped stand-in service,
which names its job in each answer's id: two jobs share the load; the busier one gets fewer requests; when one's
server is killed, requests not yet sent go to the other, and the dead one is replaced; under load a service grows from
one job to two, and back to one when the load stops."""
import math
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, squeue_ids, wait_for
from tests.support.streaming_load import StreamingLoad

pytestmark = pytest.mark.slurm

HOST = socket.gethostname().split(".")[0]  # the test cluster's first node (tests/cluster/start.sh: hostname -s)
UPSTREAM = f"{sys.executable} {REPO / 'tests' / 'support' / 'openai_upstream.py'} --token-delay 0.05"


def serving_jobs(service: dict) -> list:
    """The jobs serving a service: its current one, then its serving replicas (job ids)."""
    replicas = [job["job_id"] for job in service["jobs"] if job["phase"] == "replica" and job["ready_at"]]
    return [service["job_id"]] + replicas if service["state"] == "RUNNING" else replicas


def job_folder(portal, service: dict, job_id: str) -> Path:
    folder = portal.home / "jobs" / service["id"]
    if job_id == service["job_id"]:
        return folder / (f"generation-{service['generation']}" if service["generation"] > 1 else "")
    generation = next(job["generation"] for job in service["jobs"] if job["job_id"] == job_id)
    return folder / f"generation-{generation}"


def server_pid(portal, service: dict, job_id: str) -> int:
    return int((job_folder(portal, service, job_id) / "server.pid").read_text())


def events(service: dict, words: str) -> list:
    return [event["reason"] for event in service["events"] if words in (event["reason"] or "")]


@pytest.fixture(scope="module")
def portal(slurm_cluster, start_module_portal):
    return start_module_portal("slurm", workers=2, runtimes={"text-generation": {"command": UPSTREAM}},
                               scale_up_window=3, scale_down_window=8, drain_timeout=5)


def test_two_replicas_share_the_load_the_busier_gets_fewer_and_a_killed_one_is_replaced(portal):
    launched = portal.launch(name="two", replicas=2).json()
    assert launched["replicas"] == {"min": 2, "max": 2, "target_in_flight": 4, "serving": 0}
    service_id = launched["id"]
    portal.wait_state(service_id, "RUNNING", timeout=90)
    service = wait_for(lambda: (lambda s: s if len(serving_jobs(s)) == 2 else None)(portal.service(service_id)),
                       timeout=90, what="both jobs to serve")
    first, second = serving_jobs(service)
    assert events(service, "submitted as job") == [
        f"replica generation 2 submitted as job {second} (below the minimum of 2)"]

    with StreamingLoad(f"{portal.url}/v1", portal.token, clients=8, tokens=10) as load:
        time.sleep(6)  # both serve
        # The first job's server stops answering for 4 s (SIGSTOP): its requests in flight pile up there, so the
        # requests that start meanwhile go to the other job.
        pid = server_pid(portal, service, first)
        os.kill(pid, signal.SIGSTOP)
        paused_at = time.time()
        time.sleep(4)
        os.kill(pid, signal.SIGCONT)
        resumed_at = time.time()
        time.sleep(3)
        # The second job's server is killed: requests not yet sent go to the first; streams under way are cut.
        os.kill(server_pid(portal, service, second), signal.SIGKILL)
        killed_at = time.time()
        time.sleep(8)
    shared = Counter(s.job for s in load.streams if s.started < paused_at and s.whole)
    paused = Counter(s.job for s in load.streams if paused_at + 0.5 < s.started < resumed_at)
    after_kill = [s for s in load.streams if s.started > killed_at + 1]
    cut_by_kill = [s for s in load.streams if not s.whole and s.started <= killed_at]

    # Both served while both were well, about evenly.
    assert set(shared) == {first, second} and min(shared.values()) >= 0.3 * sum(shared.values()), shared
    # The stopped one got at most the few requests each worker sent before it counted as busier.
    assert paused[second] >= 10 and paused[first] <= 0.2 * sum(paused.values()), paused
    # After the kill: not one failure; everything whole, from the first job (or the dead one's replacement).
    assert after_kill and all(s.whole and s.job != second for s in after_kill), \
        [s for s in after_kill if not s.whole or s.job == second][:3]
    failed = [s for s in load.streams if not s.whole]
    assert len(failed) == len(cut_by_kill) and len(failed) <= 8, failed  # at most the streams under way on it

    # The dead one is cancelled and replaced (the minimum is 2).
    service = wait_for(lambda: (lambda s: s if len(serving_jobs(s)) == 2 and second not in serving_jobs(s) else None)(
        portal.service(service_id)), timeout=90, what="a replacement to serve")
    # Its health check finds the port closed, or its job ends first (the job script ends with its server).
    assert events(service, f"(job {second}) stopped answering (connection refused): cancelled") or events(
        service, f"(job {second}) ended while serving: the server crashed: killed"), service["events"]
    assert len(events(service, "(below the minimum of 2)")) == 2
    wait_for(lambda: second not in squeue_ids(), timeout=30, what=f"job {second} to leave the queue")
    print(f"replicas: before {dict(shared)}, first paused {dict(paused)}, {len(failed)} streams cut by the kill, "
          f"{len(after_kill)} whole after it", file=sys.stderr)

    # Stopping the service cancels every job.
    portal.request("POST", f"/api/services/{service_id}/stop")
    stopped = portal.wait_state(service_id, "STOPPED", timeout=60)
    everything = {stopped["job_id"]} | {job["job_id"] for job in stopped["jobs"]}
    wait_for(lambda: not everything & squeue_ids(), timeout=30, what="every job of the service to leave the queue")


def hold_streams(portal, count: int, seconds: float, stop: threading.Event) -> list:
    """`count` clients each streaming long answers until `stop`; returns their threads."""
    def run():
        while not stop.is_set():
            body = {"model": "test/tiny", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": int(seconds / 0.05), "stream": True}
            with requests.post(f"{portal.url}/v1/chat/completions", json=body, stream=True, timeout=60,
                               headers={"Authorization": f"Bearer {portal.token}"}) as answer:
                for _ in answer.iter_content(None):
                    pass
    threads = [threading.Thread(target=run, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_a_service_grows_under_load_and_shrinks_when_it_stops(portal):
    launched = portal.launch(name="elastic", replicas={"min": 1, "max": 2, "target_in_flight": 2}).json()
    service_id = launched["id"]
    portal.wait_state(service_id, "RUNNING", timeout=90)
    time.sleep(5)
    assert len(serving_jobs(portal.service(service_id))) == 1  # no load: no second job

    stop = threading.Event()
    threads = hold_streams(portal, 6, 4, stop)
    try:
        grown = wait_for(lambda: (lambda s: s if len(serving_jobs(s)) == 2 else None)(portal.service(service_id)),
                         timeout=90, what="a second job under load")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    added = events(grown, "submitted as job")
    assert len(added) == 1 and "requests in flight per job, over 2 for 3 s)" in added[0], added

    shrunk = wait_for(lambda: (lambda s: s if len(serving_jobs(s)) == 1 else None)(portal.service(service_id)),
                      timeout=60, what="back to one job once quiet")
    removed = events(shrunk, "removed (")
    assert len(removed) == 1 and "quiet for 8 s" in removed[0], removed
    assert shrunk["state"] == "RUNNING"
    portal.request("POST", f"/api/services/{service_id}/stop")
    portal.wait_state(service_id, "STOPPED", timeout=60)


def test_a_service_scaled_to_zero_has_no_job_until_a_request_wakes_it(portal):
    from openai import OpenAI

    # Its server takes 25 s to listen (the test engine's --delay), as a real model's load would.
    launched = portal.launch(name="zero", replicas="0:1", engine_args=["--delay", "25"]).json()
    service_id, first_job = launched["id"], launched["job_id"]
    first_start = portal.wait_state(service_id, "RUNNING", timeout=90)["phases"]["total"]

    # Quiet for scale_down_window (8 s): its job drains and leaves; the service stays, with no job.
    asleep = portal.wait_state(service_id, "SCALED_TO_ZERO", timeout=60)
    assert asleep["job_id"] is None and asleep["endpoint"] is None
    assert asleep["reason"].startswith("no job while unused (0 requests in flight for 1 jobs, quiet for 8 s)")
    wait_for(lambda: first_job not in squeue_ids(), timeout=30, what=f"job {first_job} to leave the queue")

    # A request by its URL is answered 503 at once, with Retry-After the length of its last start, and starts a job.
    answer = portal.request("GET", f"/services/{service_id}/v1/models")
    assert answer.status_code == 503, answer.text
    # (and the reconciler's second before it submits the job, and a 2 s margin)
    assert 0 <= int(answer.headers["Retry-After"]) - math.ceil(first_start) <= 4, (answer.headers, first_start)
    assert answer.json()["error"]["code"] == "service_starting"
    woken = portal.wait_state(service_id, "RUNNING", timeout=90)
    assert woken["job_id"] not in (None, first_job) and woken["generation"] == 2
    assert events(woken, "woken by a request") == [
        f"woken by a request: generation 2 submitted as job {woken['job_id']}"]

    # Asleep again, the official client's own retries (it honours a Retry-After up to 60 s) carry a chat across the
    # wake. Three, not its default two: if this start runs later than the last, the retry after "half the last start
    # more" can come after this module's 8 s scale-down window (300 s by default) has put the service to sleep again.
    portal.wait_state(service_id, "SCALED_TO_ZERO", timeout=60)
    client = OpenAI(base_url=f"{portal.url}/v1", api_key=portal.token, max_retries=3, timeout=30)
    started = time.time()
    reply = client.chat.completions.create(model="test/tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=3)
    assert reply.choices[0].message.content == "tok0 tok1 tok2 "
    print(f"scale to zero: a chat across the wake took {time.time() - started:.1f} s (the first start: "
          f"{first_start:.1f} s)", file=sys.stderr)
    assert portal.service(service_id)["generation"] == 3
    portal.request("POST", f"/api/services/{service_id}/stop")
    stopped = portal.wait_state(service_id, "STOPPED", timeout=60)
    assert stopped["reason"] == "stopped by user"


def test_when_a_replicas_node_goes_down_requests_go_to_the_other_and_it_is_replaced(portal):
    """Two jobs on partitions spanning both nodes: the second goes to the node the first does not use. node2 is then
    switched off (its slurmd and every process on it): requests go to the job on this node, the one on node2 is
    given up, and a replacement is submitted, which runs once node2 is back."""
    from tests.test_two_nodes import NODE2, NODE2_NS, READY, node_state, start_cluster

    if os.environ.get("PILOTFISH_TEST_NODES") == "1":
        pytest.skip("PILOTFISH_TEST_NODES=1: the test cluster has one node")
    wait_for(lambda: node_state(NODE2) in READY, timeout=90, what="node2 to take jobs")
    launched = portal.launch(name="spread", replicas=2, resources={"partition": "cpu,remote"}).json()
    service_id = launched["id"]
    service = wait_for(lambda: (lambda s: s if len(serving_jobs(s)) == 2 else None)(portal.service(service_id)),
                       timeout=120, what="both jobs to serve")
    nodes = {service["node"]} | {job["node"] for job in service["jobs"] if job["phase"] == "replica"}
    assert nodes == {HOST, NODE2}, service  # one job on each node
    on_node2 = service["job_id"] if service["node"] == NODE2 else next(
        job["job_id"] for job in service["jobs"] if job["node"] == NODE2)
    try:
        with StreamingLoad(f"{portal.url}/v1", portal.token, clients=8, tokens=10) as load:
            time.sleep(4)
            for pid in subprocess_out(["ip", "netns", "pids", NODE2_NS]).split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed_at = time.time()
            time.sleep(10)
        after = [s for s in load.streams if s.started > killed_at + 1]
        cut = [s for s in load.streams if not s.whole]
        assert after and all(s.whole for s in after), [s for s in after if not s.whole][:3]
        assert all(s.started <= killed_at for s in cut) and len(cut) <= 8, cut
        given_up = wait_for(lambda: (lambda s: s if len(events(s, "(below the minimum of 2)")) == 2 else None)(
            portal.service(service_id)), timeout=60, what="a replacement to be submitted")
        assert given_up["state"] == "RUNNING" and given_up["node"] == HOST
        assert events(given_up, f"(job {on_node2}) stopped answering") or events(
            given_up, f"took over from job {on_node2}"), [e["reason"] for e in given_up["events"]]
        print(f"node2 down: {len(cut)} streams cut, {len(after)} whole after", file=sys.stderr)
    finally:
        start_cluster()  # node2's slurmd back: Slurm returns the node to service when it registers
    wait_for(lambda: node_state(NODE2) in READY, timeout=90, what="node2 to take jobs again")
    back = wait_for(lambda: (lambda s: s if len(serving_jobs(s)) == 2 else None)(portal.service(service_id)),
                    timeout=180, what="the replacement to serve on node2")
    replica_nodes = [job["node"] for job in back["jobs"] if job["phase"] == "replica" and job["ready_at"]]
    assert back["node"] == HOST and replica_nodes == [NODE2], back
    portal.request("POST", f"/api/services/{service_id}/stop")
    portal.wait_state(service_id, "STOPPED", timeout=60)


def subprocess_out(command) -> str:
    import subprocess
    return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout


def test_a_requeued_job_on_a_preemptible_partition_comes_back_without_losing_the_service(slurm_cluster,
                                                                                          start_portal):
    """On a partition the site marked preemptible, jobs are submitted with --requeue. `scontrol requeue` (what
    preemption does) sends the job back to the queue: the service goes PENDING and comes back RUNNING under the same
    id; with a second job serving, that one takes over at once and the requeued one comes back as a replica."""
    import subprocess

    from tests.test_two_nodes import NODE2, READY, node_state

    if os.environ.get("PILOTFISH_TEST_NODES") == "1":
        pytest.skip("PILOTFISH_TEST_NODES=1: the test cluster has one node")
    wait_for(lambda: node_state(NODE2) in READY, timeout=90, what="node2 to take jobs")
    portal = start_portal("slurm", workers=2, runtimes={"text-generation": {"command": UPSTREAM}},
                          preemptible_partitions=["remote"], scale_down_window=600)
    plan = portal.request("POST", "/api/services?dry_run=true", json={
        "kind": "text-generation", "model": "test/tiny", "resources": {"partition": "remote"}}).json()
    assert "--requeue" in plan["sbatch"] and "--no-requeue" not in plan["sbatch"], plan["sbatch"]

    def requeue(job_id, seen):
        """Requeue the job as preemption does, held in the queue until the portal has seen it back there (`seen`
        waits for that and returns what it saw), then let it run again."""
        def run(*command):
            result = subprocess.run(command, capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, result.stderr
            return result.stdout.strip()
        run("scontrol", "requeuehold", job_id)
        try:
            wait_for(lambda: run("squeue", "--noheader", f"--jobs={job_id}", "--format=%T") == "PENDING",
                     timeout=30, what=f"job {job_id} back in the queue")
            return seen()
        finally:
            run("scontrol", "release", job_id)
            run("scontrol", "update", f"jobid={job_id}", "StartTime=now")  # not waiting out Slurm's requeue delay

    def chat():
        return portal.request("POST", "/v1/chat/completions", json={
            "model": "test/tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})

    # One job: PENDING while requeued, then RUNNING again, same service.
    single = portal.launch(name="preempted", resources={"partition": "remote"}).json()
    job_id = portal.wait_state(single["id"], "RUNNING", timeout=90)["job_id"]
    pending = requeue(job_id, lambda: portal.wait_state(single["id"], "PENDING", timeout=30))
    assert pending["reason"].startswith(f"job {job_id} was requeued (preempted): waiting in the queue again")
    assert pending["endpoint"] is None
    back = portal.wait_state(single["id"], "RUNNING", timeout=120)
    assert back["job_id"] == job_id and back["endpoint"] is not None
    assert chat().status_code == 200
    portal.request("POST", f"/api/services/{single['id']}/stop")

    # Two jobs: the other takes over at once; the requeued one comes back as a replica.
    pair = portal.launch(name="preempted-pair", replicas=2, resources={"partition": "remote"}).json()
    service = wait_for(lambda: (lambda s: s if len(serving_jobs(s)) == 2 else None)(portal.service(pair["id"])),
                       timeout=120, what="both jobs to serve")
    first, second = serving_jobs(service)
    taken = requeue(first, lambda: wait_for(
        lambda: (lambda s: s if s["job_id"] == second else None)(portal.service(pair["id"])), timeout=30,
        what="the replica to take over"))
    assert taken["state"] == "RUNNING" and events(taken, f"job {first} was requeued (preempted): replica generation")
    assert all(chat().status_code == 200 for _ in range(5))
    again = wait_for(lambda: (lambda s: s if sorted(serving_jobs(s)) == sorted([first, second]) else None)(
        portal.service(pair["id"])), timeout=120, what="the requeued job to serve again as a replica")
    assert again["job_id"] == second
    portal.request("POST", f"/api/services/{pair['id']}/stop")
    portal.wait_state(pair["id"], "STOPPED", timeout=60)
