"""Database tables: services, their state events, portal-wide conditions, API keys, login sessions, the model
inventory, downloads and benchmark runs; the Files and Batches API's are portal/batches/records.py's."""
from __future__ import annotations

import json
from typing import Optional

from .db import db
from .lifetimes import expected_stop
from .states import State  # the state machine lives in portal.states; State stays importable from here


from .times import iso, utcnow  # noqa: F401  (importable from here, as they always were)


class Service(db.Model):
    __tablename__ = "services"

    id = db.Column(db.String(16), primary_key=True)
    name = db.Column(db.String(100), nullable=False)
    kind = db.Column(db.String(40), nullable=False)
    engine = db.Column(db.String(40))  # vllm, llama-cpp, whisper (see catalog.kinds)
    health_path = db.Column(db.String(200))  # what the reconciler probes
    model = db.Column(db.String(300), nullable=False)
    revision = db.Column(db.String(100))
    tier = db.Column(db.String(100))
    state = db.Column(db.String(16), nullable=False, index=True)
    reason = db.Column(db.Text)
    scheduler = db.Column(db.String(16), nullable=False)
    job_id = db.Column(db.String(40))
    job_dir = db.Column(db.String(500), nullable=False)
    resources_json = db.Column(db.Text, nullable=False, default="{}")
    engine_args_json = db.Column(db.Text, nullable=False, default="[]")
    adapters_json = db.Column(db.Text, nullable=False, default="[]", server_default="[]")  # LoRA adapters it serves
    time_limit = db.Column(db.Integer, nullable=False)  # minutes
    api_key = db.Column(db.String(100), nullable=False)
    tls_fingerprint = db.Column(db.String(64))  # SHA-256 of the service's certificate (portal/service_tls.py)
    host = db.Column(db.String(255))
    port = db.Column(db.Integer)
    node = db.Column(db.String(255))
    stop_requested = db.Column(db.Boolean, nullable=False, default=False)
    health_failures = db.Column(db.Integer, nullable=False, default=0)
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    submitted_at = db.Column(db.DateTime)
    job_started_at = db.Column(db.DateTime)
    endpoint_at = db.Column(db.DateTime)
    ready_at = db.Column(db.DateTime)
    ended_at = db.Column(db.DateTime)
    last_activity = db.Column(db.DateTime)  # the last proxied request (kept fresh while one is in flight)
    busy_seconds = db.Column(db.Float, nullable=False, default=0.0, server_default="0")  # with a request in flight
    # in any worker (portal/usage_ledger.py; the idle share of portal/service_cost.py); busy_spells_json: the spells
    # counted in the last BUSY_MEMORY seconds ([start, end], epoch seconds), so that another worker's overlapping ones
    # add only what they add to them
    busy_spells_json = db.Column(db.Text, nullable=False, default="[]", server_default="[]")
    # How long it lives unused (portal/lifetimes.py): stopped after idle_timeout minutes without a request, or once
    # its lease (seconds) was neither renewed nor used for that long. stop_reason: why the portal was asked to stop it.
    idle_timeout = db.Column(db.Integer)
    lease_seconds = db.Column(db.Integer)
    lease_renewed_at = db.Column(db.DateTime)
    stop_reason = db.Column(db.Text)
    # Renewal (portal/lifetimes.py): a successor job takes over before the current one's time limit, until renew_until
    # (None: until stopped). generation: the current job's number (1: the first); earlier and next ones: `jobs`.
    renew = db.Column(db.Boolean, nullable=False, default=False)
    renew_until = db.Column(db.DateTime)
    generation = db.Column(db.Integer, nullable=False, default=1)
    # Replicas (portal/replicas.py): jobs serving it besides its current one, between replicas_min and replicas_max
    # jobs in all, added when requests in flight per serving job stay above target_in_flight (None: one job).
    replicas_min = db.Column(db.Integer)
    replicas_max = db.Column(db.Integer)
    target_in_flight = db.Column(db.Integer)

    events = db.relationship("Event", backref="service", cascade="all, delete-orphan",
                             order_by="Event.id", lazy="select")
    jobs = db.relationship("ServiceJob", backref="service", cascade="all, delete-orphan",
                           order_by="ServiceJob.generation", lazy="select")

    def serving_jobs(self) -> int:
        """How many jobs answer for it: its current one while RUNNING, and each replica that answered."""
        return (self.state == State.RUNNING) + sum(job.serving for job in self.jobs)

    @property
    def run_dir(self) -> str:
        """The folder of the current job (its script, log, endpoint and exit code): the service's own folder for the
        first, a folder inside it for each renewal's."""
        return generation_dir(self.job_dir, self.generation or 1)

    @property
    def resources(self) -> dict:
        return json.loads(self.resources_json or "{}")

    @property
    def engine_args(self) -> list:
        return json.loads(self.engine_args_json or "[]")

    @property
    def adapters(self) -> list:
        """The names of the LoRA adapters it serves beside its model (each also a model requests may name)."""
        return json.loads(self.adapters_json or "[]")

    @property
    def is_live(self) -> bool:
        return self.state in State.LIVE

    def phase_seconds(self) -> dict:
        """How long each start-up phase took, in seconds (None while a phase has not ended)."""
        def span(start, end):
            return round((end - start).total_seconds(), 3) if start and end else None
        return {
            "queued": span(self.submitted_at, self.job_started_at),
            "job_to_endpoint": span(self.job_started_at, self.endpoint_at),
            "endpoint_to_healthy": span(self.endpoint_at, self.ready_at),
            "total": span(self.submitted_at, self.ready_at),
        }

    def to_dict(self, with_events: bool = False) -> dict:
        data = {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "engine": self.engine,
            "model": self.model,
            "revision": self.revision,
            "tier": self.tier,
            "state": self.state,
            "reason": self.reason,
            "scheduler": self.scheduler,
            "job_id": self.job_id,
            "node": self.node,
            "endpoint": {"host": self.host, "port": self.port} if self.port else None,
            "resources": self.resources,
            "engine_args": self.engine_args,
            "adapters": self.adapters,
            "time_limit": self.time_limit,
            "created_at": iso(self.created_at),
            "submitted_at": iso(self.submitted_at),
            "job_started_at": iso(self.job_started_at),
            "ready_at": iso(self.ready_at),
            "ended_at": iso(self.ended_at),
            "last_activity": iso(self.last_activity),
            "phases": self.phase_seconds(),
            "idle_timeout": self.idle_timeout,
            "lease": self.lease_seconds,
            "lease_renewed_at": iso(self.lease_renewed_at),
            "renew": self.renew,
            "renew_until": iso(self.renew_until),
            "generation": self.generation,
            "replicas": {"min": self.replicas_min, "max": self.replicas_max, "target_in_flight": self.target_in_flight,
                         "serving": self.serving_jobs()} if self.replicas_max else None,
        }
        expected = expected_stop(self)
        data["stops_at"], data["stop_reason_expected"] = (iso(expected[0]), expected[1]) if expected else (None, None)
        if with_events:
            data["events"] = [event.to_dict() for event in self.events]
            data["jobs"] = [job.to_dict() for job in self.jobs]
        return data


def generation_dir(job_dir: str, generation: int) -> str:
    """The folder of a service's job of `generation`: the service's folder for the first, `generation-N` inside it
    for each later one."""
    return job_dir if generation <= 1 else f"{job_dir}/generation-{generation}"


class ServiceJob(db.Model):
    """A job of a service other than its current one: a renewal's successor on its way up, a replica (starting, or
    serving once `ready_at` is set), or a job draining its open requests (a replaced or removed one), then ended or
    failed. The current job's fields are the service's own."""
    __tablename__ = "service_jobs"
    SUCCESSOR, REPLICA, DRAINING, ENDED, FAILED = "successor", "replica", "draining", "ended", "failed"
    LIVE_PHASES = (SUCCESSOR, REPLICA, DRAINING)

    id = db.Column(db.Integer, primary_key=True)
    service_id = db.Column(db.String(16), db.ForeignKey("services.id", ondelete="CASCADE"), index=True, nullable=False)
    generation = db.Column(db.Integer, nullable=False)
    phase = db.Column(db.String(16), nullable=False)
    job_id = db.Column(db.String(40))
    node = db.Column(db.String(255))
    host = db.Column(db.String(255))
    port = db.Column(db.Integer)
    time_limit = db.Column(db.Integer, nullable=False)  # minutes
    health_failures = db.Column(db.Integer, nullable=False, default=0)
    submitted_at = db.Column(db.DateTime)
    job_started_at = db.Column(db.DateTime)
    endpoint_at = db.Column(db.DateTime)
    ready_at = db.Column(db.DateTime)
    drain_until = db.Column(db.DateTime)
    ended_at = db.Column(db.DateTime)
    reason = db.Column(db.Text)

    # What a job is, on the service row (its current job) and here alike: swapped at a handover.
    JOB_FIELDS = ("generation", "job_id", "node", "host", "port", "time_limit", "health_failures", "submitted_at",
                  "job_started_at", "endpoint_at", "ready_at")

    @property
    def run_dir(self) -> str:
        return generation_dir(self.service.job_dir, self.generation)

    @property
    def is_live(self) -> bool:
        return self.phase in self.LIVE_PHASES

    @property
    def serving(self) -> bool:
        """A replica that answered its health check: the proxies route to it."""
        return self.phase == self.REPLICA and self.ready_at is not None and bool(self.port)

    def to_dict(self) -> dict:
        return {"generation": self.generation, "phase": self.phase, "job_id": self.job_id, "node": self.node,
                "time_limit": self.time_limit, "submitted_at": iso(self.submitted_at),
                "job_started_at": iso(self.job_started_at), "endpoint_at": iso(self.endpoint_at),
                "ready_at": iso(self.ready_at), "drain_until": iso(self.drain_until), "ended_at": iso(self.ended_at), "reason": self.reason}


class Event(db.Model):
    __tablename__ = "events"

    id = db.Column(db.Integer, primary_key=True)
    service_id = db.Column(db.String(16), db.ForeignKey("services.id", ondelete="CASCADE"), index=True, nullable=False)
    at = db.Column(db.DateTime, nullable=False, default=utcnow)
    from_state = db.Column(db.String(16))
    to_state = db.Column(db.String(16), nullable=False)
    reason = db.Column(db.Text)

    def to_dict(self) -> dict:
        return {"at": iso(self.at), "from": self.from_state, "to": self.to_state, "reason": self.reason}


class Condition(db.Model):
    """A portal-wide condition (for example the scheduler being unreachable), shared by all workers."""
    __tablename__ = "conditions"

    name = db.Column(db.String(40), primary_key=True)
    ok = db.Column(db.Boolean, nullable=False, default=True)
    message = db.Column(db.Text)
    since = db.Column(db.DateTime, nullable=False, default=utcnow)
    checked_at = db.Column(db.DateTime, nullable=False, default=utcnow)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "message": self.message, "since": iso(self.since), "checked_at": iso(self.checked_at)}


KEY_SCOPES = ("use", "read", "launch")  # what a named key may do (portal/keys.py), in the order they are listed


class ApiKey(db.Model):
    """A named key for scripts and collaborators; only its SHA-256 is stored."""
    __tablename__ = "api_keys"

    id = db.Column(db.String(16), primary_key=True)
    name = db.Column(db.String(60), nullable=False)
    key_hash = db.Column(db.String(64), nullable=False, unique=True, index=True)
    hint = db.Column(db.String(16), nullable=False)
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    revoked_at = db.Column(db.DateTime)
    # What it may do (portal/keys.py): scopes (comma-separated: use, read, launch), the models it may call (a JSON
    # list; null: any), its end, its rates (null: unlimited), and its last use (written off the request path).
    scopes = db.Column(db.String(40), nullable=False, default="use,read,launch", server_default="use,read,launch")
    models_json = db.Column(db.Text)
    expires_at = db.Column(db.DateTime)
    requests_per_minute = db.Column(db.Integer)
    tokens_per_minute = db.Column(db.Integer)
    last_used_at = db.Column(db.DateTime)

    @property
    def scope_list(self) -> list:
        written = set((self.scopes or "").split(","))
        return [scope for scope in KEY_SCOPES if scope in written]

    @property
    def model_list(self) -> Optional[list]:
        return json.loads(self.models_json) if self.models_json else None

    def to_dict(self) -> dict:
        """The key as the API, the pages and the CLI show it (never its secret)."""
        return {"id": self.id, "name": self.name, "hint": self.hint, "created_at": iso(self.created_at),
                "scopes": self.scope_list, "models": self.model_list, "expires_at": iso(self.expires_at),
                "expired": self.expires_at is not None and self.expires_at <= utcnow(),
                "requests_per_minute": self.requests_per_minute, "tokens_per_minute": self.tokens_per_minute,
                "last_used_at": iso(self.last_used_at)}


class Usage(db.Model):
    """What one principal ("owner", "key:<name>") asked of one service's model on one day (UTC): aggregates
    added to by portal/usage_ledger.py off the request path (never a row per request), read by
    portal/usage_report.py."""
    __tablename__ = "usage"

    day = db.Column(db.String(10), primary_key=True)  # YYYY-MM-DD
    principal = db.Column(db.String(80), primary_key=True)
    model = db.Column(db.String(300), primary_key=True)
    service_id = db.Column(db.String(40), primary_key=True)  # a service's id, or a batch's (batch_<hex>)
    requests = db.Column(db.Integer, nullable=False, default=0, server_default="0")
    errors = db.Column(db.Integer, nullable=False, default=0, server_default="0")
    prompt_tokens = db.Column(db.BigInteger, nullable=False, default=0, server_default="0")
    completion_tokens = db.Column(db.BigInteger, nullable=False, default=0, server_default="0")


class LoginSession(db.Model):
    """A browser's login session (portal/sessions.py): the cookie holds a random id, this table its SHA-256, so
    logging out, idling or a new portal token ends it on the server."""
    __tablename__ = "sessions"

    id = db.Column(db.String(64), primary_key=True)  # SHA-256 of the cookie's value
    csrf = db.Column(db.String(64), nullable=False)  # the session's CSRF token
    token_id = db.Column(db.String(16), nullable=False)  # the portal token it was opened with (auth.token_id)
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    last_seen = db.Column(db.DateTime, nullable=False, default=utcnow)  # written at most once a minute
    expires_at = db.Column(db.DateTime, nullable=False)  # the absolute end (a week, or the Open OnDemand job's end)
    revoked_at = db.Column(db.DateTime)  # logged out


class ModelRecord(db.Model):
    """One model repository of the inventory (cache_dir and home_dir), as last scanned."""
    __tablename__ = "model_inventory"

    repo_id = db.Column(db.String(200), primary_key=True)
    kind = db.Column(db.String(40))
    size_bytes = db.Column(db.BigInteger, nullable=False, default=0)
    data_json = db.Column(db.Text, nullable=False)
    scanned_at = db.Column(db.DateTime, nullable=False, default=utcnow)

    def to_dict(self) -> dict:
        import json
        return {**json.loads(self.data_json), "scanned_at": iso(self.scanned_at)}


class DownloadRecord(db.Model):
    """A model download, shared by all workers: the worker running it writes its progress here."""
    __tablename__ = "downloads"

    id = db.Column(db.String(32), primary_key=True)
    repo_id = db.Column(db.String(200), nullable=False)
    state = db.Column(db.String(16), nullable=False)
    data_json = db.Column(db.Text, nullable=False)
    cancel_requested = db.Column(db.Boolean, nullable=False, default=False)
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    updated_at = db.Column(db.DateTime, nullable=False, default=utcnow)

    def to_dict(self) -> dict:
        import json
        return json.loads(self.data_json)


class BenchmarkRun(db.Model):
    """A load benchmark of one service; kept after the service is gone, so runs of a model and tier compare."""
    __tablename__ = "benchmark_runs"

    id = db.Column(db.String(16), primary_key=True)
    service_id = db.Column(db.String(16), nullable=False, index=True)
    service_name = db.Column(db.String(100))
    kind = db.Column(db.String(40))
    model = db.Column(db.String(300), nullable=False, index=True)
    tier = db.Column(db.String(100))
    state = db.Column(db.String(16), nullable=False)  # RUNNING, DONE, FAILED, CANCELLED
    mode = db.Column(db.String(16), nullable=False)  # load, or sweep over client counts
    target = db.Column(db.String(16), nullable=False)  # portal (through the proxy) or direct (to the engine)
    params_json = db.Column(db.Text, nullable=False)
    summary_json = db.Column(db.Text)  # the figures without the per-request lists
    result_json = db.deferred(db.Column(db.Text))  # everything, per-request lists included
    error = db.Column(db.Text)
    pid = db.Column(db.Integer)
    pid_started = db.Column(db.Float)  # the process's start time, so a recycled pid is never taken for it
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    finished_at = db.Column(db.DateTime)

    def to_dict(self, full: bool = False) -> dict:
        data = {
            "id": self.id,
            "service_id": self.service_id,
            "service_name": self.service_name,
            "kind": self.kind,
            "model": self.model,
            "tier": self.tier,
            "state": self.state,
            "mode": self.mode,
            "target": self.target,
            "params": json.loads(self.params_json),
            "created_at": iso(self.created_at),
            "finished_at": iso(self.finished_at),
            "error": self.error,
            "summary": json.loads(self.summary_json) if self.summary_json else None,
        }
        if full:
            data["result"] = json.loads(self.result_json) if self.result_json else None
        return data



# The Files and Batches API's tables (portal/batches/records.py): part of the schema the migrations make.
from .batches.records import Batch, BatchEvent, BatchShard, StoredFile, epoch  # noqa: E402,F401
