"""Renewal on the real test Slurm through a real portal (two gunicorn workers): a service whose jobs have a time limit
of one minute serves 16 clients streaming through the gateway with the official `openai` client, without a pause,
across three generations (three Slurm jobs, each taking over from the one before before its time limit): no request
fails, no stream is cut, every stream is whole, and the answers come from each generation's job. The stand-in service
(tests/support/openai_upstream.py) names its job in each answer's id. About two minutes."""
import sys
import time

import pytest

from tests.conftest import REPO, squeue_ids, wait_for
from tests.support.streaming_load import StreamingLoad

pytestmark = pytest.mark.slurm

UPSTREAM = f"{sys.executable} {REPO / 'tests' / 'support' / 'openai_upstream.py'} --token-delay 0.05"
CLIENTS = 16
TOKENS = 20  # a stream of about a second
DRAIN = 8  # seconds a replaced job finishes its streams


def takeovers(service: dict) -> list:
    return [event["reason"] for event in service["events"] if " took over from job " in (event["reason"] or "")]


def test_a_renewed_service_serves_16_streaming_clients_across_three_generations_without_a_failure(slurm_cluster,
                                                                                                  start_portal):
    portal = start_portal("slurm", workers=2, runtimes={"text-generation": {"command": UPSTREAM}},
                          drain_timeout=DRAIN)
    launched = portal.launch(name="renewed", time=1, renew=True).json()
    assert launched["renew"] is True and launched["renew_until"] is None and launched["generation"] == 1
    assert launched["events"][0]["reason"].endswith("renewed before its time limit until stopped)")
    service_id, first_job = launched["id"], launched["job_id"]
    portal.wait_state(service_id, "RUNNING", timeout=90)

    started = time.time()
    with StreamingLoad(f"{portal.url}/v1", portal.token, clients=CLIENTS, tokens=TOKENS) as load:
        # Two handovers: generations 2 and 3 each take over within about 40 s of their predecessor's start.
        wait_for(lambda: portal.service(service_id)["generation"] >= 3, timeout=200, interval=1,
                 what="the third generation to take over")
        time.sleep(DRAIN + 4)  # the third serves, and the second's drain ends under load
    seconds = time.time() - started
    service = portal.service(service_id)

    # Not one failed request, not one cut stream, and the load kept going all along.
    assert load.failed == [], load.failed[:5]
    assert load.cut == [], load.cut[:5]
    assert load.complete >= CLIENTS * seconds / 4, (load.complete, seconds)

    # Same service, RUNNING throughout; three jobs answered, each of them a generation of this service.
    assert service["id"] == service_id and service["state"] == "RUNNING" and service["generation"] >= 3
    running = next(index for index, event in enumerate(service["events"]) if event["to"] == "RUNNING")
    assert all(event["to"] == "RUNNING" for event in service["events"][running:]), service["events"]
    jobs = [first_job] + [job["job_id"] for job in service["jobs"] if job["generation"] > 1] + [service["job_id"]]
    answered = set(load.by_job)
    assert len(answered) >= 3 and answered <= set(jobs), (answered, jobs, load.by_job)
    assert first_job in answered and service["job_id"] in answered, (answered, jobs)

    # Each handover is an event naming the jobs; a replaced job is cancelled after its drain and leaves the queue.
    assert len(takeovers(service)) == service["generation"] - 1, takeovers(service)
    assert f"took over from job {first_job}, which finishes its open requests" in takeovers(service)[0]
    replaced = [job for job in service["jobs"] if job["phase"] != "successor"]
    assert len(replaced) == service["generation"] - 1, service["jobs"]
    assert all(job["phase"] == "ended" and job["reason"] == "cancelled after its drain" for job in replaced), \
        service["jobs"]
    wait_for(lambda: not {job["job_id"] for job in replaced} & squeue_ids(), timeout=30,
             what="the replaced jobs to leave the queue")

    # Stopping the service cancels every job it has.
    assert portal.request("POST", f"/api/services/{service_id}/stop").status_code == 202
    stopped = portal.wait_state(service_id, "STOPPED", timeout=60)
    assert all(job["phase"] in ("ended", "failed") for job in stopped["jobs"]), stopped["jobs"]
    live = {job["job_id"] for job in stopped["jobs"]} | {stopped["job_id"]}
    wait_for(lambda: not live & squeue_ids(), timeout=30, what="every job of the service to leave the queue")
    print(f"renewal: {load.complete} whole streams in {seconds:.0f} s from {CLIENTS} clients, by job "
          f"{dict(load.by_job)}; {len(takeovers(service))} handovers", file=sys.stderr)
