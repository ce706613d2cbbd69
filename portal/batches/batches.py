"""Batches: create (the input checked line by line, split into shards, submitted as one job array), list, read,
cancel, and OpenAI's batch object; what the API calls (and, through the API, the CLI and the pages).

A batch's `metadata` (OpenAI's: strings to strings) may carry Pilotfish's options: `tier` (a tier's name), `time`
(minutes, or HH:MM:SS, per task), `partition`, `shard_size` (lines per shard), `concurrency` (requests in flight per
shard) and `engine_args` (engine flags, as one string); any other key is kept as the user's own.
"""
from __future__ import annotations

import json
import logging
import re
import secrets
import shlex
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Callable, List, Optional

from flask import current_app

from ..catalog.models import find_revision
from ..db import db
from ..errors import ConflictError, NotFoundError, RejectedError, UnavailableError, ValidationError
from ..keys import check_key_model
from ..launching import parse_time
from ..models import Batch, BatchEvent, BatchShard, epoch, utcnow
from ..scheduler import SchedulerError, SchedulerUnreachable, SubmissionRejected
from .audio import is_audio_endpoint
from .audio_input import audio_checker, key_roots
from .files import get_file, visible
from .submission import (cancel_shards, plan_batch, runner_settings, stored_resources, submit_shards,
                         write_job_files)
from .validation import ENDPOINT_KINDS, FIELD, check_endpoint, check_input, model_problem, write_shards

log = logging.getLogger(__name__)

VALIDATING, IN_PROGRESS, FINALIZING, COMPLETED = "validating", "in_progress", "finalizing", "completed"
FAILED, EXPIRED, CANCELLING, CANCELLED = "failed", "expired", "cancelling", "cancelled"
STATUSES = (VALIDATING, IN_PROGRESS, FINALIZING, COMPLETED, FAILED, EXPIRED, CANCELLING, CANCELLED)
LIVE = (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING)  # the reconciler follows these
ENDED = (COMPLETED, FAILED, EXPIRED, CANCELLED)
TIMESTAMPS = {IN_PROGRESS: "in_progress_at", FINALIZING: "finalizing_at", COMPLETED: "completed_at",
              FAILED: "failed_at", EXPIRED: "expired_at", CANCELLING: "cancelling_at", CANCELLED: "cancelled_at"}
WINDOW = re.compile(r"^([1-9][0-9]{0,4})([mhd])$")
WINDOW_WORDS = "a duration such as 24h (OpenAI's), 90m or 7d"
OPTION_WORDS = {"tier": "a tier name such as Small", "time": "minutes per task, or HH:MM:SS",
                "partition": "a partition name", "shard_size": "lines per shard (a whole number)",
                "concurrency": "requests in flight per shard (1 to 1024)", "engine_args": "engine flags as one string"}
NAME = re.compile(r"^[A-Za-z0-9_.\- ]{1,100}$")
MAX_SHARDS = 1000  # Slurm's default MaxArraySize is 1001


def settings():
    return current_app.config["PILOTFISH"]


def scheduler():
    return current_app.extensions["pilotfish.scheduler"]


def parse_window(value: str) -> timedelta:
    match = WINDOW.fullmatch(value or "")
    if not match:
        raise ValidationError("completion_window", f"expected {WINDOW_WORDS}, got {value!r}")
    amount, unit = int(match.group(1)), match.group(2)
    return timedelta(minutes=amount) if unit == "m" else timedelta(hours=amount) if unit == "h" else \
        timedelta(days=amount)


def parse_options(metadata: Optional[dict]) -> dict:
    """Pilotfish's options from a batch's metadata (strings), checked; a refusal names metadata.<key>."""
    metadata = metadata or {}
    options: dict = {}

    def refuse(key, problem=None):
        raise ValidationError(f"metadata.{key}", problem or f"expected {OPTION_WORDS[key]}, got {metadata[key]!r}")

    if metadata.get("tier"):
        if not NAME.fullmatch(metadata["tier"]):
            refuse("tier")
        options["tier"] = metadata["tier"]
    if metadata.get("time"):
        try:
            options["time"] = parse_time(metadata["time"])
        except ValidationError as exc:
            refuse("time", exc.problem)
    if metadata.get("partition"):
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,100}", metadata["partition"]):
            refuse("partition")
        options["partition"] = metadata["partition"]
    for key, low, high in (("shard_size", 1, 10_000_000), ("concurrency", 1, 1024)):
        if metadata.get(key):
            text = metadata[key].strip()
            if not text.isascii() or not text.isdigit() or not low <= int(text) <= high:
                refuse(key)
            options[key] = int(text)
    if metadata.get("engine_args"):
        try:
            options["engine_args"] = shlex.split(metadata["engine_args"])
        except ValueError as exc:
            refuse("engine_args", f"not shell words: {exc}")
    return options


def transition(batch: Batch, status: str, reason: str) -> bool:
    """Move a batch to `status` (its timestamp set), recording an event; False if it was there already."""
    if batch.status == status:
        return False
    now = utcnow()
    db.session.add(BatchEvent(batch_id=batch.id, at=now, from_status=batch.status, to_status=status, reason=reason))
    batch.status, batch.reason = status, reason
    if status in TIMESTAMPS and getattr(batch, TIMESTAMPS[status]) is None:
        setattr(batch, TIMESTAMPS[status], now)
    return True


def note(batch: Batch, reason: str) -> None:
    """An event that does not change the status (a shard submitted again, given up)."""
    db.session.add(BatchEvent(batch_id=batch.id, at=utcnow(), from_status=batch.status, to_status=batch.status,
                              reason=reason))


def _wake_reconciler() -> None:
    reconciler = current_app.extensions.get("pilotfish.reconciler")
    if reconciler is not None:
        reconciler.wake()


def create_batch(input_file_id: str, endpoint: str, completion_window: str, metadata: Optional[dict],
                 principal: str) -> Batch:
    """Check the input, split it into shards and submit them; the batch is in_progress when this returns (failed,
    with a 422 or 503 raised, when the scheduler refused or did not answer). Bad input is a 400 naming the field (and
    the input's line) and creates nothing."""
    config = settings()
    check_endpoint(endpoint)
    window = parse_window(completion_window)
    options = parse_options(metadata)
    try:
        source = get_file(input_file_id, principal)
    except NotFoundError:
        source = None
    if source is None or source.purpose != "batch":
        raise ValidationError(FIELD, f"{input_file_id!r} is not a file uploaded with purpose batch")
    found = {}
    audio = is_audio_endpoint(endpoint)
    check_body, audio_files = audio_checker(principal, config) if audio else (None, {})

    def check_model(model: str, number: int) -> None:
        try:
            found["revision"] = find_model(model, principal)
        except ValidationError as exc:
            raise ValidationError(FIELD, f"line {number}: body.model: {exc.problem}", line=number) from None
        problem = model_problem(model, found["revision"].kind, found["revision"].kinds, endpoint)
        if problem:
            raise ValidationError(FIELD, f"line {number}: body.model: {problem}", line=number)

    checked = check_input(Path(source.path), endpoint, check_model, check_body)
    revision = found["revision"]
    adapter = revision.meta.get("adapter")  # a LoRA adapter's lines run on its base, serving it under its name
    plan = plan_for(ENDPOINT_KINDS[endpoint], adapter["base"] if adapter else revision.repo_id, options, principal,
                    [revision.repo_id] if adapter else None)
    shard_size = options.get("shard_size") or config.batch_shard_size
    shards = -(-checked.lines // shard_size)
    if shards > MAX_SHARDS:
        raise ValidationError("metadata.shard_size", f"{checked.lines} lines in shards of {shard_size} make {shards} "
                                                     f"shards: at most {MAX_SHARDS}; give a larger shard_size")
    runner_settings = {"files": audio_files, "audio_roots": key_roots(principal, config)} if audio else {}
    return start_batch(principal, endpoint, revision.repo_id, plan, options, completion_window, window, metadata,
                       source.id, checked.lines, shard_size,
                       lambda folder: write_shards(Path(source.path), folder, shard_size), runner_settings)


def find_model(model: str, principal: str):
    """The model's snapshot for a batch (a key limited to models: 403 before anything is looked for)."""
    config = settings()
    check_key_model(principal, model)
    return find_revision(model, None, cache_dir=config.cache_dir, home_dir=config.home_dir)


def plan_for(kind: str, model: str, options: dict, principal: str, adapters: Optional[List[str]] = None):
    """The launch plan of a batch's tasks; a refusal names its option (metadata.<key>)."""
    try:
        return plan_batch(kind, model, options, settings(), principal, adapters)
    except ValidationError as exc:
        if exc.field in ("model", "adapters"):  # the lines' model (an adapter: its base) cannot be launched so
            raise ValidationError(FIELD, f"line 1: body.model: {exc.problem}", line=1) from None
        field = exc.field if exc.field in ("engine_args",) or exc.field.startswith("metadata.") else \
            f"metadata.{exc.field}" if exc.field in ("tier", "time", "resources") else exc.field
        raise ValidationError(field, exc.problem) from None


def start_batch(principal: str, endpoint: str, model: str, plan, options: dict, completion_window: str,
                window: timedelta, metadata: Optional[dict], input_file_id: str, lines: int, shard_size: int,
                write_inputs: Callable[[Path], List[int]], runner_settings: dict, description: str = "") -> Batch:
    """Record a checked batch, write its folder (`write_inputs(folder)` writes the shards and returns each one's line
    count; the runner's settings with `runner_settings`) and submit its job array: the batch in_progress, or failed
    with a 422 or 503 raised when the scheduler refused or did not answer."""
    config = settings()
    batch_id = f"batch_{secrets.token_hex(12)}"
    folder = config.batches_dir / batch_id
    now = utcnow()
    batch = Batch(id=batch_id, owner=principal, endpoint=endpoint, model=model,
                  input_file_id=input_file_id, completion_window=completion_window,
                  metadata_json=json.dumps(metadata) if metadata is not None else None, status=VALIDATING,
                  total=lines, completed=0, failed=0, folder=str(folder), scheduler=config.scheduler,
                  engine=plan.runtime.engine.name, tier=plan.tier.ref if plan.tier else None,
                  time_limit=plan.resources.time, resources_json=stored_resources(plan), shard_size=shard_size,
                  concurrency=options.get("concurrency") or plan.runtime.engine.batch_concurrency,
                  created_at=now, expires_at=now + window)
    try:
        folder.mkdir(parents=True, mode=0o700)
        counts = write_inputs(folder)
        write_job_files(batch, plan, len(counts), runner_settings)
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise UnavailableError(f"cannot write the batch's files in {folder}: {exc.strerror}")
    batch.shards = [BatchShard(index=index, lines=count, state=BatchShard.QUEUED, attempts=0, idle_attempts=0,
                               output_bytes=0, output_lines=0, error_bytes=0, error_lines=0, lines_at_submit=0)
                    for index, count in enumerate(counts)]
    db.session.add(batch)
    db.session.add(BatchEvent(batch_id=batch_id, at=now, from_status=None, to_status=VALIDATING,
                              reason=description or f"{lines} lines of {model} in {len(counts)} shard(s) of up to "
                                                    f"{shard_size}"))
    db.session.commit()
    try:
        submit_shards(scheduler(), batch, batch.shards)
    except (SubmissionRejected, SchedulerUnreachable) as exc:
        words = f"{config.scheduler} rejected the job array: {exc}" if isinstance(exc, SubmissionRejected) else \
            f"could not submit: {exc}"
        batch.errors_json = json.dumps([{"code": "submission_failed", "message": words, "param": None,
                                         "line": None}])
        for shard in batch.shards:
            shard.state = BatchShard.STOPPED
        transition(batch, FAILED, words)
        db.session.commit()
        error = RejectedError if isinstance(exc, SubmissionRejected) else UnavailableError
        raise error(words, batch=batch_object(batch))
    tier = f"tier {batch.tier}" if batch.tier else "explicit resources"
    transition(batch, IN_PROGRESS, f"submitted to {config.scheduler} as job array {batch.shards[0].job_id.split('_')[0]}"
                                   f" ({len(counts)} task(s), {tier}, {batch.time_limit} min each, "
                                   f"{batch.concurrency} requests in flight per task)")
    db.session.commit()
    _wake_reconciler()
    return batch


def is_folder(batch: Batch) -> bool:
    """Whether the batch transcribes a folder (portal/batches/folders.py): its lines are the files it finds."""
    return not batch.input_file_id


def get_batch(batch_id: str, principal: str) -> Batch:
    batch = db.session.get(Batch, batch_id) if isinstance(batch_id, str) and len(batch_id) <= 40 else None
    if batch is None or not visible(batch.owner, principal):
        raise NotFoundError(f"no batch {batch_id!r}", code="batch_not_found")
    return batch


def list_batches(principal: str, limit: int = 20, after: Optional[str] = None) -> tuple:
    """(batches, has_more): newest first, after the batch `after`, at most `limit`."""
    query = Batch.query
    if principal != "owner":
        query = query.filter(Batch.owner == principal)
    if after:
        anchor = db.session.get(Batch, after)
        if anchor is not None:
            query = query.filter((Batch.created_at < anchor.created_at) | (
                (Batch.created_at == anchor.created_at) & (Batch.id < anchor.id)))
    found = query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1).all()
    return found[:limit], len(found) > limit


def cancel_batch(batch_id: str, principal: str) -> Batch:
    """Cancel a batch: `cancelling` at once, its tasks cancelled; the reconciler merges what was done and makes it
    `cancelled`. A batch that has ended is a 409."""
    batch = get_batch(batch_id, principal)
    if batch.status in ENDED:
        raise ConflictError(f"batch {batch.id} is {batch.status}: nothing to cancel", code="batch_ended")
    if batch.status == CANCELLING or batch.ending:
        return batch
    batch.ending = CANCELLED
    transition(batch, CANCELLING, f"cancelled by {principal}")
    db.session.commit()
    try:
        cancel_shards(scheduler(), batch)
    except SchedulerError as exc:  # the reconciler cancels them again
        log.warning("batch %s: cancelling its tasks failed: %s", batch.id, exc)
    _wake_reconciler()
    return batch


def batch_object(batch: Batch, detail: bool = False) -> dict:
    """OpenAI's batch object, with what Pilotfish knows besides under `pilotfish` (its shards and events with
    `detail`)."""
    errors = json.loads(batch.errors_json) if batch.errors_json else None
    data = {
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint, "model": batch.model,
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window, "status": batch.status,
        "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
        "created_at": epoch(batch.created_at), "in_progress_at": epoch(batch.in_progress_at),
        "expires_at": epoch(batch.expires_at), "finalizing_at": epoch(batch.finalizing_at),
        "completed_at": epoch(batch.completed_at), "failed_at": epoch(batch.failed_at),
        "expired_at": epoch(batch.expired_at), "cancelling_at": epoch(batch.cancelling_at),
        "cancelled_at": epoch(batch.cancelled_at),
        "request_counts": {"total": batch.total, "completed": batch.completed, "failed": batch.failed},
        "metadata": batch.metadata_dict,
    }
    extra = {"owner": batch.owner, "reason": batch.reason, "scheduler": batch.scheduler, "engine": batch.engine,
             "tier": batch.tier, "time_limit": batch.time_limit, "resources": batch.resources,
             "shard_size": batch.shard_size, "concurrency": batch.concurrency, "shards": len(batch.shards)}
    if is_folder(batch):
        spec = runner_settings(batch).get("folder") or {}
        extra["folder"] = {key: spec.get(key) for key in ("source", "output", "format")}
    if detail:
        extra["shards"] = [shard.to_dict() for shard in batch.shards]
        extra["events"] = [event.to_dict() for event in batch.events]
    data["pilotfish"] = extra
    return data
