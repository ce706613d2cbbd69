"""Services that outlive one job or run on several (portal/renewal.py, portal/replicas.py): renewal, its end, the
current job's generation, replica counts, and a service's other jobs (a successor, replicas, draining jobs).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("services") as batch:
        batch.add_column(sa.Column("renew", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("renew_until", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("generation", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("replicas_min", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("replicas_max", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("target_in_flight", sa.Integer(), nullable=True))
    op.create_table(
        "service_jobs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("service_id", sa.String(16), sa.ForeignKey("services.id", ondelete="CASCADE"), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("job_id", sa.String(40)),
        sa.Column("node", sa.String(255)),
        sa.Column("host", sa.String(255)),
        sa.Column("port", sa.Integer()),
        sa.Column("time_limit", sa.Integer(), nullable=False),
        sa.Column("health_failures", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("submitted_at", sa.DateTime()),
        sa.Column("job_started_at", sa.DateTime()),
        sa.Column("endpoint_at", sa.DateTime()),
        sa.Column("ready_at", sa.DateTime()),
        sa.Column("drain_until", sa.DateTime()),
        sa.Column("ended_at", sa.DateTime()),
        sa.Column("reason", sa.Text()),
    )
    op.create_index("ix_service_jobs_service_id", "service_jobs", ["service_id"])


def downgrade():
    op.drop_index("ix_service_jobs_service_id", "service_jobs")
    op.drop_table("service_jobs")
    with op.batch_alter_table("services") as batch:
        for column in ("target_in_flight", "replicas_max", "replicas_min", "generation", "renew_until", "renew"):
            batch.drop_column(column)
