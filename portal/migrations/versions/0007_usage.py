"""Who used what (portal/usage_ledger.py writes it, portal/usage_report.py reads it): requests, errors and tokens
per day, principal, model and service, and the seconds each service had a request in flight.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "usage",
        sa.Column("day", sa.String(10), primary_key=True),  # YYYY-MM-DD, UTC
        sa.Column("principal", sa.String(80), primary_key=True),  # owner, key:<name>
        sa.Column("model", sa.String(300), primary_key=True),
        sa.Column("service_id", sa.String(16), primary_key=True),
        sa.Column("requests", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("errors", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False, server_default="0"),
    )
    with op.batch_alter_table("services") as batch:
        batch.add_column(sa.Column("busy_seconds", sa.Float(), nullable=False, server_default="0"))


def downgrade():
    with op.batch_alter_table("services") as batch:
        batch.drop_column("busy_seconds")
    op.drop_table("usage")
