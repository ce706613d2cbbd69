"""Batches counted as usage: a usage row's service is a service's id or a batch's (batch_<hex>, 30 characters).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("usage") as batch:
        batch.alter_column("service_id", existing_type=sa.String(16), type_=sa.String(40), existing_nullable=False)


def downgrade():
    with op.batch_alter_table("usage") as batch:
        batch.alter_column("service_id", existing_type=sa.String(40), type_=sa.String(16), existing_nullable=False)
