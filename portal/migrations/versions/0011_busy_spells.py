"""A service's busy spells counted lately (busy_spells_json), so that the spells of several workers that overlap them
add only what they add to them (portal/usage_ledger.py).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-21

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("services") as batch:
        batch.add_column(sa.Column("busy_spells_json", sa.Text(), nullable=False, server_default="[]"))


def downgrade():
    with op.batch_alter_table("services") as batch:
        batch.drop_column("busy_spells_json")
