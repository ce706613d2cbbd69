"""The schema of release 0.1.0, the last one before migrations, frozen: never edit it to follow the models.

Revision 0001 creates it in an empty database; portal.migrations brings a database written by 0.1.0 (or an earlier
commit, which lacks some of these columns and tables) up to it before stamping it. Later schema changes are new
revisions in versions/, not changes here.
"""
import sqlalchemy as sa

metadata = sa.MetaData(naming_convention={"ix": "ix_%(column_0_label)s"})

sa.Table(
    "services", metadata,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("engine", sa.String(40)),
    sa.Column("health_path", sa.String(200)),
    sa.Column("model", sa.String(300), nullable=False),
    sa.Column("revision", sa.String(100)),
    sa.Column("tier", sa.String(100)),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("reason", sa.Text()),
    sa.Column("scheduler", sa.String(16), nullable=False),
    sa.Column("job_id", sa.String(40)),
    sa.Column("job_dir", sa.String(500), nullable=False),
    sa.Column("resources_json", sa.Text(), nullable=False),
    sa.Column("engine_args_json", sa.Text(), nullable=False),
    sa.Column("time_limit", sa.Integer(), nullable=False),
    sa.Column("api_key", sa.String(100), nullable=False),
    sa.Column("host", sa.String(255)),
    sa.Column("port", sa.Integer()),
    sa.Column("node", sa.String(255)),
    sa.Column("stop_requested", sa.Boolean(), nullable=False),
    sa.Column("health_failures", sa.Integer(), nullable=False),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("submitted_at", sa.DateTime()),
    sa.Column("job_started_at", sa.DateTime()),
    sa.Column("endpoint_at", sa.DateTime()),
    sa.Column("ready_at", sa.DateTime()),
    sa.Column("ended_at", sa.DateTime()),
    sa.Column("last_activity", sa.DateTime()),
)

sa.Table(
    "events", metadata,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("service_id", sa.String(16), sa.ForeignKey("services.id", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("at", sa.DateTime(), nullable=False),
    sa.Column("from_state", sa.String(16)),
    sa.Column("to_state", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text()),
)

sa.Table(
    "conditions", metadata,
    sa.Column("name", sa.String(40), primary_key=True),
    sa.Column("ok", sa.Boolean(), nullable=False),
    sa.Column("message", sa.Text()),
    sa.Column("since", sa.DateTime(), nullable=False),
    sa.Column("checked_at", sa.DateTime(), nullable=False),
)

sa.Table(
    "api_keys", metadata,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("name", sa.String(60), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True, index=True),
    sa.Column("hint", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("revoked_at", sa.DateTime()),
)

sa.Table(
    "model_inventory", metadata,
    sa.Column("repo_id", sa.String(200), primary_key=True),
    sa.Column("kind", sa.String(40)),
    sa.Column("size_bytes", sa.BigInteger(), nullable=False),
    sa.Column("data_json", sa.Text(), nullable=False),
    sa.Column("scanned_at", sa.DateTime(), nullable=False),
)

sa.Table(
    "downloads", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("repo_id", sa.String(200), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("data_json", sa.Text(), nullable=False),
    sa.Column("cancel_requested", sa.Boolean(), nullable=False),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("updated_at", sa.DateTime(), nullable=False),
)

sa.Table(
    "benchmark_runs", metadata,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("service_id", sa.String(16), nullable=False, index=True),
    sa.Column("service_name", sa.String(100)),
    sa.Column("kind", sa.String(40)),
    sa.Column("model", sa.String(300), nullable=False, index=True),
    sa.Column("tier", sa.String(100)),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("target", sa.String(16), nullable=False),
    sa.Column("params_json", sa.Text(), nullable=False),
    sa.Column("summary_json", sa.Text()),
    sa.Column("result_json", sa.Text()),
    sa.Column("error", sa.Text()),
    sa.Column("pid", sa.Integer()),
    sa.Column("pid_started", sa.Float()),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("finished_at", sa.DateTime()),
)
