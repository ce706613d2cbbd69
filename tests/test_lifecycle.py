"""The service lifecycle on the real test Slurm, through a real portal under gunicorn."""
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import port_open, squeue_ids, wait_for

pytestmark = pytest.mark.slurm



IMPOSTOR = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    server.bind(("0.0.0.0", int(sys.argv[1])))
except OSError:
    sys.exit(3)  # still held by the dying server: try again
server.listen(16)
print("LISTENING", flush=True)
while True:
    conn, _ = server.accept()
    conn.settimeout(2)
    data = b""
    try:
        while b"\\r\\n\\r\\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    print("HEARD", data.hex(), flush=True)  # everything that reached it, on one line
    try:
        conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 8\\r\\n\\r\\nimpostor")
    except OSError:
        pass
    conn.close()
"""


def start_impostor(port: int):
    """Another user of the node (nobody, uid 65534) binding the port a service left; None while it is still held."""
    process = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                                "-c", IMPOSTOR, str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd="/")
    if process.stdout.readline().strip() != "LISTENING":
        process.wait(timeout=10)
        if process.returncode != 3:
            pytest.fail(f"the impostor could not start ({process.returncode}): {process.stderr.read()}")
        return None
    return process


def heard(impostor) -> bytes:
    """Everything the impostor received, once it is stopped."""
    impostor.kill()
    out = impostor.communicate(timeout=10)[0]
    return b"".join(bytes.fromhex(line[len("HEARD "):]) for line in out.splitlines() if line.startswith("HEARD "))


@pytest.fixture(scope="module")
def portal(slurm_cluster, start_module_portal):
    return start_module_portal("slurm")


@pytest.fixture(scope="module")
def time_limited(portal):
    """A service with a one-minute limit, launched early so the module's other tests run while it ages."""
    response = portal.launch(name="short-lived", time=1)
    assert response.status_code == 201, response.text
    return response.json()


def test_service_runs_is_stopped_and_deleted(portal, time_limited):
    response = portal.launch(name="first")
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["state"] == "SUBMITTED"
    assert created["job_id"].isdigit()
    assert created["events"][0]["reason"].startswith(f"submitted to slurm as job {created['job_id']} (tier cpu.Tiny: ")
    assert created["tier"] == "cpu.Tiny" and created["resources"]["cpus"] == 1

    running = portal.wait_state(created["id"], "RUNNING", timeout=60)
    states = [event["to"] for event in running["events"]]
    assert states[0] == "SUBMITTED" and states[-1] == "RUNNING" and "STARTING" in states
    assert states.index("STARTING") < states.index("RUNNING")
    assert running["node"] and running["endpoint"]["port"]
    assert all(value is not None for value in running["phases"].values()), running["phases"]
    assert created["job_id"] in squeue_ids()
    host, port = running["endpoint"]["host"], running["endpoint"]["port"]
    assert port_open(host, port)

    # The service itself (TLS only) refuses callers without its key.
    import requests
    assert requests.get(f"https://{host}:{port}/health", timeout=5, verify=False).status_code == 401

    # Deleting a live service is refused: it must be stopped first.
    assert portal.request("DELETE", f"/api/services/{created['id']}").status_code == 409

    stop = portal.request("POST", f"/api/services/{created['id'][:6]}/stop")
    assert stop.status_code in (200, 202), stop.text
    stopped = portal.wait_state(created["id"], "STOPPED", timeout=30)
    assert stopped["reason"] == "stopped by user"
    wait_for(lambda: created["job_id"] not in squeue_ids() or _ended_in_squeue(created["job_id"]), timeout=30,
             what="job to leave squeue")
    wait_for(lambda: not port_open(host, port), timeout=15, what="the server process to exit")

    job_dir = Path(portal.home / "jobs" / created["id"])
    assert job_dir.is_dir()
    log = portal.request("GET", f"/api/services/{created['id']}/logs?tail=5").json()["log"]
    assert "pilotfish: serving on " in log and "tiny_service: listening on" in log
    assert portal.request("DELETE", f"/api/services/{created['id']}").status_code == 200
    assert portal.request("GET", f"/api/services/{created['id']}").status_code == 404
    assert not job_dir.exists()


def _ended_in_squeue(job_id) -> bool:
    """squeue --states=all keeps finished jobs for MinJobAge; a finished job counts as gone from the queue."""
    out = subprocess.run(["squeue", "--noheader", "--states=all", "--jobs", job_id, "--format=%T"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
    return out in ("", "CANCELLED", "COMPLETED", "FAILED", "TIMEOUT")


def test_speech_recognition_service_starts_from_its_script(portal):
    response = portal.launch(kind="speech-recognition", model="test/whisper", name="ears")
    assert response.status_code == 201, response.text
    service = portal.wait_state(response.json()["id"], "RUNNING", timeout=60)
    script = (portal.home / "jobs" / service["id"] / "job.sh").read_text()
    assert "--served-model-name test/whisper" in script
    portal.request("POST", f"/api/services/{service['id']}/stop")
    portal.wait_state(service["id"], "STOPPED", timeout=30)


def test_unknown_partition_is_rejected_with_slurms_reason(portal):
    response = portal.launch(name="nowhere", resources={"partition": "nosuch"})
    assert response.status_code == 422, response.text
    body = response.json()
    assert "invalid partition specified: nosuch" in body["error"]
    service = portal.service(body["service"]["id"])
    assert service["state"] == "FAILED"
    assert "invalid partition specified: nosuch" in service["reason"]
    assert service["job_id"] is None


def test_gpu_tier_resources_schedule(portal):
    response = portal.launch(name="gpu", resources={"partition": "gpu", "gpus": 2, "gpu_type": "a100"})
    assert response.status_code == 201, response.text
    service = portal.wait_state(response.json()["id"], "RUNNING", timeout=60)
    assert service["resources"]["gpus"] == 2
    portal.request("POST", f"/api/services/{service['id']}/stop")
    portal.wait_state(service["id"], "STOPPED", timeout=30)


def test_job_that_exits_with_an_error_fails_with_its_log(portal):
    response = portal.launch(name="broken", engine_args=["--exit", "3"])
    assert response.status_code == 201, response.text
    failed = portal.wait_state(response.json()["id"], ("FAILED", "RUNNING", "STOPPED"), timeout=60)
    assert failed["state"] == "FAILED"
    assert failed["reason"].startswith(f"the server exited with code 3 (job {failed['job_id']}: FAILED")
    assert "server exited with code 3" in failed["reason"]
    assert "giving up on purpose" in failed["reason"]


def test_a_server_that_crashes_fails_in_words_and_is_no_longer_routed_to(portal):
    service = portal.launch(name="crashing").json()
    running = portal.wait_state(service["id"], "RUNNING", timeout=60)
    assert portal.request("GET", f"/services/{service['id']}/hello").status_code == 200
    pid = int((portal.home / "jobs" / service["id"] / "server.pid").read_text())
    os.kill(pid, signal.SIGSEGV)
    # Whoever takes the freed port next must not receive the service's traffic (nor its key).
    impostor = wait_for(lambda: start_impostor(running["endpoint"]["port"]), timeout=10,
                        what="the dead server's port to be free")
    try:
        failed = portal.wait_state(service["id"], ("FAILED", "STOPPED"), timeout=30)
        assert failed["state"] == "FAILED"
        assert failed["reason"].startswith("the server crashed: segmentation fault (signal 11, SIGSEGV; exit code 139)")
        # At once, the proxy answers with the reason, not with whatever listens on the dead port now.
        answer = portal.request("GET", f"/services/{service['id']}/hello")
        assert answer.status_code == 503, answer.text
        assert "segmentation fault" in answer.json()["error"]["message"]
    finally:
        received = heard(impostor)
    assert b"/hello" not in received, received


def test_a_port_taken_over_while_the_service_is_routed_to_gets_nothing(portal):
    """The window before the portal notices that a server is gone: another user of the node holds its port, and the
    portal still routes there. The portal checks the service's TLS certificate before it sends a byte of the request
    (nor the service's key); the caller is told what happened."""
    service = portal.launch(name="taken-over").json()
    running = portal.wait_state(service["id"], "RUNNING", timeout=60)
    key = (portal.home / "jobs" / service["id"] / "service.key").read_text().strip()
    assert portal.request("GET", f"/services/{service['id']}/stop-listening").status_code == 200
    impostor = wait_for(lambda: start_impostor(running["endpoint"]["port"]), timeout=10,
                        what="the server's port to be free")
    try:
        answer = portal.request("POST", f"/services/{service['id']}/v1/chat/completions",
                                json={"model": "test/tiny", "messages": [{"role": "user", "content": "secret-prompt"}]})
        assert answer.status_code == 502, answer.text
        assert "another program holds its port" in answer.json()["error"]["message"]
    finally:
        received = heard(impostor)
        portal.request("POST", f"/services/{service['id']}/stop")
    assert received, "the portal did not even try the port (the test proves nothing)"
    assert b"secret-prompt" not in received and key.encode() not in received and b"HTTP/1.1" not in received


def test_a_server_that_stops_accepting_connections_is_unhealthy_at_once(portal):
    service = portal.launch(name="deaf").json()
    portal.wait_state(service["id"], "RUNNING", timeout=60)
    assert portal.request("GET", f"/services/{service['id']}/stop-listening").status_code == 200
    # One probe that is refused is enough (unhealthy_after counts slow or failing answers, not a closed port).
    unhealthy = portal.wait_state(service["id"], ("UNHEALTHY", "FAILED"), timeout=15)
    assert unhealthy["state"] == "UNHEALTHY"
    assert unhealthy["reason"] == "the server no longer accepts connections (connection refused)"
    assert unhealthy["job_id"] in squeue_ids()
    portal.request("POST", f"/api/services/{service['id']}/stop")
    portal.wait_state(service["id"], "STOPPED", timeout=30)


def test_job_cancelled_outside_the_portal_is_stopped(portal):
    service = portal.launch(name="scancelled").json()
    portal.wait_state(service["id"], ("STARTING", "RUNNING"), timeout=60)
    subprocess.run(["scancel", service["job_id"]], check=True, timeout=30)
    stopped = portal.wait_state(service["id"], ("STOPPED", "FAILED"), timeout=30)
    assert stopped["state"] == "STOPPED"
    assert stopped["reason"] == f"job {service['job_id']} was cancelled outside the portal"


def test_unhealthy_and_back(portal, tmp_path):
    sick = tmp_path / "sick"
    service = portal.launch(name="wobbly", engine_args=["--sick-file", str(sick)]).json()
    portal.wait_state(service["id"], "RUNNING", timeout=60)
    sick.write_text("x")
    unhealthy = portal.wait_state(service["id"], "UNHEALTHY", timeout=30)
    assert "health check failed" in unhealthy["reason"] and "HTTP 503" in unhealthy["reason"]
    sick.unlink()
    back = portal.wait_state(service["id"], "RUNNING", timeout=30)
    assert [event["to"] for event in back["events"]][-3:] == ["RUNNING", "UNHEALTHY", "RUNNING"]
    portal.request("POST", f"/api/services/{service['id']}/stop")


def test_state_filter(portal):
    live = portal.request("GET", "/api/services?state=LIVE").json()["services"]
    ended = portal.request("GET", "/api/services?state=ended").json()["services"]
    assert all(s["state"] in ("SUBMITTED", "PENDING", "STARTING", "RUNNING", "UNHEALTHY") for s in live)
    assert all(s["state"] in ("STOPPED", "FAILED", "TIMEOUT") for s in ended)
    assert ended, "earlier tests left ended services"


def test_time_limit_gives_timeout(portal, time_limited):
    """Last in the module: the one-minute service launched at the start has had time to age."""
    ended = portal.wait_state(time_limited["id"], ("TIMEOUT", "FAILED", "STOPPED"), timeout=180)
    assert ended["state"] == "TIMEOUT", ended
    assert ended["reason"] == f"job {time_limited['job_id']} reached its time limit of 1 min"
