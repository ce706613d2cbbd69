"""Shared fixtures: a Flask app on a temporary home, the real test Slurm cluster, and real gunicorn portals (started
by tests/support/portal_process.py, whose helpers are re-exported here for the tests)."""
from __future__ import annotations

import getpass
import os
import subprocess
from pathlib import Path

import pytest

from portal.app import create_app
from tests.support.portal_process import (REPO, TEST_ENGINE_FLAGS, TEST_MODELS, TEST_SPECS, TINY_SERVICE,
                                          PortalFactory, PortalProcess, free_port, make_site_cache, port_open,
                                          wait_for, write_site_config)

__all__ = ["REPO", "TEST_ENGINE_FLAGS", "TEST_MODELS", "TEST_SPECS", "TINY_SERVICE", "PortalFactory", "PortalProcess",
           "free_port", "make_site_cache", "port_open", "squeue_ids", "vllm_dry_run_api", "wait_for",
           "write_site_config"]


def vllm_dry_run_api(tmp_path: Path, monkeypatch, models: dict):
    """`call(method, path, token=<the portal token>, **kwargs)` on a portal app whose site serves every kind with vLLM
    and whose cache holds `models` (repo id: files); for dry runs and launch options: nothing is submitted."""
    from portal.catalog.inventory import refresh_inventory
    from tests.support.model_builders import write_cache_repo

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    site = write_site_config(tmp_path / "site.yaml", scheduler="local",
                             runtimes={"vllm": {"command": "python -m vllm.entrypoints.openai.api_server"}})
    for repo_id, files in models.items():
        write_cache_repo(tmp_path / "cache" / "models", repo_id, files)
    app = create_app({"home": tmp_path / "home", "site_config_path": site, "testing": True})
    refresh_inventory(app)
    client = app.test_client()

    def call(method, path, token=app.config["PILOTFISH_TOKEN"], **kwargs):
        return client.open(path, method=method, headers={"Authorization": f"Bearer {token}"}, **kwargs)
    call.app = app
    return call


@pytest.fixture(scope="session")
def site_cache(tmp_path_factory):
    return make_site_cache(tmp_path_factory.mktemp("site"))


@pytest.fixture
def site_config(tmp_path):
    return write_site_config(tmp_path / "site.yaml", scheduler="local")


@pytest.fixture
def app(tmp_path, site_config):
    app = create_app({"home": tmp_path / "home", "site_config_path": site_config, "testing": True})
    yield app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def auth(app):
    return {"Authorization": f"Bearer {app.config['PILOTFISH_TOKEN']}"}


# --- the real Slurm -------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Start (or reuse) the two-node test cluster once per session. Never skipped: CI must test Slurm."""
    result = subprocess.run([str(REPO / "tests" / "cluster" / "start.sh")], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"tests/cluster/start.sh failed:\n{result.stdout}\n{result.stderr}")
    # A clean slate: jobs an earlier run left behind (their working directories are gone). Jobs of a test
    # run going on beside this one are left alone; this run cancels its own jobs when it ends.
    _cancel_jobs(lambda workdir: not Path(workdir).exists())
    yield True
    base = str(tmp_path_factory.getbasetemp().resolve())
    _cancel_jobs(lambda workdir: workdir == base or workdir.startswith(base + os.sep))


def _cancel_jobs(matches) -> None:
    out = subprocess.run(["squeue", "--noheader", f"--user={getpass.getuser()}", "--format=%i|%Z"],
                         capture_output=True, text=True, timeout=30)
    ids = [job for job, _, workdir in (line.partition("|") for line in out.stdout.splitlines())
           if job.strip() and matches(workdir.strip())]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


def squeue_ids() -> set:
    out = subprocess.run(["squeue", "--noheader", "--format=%i"], capture_output=True, text=True, timeout=30)
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


@pytest.fixture
def start_portal(tmp_path):
    factory = PortalFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def start_module_portal(tmp_path_factory):
    factory = PortalFactory(tmp_path_factory.mktemp("portal"))
    yield factory
    factory.close()
