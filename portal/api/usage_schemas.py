"""The answers of usage and cost (`GET /api/usage`, `GET /api/services/<id>/cost`), as portal/api/schemas.py's models
are the rest of the API's: the routes check against them and the OpenAPI description shows them."""
from __future__ import annotations

from typing import Dict, List, Literal, Optional

from pydantic import Field

from .schemas import Answer


class UsageFigures(Answer):
    requests: int
    errors: int = Field(description="requests answered with an error (a refusal or failure of the service)")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageRow(UsageFigures):
    """One group: its key is named after `by` (principal, model, day or service, with the service's name)."""


class UsageAnswer(Answer):
    by: str
    since: Optional[str] = Field(description="the first day counted (null: from the first)")
    until: Optional[str] = Field(description="the last day counted (null: through today)")
    principal: Optional[str] = Field(description="the principal the rows are limited to (a key: always its own)")
    model: Optional[str]
    rows: List[UsageRow]
    totals: UsageFigures


class JobCost(Answer):
    generation: int
    job_id: Optional[str]
    source: Literal["sacct", "job times"]
    started_at: Optional[str]
    ended_at: Optional[str] = Field(description="null while it runs")
    running: bool
    seconds: float = Field(description="how long it ran (sacct's ElapsedRaw, or by the job's times)")
    cpus: int
    gpus: int
    cpu_hours: float
    gpu_hours: float


class Cost(Answer):
    service: str
    source: Literal["sacct", "job times"] = Field(description="sacct: Slurm's accounting of every job; job times: "
                                                              "the jobs' start and end times x the allocation")
    accounting_problem: Optional[str] = Field(description="why the job times were used (sacct off, failing, slow)")
    gpu_hours: float
    cpu_hours: float
    tokens: Dict[str, int] = Field(description="prompt, completion and total tokens the service answered")
    tokens_per_gpu_hour: Optional[float] = Field(description="total tokens per GPU-hour (null without GPUs)")
    running_seconds: float = Field(description="time at least one of its jobs ran")
    busy_seconds: float = Field(description="time it had a request in flight (each portal worker's, added)")
    idle_share: Optional[float] = Field(description="1 - busy / running, within 0 and 1 (null before it ran)")
    jobs: List[JobCost]
