"""The Python client against a real portal on the real test Slurm: launch, wait, logs, stop, context managers, errors."""
import pytest

from portal.client import PortalClientError, ServiceEnded, WaitTimeout, connect

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def portal(slurm_cluster, start_module_portal):
    return start_module_portal("slurm")


@pytest.fixture(scope="module")
def client(portal):
    return connect(home=str(portal.home))


def test_launch_waits_until_running_and_the_handle_stops_it(client, portal):
    changes = []
    with client.launch("text-generation", "test/tiny", time=5, name="client-one",
                       on_change=lambda old, new: changes.append(new["state"])) as service:
        assert service.state == "RUNNING"
        assert service.data["tier"] == "cpu.Tiny" and service.data["name"] == "client-one"
        assert changes[-1] == "RUNNING" and len(changes) >= 2
        assert isinstance(service.logs(tail=5), str)
        assert client.service(service.id[:6]).id == service.id  # prefix
        assert client.service("test/tiny").id == service.id  # by model
    assert portal.wait_state(service.id, "STOPPED", timeout=30)["reason"] == "stopped by user"
    service.delete()
    with pytest.raises(PortalClientError) as caught:
        client.service(service.id)
    assert caught.value.status == 404 and "no service" in caught.value.message


def test_portal_as_context_manager_stops_what_it_launched(portal):
    with connect(home=str(portal.home)) as scoped:
        service = scoped.launch("text-generation", "test/tiny", wait=False, time=5, engine_args=["--delay", "30"])
        assert service.state in ("SUBMITTED", "PENDING", "STARTING")
        with pytest.raises(WaitTimeout, match="still"):
            service.wait_ready(timeout=1)
    assert portal.wait_state(service.id, "STOPPED", timeout=30)


def test_errors_carry_the_api_message(client):
    with pytest.raises(PortalClientError) as caught:
        client.launch("text-generation", "test/tiny", tier="Huge")
    assert caught.value.status == 400 and caught.value.message.startswith("tier: ")
    with pytest.raises(ServiceEnded, match="FAILED") as ended:
        client.launch("text-generation", "test/tiny", time=5, engine_args=["--exit", "3"], timeout=60)
    assert ended.value.service["state"] == "FAILED"
    plan = client.dry_run("text-generation", "test/tiny", time=5)
    assert plan["job_script"].startswith("#!") and plan["tier"] == "cpu.Tiny"


def test_the_client_needs_only_requests(portal, tmp_path):
    """A notebook's Python with requests and without Flask imports the client and talks to a real portal."""
    import subprocess
    import venv

    from tests.conftest import REPO

    env_dir = tmp_path / "notebook"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "requests"],
                   check=True, timeout=300)
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from portal.client import connect\n"
        "portal = connect(home=sys.argv[2])\n"
        "print(sorted(portal.status()))\n"
        "assert 'flask' not in sys.modules and 'sqlalchemy' not in sys.modules, sorted(sys.modules)\n"
    )
    result = subprocess.run([str(python), "-c", script, str(REPO), str(portal.home)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "scheduler" in result.stdout, result.stdout
    check = subprocess.run([str(python), "-c", "import flask"], capture_output=True, text=True)
    assert check.returncode != 0  # the test's Python really has no Flask
