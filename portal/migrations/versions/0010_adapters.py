"""The LoRA adapters a service serves beside its model (catalog/adapters.py): names the gateway routes and lists.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-20

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("services") as batch:
        batch.add_column(sa.Column("adapters_json", sa.Text(), nullable=False, server_default="[]"))


def downgrade():
    with op.batch_alter_table("services") as batch:
        batch.drop_column("adapters_json")
