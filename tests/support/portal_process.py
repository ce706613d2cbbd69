"""Real portals for tests and benchmarks: `pilotfish start` in a subprocess on a site config whose runtimes are the
tiny test service and whose cache_dir holds small real test models (PortalProcess, PortalFactory), and the helpers
they use. tests/conftest.py re-exports these and wraps them in fixtures; benchmarks/ imports them from here."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

REPO = Path(__file__).resolve().parents[2]
TINY_SERVICE = REPO / "tests" / "support" / "tiny_service.py"


def wait_for(predicate, timeout: float = 60, interval: float = 0.2, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what} (last value: {last!r})")


def port_open(host: str, port: int) -> bool:
    """Whether something accepts connections on host:port now."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TEST_SPECS = """\
time: {default: 10, max: 120}
partitions:
  cpu:
    default: true
    tiers:
      - name: Tiny
        description: One CPU for test models
        max_model_size_gb: 1
        gpu_count: 0
        cpu_cores: 1
        memory_gb: 0.25
      - name: Big
        description: Anything larger
        max_model_size_gb: null
        gpu_count: 0
        cpu_cores: 2
        memory_gb: 1
  gpu:
    default: false
    tiers:
      - name: Small
        description: One fake A100
        max_model_size_gb: 16
        gpu_count: 1
        gpu_type: a100
        cpu_cores: 1
        memory_gb: 0.25
"""
TEST_MODELS = {"test/tiny": "tiny_llama", "test/slow": "tiny_llama", "test/whisper": "ct2_whisper"}
TEST_ENGINE_FLAGS = ["--delay", "--exit", "--sick-file", "--token-delay"]


def make_site_cache(root: Path) -> Path:
    """A site cache_dir as an admin stages it: small real models in the HF layout and resource_specs.yaml."""
    from tests.support import model_builders

    cache = root / "cache"
    if not (cache / "resource_specs.yaml").exists():
        for repo_id, builder in TEST_MODELS.items():
            model_builders.write_cache_repo(cache / "models", repo_id, getattr(model_builders, builder)())
        (cache / "resource_specs.yaml").write_text(TEST_SPECS)
    return cache




def write_site_config(path: Path, **settings) -> Path:
    """A site config whose runtimes are the tiny test service, with a cache_dir of small real models."""
    tiny = {"command": f"{sys.executable} {TINY_SERVICE}", "allowed_args": TEST_ENGINE_FLAGS}
    data = {
        "cache_dir": str(make_site_cache(path.parent)),
        "runtimes": {"text-generation": tiny, "speech-recognition": tiny},
    }
    data.update(settings)
    for spec in data["runtimes"].values():
        spec.setdefault("allowed_args", TEST_ENGINE_FLAGS)
    path.write_text(yaml.safe_dump(data))
    return path




class PortalProcess:
    """`pilotfish start` in a subprocess, with helpers to call its API."""

    def __init__(self, home: Path, site_config: Path, workers: int = 1, port: int | None = None,
                 env: dict | None = None):
        self.home, self.site_config, self.workers = home, site_config, workers
        self.extra_env = dict(env or {})  # e.g. {"PILOTFISH_POLL_INTERVAL": "5"}: the tests poll every second
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home.parent / f"portal-{self.port}.log"
        self.proc = None

    def start(self):
        env = dict(os.environ, PILOTFISH_HOME=str(self.home), PILOTFISH_SITE_CONFIG=str(self.site_config),
                   PILOTFISH_POLL_INTERVAL="1")
        env.update(self.extra_env)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "portal.cli", "start", "--port", str(self.port),
                                      "--workers", str(self.workers)], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=str(REPO))
        wait_for(self._healthy, timeout=30, what=f"portal on port {self.port} (log {self.log_path})")
        self.token = (self.home / "token").read_text().strip()
        return self

    def _healthy(self):
        if self.proc.poll() is not None:
            pytest.fail(f"portal exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
        try:
            return requests.get(self.url + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def kill(self):
        """Kill the portal at once (SIGKILL to gunicorn and its workers), as a crash would."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def request(self, method, path, token=True, **kwargs):
        headers = kwargs.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {self.token}"
        return requests.request(method, self.url + path, headers=headers, timeout=kwargs.pop("timeout", 60), **kwargs)

    def launch(self, **body):
        body.setdefault("kind", "text-generation")
        body.setdefault("model", "test/tiny")
        return self.request("POST", "/api/services", json=body)

    def service(self, service_id):
        response = self.request("GET", f"/api/services/{service_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_state(self, service_id, states, timeout=90):
        states = {states} if isinstance(states, str) else set(states)
        return wait_for(lambda: (lambda s: s if s["state"] in states else None)(self.service(service_id)),
                        timeout=timeout, interval=0.3, what=f"service {service_id} to reach {sorted(states)}")

    def log_text(self):
        return self.log_path.read_text(errors="replace")


class PortalFactory:
    """Starts portals under one folder and stops them (and their live services) afterwards."""

    def __init__(self, base: Path):
        self.base = base
        self.portals = []

    def __call__(self, scheduler="slurm", workers=1, home=None, site=None, env=None, **settings):
        site = site or write_site_config(self.base / f"site-{scheduler}.yaml", scheduler=scheduler, **settings)
        portal = PortalProcess(home or self.base / "home", site, workers=workers, env=env).start()
        self.portals.append(portal)
        return portal

    def close(self):
        for portal in self.portals:
            if portal.proc.poll() is None:
                try:
                    for service in portal.request("GET", "/api/services?state=LIVE", timeout=10).json()["services"]:
                        portal.request("POST", f"/api/services/{service['id']}/stop", timeout=10)
                except (requests.RequestException, ValueError, KeyError):
                    pass
            portal.stop()
