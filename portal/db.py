"""Database setup: the Flask-SQLAlchemy handle, SQLite in WAL mode, private file permissions."""
from __future__ import annotations

import os

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


def init_db(app) -> None:
    """Bind the database to the app and create missing tables."""
    url = app.config["SQLALCHEMY_DATABASE_URI"]
    if url.startswith("sqlite"):
        app.config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", {"connect_args": {"timeout": 10, "check_same_thread": False}})
    db.init_app(app)
    with app.app_context():
        engine = db.engine
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
            engine.dispose()  # connections made before the listener get the pragmas too
        from . import models  # noqa: F401  (registers the tables)

        db.create_all()
        path = engine.url.database
        if engine.dialect.name == "sqlite" and path and os.path.exists(path):
            os.chmod(path, 0o600)  # holds service API keys
