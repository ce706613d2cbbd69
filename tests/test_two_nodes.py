"""Services on the test cluster's second node, as on a real cluster: another host than the portal's.

node2 is a slurmd in its own network namespace (pf-node2, 10.203.0.2) with its own host name, in partition
`remote` only (tests/cluster/README.md). A job there advertises `node2`, which the portal looks up and reaches
across a veth pair; nothing it binds on its own loopback is visible from the portal's host.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, TEST_ENGINE_FLAGS, TINY_SERVICE, port_open, wait_for, write_site_config

pytestmark = pytest.mark.slurm

NODE2 = "node2"
NODE2_NS = "pf-node2"
NODE2_ADDR = "10.203.0.2"
ON_NODE2 = {"partition": "remote"}
READY = ("idle", "mixed", "allocated", "completing", "planned")  # planned: backfill holds it for a job


def node_state(node: str) -> str:
    out = subprocess.run(["sinfo", "--noheader", "--Node", f"--nodes={node}", "--format=%T"],
                         capture_output=True, text=True, timeout=30).stdout.split()
    return out[0] if out else ""


def start_cluster():
    result = subprocess.run([str(REPO / "tests" / "cluster" / "start.sh")], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"tests/cluster/start.sh failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def node2(slurm_cluster):
    if os.environ.get("PILOTFISH_TEST_NODES") == "1":
        pytest.skip("PILOTFISH_TEST_NODES=1: the test cluster has one node")
    assert socket.gethostbyname(NODE2) == NODE2_ADDR
    assert node_state(NODE2) in READY, f"node2 is {node_state(NODE2)!r} (tests/cluster/start.sh starts it)"
    return NODE2


@pytest.fixture(scope="module")
def portal(node2, start_module_portal, tmp_path_factory):
    """A portal whose tiny service may also be told to listen on another address (--bind)."""
    tiny = f"{sys.executable} {TINY_SERVICE}"
    runtimes = {kind: {"command": tiny, "allowed_args": TEST_ENGINE_FLAGS + ["--bind"]}
                for kind in ("text-generation", "speech-recognition")}
    site = write_site_config(tmp_path_factory.mktemp("two-nodes") / "site.yaml", scheduler="slurm", runtimes=runtimes)
    return start_module_portal(site=site)


def launch(portal, name, **body):
    response = portal.launch(name=name, **body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def stop(portal, service_id):
    portal.request("POST", f"/api/services/{service_id}/stop")
    return portal.wait_state(service_id, ("STOPPED", "FAILED"), timeout=60)


def in_node2(*command, timeout=30) -> subprocess.CompletedProcess:
    """A command run on node2: in its network namespace, where /etc/hosts is node2's."""
    return subprocess.run(["ip", "netns", "exec", NODE2_NS, *command], capture_output=True, text=True,
                          timeout=timeout)


def test_a_service_on_the_second_node_is_reached_by_name_across_the_network(portal):
    service_id = launch(portal, "over-there", resources=ON_NODE2)
    service = portal.wait_state(service_id, "RUNNING", timeout=60)
    assert service["node"] == NODE2
    assert service["endpoint"]["host"] == NODE2
    port = service["endpoint"]["port"]
    assert f"pilotfish: serving on {NODE2}:{port}" in portal.request(
        "GET", f"/api/services/{service_id}/logs?tail=50").json()["log"]

    # It listens in node2's namespace: at node2's address, not on this machine.
    assert port_open(NODE2, port)
    assert not port_open("127.0.0.1", port)
    # The proxy reaches it (by the name node2, across the veth pair) and gives its answer.
    answer = portal.request("GET", f"/services/{service_id}/hello?from=portal")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"path": "/hello?from=portal", "model": "test/tiny"}
    # Looked at from node2, the portal's host is the other end of the pair.
    host = socket.gethostname()
    looked_up = in_node2("getent", "hosts", host)
    assert looked_up.returncode == 0 and looked_up.stdout.split()[0] == "10.203.0.1", looked_up

    assert stop(portal, service_id)["state"] == "STOPPED"
    wait_for(lambda: not port_open(NODE2, port), timeout=30, what="the server on node2 to exit")


def _loopback_server_listens_in_node2(port: int) -> bool:
    probe = in_node2(sys.executable, "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), 2)")
    return probe.returncode == 0


def test_a_server_listening_only_on_its_nodes_loopback_is_never_reached(portal):
    service_id = launch(portal, "loopback-only", resources=ON_NODE2, engine_args=["--bind", "127.0.0.1"])
    service = wait_for(lambda: (lambda s: s if s["endpoint"] and s["state"] == "STARTING" else None)(
        portal.service(service_id)), timeout=60, what="the job on node2 to report its endpoint")
    assert service["node"] == NODE2 and service["endpoint"]["host"] == NODE2
    port = service["endpoint"]["port"]
    # The server is up, on node2's loopback: reachable there, and only there.
    wait_for(lambda: _loopback_server_listens_in_node2(port), timeout=30, what="the server to listen on node2")
    assert not port_open(NODE2, port)

    # The portal probes it every second or so and never gets an answer: it stays STARTING, the proxy says so.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert portal.service(service_id)["state"] == "STARTING"
        time.sleep(1)
    proxied = portal.request("GET", f"/services/{service_id}/hello")
    assert proxied.status_code in (502, 503), proxied.text
    assert "STARTING" in proxied.json()["error"]["message"] and "path" not in proxied.json()
    assert _loopback_server_listens_in_node2(port)  # still there the whole time
    assert stop(portal, service_id)["state"] == "STOPPED"


def test_the_same_server_on_the_portals_own_node_would_have_passed(portal):
    """Why the test above needs a second node: on the portal's own host, loopback is the portal's too."""
    host = socket.gethostname()
    if socket.gethostbyname(host) != "127.0.0.1":
        pytest.skip(f"{host} resolves to {socket.gethostbyname(host)}, not 127.0.0.1")
    service_id = launch(portal, "loopback-here", engine_args=["--bind", "127.0.0.1"])
    service = portal.wait_state(service_id, "RUNNING", timeout=60)
    assert service["node"] != NODE2
    assert portal.request("GET", f"/services/{service_id}/hello").status_code == 200
    assert stop(portal, service_id)["state"] == "STOPPED"


def test_a_service_whose_node_goes_down_fails_in_slurms_words(portal):
    service_id = launch(portal, "node-goes-down", resources=ON_NODE2)
    service = portal.wait_state(service_id, "RUNNING", timeout=60)
    assert service["node"] == NODE2
    job_id = service["job_id"]
    try:
        # node2 switched off: its slurmd, the job's slurmstepd, script and server, all at once.
        pids = subprocess.run(["ip", "netns", "pids", NODE2_NS], capture_output=True, text=True,
                              timeout=30).stdout.split()
        assert pids
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        started = time.monotonic()
        failed = portal.wait_state(service_id, ("FAILED", "STOPPED", "TIMEOUT"), timeout=90)
        took = time.monotonic() - started
        squeue = subprocess.run(["squeue", "--noheader", "--states=all", f"--jobs={job_id}", "--format=%T|%r"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
        print(f"node2 down: FAILED after {took:.0f} s; squeue: {squeue!r}; reason: {failed['reason']!r}")
        assert failed["state"] == "FAILED", failed
        assert "NODE_FAIL" in failed["reason"] or "node" in failed["reason"].lower(), failed["reason"]
        proxied = portal.request("GET", f"/services/{service_id}/hello")
        assert proxied.status_code == 503 and "FAILED" in proxied.json()["error"]["message"]
    finally:
        start_cluster()  # brings node2's slurmd back; Slurm returns the node to service when it registers
    wait_for(lambda: node_state(NODE2) in READY, timeout=60, what="node2 to take jobs again")
