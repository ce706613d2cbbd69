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


def _add_missing_columns(engine) -> None:
    """Columns added to a table since a database was created (nullable, no default): ALTER TABLE ADD COLUMN."""
    from sqlalchemy import inspect, text
    from sqlalchemy.exc import OperationalError

    inspector = inspect(engine)
    with engine.begin() as connection:
        for table in db.metadata.sorted_tables:
            if not inspector.has_table(table.name):
                continue
            present = {column["name"] for column in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in present and column.nullable and column.default is None:
                    kind = column.type.compile(dialect=engine.dialect)
                    try:
                        with connection.begin_nested():
                            connection.execute(text(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}'))
                    except OperationalError as exc:  # another worker added it between the check and here
                        if "duplicate column" not in str(exc):
                            raise


def _create_tables(attempts: int = 5) -> None:
    """create_all, again if another worker created a table between the check and the CREATE (a fresh database)."""
    from sqlalchemy.exc import OperationalError

    for attempt in range(attempts):
        try:
            db.create_all()
            return
        except OperationalError as exc:
            if "already exists" not in str(exc) or attempt == attempts - 1:
                raise


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

        _create_tables()
        _add_missing_columns(engine)
        path = engine.url.database
        if engine.dialect.name == "sqlite" and path and os.path.exists(path):
            os.chmod(path, 0o600)  # holds service API keys
