"""A batch's jobs: the plan (the model's engine, tier and resources, as a launch of that model would get them:
portal/launching.py), its job script (templates/jobs/batch.sh.j2: the service's own engine command behind the key
guard, then the runner), the shards submitted as one job array (again, one index at a time, when a task was lost)
and cancelled."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from ..launching import LaunchPlan, LaunchRequest, plan_launch, render_job_template, resources_dict
from ..models import Batch, BatchShard, utcnow
from ..scheduler import JobQuery, LOG_NAME, Resources, task_dir
from ..scheduler.job_files import EXIT_CODE_FILE
from .runner import CONFIG_NAME

PORTAL_ROOT = Path(__file__).resolve().parents[2]  # on the runner's PYTHONPATH (the folder holding `portal`)
SCRIPT_NAME = "batch.sh"


def job_name(batch: Batch) -> str:
    return f"pilotfish-{batch.id}"


def plan_batch(kind: str, model: str, options: dict, config, principal: str,
               adapters: Optional[List[str]] = None) -> LaunchPlan:
    """What a launch of `model` (serving `adapters` beside it) would run (its engine, arguments, tier and resources),
    with the batch's options (`tier`, `time`, `partition`, `engine_args`) as a launch's fields."""
    request = LaunchRequest(kind=kind, model=model, tier=options.get("tier"), time=options.get("time"),
                            resources={"partition": options["partition"]} if options.get("partition") else {},
                            engine_args=list(options.get("engine_args") or []), adapters=list(adapters or []))
    return plan_launch(request, config, principal)


def write_job_files(batch: Batch, plan: LaunchPlan, shard_count: int, extra: Optional[dict] = None) -> Path:
    """The batch's job script, the runner's settings (batch.json, with `extra`: an audio batch's files and the
    folders a named key may read, a folder's transcription) and a folder per task; returns the script."""
    folder = Path(batch.folder)
    # The runner waits for the engine as long as the task may run: the scheduler's time limit ends a start that hangs.
    settings = {"endpoint": batch.endpoint, "model": batch.model, "concurrency": batch.concurrency,
                "health_path": plan.runtime.health_path, "start_timeout": batch.time_limit * 60 * 2 + 600,
                **(extra or {})}
    (folder / CONFIG_NAME).write_text(json.dumps(settings, indent=1))
    for index in range(shard_count):
        task_dir(folder, index).mkdir(parents=True, exist_ok=True, mode=0o700)
    script = folder / SCRIPT_NAME
    text = render_job_template(
        "batch.sh.j2", batch=batch, runtime=plan.runtime, job_dir=str(folder), model_path=str(plan.model.path),
        model_root=str(plan.model.path.parent.parent), arguments=plan.arguments, gpus=plan.resources.gpus,
        adapter_roots=sorted({str(adapter.path.parent.parent) for adapter in plan.adapters}),
        image_path=str(plan.image.path) if plan.image else "", tls_arguments=[], listen_host="127.0.0.1",
        portal_root=str(PORTAL_ROOT), python=sys.executable)
    fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return script


def runner_settings(batch: Batch) -> dict:
    """What batch.json says (the runner's settings); {} when it cannot be read."""
    try:
        return json.loads((Path(batch.folder) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return {}


def batch_resources(batch: Batch) -> Resources:
    return Resources(**batch.resources)


def stored_resources(plan: LaunchPlan) -> str:
    return json.dumps(resources_dict(plan.resources))


def submit_shards(scheduler, batch: Batch, shards: List[BatchShard]) -> None:
    """Submit these shards' tasks as one job array (SchedulerError as the scheduler raised it: nothing changed then).
    A shard run before starts a fresh log and exit code (its earlier log kept as job.log.<attempt>)."""
    folder = Path(batch.folder)
    for shard in shards:
        here = task_dir(folder, shard.index)
        here.mkdir(parents=True, exist_ok=True, mode=0o700)
        (here / EXIT_CODE_FILE).unlink(missing_ok=True)
        (here / "end_mark").unlink(missing_ok=True)
        if shard.attempts and (here / LOG_NAME).exists():
            os.replace(here / LOG_NAME, here / f"{LOG_NAME}.{shard.attempts}")
    ids = scheduler.submit_array(folder / SCRIPT_NAME, folder, job_name(batch), batch_resources(batch),
                                 [shard.index for shard in shards])
    now = utcnow()
    for shard in shards:
        shard.job_id = ids[shard.index]
        shard.state = BatchShard.QUEUED
        shard.attempts += 1
        shard.submitted_at, shard.started_at, shard.ended_at, shard.node = now, None, None, None
        shard.lines_at_submit = shard.answered


def shard_query(batch: Batch, shard: BatchShard) -> JobQuery:
    return JobQuery(job_id=shard.job_id, name=job_name(batch), submitted_at=shard.submitted_at or batch.created_at,
                    job_dir=task_dir(Path(batch.folder), shard.index))


def cancel_shards(scheduler, batch: Batch, shards: Optional[List[BatchShard]] = None) -> None:
    """Cancel the live tasks of these shards (default: all of the batch's); SchedulerError as raised."""
    for shard in shards if shards is not None else batch.shards:
        if shard.state in BatchShard.LIVE and shard.job_id:
            scheduler.cancel(shard.job_id, task_dir(Path(batch.folder), shard.index))
