"""ood_app.launch outside a job: the portal's child jobs end by the time the portal's own job does, and the launch
refuses what would go wrong (no token, a second portal sharing the same services)."""
import os
import subprocess
import sys
import time

import pytest

from portal.app import create_app
from tests.conftest import REPO, free_port


def launch(env: dict, *args) -> subprocess.CompletedProcess:
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("PILOTFISH_", "SLURM_"))}
    return subprocess.run([sys.executable, "-m", "ood_app.launch", *args], env={**clean, **env}, capture_output=True,
                          text=True, timeout=60, cwd=str(REPO))


@pytest.mark.parametrize("seconds_left, expected", [(10 * 60 + 30, 10), (3 * 3600, 60), (45, None)])
def test_child_jobs_end_by_the_portal_jobs_deadline(tmp_path, site_config, seconds_left, expected):
    app = create_app({"home": tmp_path / "home", "site_config_path": site_config, "testing": True,
                      "job_deadline": time.time() + seconds_left})
    client = app.test_client()
    auth = {"Authorization": f"Bearer {app.config['PILOTFISH_TOKEN']}"}
    response = client.post("/api/services?dry_run=1", json={"kind": "text-generation", "model": "test/tiny",
                                                            "time": 60}, headers=auth)
    if expected is None:
        assert response.status_code == 400, response.get_json()
        assert response.get_json()["field"] == "time" and "ends within a minute" in response.get_json()["error"]
    else:
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["resources"]["time"] == expected


def test_launch_needs_its_token(tmp_path):
    result = launch({"PILOTFISH_HOME": str(tmp_path / "home")}, "--host", "localhost", "--port", str(free_port()),
                    "--token-file", str(tmp_path / "absent"), "--placement", "separate_jobs")
    assert result.returncode == 1 and result.stdout.strip().startswith("pilotfish: cannot read the portal token ")
    assert "Traceback" not in result.stderr
    result = launch({}, "--host", "localhost", "--port", "1", "--token-file", "x", "--placement", "elsewhere")
    assert result.returncode == 2 and "invalid choice: 'elsewhere'" in result.stderr


def test_launch_refuses_a_second_portal_on_the_same_services(tmp_path, start_portal):
    running = start_portal("local")  # writes connection.json in its home, as a session's portal does
    token = tmp_path / "token"
    token.write_text("another-token\n")
    port = free_port()
    result = launch({"PILOTFISH_HOME": str(running.home), "PILOTFISH_SITE_CONFIG": str(running.site_config)},
                    "--host", "127.0.0.1", "--port", str(port), "--token-file", str(token), "--placement", "this_allocation")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"a Pilotfish portal of yours already runs at {running.url}" in result.stdout
    assert running.request("GET", "/health").status_code == 200


def test_the_forms_idle_timeout_reaches_the_portals_settings(tmp_path):
    token = tmp_path / "token"
    token.write_text("a-token\n")
    result = launch({"PILOTFISH_HOME": str(tmp_path / "home")}, "--host", "localhost", "--port", str(free_port()),
                    "--token-file", str(token), "--placement", "separate_jobs", "--idle-timeout", "soon")
    assert result.returncode == 1 and result.stdout.strip() == (
        "pilotfish: idle_timeout: expected minutes, or a duration such as 30m, 1h or 1h30m (0 or off: never), got "
        "'soon'"), result.stdout + result.stderr
