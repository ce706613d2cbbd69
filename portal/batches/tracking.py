"""Batches followed by the reconciler, one step of its cycle (`track`): what the cycle's one scheduler query said of
every live shard's task (`live_tasks`), the answers and errors counted from what the shards' files grew by since the
last look, and the batch moved on.

- A task that ended with its shard not done (its time limit, preemption, a node failure, the server crashing, ...) is
  submitted again for that index; its runner skips what is already written. After `batch_max_attempts` tasks in a
  row that added no line, the shard's remaining lines go to the error file with the reason.
- Every shard done: `finalizing`, the shards merged into one output file and one error file in input order (files of
  purpose batch_output), `completed`.
- Past `expires_at`: its tasks cancelled, what was done merged (the lines not run are errors with code
  batch_expired), `expired`. Cancelled (portal/batches/batches.py): once no task runs, merged, `cancelled`.
"""
from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from ..metrics import instruments
from ..models import Batch, BatchShard, utcnow
from ..scheduler import JobInfo, JobQuery, JobState, SchedulerError, task_dir
from ..scheduler.job_files import read_exit_code
from ..usage_ledger import usage_ledger
from .batches import (CANCELLED, CANCELLING, COMPLETED, EXPIRED, FINALIZING, IN_PROGRESS, LIVE, VALIDATING,
                      is_folder, note, transition)
from .files import OUTPUT_PURPOSE, files_dir, register
from .lines import append_lines, count_new_lines, error_line, errors_path, input_ids, merge_shards, output_path, \
    shard_path, answered_ids
from .submission import cancel_shards, shard_query, submit_shards

log = logging.getLogger(__name__)
LIVE_BATCHES = Batch.status.in_(LIVE)
RECANCEL_SECONDS = 30  # a task still in the queue this long after its batch was stopped is cancelled again


@dataclass
class TrackReport:
    batches: int = 0  # live batches after the step
    changes: int = 0  # status changes and resubmissions


def live_tasks() -> Tuple[List[Batch], List[JobQuery]]:
    """The live batches, and the queries of their shards' tasks that may be in the scheduler (asked in the
    reconciler's one scheduler query of its cycle)."""
    batches = Batch.query.filter(LIVE_BATCHES).all()
    return batches, [shard_query(batch, shard) for batch in batches for shard in batch.shards
                     if shard.state in BatchShard.LIVE and shard.job_id]


def track(scheduler, config, batches: List[Batch], infos: Dict[str, JobInfo]) -> TrackReport:
    """Bring these live batches up to date with what the scheduler said of their tasks (`infos` by job id: a task
    missing from it is not looked at this time), inside an app context; the caller commits."""
    report = TrackReport()
    if not batches:
        return report
    now = utcnow()
    for batch in batches:
        count_lines(batch)
        if batch.status in (IN_PROGRESS, CANCELLING):
            lost = []
            for shard in batch.shards:
                if shard.state in BatchShard.LIVE:
                    lost += follow(batch, shard, infos.get(shard.job_id) if shard.job_id else None, config)
            if lost and not batch.ending:
                report.changes += resubmit(scheduler, batch, lost)
        if batch.status == IN_PROGRESS and not batch.ending and now >= batch.expires_at:
            batch.ending = EXPIRED
            note(batch, f"its completion window ({batch.completion_window}) ended: its tasks are cancelled")
            stop_tasks(scheduler, batch)
            report.changes += 1
        if batch.ending:
            stopping = [shard for shard in batch.shards if shard.state in BatchShard.LIVE]
            since = batch.cancelling_at or batch.expires_at
            if stopping and (now - since).total_seconds() >= RECANCEL_SECONDS:
                stop_tasks(scheduler, batch)
            if not stopping:
                report.changes += finish(batch, batch.ending)
        elif batch.status in (IN_PROGRESS, VALIDATING) and all(
                shard.state in (BatchShard.DONE, BatchShard.GIVEN_UP) for shard in batch.shards):
            report.changes += finish(batch, COMPLETED)
        elif batch.status == FINALIZING:  # the portal stopped while merging
            report.changes += finish(batch, COMPLETED)
        report.batches += batch.status in LIVE
    return report


def count_lines(batch: Batch) -> None:
    """What each unfinished shard's answers and errors files grew by: the batch's request_counts, the metrics, and
    the lines and tokens counted as the batch owner's usage (portal/usage_ledger.py, under the batch's id)."""
    folder = Path(batch.folder)
    added_output = added_errors = prompt_tokens = completion_tokens = 0
    grows = is_folder(batch)  # a folder's shard gets a line per audio file its runner finds
    for shard in batch.shards:
        if shard.state == BatchShard.DONE:
            continue
        if grows:
            shard.lines = count_new_lines(shard_path(folder, shard.index), 0).lines
        output = count_new_lines(output_path(folder, shard.index), shard.output_bytes, tokens=True)
        errors = count_new_lines(errors_path(folder, shard.index), shard.error_bytes)
        shard.output_bytes, shard.error_bytes = output.end, errors.end
        if output.lines:
            shard.output_lines += output.lines
        if errors.lines:
            shard.error_lines += errors.lines
        added_output, added_errors = added_output + output.lines, added_errors + errors.lines
        prompt_tokens, completion_tokens = prompt_tokens + output.prompt_tokens, \
            completion_tokens + output.completion_tokens
    if grows:
        batch.total = sum(shard.lines for shard in batch.shards)
    if added_output or added_errors:
        batch.completed = sum(shard.output_lines for shard in batch.shards)
        batch.failed = sum(shard.error_lines for shard in batch.shards)
        metrics = instruments()
        if added_output:
            metrics.batch_lines.labels(batch.model, "completed").inc(added_output)
        if added_errors:
            metrics.batch_lines.labels(batch.model, "failed").inc(added_errors)
        ledger = usage_ledger()
        ledger.add(batch.owner, batch.id, batch.model, requests=added_output + added_errors, errors=added_errors,
                   prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        if prompt_tokens or completion_tokens:
            metrics.batch_tokens.labels(batch.model, "prompt").inc(prompt_tokens)
            metrics.batch_tokens.labels(batch.model, "completion").inc(completion_tokens)


def follow(batch: Batch, shard: BatchShard, info, config) -> List[BatchShard]:
    """Follow one shard's task; returns [shard] when it ended before its shard was done and should run again. A
    folder's shard is done only once its task ended with exit code 0 (its last pass over the folder found nothing
    new)."""
    if is_folder(batch):
        finished = info is not None and info.state.finished and \
            read_exit_code(task_dir(Path(batch.folder), shard.index)) == 0
    else:
        finished = info is None or info.state.finished
    if shard.answered >= shard.lines and finished:
        shard.state, shard.ended_at = BatchShard.DONE, shard.ended_at or utcnow()
        shard.reason = info.detail if info is not None else shard.reason
        return []
    if info is None:
        return [shard] if shard.job_id is None and not batch.ending else []
    if info.state is JobState.PENDING:
        shard.state = BatchShard.QUEUED
        return []
    if info.state is JobState.RUNNING:
        if shard.state != BatchShard.RUNNING:
            shard.state, shard.started_at = BatchShard.RUNNING, utcnow()
        shard.node = info.node or shard.node
        return []
    shard.ended_at = utcnow()
    shard.reason = f"task {shard.job_id} ended: {info.detail or info.state.value}"
    if batch.ending:
        shard.state = BatchShard.STOPPED
        return []
    if shard.answered > shard.lines_at_submit:
        shard.idle_attempts = 0
    else:
        shard.idle_attempts += 1
    if shard.idle_attempts >= config.batch_max_attempts:
        give_up(batch, shard, f"{shard.idle_attempts} task(s) in a row ended without a new answer; the last: "
                              f"{info.detail or info.state.value}")
        return []
    return [shard]


def resubmit(scheduler, batch: Batch, shards: List[BatchShard]) -> int:
    """Submit these shards' tasks again, as one job array; a scheduler that does not answer is tried next cycle."""
    try:
        submit_shards(scheduler, batch, shards)
    except SchedulerError as exc:
        for shard in shards:
            shard.job_id = None  # submitted again next cycle
        note(batch, f"shard(s) {', '.join(str(shard.index) for shard in shards)} could not be submitted again: {exc}")
        return 1
    for shard in shards:
        note(batch, f"shard {shard.index} submitted again as task {shard.job_id} (attempt {shard.attempts}, "
                    f"{shard.answered} of {shard.lines} lines done): {shard.reason}")
    return len(shards)


def give_up(batch: Batch, shard: BatchShard, why: str) -> None:
    """Write a shard's unanswered lines to its error file with the reason; the shard is given up."""
    folder = Path(batch.folder)
    done = answered_ids(output_path(folder, shard.index), errors_path(folder, shard.index))
    message = f"not run: {why}"
    append_lines(errors_path(folder, shard.index),
                 (error_line(custom_id, "shard_given_up", message)
                  for custom_id in input_ids(shard_path(folder, shard.index)) if custom_id not in done))
    shard.state = BatchShard.GIVEN_UP
    note(batch, f"shard {shard.index} given up: {why}")
    count_lines(batch)


def stop_tasks(scheduler, batch: Batch) -> None:
    try:
        cancel_shards(scheduler, batch)
    except SchedulerError as exc:
        log.warning("batch %s: cancelling its tasks failed (tried again next cycle): %s", batch.id, exc)


def finish(batch: Batch, status: str) -> int:
    """Merge the shards into the batch's output and error files (in input order), then end it with `status`."""
    changes = 0
    if status == COMPLETED:
        changes += transition(batch, FINALIZING, "every shard done: merging the answers in input order")
    folder = Path(batch.folder)
    target = files_dir()
    output, errors = target / f".merge-{secrets.token_hex(8)}", target / f".merge-{secrets.token_hex(8)}"
    unanswered = ("batch_expired", "the batch expired before this line ran") if status == EXPIRED else None
    try:
        written, failed = merge_shards(((shard_path(folder, shard.index), output_path(folder, shard.index),
                                         errors_path(folder, shard.index)) for shard in batch.shards),
                                       output, errors, unanswered)
        if written:
            batch.output_file_id = register(output, f"{batch.id}_output.jsonl", OUTPUT_PURPOSE, batch.owner).id
        if failed:
            batch.error_file_id = register(errors, f"{batch.id}_error.jsonl", OUTPUT_PURPOSE, batch.owner).id
    finally:
        output.unlink(missing_ok=True)
        errors.unlink(missing_ok=True)
    batch.completed, batch.failed = written, failed
    words = {COMPLETED: "every line answered or failed", CANCELLED: "cancelled", EXPIRED: "expired"}[status]
    changes += transition(batch, status, f"{words}: {written} answered, {failed} failed"
                                         + (f", {batch.total - written - failed} not run" if status == CANCELLED
                                            else ""))
    for shard in batch.shards:
        if shard.state in BatchShard.LIVE:
            shard.state = BatchShard.STOPPED
    log.info("batch %s %s: %s", batch.id, status, json.dumps({"completed": written, "failed": failed}))
    return changes
