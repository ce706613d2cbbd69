"""The portals the proxy benchmark compares: --configs entries (class:workers[:threads][@source tree]) and a
portal started under one of them, on the test suite's portal helpers (tests/support/portal_process.py)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import requests

from tests.support.portal_process import PortalProcess

ROOT = Path(__file__).resolve().parents[2]


def parse_configs(text: str) -> List[dict]:
    configs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        item, _, tree = item.partition("@")
        parts = item.split(":")
        worker_class = parts[0]
        if worker_class == "sync":
            raise SystemExit("--configs: sync workers serialize streams; not a candidate")
        workers = int(parts[1]) if len(parts) > 1 else 2
        threads = int(parts[2]) if len(parts) > 2 else 32
        label = f"portal {worker_class} {workers}x{threads}" if worker_class == "gthread" else f"portal {worker_class} {workers}w"
        if tree:
            label += f" @{Path(tree).name}"
        configs.append({"worker_class": worker_class, "workers": workers, "threads": threads, "label": label,
                        "tree": tree or None})
    return configs


class BenchPortal(PortalProcess):
    """`pilotfish start` under one gunicorn configuration (PortalProcess, but with the production poll interval
    instead of the tests' 1 s, the worker class from the config, another source tree if it names one, and errors
    instead of pytest failures)."""

    def __init__(self, home: Path, site: Path, config: dict, poll_interval: str):
        super().__init__(home, site, workers=config["workers"])
        self.config, self.poll_interval = config, poll_interval
        slug = config["label"].replace(" ", "-")
        self.log_path = home.parent / f"{slug}-{self.port}.log"

    def start(self):
        config = self.config
        env = dict(os.environ, PILOTFISH_HOME=str(self.home), PILOTFISH_SITE_CONFIG=str(self.site_config),
                   PILOTFISH_POLL_INTERVAL=self.poll_interval, PILOTFISH_WORKER_CLASS=config["worker_class"],
                   PILOTFISH_THREADS=str(config["threads"]))
        tree = config.get("tree")
        if tree:  # another source tree of the portal (e.g. a baseline checkout), compared in the same run
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "portal.cli", "start", "--port", str(self.port),
                                      "--workers", str(self.workers)], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=tree or str(ROOT))
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{config['label']} exited with {self.proc.returncode}:\n"
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{config['label']} did not answer /health within 60 s (log {self.log_path})")
            time.sleep(0.2)
        self.token = (self.home / "token").read_text().strip()
        return self

    def wait_running(self, service_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            body = self.service(service_id)
            if body["state"] == "RUNNING":
                return body
            if body["state"] in ("FAILED", "STOPPED", "TIMEOUT", "CANCELLED") or time.monotonic() > deadline:
                raise RuntimeError(f"service {service_id} is {body['state']} ({body.get('reason')})")
            time.sleep(0.2)
