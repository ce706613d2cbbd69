"""Database setup: the Flask-SQLAlchemy handle, SQLite in WAL mode, private file permissions, and the schema
brought up to date by migrations (portal/migrations) when the portal starts."""
from __future__ import annotations

import os
from pathlib import Path

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event

db = SQLAlchemy()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _lock_path(app, database: str | None) -> Path:
    """The lock file the workers of one portal migrate under: in its home (beside the database without one)."""
    settings = app.config.get("PILOTFISH")
    if settings is not None:
        return Path(settings.home) / "database.lock"
    return Path(database or ".").resolve().parent / "database.lock"


def init_db(app) -> None:
    """Bind the database to the app and migrate it to the newest schema (`flask db ...` works on it too)."""
    from .migrations import MIGRATIONS_DIR, upgrade  # first: it quiets alembic's logger before alembic loads
    from flask_migrate import Migrate

    url = app.config["SQLALCHEMY_DATABASE_URI"]
    if url.startswith("sqlite"):
        app.config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", {"connect_args": {"timeout": 10, "check_same_thread": False}})
    db.init_app(app)
    Migrate(app, db, directory=str(MIGRATIONS_DIR))
    with app.app_context():
        engine = db.engine
        path = engine.url.database if engine.dialect.name == "sqlite" else None
        if path and path != ":memory:":
            # Created 0600 before SQLite writes a byte (it holds service API keys); -wal and -shm get the same mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            for name in (path, path + "-wal", path + "-shm", path + "-journal"):  # left by an older portal: made private
                if os.path.exists(name):
                    os.chmod(name, 0o600)
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
            engine.dispose()  # connections made before the listener get the pragmas too
        from . import models  # noqa: F401  (registers the tables)

        upgrade(engine, _lock_path(app, path))
