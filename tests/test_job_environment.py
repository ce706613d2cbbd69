"""A service job gets its own key and nothing of its owner's: the portal token (and every other PILOTFISH_* setting
of the portal, such as its database URL, which may hold a password, and the owner's Hub token) never reaches a job's
environment, on the real test Slurm (sbatch exports the submitting environment) and with the local scheduler (the
Open OnDemand app's). Checked in the running processes themselves: /proc/<pid>/environ of the server and its job
script, and every file the job left."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from portal.scheduler import job_environment, scrubbed_environment
from tests.conftest import wait_for

TOKEN = "portal-token-" + "7" * 32
DATABASE_URL = "postgresql://pilotfish:db-pass-5ecret@db.example/pilotfish"
HF_TOKEN = "hf_owner_secret_0123456789"


def environ_of(pid: int) -> dict:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)


def check_job_environment(portal, service: dict) -> None:
    job_dir = portal.home / "jobs" / service["id"]
    key = (job_dir / "service.key").read_text().strip()
    server = int(wait_for(lambda: (job_dir / "server.pid").read_text().strip() or None
                          if (job_dir / "server.pid").exists() else None, timeout=30, what="server.pid"))
    # its parent: the job script, whose /proc environ is what the job started with (sbatch's export, or the local
    # scheduler's environment), before the script's own exports
    job_script = int(Path(f"/proc/{server}/stat").read_text().rsplit(")", 1)[1].split()[1])
    for pid in (server, job_script):
        env = environ_of(pid)
        raw = Path(f"/proc/{pid}/environ").read_bytes()
        assert TOKEN.encode() not in raw and HF_TOKEN.encode() not in raw, pid
        assert b"PILOTFISH_TOKEN" not in env and b"PILOTFISH_DATABASE_URL" not in env and b"HF_TOKEN" not in env
    # the server's own key, which the job script read from service.key
    assert environ_of(server)[b"PILOTFISH_API_KEY"] == key.encode()
    for path in job_dir.rglob("*"):  # the job script, its log, what the server wrote
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def portal_with_secrets(start_portal, monkeypatch, scheduler: str):
    """A portal whose own environment holds its token, its database URL and the owner's Hub token."""
    home = start_portal.base / "home"
    home.mkdir(mode=0o700)
    (home / "token").write_text(TOKEN + "\n")  # what the test client reads; the portal takes PILOTFISH_TOKEN
    monkeypatch.setenv("PILOTFISH_TOKEN", TOKEN)
    monkeypatch.setenv("PILOTFISH_DATABASE_URL", f"sqlite:///{home / 'pilotfish.db'}")
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    portal = start_portal(scheduler, home=home)
    assert portal.token == TOKEN and portal.request("GET", "/api/services").status_code == 200
    return portal


def test_local_job_has_its_key_and_not_the_portal_token(start_portal, monkeypatch):
    portal = portal_with_secrets(start_portal, monkeypatch, "local")
    service = portal.launch(name="env-local").json()
    running = portal.wait_state(service["id"], ("RUNNING", "FAILED"), timeout=30)
    assert running["state"] == "RUNNING", running["reason"]
    check_job_environment(portal, running)


@pytest.mark.slurm
def test_slurm_job_has_its_key_and_not_the_portal_token(slurm_cluster, start_portal, monkeypatch):
    portal = portal_with_secrets(start_portal, monkeypatch, "slurm")
    service = portal.launch(name="env-slurm", time=5).json()
    running = portal.wait_state(service["id"], ("RUNNING", "FAILED"), timeout=90)
    assert running["state"] == "RUNNING", running["reason"]
    check_job_environment(portal, running)


def test_the_rule_drops_every_portal_variable_and_the_owner_hub_token():
    base = {"PILOTFISH_TOKEN": TOKEN, "PILOTFISH_DATABASE_URL": DATABASE_URL, "PILOTFISH_HF_TOKEN": HF_TOKEN,
            "PILOTFISH_SOMETHING_NEW": "x", "HF_TOKEN": HF_TOKEN, "HUGGING_FACE_HUB_TOKEN": HF_TOKEN,
            "SLURM_JOB_ID": "1", "SLURM_CONF": "/etc/slurm/slurm.conf", "PROMETHEUS_MULTIPROC_DIR": "/tmp/m",
            "HOME": "/home/u", "PATH": "/usr/bin", "HF_ENDPOINT": "http://127.0.0.1:9"}
    assert job_environment(base) == {"SLURM_CONF": "/etc/slurm/slurm.conf", "HOME": "/home/u", "PATH": "/usr/bin",
                                     "HF_ENDPOINT": "http://127.0.0.1:9"}
    assert scrubbed_environment(base)["PILOTFISH_TOKEN"] == TOKEN  # the portal's own processes keep their settings
    assert "PILOTFISH_TOKEN" not in job_environment(dict(os.environ, PILOTFISH_TOKEN=TOKEN))
