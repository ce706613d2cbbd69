"""What a named key may do (portal/keys.py): its scopes, its models, its end, its rates, and when it was last used.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("scopes", sa.String(40), nullable=False, server_default="use,read,launch"))
        batch.add_column(sa.Column("models_json", sa.Text(), nullable=True))
        batch.add_column(sa.Column("expires_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("requests_per_minute", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("tokens_per_minute", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("last_used_at", sa.DateTime(), nullable=True))


def downgrade():
    with op.batch_alter_table("api_keys") as batch:
        for column in ("last_used_at", "tokens_per_minute", "requests_per_minute", "expires_at", "models_json",
                       "scopes"):
            batch.drop_column(column)
