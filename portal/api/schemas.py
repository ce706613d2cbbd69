"""The REST API's request and answer models (pydantic): the routes check requests against them and
portal/api/openapi.py describes the API from them. The launch request's model is the launch's own
(portal.launching.LaunchBody), shared with the launch page."""
from __future__ import annotations

from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


from ..keys import EXPIRES_SHAPE, EXPIRES_WORDS, MODEL_NAME_MAX, MODELS_MAX, RATE_MAX
from ..launching import REPO_ID_SHAPE, REVISION_SHAPE
from ..validation import Query, Strict


def _digits(value):
    """A whole number written in digits only (no sign, space or underscore), as a query parameter."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError(f"expected a number of lines, got {value!r}")
    return value


REPO_PART = REPO_ID_SHAPE.split("/")[1]  # one side of org/name, anchored at its end (JSON Schema's patterns)
if not REPO_PART.startswith("^"):
    REPO_PART = "^" + REPO_PART
Flag = Annotated[bool, Field(description="true or false (also 1/0, yes/no)")]


# --- requests ----------------------------------------------------------------------------------------------

class DryRunQuery(Query):
    dry_run: Flag = False


class ServicesQuery(Query):
    state: Optional[str] = Field(None, description="states, comma-separated: SUBMITTED, PENDING, STARTING, RUNNING, "
                                                   "UNHEALTHY, SCALED_TO_ZERO, STOPPED, FAILED, TIMEOUT, or the groups "
                                                   "LIVE, ENDED")


class PruneQuery(Query):
    state: Literal["ENDED", "ended"] = Field(description="ENDED: DELETE /api/services removes ended services only")


class LogsQuery(Query):
    tail: Annotated[int, Field(ge=0, le=1_000_000), BeforeValidator(_digits)] = Field(
        200, description="a number of lines")


class RecommendQuery(Query):
    model: str = Field(pattern=REPO_ID_SHAPE, description="a Hugging Face repo id such as org/name")
    revision: Optional[str] = Field(None, pattern=REVISION_SHAPE, description="a branch, tag or commit")
    partition: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_\-]{1,64}$", description="a partition name")


class ModelsQuery(Query):
    refresh: Flag = False


class RevisionQuery(Query):
    revision: Optional[str] = Field(None, pattern=REVISION_SHAPE, description="a branch, tag or commit")


class BenchmarksQuery(Query):
    service: Optional[str] = Field(None, description="a service id or its prefix")
    model: Optional[str] = Field(None, description="a model's repo id")


USAGE_DAY = r"^([0-9]{4}-[0-9]{2}-[0-9]{2}|[1-9][0-9]{0,4}[dw])$"


class UsageQuery(Query):
    by: Literal["principal", "model", "day", "service"] = Field(
        "principal", description="principal, model, day or service: what each row is (a principal is owner or "
                                 "key:<name>; days are UTC)")
    since: Optional[str] = Field(None, pattern=USAGE_DAY,
                                 description="a date (2026-12-01) or a span back from today, UTC (7d, 2w): the first "
                                             "day counted (default: the first with usage)")
    until: Optional[str] = Field(None, pattern=USAGE_DAY,
                                 description="a date (2026-12-01) or a span back from today, UTC (7d, 2w): the last "
                                             "day counted, included (default: today)")
    principal: Optional[str] = Field(None, max_length=80, description="owner or key:<name>: only its rows (a key may "
                                                                     "give only its own)")
    model: Optional[str] = Field(None, max_length=300, description="a model's repo id: only its rows")


class DownloadBody(Strict):
    repo_id: str = Field(pattern=REPO_ID_SHAPE, description="a Hugging Face repo id such as org/name")
    revision: Optional[str] = Field(None, pattern=REVISION_SHAPE, description="a branch, tag or commit")
    use_cache: bool = Field(False, description="true or false (true: into the site's cache_dir)")


class KeyBody(Strict):
    name: str = Field(pattern=r"^[^\x00-\x1f\x7f]{1,60}$", description="a name of 1 to 60 characters")
    scopes: Optional[List[Literal["use", "read", "launch"]]] = Field(
        None, min_length=1, max_length=3, description="one or more of use (call models), read (see the portal's "
                                                      "state), launch (launch, stop, change); default: all three")
    models: Optional[List[Annotated[str, Field(pattern=r"^[^\x00-\x1f\x7f]*[^\x00-\x1f\x7f ][^\x00-\x1f\x7f]*$",
                                               max_length=MODEL_NAME_MAX)]]] = Field(
        None, min_length=1, max_length=MODELS_MAX, description=f"a list of 1 to {MODELS_MAX} model names (repo "
                                                               "ids) the key may call and launch; default: any")
    expires: Optional[str] = Field(None, pattern=EXPIRES_SHAPE, description=EXPIRES_WORDS + "; default: never")
    requests_per_minute: Optional[int] = Field(None, ge=1, le=RATE_MAX, description=f"a whole number from 1 to "
                                               f"{RATE_MAX:,}: requests per minute to models (default: unlimited)")
    tokens_per_minute: Optional[int] = Field(None, ge=1, le=RATE_MAX, description=f"a whole number from 1 to "
                                             f"{RATE_MAX:,}: tokens per minute, prompt and completion (default: "
                                             "unlimited)")


class BenchmarkBody(BaseModel):
    """A benchmark request; portal/benchmark_runs.py checks its fields."""
    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": True})
    service: Optional[str] = Field(None, description="the id of a RUNNING service")


# --- answers -----------------------------------------------------------------------------------------------

class Answer(BaseModel):
    """An answer: the fields named are always there; more may come."""
    model_config = ConfigDict(extra="allow")


class ErrorAnswer(Answer):
    error: str = Field(description="what went wrong, starting with the field it is about")
    field: Optional[str] = Field(None, description="the request's field it is about (a nested one with dots)")


class Health(Answer):
    status: Literal["ok"]
    scheduler: Literal["ok", "unreachable"]


class Status(Answer):
    scheduler: Dict[str, Any]
    conditions: Dict[str, Any]
    reconciler: Dict[str, Optional[int]]


class Event(Answer):
    at: Optional[str]
    to: str
    reason: Optional[str]


class ServiceJob(Answer):
    generation: int = Field(description="the job's number among the service's jobs (1: the first)")
    phase: str = Field(description="successor (a renewal's, on its way up), replica (serving once ready_at is set), "
                                   "draining (finishing its open requests), ended or failed")
    job_id: Optional[str]
    node: Optional[str]
    ready_at: Optional[str] = Field(None, description="when it first answered its health check (a replica with it "
                                                      "serves)")
    reason: Optional[str] = None


class Replicas(Answer):
    min: int = Field(description="jobs it keeps at least (0: none while unused)")
    max: int = Field(description="jobs it runs at most")
    target_in_flight: int = Field(description="requests in flight per serving job above which a job is added")
    serving: int = Field(description="jobs answering now: its current one while RUNNING, and each replica that "
                                     "answered its health check")


class Service(Answer):
    id: str
    name: Optional[str]
    kind: str
    engine: Optional[str]
    model: str
    revision: Optional[str]
    tier: Optional[str]
    state: str
    reason: Optional[str]
    endpoint: Optional[Dict[str, Any]]
    resources: Optional[Dict[str, Any]]
    engine_args: Optional[List[str]]
    adapters: List[str] = Field([], description="the LoRA adapters it serves beside its model, each a model name")
    time_limit: Optional[int]
    created_at: Optional[str]
    idle_timeout: Optional[int] = Field(None, description="minutes without a request before it stops (null: never)")
    lease: Optional[int] = Field(None, description="seconds it lives without a heartbeat or a request (null: no lease)")
    stops_at: Optional[str] = Field(None, description="when the portal stops it if nobody uses it (or renews its "
                                                      "lease); null: it will not")
    stop_reason_expected: Optional[str] = Field(None, description="the reason it will stop with at stops_at")
    renew: bool = Field(False, description="whether a successor job takes over before each job's time limit")
    renew_until: Optional[str] = Field(None, description="when its renewal ends (null: when it is stopped)")
    generation: int = Field(1, description="the current job's number (1: the first; one more at each renewal)")
    replicas: Optional[Replicas] = Field(None, description="how many jobs serve it at once (null: one job)")
    events: Optional[List[Event]] = None
    jobs: Optional[List[ServiceJob]] = Field(None, description="its other jobs (with events): a renewal's successor, "
                                                               "replicas, the draining, the ended and the failed")


class Services(Answer):
    services: List[Service]
    conditions: Dict[str, Any]


class DryRun(Answer):
    kind: str
    model: str
    revision: Optional[str]
    model_path: str
    tier: Optional[str]
    resources: Dict[str, Any]
    sbatch: List[str]
    engine: str
    runtime: str
    arguments: List[str]
    job_script: str


class Log(Answer):
    id: str
    log: str


class Script(Answer):
    id: str
    script: str


class ProvenanceFile(Answer):
    name: str = Field(description="its path in the snapshot folder")
    size: int
    sha256: Optional[str] = Field(description="null when it changed or went before it was hashed (see sha256_from)")
    sha256_from: Optional[str] = Field(description="blob name (the Hugging Face cache names LFS files by their "
                                                   "sha256), computed, or why there is none")
    weights: bool = Field(description="a weight file (safetensors, bin, gguf, ...)")


class ProvenanceModel(Answer):
    repo_id: str
    revision: str = Field(description="the snapshot's commit")
    files: List[ProvenanceFile]


class ProvenanceEngine(Answer):
    name: str
    runtime: str
    command: str
    version: str = Field(description="read from the engine's virtualenv; unknown when it cannot be known")


class Provenance(Answer):
    service: str
    kind: str
    model: ProvenanceModel
    engine: ProvenanceEngine
    image: Optional[Dict[str, Any]] = Field(description="apptainer: the image's reference, SIF file and its sha256")
    server_arguments: List[str] = Field(description="the server's arguments in the job script (before its TLS "
                                                    "files, host and port)")
    tier: Optional[str]
    resources: Dict[str, Any]
    scheduler: str
    scheduler_arguments: List[str]
    recipe: Dict[str, Any] = Field(description="a recipe (pilotfish apply) that launches the identical service")
    methods: str = Field(description="a paragraph for a methods section")


class Deleted(Answer):
    deleted: Union[str, List[str]]


class Tiers(Answer):
    tiers: List[Dict[str, Any]]
    time: Dict[str, Any]
    default_partition: Optional[str]


class Recommendation(Answer):
    model: str
    revision: Optional[str]
    size_gb: float
    kind: Optional[str]
    tier: Optional[Dict[str, Any]]
    reason: str
    fitting: List[Dict[str, Any]] = Field(description="each tier the model fits: ref, partition, name, start (the "
                                                      "scheduler's estimate: at, in_seconds, now, text, problem)")
    sooner: Optional[Dict[str, Any]] = Field(description="a tier that also fits and would start sooner: tier, reason")


class LaunchOptions(Answer):
    model: str
    revision: str
    kind: str = Field(description="the kind asked for, else the model's own")
    kinds: List[str] = Field(description="the kinds the model can be launched as, its own first")
    model_kind: Optional[str] = Field(description="what its files say it is (null: unknown, any kind may be tried)")
    kind_reason: Optional[str]
    modalities: List[str] = Field(description="what the model takes as input: text, image, audio (empty: unknown)")
    engine: str
    engine_title: str
    presets: List[Dict[str, Any]] = Field(description="flags the launch gets from what the model is: purpose, flags, "
                                                      "reason, yields_to (the user's flags that replace it), applied")
    flags: List[str] = Field(description="the engine flags a launch of this kind and this model's inputs may give "
                                         "(engine_args)")
    serves_adapters: bool = Field(description="whether a launch of this kind on this engine may serve LoRA adapters")
    adapters: List[str] = Field(description="the local LoRA adapters of the model a launch may serve (`adapters`)")


class Models(Answer):
    models: List[Dict[str, Any]]
    refreshing: bool
    cache_dir: Optional[str]
    home_dir: str


class Download(Answer):
    id: str
    repo_id: str
    state: str


class Downloads(Answer):
    downloads: List[Download]


class Images(Answer):
    images: List[Dict[str, Any]]


class Key(Answer):
    id: str
    name: str
    hint: str
    created_at: Optional[str]
    scopes: List[str] = Field(description="use, read, launch: what the key may do")
    models: Optional[List[str]] = Field(description="the models it may call and launch (null: any)")
    expires_at: Optional[str] = Field(description="when it stops working (null: never)")
    expired: bool
    requests_per_minute: Optional[int] = Field(description="null: unlimited")
    tokens_per_minute: Optional[int] = Field(description="null: unlimited")
    last_used_at: Optional[str] = Field(description="when it was last used to call a model (null: never)")


class Keys(Answer):
    keys: List[Key]


class NewKey(Key):
    key: str = Field(description="the key itself, shown once")


class Revoked(Answer):
    revoked: str


class Benchmark(Answer):
    id: str


class Benchmarks(Answer):
    benchmarks: List[Benchmark]


class OpenAIError(BaseModel):
    """The gateway's errors, in OpenAI's shape."""
    model_config = ConfigDict(extra="allow")
    error: Dict[str, Any] = Field(description="message, type, param, code")


class ModelList(Answer):
    object: Literal["list"]
    data: List[Dict[str, Any]]


class GatewayBody(BaseModel):
    """A request of OpenAI's API: any JSON object with the `model` to answer it (a RUNNING service's model)."""
    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": True})
    model: str = Field(description="the model (repo id) of a RUNNING service")

