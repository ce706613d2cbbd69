"""Stored benchmark runs: start one against a RUNNING text-generation service in a process of its own
(`python -m portal.benchmark RUN_DIR`), follow it, list runs, cancel or delete them. The API, the CLI and the UI
all go through these functions.

Where the load goes, and with which credential: never to an address taken from the request's headers. Through the
portal ("portal"), to the address the request reached this worker at (its own socket's, `own_address`), with a
named API key made for the run alone and revoked when it ends (never the owner's token); straight to the service
("direct"), with the service's own key and its certificate's pin. The credential goes through the child's
environment (readable by its user alone), never its command line (which `ps` shows to everyone).

A run's files live in PILOTFISH_HOME/benchmarks/<id>/: spec.json (what to run, no credential), progress.json, result.json and bench.log, and the process's own record and end mark: the process
is a tracked child (portal/scheduler/processes.py, as the local scheduler runs jobs), so any worker can tell from
these files whether it still runs, stop it, and finish the run's record: the one that started it as soon as the
process exits, any other when the run is read.
"""
from __future__ import annotations

import json
import math
import re
import secrets
import shutil
import socket
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

from flask import current_app

from . import ROOT
from .benchmark import CREDENTIAL_ENV
from .benchmark_requests import APIS, LoadSpec
from .db import db
from .errors import ConflictError, NotFoundError, UnavailableError, ValidationError, check_fields
from .keys import check_key_model, create_api_key, key_cache
from .models import ApiKey, BenchmarkRun, Service, State, utcnow
from .scheduler import processes, scrubbed_environment
from .services import get_service

RUNNING, DONE, FAILED, CANCELLED = "RUNNING", "DONE", "FAILED", "CANCELLED"
TARGETS = ("portal", "direct")
FIELDS = {"service", "clients", "requests", "prompt_len", "max_tokens", "stream", "api", "ignore_eos", "timeout",
          "sweep", "ttft_target", "target"}
MAX_CLIENTS = 1024
MAX_REQUESTS = 20000
MAX_TOKENS = 32768
MAX_SWEEP_POINTS = 12
LOG_NAME = "bench.log"


@dataclass
class BenchmarkRequest:
    service: str
    clients: int
    requests: int
    prompt_len: int = 128
    max_tokens: int = 64
    stream: bool = True
    api: str = "completions"
    ignore_eos: bool = True
    timeout: float = 300.0
    sweep: Optional[List[int]] = None
    ttft_target: Optional[float] = None
    target: str = "portal"


def _integer(body: dict, key: str, default, low: int, high: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(key, f"expected a whole number from {low} to {high}, got {value!r}")
    return value


def _flag(body: dict, key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise ValidationError(key, f"expected true or false, got {value!r}")
    return value


def parse_benchmark_request(body) -> BenchmarkRequest:
    """Check a benchmark request field by field; ValidationError names the first bad field."""
    check_fields(body, FIELDS)
    service = body.get("service")
    if not isinstance(service, str) or not service.strip():
        raise ValidationError("service", "required: a service id (or unique prefix), or the model it serves")
    sweep = body.get("sweep")
    if sweep is not None:
        if (not isinstance(sweep, list) or not sweep or len(sweep) > MAX_SWEEP_POINTS
                or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_CLIENTS for n in sweep)):
            raise ValidationError("sweep", f"expected a list of 1 to {MAX_SWEEP_POINTS} client counts from 1 to "
                                           f"{MAX_CLIENTS}, such as [1, 2, 4, 8]")
        sweep = sorted(set(sweep))
    clients = _integer(body, "clients", sweep[0] if sweep else None, 1, MAX_CLIENTS)
    requests = _integer(body, "requests", None, 1, MAX_REQUESTS)
    if sweep is None and requests < clients:
        raise ValidationError("requests", f"expected at least as many requests as clients ({clients}), so every "
                                          "client sends one and the concurrency is the one asked for")
    ttft_target = body.get("ttft_target")
    if sweep is not None:
        if isinstance(ttft_target, bool) or not isinstance(ttft_target, (int, float)) \
                or not math.isfinite(ttft_target) or ttft_target <= 0:
            raise ValidationError("ttft_target", "a sweep needs a target: the highest time to first token (p95, "
                                                 f"seconds) a load may have, got {ttft_target!r}")
    elif ttft_target is not None:
        raise ValidationError("ttft_target", "only used with sweep")
    stream = _flag(body, "stream", True)
    if sweep is not None and not stream:
        raise ValidationError("stream", "a sweep compares time to first token, which needs streaming")
    api = body.get("api", "completions")
    if api not in APIS:
        raise ValidationError("api", f"expected one of {', '.join(APIS)}, got {api!r}")
    target = body.get("target", "portal")
    if target not in TARGETS:
        raise ValidationError("target", f"expected one of {', '.join(TARGETS)}, got {target!r}")
    timeout = body.get("timeout", 300.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 1 <= timeout <= 3600:
        raise ValidationError("timeout", f"expected seconds from 1 to 3600, got {timeout!r}")
    return BenchmarkRequest(
        service=service.strip(), clients=clients, requests=requests,
        prompt_len=_integer(body, "prompt_len", 128, 1, MAX_TOKENS),
        max_tokens=_integer(body, "max_tokens", 64, 1, MAX_TOKENS), stream=stream, api=api,
        ignore_eos=_flag(body, "ignore_eos", True), timeout=float(timeout), sweep=sweep,
        ttft_target=float(ttft_target) if ttft_target is not None else None, target=target)


def resolve_service(ref: str) -> Service:
    """The RUNNING text-generation service named by id (or unique prefix), or serving the model `ref`."""
    service = None
    if re.fullmatch(r"[0-9a-f]{1,16}", ref):
        try:
            service = get_service(ref)
        except NotFoundError:
            service = None
    if service is None:
        service = Service.query.filter_by(model=ref, state=State.RUNNING).order_by(Service.created_at.desc()).first()
    if service is None:
        raise NotFoundError(f"no service {ref!r} (no id, id prefix or running model matches)")
    if service.kind != "text-generation":
        raise ValidationError("service", f"service {service.id} is {service.kind}: benchmarks measure "
                                         "text-generation services")
    if service.state != State.RUNNING:
        raise ConflictError(f"service {service.id} is {service.state}: a benchmark needs a RUNNING service")
    return service


def _home() -> Path:
    return current_app.config["PILOTFISH"].home


def run_dir(run_id: str) -> Path:
    return _home() / "benchmarks" / run_id


def own_address(environ) -> Optional[tuple]:
    """(host, port) this worker accepted the request on: its listening socket's own address (the WSGI bridge takes
    SERVER_NAME and SERVER_PORT from the connection, never from a Host header), or None when it is not an IP one."""
    host, port = environ.get("SERVER_NAME") or "", environ.get("SERVER_PORT") or ""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return host, int(port)
    except (OSError, ValueError):
        return None


def _portal_base(address: Optional[tuple]) -> str:
    if address is None:
        raise UnavailableError("the portal cannot tell its own address here: benchmark with target \"direct\"")
    host, port = address
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def credential_name(run_id: str) -> str:
    """The name of the API key a run through the portal uses (revoked when the run ends)."""
    return f"benchmark {run_id}"


def _revoke_credential(run_id: str) -> None:
    revoked = ApiKey.query.filter_by(name=credential_name(run_id), revoked_at=None).update(
        {"revoked_at": utcnow()}, synchronize_session=False)
    db.session.commit()
    if revoked:
        key_cache().forget()


def start(body, address: Optional[tuple], principal: Optional[str] = None) -> BenchmarkRun:
    """Validate, record and start a benchmark. `address` is the portal's own (host, port) (`own_address`), which a
    run through the portal sends its load to; `principal` who asks (a key limited to models benchmarks only those)."""
    wanted = parse_benchmark_request(body)
    service = resolve_service(wanted.service)
    check_key_model(principal, service.model, "benchmark")
    for other in BenchmarkRun.query.filter_by(service_id=service.id, state=RUNNING).all():
        if refresh(other).state == RUNNING:
            raise ConflictError(f"benchmark {other.id} is still running against service {service.id}: wait for it "
                                "or cancel it (two loads at once would measure neither)")
    run_id = secrets.token_hex(6)
    pin = None
    if wanted.target == "portal":
        base_url = f"{_portal_base(address)}/services/{service.id}/v1"
        credential = None  # made below, once the run is known to start
    else:
        scheme = "https" if service.tls_fingerprint else "http"
        base_url = f"{scheme}://{service.host}:{service.port}/v1"
        credential, pin = service.api_key, service.tls_fingerprint
    load = LoadSpec(base_url=base_url, model=service.model, clients=wanted.clients, requests=wanted.requests,
                    prompt_len=wanted.prompt_len, max_tokens=wanted.max_tokens, stream=wanted.stream,
                    api=wanted.api, ignore_eos=wanted.ignore_eos, timeout=wanted.timeout, tls_pin=pin)
    run = BenchmarkRun(id=run_id, service_id=service.id, service_name=service.name, kind=service.kind,
                       model=service.model, tier=service.tier, state=RUNNING,
                       mode="sweep" if wanted.sweep else "load", target=wanted.target,
                       params_json=json.dumps({key: value for key, value in asdict(wanted).items()
                                               if key != "service"}))
    folder = run_dir(run.id)
    folder.mkdir(parents=True, mode=0o700)
    (folder / "spec.json").write_text(json.dumps({"load": asdict(load), "sweep": wanted.sweep,
                                                  "ttft_target": wanted.ttft_target}))
    try:
        if credential is None:
            credential = create_api_key(credential_name(run.id), scopes=["use"], models=[service.model])[1]
        env = {**scrubbed_environment(), CREDENTIAL_ENV: credential}
        child = processes.start([sys.executable, "-m", "portal.benchmark", str(folder)], folder, LOG_NAME, env,
                                cwd=ROOT, name=f"benchmark-{run.id}")
    except BaseException:
        _revoke_credential(run.id)
        raise
    run.pid, run.pid_started = child.pid, child.record["create_time"]
    db.session.add(run)
    db.session.commit()
    app = current_app._get_current_object()
    threading.Thread(target=_finish_when_done, args=(app, child, run.id), name=f"benchmark-{run.id}",
                     daemon=True).start()
    return run


def _finish_when_done(app, child: processes.Child, run_id: str) -> None:
    child.wait()
    with app.app_context():
        try:
            run = db.session.get(BenchmarkRun, run_id)
            if run is not None:
                refresh(run)
        finally:
            db.session.remove()


def _alive(run: BenchmarkRun) -> bool:
    """Whether the run's process still runs: its record in the run's folder (or, for a run started before there
    were records, the pid and start time stored with it)."""
    processes.reap()
    record = processes.read_record(run_dir(run.id))
    if record is None and run.pid:
        record = {"pid": run.pid, "create_time": run.pid_started}
    return processes.alive(record)


def summary_of(result: dict) -> dict:
    """The figures without the per-request lists (what listings and comparisons need)."""
    if result.get("mode") == "sweep":
        return {**result, "points": [{k: v for k, v in point.items() if k != "per_request"}
                                     for point in result.get("points", [])]}
    return {key: value for key, value in result.items() if key != "per_request"}


def _end(run: BenchmarkRun, state: str, **fields) -> BenchmarkRun:
    """Record the end of a run once, whichever worker gets there first."""
    run_id = run.id
    BenchmarkRun.query.filter_by(id=run_id, state=RUNNING).update({"state": state, "finished_at": utcnow(), **fields},
                                                                  synchronize_session=False)
    db.session.commit()  # expires `run`: it is read again, as whoever ended it left it
    _revoke_credential(run_id)
    return run


def refresh(run: BenchmarkRun) -> BenchmarkRun:
    """Bring a RUNNING run up to date: its result if the process wrote one, a failure if the process is gone."""
    if run.state != RUNNING:
        return run
    folder = run_dir(run.id)
    try:
        result = json.loads((folder / "result.json").read_text())
    except (FileNotFoundError, ValueError):
        result = None
    if isinstance(result, dict):
        if "error" in result:
            return _end(run, FAILED, error=str(result["error"]))
        return _end(run, DONE, result_json=json.dumps(result), summary_json=json.dumps(summary_of(result)))
    if _alive(run):
        return run
    try:
        log_tail = (folder / LOG_NAME).read_text(errors="replace").strip().splitlines()[-3:]
    except OSError:
        log_tail = []
    return _end(run, FAILED, error="the benchmark process ended without a result"
                + (": " + " | ".join(log_tail) if log_tail else ""))


def progress(run: BenchmarkRun) -> Optional[dict]:
    if run.state != RUNNING:
        return None
    try:
        return json.loads((run_dir(run.id) / "progress.json").read_text())
    except (FileNotFoundError, ValueError):
        return {"done": 0, "total": None}


def get_run(id_or_prefix: str) -> BenchmarkRun:
    if not re.fullmatch(r"[0-9a-f]{1,16}", id_or_prefix or ""):
        raise NotFoundError(f"no benchmark {id_or_prefix!r}")
    run = db.session.get(BenchmarkRun, id_or_prefix)
    if run is None:
        matches = BenchmarkRun.query.filter(BenchmarkRun.id.startswith(id_or_prefix)).limit(5).all()
        if not matches:
            raise NotFoundError(f"no benchmark {id_or_prefix!r}")
        if len(matches) > 1:
            raise ValidationError("id", f"{id_or_prefix!r} matches several benchmarks: "
                                        f"{', '.join(m.id for m in matches)}")
        run = matches[0]
    return refresh(run)


def list_runs(service: Optional[str] = None, model: Optional[str] = None) -> List[BenchmarkRun]:
    """Runs, newest first, optionally of one service (id or prefix) or one model."""
    query = BenchmarkRun.query
    if service:
        query = query.filter(BenchmarkRun.service_id.startswith(service))
    if model:
        query = query.filter_by(model=model)
    return [refresh(run) for run in query.order_by(BenchmarkRun.created_at.desc()).all()]


def cancel_or_delete(run: BenchmarkRun) -> str:
    """Cancel a running benchmark (its process is stopped), or delete an ended one with its files."""
    if run.state == RUNNING:
        _end(run, CANCELLED, error="cancelled")  # first, so the process ending is not taken for a failure
        processes.stop(run_dir(run.id), "cancelled")
        return "cancelled"
    shutil.rmtree(run_dir(run.id), ignore_errors=True)
    db.session.delete(run)
    db.session.commit()
    return "deleted"
