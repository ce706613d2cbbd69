"""End-to-end fixtures: the real engines (vLLM CPU, llama.cpp, faster-whisper) installed once per machine, the real
models staged into a site cache, and one portal on the real test Slurm running a service of each engine (llama.cpp
twice: SmolLM2, which carries its chat template, on the cluster's second node, and Gemma 3, which does not)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

import pytest
import yaml

from portal.engines import installer
from portal.engines.demo_site import slurm_default_partition, write_site
from tests.conftest import PortalProcess, wait_for

TINY_LLAMA = installer.TINY_LLAMA_REPO_ID
SMOLLM = installer.SMOLLM_REPO_ID
GEMMA = installer.GEMMA_REPO_ID
WHISPER = installer.WHISPER_REPO_ID
ENGINES = ("vllm", "llama-cpp", "whisper")
READY_TIMEOUT = 600  # vLLM takes one to two minutes to start on 2 busy cores
SENTENCE = "The quick brown fox jumps over the lazy dog."  # spoken by espeak-ng for the Whisper tests


@pytest.fixture(scope="session")
def speech(tmp_path_factory):
    """The sentence spoken by espeak-ng, as a WAV file: real speech for Whisper."""
    wav = tmp_path_factory.mktemp("speech") / "fox.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), SENTENCE], check=True, timeout=60)
    return wav


def _install_all() -> None:
    """The three engines (tests/run.sh installs them before pytest starts; here a no-op then)."""
    errors = installer.install_engines(list(ENGINES), progress=lambda line: print(line, flush=True))
    if errors:
        pytest.fail("installing the engines failed:\n" + "\n\n".join(errors))


@pytest.fixture(scope="session")
def engine_site(tmp_path_factory, slurm_cluster):
    """A site config with the installed engines, the staged models and a CPU tier, for the real test Slurm."""
    _install_all()
    models = installer.models_dir()
    installer.stage_gemma(models)
    installer.stage_smollm(models)
    installer.stage_whisper(models)
    installer.stage_tiny_llama(models, installer.venv_python("vllm"))
    partition = slurm_default_partition()
    assert partition, "the test Slurm does not answer sinfo"
    return write_site(tmp_path_factory.mktemp("engine-site"), ENGINES, scheduler="slurm", partition=partition)


class Running:
    """One service per engine, launched together on one portal and RUNNING."""

    def __init__(self, portal: PortalProcess, services: dict):
        self.portal, self.services = portal, services

    def base_url(self, name: str) -> str:
        return f"{self.portal.url}/services/{self.services[name]['id']}/v1"


@contextlib.contextmanager
def services_running(portal: PortalProcess, launches: dict, prefix: str, time: int) -> Iterator[dict]:
    """Launch each of `launches` (name: launch body) as `<prefix>-<name>` on `portal` for `time` minutes, wait until
    each is RUNNING (else fail with its reason and log), yield {name: service}; stop them all at the end."""
    ids = {}
    try:
        for name, body in launches.items():
            response = portal.request("POST", "/api/services", json=dict(body, name=f"{prefix}-{name}", time=time))
            assert response.status_code == 201, response.text
            ids[name] = response.json()["id"]
        services = {}
        for name, service_id in ids.items():
            services[name] = portal.wait_state(service_id, {"RUNNING", "FAILED", "TIMEOUT"}, timeout=READY_TIMEOUT)
            assert services[name]["state"] == "RUNNING", (
                f"{name}: {services[name]['reason']}\n" + portal.request("GET", f"/api/services/{service_id}/logs")
                .json().get("log", "")[-3000:])
        yield services
    finally:
        for service_id in ids.values():
            portal.request("POST", f"/api/services/{service_id}/stop", timeout=30)
        wait_for(lambda: all(portal.service(i)["state"] not in ("SUBMITTED", "PENDING", "STARTING", "RUNNING",
                                                                  "UNHEALTHY", "STOPPING") for i in ids.values()),
                 timeout=120, what=f"the {prefix} services to stop")


def pilotfish_cli(portal: PortalProcess, *arguments: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The `pilotfish` command of this virtualenv against `portal` (its URL and token; no other PILOTFISH_ setting)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PILOTFISH_")}
    env.update(PILOTFISH_URL=portal.url, PILOTFISH_TOKEN=portal.token)
    return subprocess.run([str(Path(sys.executable).parent / "pilotfish"), *arguments], env=env, capture_output=True,
                          text=True, timeout=timeout)


@contextlib.contextmanager
def vllm_portal(tmp_path_factory, name: str, launches: dict, site_settings: Optional[dict] = None,
                stage=()) -> Iterator[tuple]:
    """A portal on the real test Slurm whose site has vLLM only (with `site_settings`), after vLLM is installed and each
    of `stage` (a function of the models folder and vLLM's Python) has staged its model; yields (portal, services)
    with each of `launches` RUNNING (services_running), and stops it all at the end."""
    errors = installer.install_engines(["vllm"], progress=lambda line: print(line, flush=True))
    assert not errors, errors
    for staging in stage:
        staging(installer.models_dir(), installer.venv_python("vllm"))
    partition = slurm_default_partition()
    assert partition, "the test Slurm does not answer sinfo"
    site = write_site(tmp_path_factory.mktemp(f"{name}-site"), ["vllm"], scheduler="slurm", partition=partition)
    if site_settings:
        site.write_text(yaml.safe_dump({**yaml.safe_load(site.read_text()), **site_settings}))
    portal = PortalProcess(tmp_path_factory.mktemp(name) / "home", site).start()
    try:
        with services_running(portal, launches, name, 60) as services:
            yield portal, services
    finally:
        portal.stop()


@pytest.fixture(scope="module")
def running(tmp_path_factory, engine_site):
    home = tmp_path_factory.mktemp("e2e") / "home"
    portal = PortalProcess(home, engine_site).start()
    launches = {"vllm": {"kind": "text-generation", "model": TINY_LLAMA, "engine_args": ["--max-model-len", "256"]},
                # On the second node: every request crosses a network link and a name lookup, as on a cluster.
                "llama-cpp": {"kind": "text-generation", "model": SMOLLM,
                              "resources": {"partition": "remote", "memory_gb": 2}},
                "gemma": {"kind": "text-generation", "model": GEMMA},
                "whisper": {"kind": "speech-recognition", "model": WHISPER}}
    try:
        with services_running(portal, launches, "e2e", 30) as services:
            yield Running(portal, services)
    finally:
        portal.stop()
