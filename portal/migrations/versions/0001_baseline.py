"""Baseline: the schema of release 0.1.0 (portal/migrations/baseline.py).

Revision ID: 0001
Revises:
Create Date: 2025-11-30

"""
from alembic import op
from sqlalchemy.schema import CreateIndex, CreateTable, DropTable

from portal.migrations.baseline import metadata

# revision identifiers, used by Alembic.
revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    for table in metadata.sorted_tables:
        op.execute(CreateTable(table))
        for index in sorted(table.indexes, key=lambda index: index.name):
            op.execute(CreateIndex(index))


def downgrade():
    for table in reversed(metadata.sorted_tables):
        op.execute(DropTable(table))
