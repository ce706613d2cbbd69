"""The same lifecycle with the local scheduler (a laptop, or services inside the portal's own allocation)."""


def test_local_service_runs_and_stops(start_portal):
    portal = start_portal("local")
    service = portal.launch(name="local", engine_args=["--delay", "0.5"]).json()
    running = portal.wait_state(service["id"], "RUNNING", timeout=30)
    assert running["scheduler"] == "local"
    portal.request("POST", f"/api/services/{service['id']}/stop")
    stopped = portal.wait_state(service["id"], "STOPPED", timeout=30)
    assert stopped["reason"] == "stopped by user"


def test_local_failure_carries_the_log(start_portal):
    portal = start_portal("local")
    service = portal.launch(name="broken", engine_args=["--exit", "4"]).json()
    failed = portal.wait_state(service["id"], ("FAILED", "RUNNING"), timeout=30)
    assert failed["state"] == "FAILED"
    assert "exit code 4" in failed["reason"] and "giving up on purpose" in failed["reason"]
