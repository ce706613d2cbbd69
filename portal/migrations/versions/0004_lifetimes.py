"""Services that live as long as they are used (portal/lifetimes.py): an idle timeout, a lease and its renewal, and
why the portal was asked to stop a service.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("services") as batch:
        batch.add_column(sa.Column("idle_timeout", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("lease_seconds", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("lease_renewed_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("stop_reason", sa.Text(), nullable=True))


def downgrade():
    with op.batch_alter_table("services") as batch:
        for column in ("stop_reason", "lease_renewed_at", "lease_seconds", "idle_timeout"):
            batch.drop_column(column)
