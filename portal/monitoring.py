"""Monitoring targets for a site Prometheus: file-based service discovery files in PILOTFISH_HOME/prometheus/.

`service-<id>.json` exists while a service is RUNNING (or UNHEALTHY): its engine's own /metrics on the node, and
the exporters its job started (node, DCGM, ... from the site config's `exporters`, see portal/site.py, listed by
the job in exporters.json). `portal.json` names the portal's /metrics (which needs the portal token or an API key).
The reconciler rewrites a file only when its content changes and removes the files of services that ended.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional
from urllib.parse import urlsplit

from . import metrics
from .connection import portal_url
from .db import db
from .models import Service, State
from .site import EXPORTER_NAME, METRICS_PATH

log = logging.getLogger(__name__)

FOLDER = "prometheus"
EXPORTERS_FILE = "exporters.json"  # written by the job script (templates/jobs/base.sh.j2)


# --- discovery files -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServiceTarget:
    """What a discovery file says about one service (read from its row before the cycle commits)."""
    id: str
    name: str
    kind: str
    model: str
    tier: Optional[str]
    node: Optional[str]
    host: str
    port: int
    job_dir: str


def serving_targets(services) -> List[ServiceTarget]:
    return [ServiceTarget(service.id, service.name, service.kind, service.model, service.tier, service.node,
                          service.host, service.port, service.run_dir)
            for service in services if service.state in State.ROUTABLE and service.port and service.host]


def read_exporters(job_dir: str) -> Optional[List[dict]]:
    """The exporters a job started (exporters.json), or None while the job has not written the file."""
    try:
        data = json.loads((Path(job_dir) / EXPORTERS_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return []
    found = []
    for entry in data if isinstance(data, list) else []:
        try:
            name, host, port = str(entry["name"]), str(entry["host"]), int(entry["port"])
            path = str(entry.get("metrics_path") or "/metrics")
        except (KeyError, TypeError, ValueError):
            continue
        if EXPORTER_NAME.fullmatch(name) and host and 0 < port < 65536 and METRICS_PATH.fullmatch(path):
            found.append({"name": name, "host": host, "port": port, "metrics_path": path})
    return found


def discovery_groups(target: ServiceTarget, exporters: Iterable[dict] = ()) -> List[dict]:
    """Prometheus file_sd target groups for one service: its engine, then its exporters."""
    labels = {"pilotfish_service": target.id, "pilotfish_service_name": target.name, "kind": target.kind,
              "model": target.model, "tier": target.tier or "", "node": target.node or target.host}
    groups = [{"targets": [f"{target.host}:{target.port}"],
               "labels": {**labels, "pilotfish_target": "engine", "__metrics_path__": "/metrics"}}]
    for exporter in exporters:
        groups.append({"targets": [f"{exporter['host']}:{exporter['port']}"],
                       "labels": {**labels, "pilotfish_target": exporter["name"],
                                  "__metrics_path__": exporter["metrics_path"]}})
    return groups


def _write(path: Path, text: str) -> None:
    """Atomically, so Prometheus never reads half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


class DiscoveryFiles:
    """PILOTFISH_HOME/prometheus/service-<id>.json for the services that serve, kept in step by the reconciler."""

    def __init__(self, home: Path):
        self.folder = Path(home) / FOLDER
        self._written: Optional[Dict[str, str]] = None  # None: files on disk not known yet (first sync, an error)
        self._exporters: Dict[str, List[dict]] = {}  # exporters.json is written once, before the server starts
        self._texts: Dict[ServiceTarget, str] = {}  # each target's file content, made once

    def path_of(self, service_id: str) -> Path:
        return self.folder / f"service-{service_id}.json"

    def sync(self, targets: Iterable[ServiceTarget]) -> None:
        wanted: Dict[str, str] = {}
        texts: Dict[ServiceTarget, str] = {}
        for target in targets:
            text = self._texts.get(target)
            if text is None:
                exporters = self._exporters.get(target.id)
                if exporters is None:  # read once: a serving job wrote the file (if at all) before its server started
                    exporters = self._exporters[target.id] = read_exporters(target.job_dir) or []
                text = json.dumps(discovery_groups(target, exporters), indent=2)
            wanted[f"service-{target.id}.json"] = texts[target] = text
        self._texts = texts
        try:
            self.folder.mkdir(mode=0o755, exist_ok=True)
            for name, text in wanted.items():
                if (self._written or {}).get(name) != text or not (self.folder / name).exists():
                    _write(self.folder / name, text)
            if self._written is None or set(wanted) != set(self._written):  # drop files of ended services
                for path in self.folder.glob("service-*.json"):
                    if path.name not in wanted:
                        path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not update the Prometheus discovery files in %s: %s", self.folder, exc)
            self._written = None
            return
        self._written = wanted
        self._exporters = {key: value for key, value in self._exporters.items()
                           if self.path_of(key).name in wanted}


def write_portal_target(home: Path) -> Optional[Path]:
    """prometheus/portal.json: the portal's own /metrics, at the address in connection.json."""
    url = portal_url(home)
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        address = parts.netloc
    except ValueError:
        return None
    if not address:
        return None
    folder = Path(home) / FOLDER
    path = folder / "portal.json"
    groups = [{"targets": [address], "labels": {"pilotfish_target": "portal",
                                                "__metrics_path__": parts.path.rstrip("/") + "/metrics"}}]
    try:
        folder.mkdir(mode=0o755, exist_ok=True)
        _write(path, json.dumps(groups, indent=2))
    except OSError as exc:
        log.warning("could not write %s: %s", path, exc)
        return None
    return path


class CycleMonitor:
    """What the reconciler records after each cycle: discovery files and the cycle's metrics."""

    def __init__(self, home: Path):
        self.discovery = DiscoveryFiles(home)

    def after_cycle(self, report, served: List[ServiceTarget], recount: bool = True) -> None:
        """Sync the discovery files and record the cycle; services are counted by state only when `recount` (the
        reconciler knows when they may have changed)."""
        self.discovery.sync(served)
        states = None
        if recount:
            states = dict(db.session.query(Service.state, db.func.count(Service.id)).group_by(Service.state).all())
        metrics.instruments().record_cycle(report.seconds, report.scheduler_calls, report.scheduler_ok, states)
