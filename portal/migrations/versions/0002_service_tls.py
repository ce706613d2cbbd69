"""Services keep the fingerprint of their TLS certificate (portal/service_tls.py).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("services") as batch:
        batch.add_column(sa.Column("tls_fingerprint", sa.String(64), nullable=True))


def downgrade():
    with op.batch_alter_table("services") as batch:
        batch.drop_column("tls_fingerprint")
