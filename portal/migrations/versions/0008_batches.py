"""The Files and Batches API (portal/batches/): stored files, batches, their shards (one array task each) and their
status changes.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "files",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner", sa.String(80), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("path", sa.String(1000), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_files_owner", "files", ["owner"])
    op.create_table(
        "batches",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner", sa.String(80), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("model", sa.String(300), nullable=False),
        sa.Column("input_file_id", sa.String(40), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("metadata_json", sa.Text()),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("errors_json", sa.Text()),
        sa.Column("ending", sa.String(16)),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("completed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("output_file_id", sa.String(40)),
        sa.Column("error_file_id", sa.String(40)),
        sa.Column("folder", sa.String(1000), nullable=False),
        sa.Column("scheduler", sa.String(16), nullable=False),
        sa.Column("engine", sa.String(40)),
        sa.Column("tier", sa.String(100)),
        sa.Column("time_limit", sa.Integer(), nullable=False),
        sa.Column("resources_json", sa.Text(), nullable=False),
        sa.Column("shard_size", sa.Integer(), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("in_progress_at", sa.DateTime()),
        sa.Column("finalizing_at", sa.DateTime()),
        sa.Column("completed_at", sa.DateTime()),
        sa.Column("failed_at", sa.DateTime()),
        sa.Column("expired_at", sa.DateTime()),
        sa.Column("cancelling_at", sa.DateTime()),
        sa.Column("cancelled_at", sa.DateTime()),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_batches_owner", "batches", ["owner"])
    op.create_index("ix_batches_status", "batches", ["status"])
    op.create_table(
        "batch_shards",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("batch_id", sa.String(40), sa.ForeignKey("batches.id", ondelete="CASCADE"), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("job_id", sa.String(40)),
        sa.Column("node", sa.String(255)),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("idle_attempts", sa.Integer(), nullable=False),
        sa.Column("submitted_at", sa.DateTime()),
        sa.Column("started_at", sa.DateTime()),
        sa.Column("ended_at", sa.DateTime()),
        sa.Column("reason", sa.Text()),
        sa.Column("output_bytes", sa.BigInteger(), nullable=False),
        sa.Column("output_lines", sa.Integer(), nullable=False),
        sa.Column("error_bytes", sa.BigInteger(), nullable=False),
        sa.Column("error_lines", sa.Integer(), nullable=False),
        sa.Column("lines_at_submit", sa.Integer(), nullable=False),
    )
    op.create_index("ix_batch_shards_batch_id", "batch_shards", ["batch_id"])
    op.create_table(
        "batch_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("batch_id", sa.String(40), sa.ForeignKey("batches.id", ondelete="CASCADE"), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("from_status", sa.String(16)),
        sa.Column("to_status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text()),
    )
    op.create_index("ix_batch_events_batch_id", "batch_events", ["batch_id"])


def downgrade():
    op.drop_table("batch_events")
    op.drop_table("batch_shards")
    op.drop_table("batches")
    op.drop_table("files")
