"""The Files and Batches API's tables: stored files, batches, their shards (one array task each) and their events.
Imported by portal/models.py, so they are part of the schema the migrations make (0008_batches)."""
from __future__ import annotations

import json
from typing import Optional

from ..db import db
from ..times import epoch, iso, utcnow


class StoredFile(db.Model):
    """A file of the Files API (portal/batches/files.py): an uploaded batch input, or a batch's merged output or
    errors; its bytes in `path` (0600), its owner the principal that uploaded it ("owner", "key:<name>")."""
    __tablename__ = "files"

    id = db.Column(db.String(40), primary_key=True)  # file-<hex>
    owner = db.Column(db.String(80), nullable=False, index=True)
    filename = db.Column(db.String(255), nullable=False)
    purpose = db.Column(db.String(32), nullable=False)  # batch, batch_output
    bytes = db.Column(db.BigInteger, nullable=False)
    path = db.Column(db.String(1000), nullable=False)
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)

    def to_dict(self) -> dict:
        """OpenAI's file object."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": epoch(self.created_at),
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "expires_at": None,
                "status_details": None}


class Batch(db.Model):
    """A batch of the Batches API (portal/batches/): its input split into shards, each run as a task of a job array
    (BatchShard), followed by the reconciler (portal/batches/tracking.py). `status` is OpenAI's."""
    __tablename__ = "batches"

    id = db.Column(db.String(40), primary_key=True)  # batch_<hex>
    owner = db.Column(db.String(80), nullable=False, index=True)
    endpoint = db.Column(db.String(64), nullable=False)
    model = db.Column(db.String(300), nullable=False)
    input_file_id = db.Column(db.String(40), nullable=False)
    completion_window = db.Column(db.String(16), nullable=False)
    metadata_json = db.Column(db.Text)
    status = db.Column(db.String(16), nullable=False, index=True)
    reason = db.Column(db.Text)  # the last status change's reason, in words
    errors_json = db.Column(db.Text)  # OpenAI's `errors.data` (why it failed)
    ending = db.Column(db.String(16))  # cancelled or expired: why its jobs are being stopped
    total = db.Column(db.Integer, nullable=False, default=0)
    completed = db.Column(db.Integer, nullable=False, default=0)
    failed = db.Column(db.Integer, nullable=False, default=0)
    output_file_id = db.Column(db.String(40))
    error_file_id = db.Column(db.String(40))
    folder = db.Column(db.String(1000), nullable=False)
    scheduler = db.Column(db.String(16), nullable=False)
    engine = db.Column(db.String(40))
    tier = db.Column(db.String(100))
    time_limit = db.Column(db.Integer, nullable=False)  # minutes, per task
    resources_json = db.Column(db.Text, nullable=False, default="{}")
    shard_size = db.Column(db.Integer, nullable=False)
    concurrency = db.Column(db.Integer, nullable=False)
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    in_progress_at = db.Column(db.DateTime)
    finalizing_at = db.Column(db.DateTime)
    completed_at = db.Column(db.DateTime)
    failed_at = db.Column(db.DateTime)
    expired_at = db.Column(db.DateTime)
    cancelling_at = db.Column(db.DateTime)
    cancelled_at = db.Column(db.DateTime)
    expires_at = db.Column(db.DateTime, nullable=False)

    shards = db.relationship("BatchShard", backref="batch", cascade="all, delete-orphan",
                             order_by="BatchShard.index", lazy="select")
    events = db.relationship("BatchEvent", backref="batch", cascade="all, delete-orphan",
                             order_by="BatchEvent.id", lazy="select")

    @property
    def metadata_dict(self) -> Optional[dict]:
        return json.loads(self.metadata_json) if self.metadata_json else None

    @property
    def resources(self) -> dict:
        return json.loads(self.resources_json or "{}")


class BatchShard(db.Model):
    """One shard of a batch: `lines` input lines in shard-NNNN.jsonl of the batch's folder, run by array task `index`
    (its current job: `job_id`); what its answers and errors files held when last counted."""
    __tablename__ = "batch_shards"
    # queued or running: a task is on its way; done: every line answered or failed; given_up: its remaining lines went
    # to the error file after tasks in a row that answered nothing; stopped: the batch was cancelled or expired first.
    QUEUED, RUNNING, DONE, GIVEN_UP, STOPPED = "queued", "running", "done", "given_up", "stopped"
    LIVE = (QUEUED, RUNNING)

    id = db.Column(db.Integer, primary_key=True)
    batch_id = db.Column(db.String(40), db.ForeignKey("batches.id", ondelete="CASCADE"), index=True, nullable=False)
    index = db.Column(db.Integer, nullable=False)
    lines = db.Column(db.Integer, nullable=False)
    state = db.Column(db.String(16), nullable=False)
    job_id = db.Column(db.String(40))
    node = db.Column(db.String(255))
    attempts = db.Column(db.Integer, nullable=False, default=0)  # tasks submitted for it
    idle_attempts = db.Column(db.Integer, nullable=False, default=0)  # tasks in a row that ended without a new answer
    submitted_at = db.Column(db.DateTime)
    started_at = db.Column(db.DateTime)
    ended_at = db.Column(db.DateTime)
    reason = db.Column(db.Text)  # how its last task ended
    output_bytes = db.Column(db.BigInteger, nullable=False, default=0)
    output_lines = db.Column(db.Integer, nullable=False, default=0)
    error_bytes = db.Column(db.BigInteger, nullable=False, default=0)
    error_lines = db.Column(db.Integer, nullable=False, default=0)
    lines_at_submit = db.Column(db.Integer, nullable=False, default=0)  # answered lines when its task was submitted

    @property
    def answered(self) -> int:
        return self.output_lines + self.error_lines

    def to_dict(self) -> dict:
        return {"index": self.index, "lines": self.lines, "state": self.state, "job_id": self.job_id,
                "node": self.node, "attempts": self.attempts, "completed": self.output_lines,
                "failed": self.error_lines, "submitted_at": iso(self.submitted_at), "started_at": iso(self.started_at),
                "ended_at": iso(self.ended_at), "reason": self.reason}


class BatchEvent(db.Model):
    """A batch's status change (or a shard's resubmission), with its reason."""
    __tablename__ = "batch_events"

    id = db.Column(db.Integer, primary_key=True)
    batch_id = db.Column(db.String(40), db.ForeignKey("batches.id", ondelete="CASCADE"), index=True, nullable=False)
    at = db.Column(db.DateTime, nullable=False, default=utcnow)
    from_status = db.Column(db.String(16))
    to_status = db.Column(db.String(16), nullable=False)
    reason = db.Column(db.Text)

    def to_dict(self) -> dict:
        return {"at": iso(self.at), "from": self.from_status, "to": self.to_status, "reason": self.reason}
