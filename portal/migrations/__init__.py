"""Schema migrations (Alembic, through Flask-Migrate), run when the portal starts.

`upgrade(engine, lock_path)` brings the database to the newest revision in versions/: an empty database gets every
revision from 0001 (the baseline: release 0.1.0's schema, baseline.py); a database written before migrations (its
tables exist, it has no alembic_version) first gets what the baseline has that it lacks, is stamped at 0001, and
then gets the later revisions. Every gunicorn worker calls it at start: an exclusive lock file lets one of them
migrate while the others wait, then find nothing to do. A developer adds a revision with
`flask --app portal.app db migrate -m "..."` (README, "Configuration").
"""
from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import sqlalchemy as sa

if logging.getLogger("alembic").level == logging.NOTSET:  # no INFO lines from every worker at every start;
    logging.getLogger("alembic").setLevel(logging.WARNING)  # `flask db` sets its own level (alembic.ini)
from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.operations import Operations
from alembic.script import ScriptDirectory

MIGRATIONS_DIR = Path(__file__).resolve().parent
BASELINE = "0001"
PG_LOCK_KEY = 0x70696C6F74  # pg_advisory_xact_lock key: portals of other homes sharing one PostgreSQL database

log = logging.getLogger(__name__)


class MigrationError(RuntimeError):
    """The database could not be brought to the portal's schema; the message says what is wrong."""


def alembic_config(connection: Optional[sa.engine.Connection] = None) -> Config:
    """Alembic settings without a file: the scripts of this package, and the connection env.py uses."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(connection: sa.engine.Connection) -> Optional[str]:
    return MigrationContext.configure(connection).get_current_revision()


@contextmanager
def lock_file(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created 0600), waiting for any other process that holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def migration_connection(engine: sa.engine.Engine) -> Iterator[sa.engine.Connection]:
    """One connection and one transaction for a whole migration, committed only if all of it succeeds.

    On SQLite: foreign keys are off meanwhile (a batch migration copies a table and drops the old one; with them on,
    dropping `services` would delete every event by cascade), checked before the commit, and the transaction is
    BEGIN IMMEDIATE, since the driver would otherwise commit each CREATE and ALTER on its own. On PostgreSQL an
    advisory lock keeps two portals from migrating one database at once.
    """
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        elif connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_LOCK_KEY})")
        try:
            yield connection
            if sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise MigrationError(f"the migration left rows whose foreign keys point nowhere: {broken[:5]}")
            connection.commit()
        except BaseException:
            connection.rollback()
            raise
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")


def adopt(connection: sa.engine.Connection) -> List[str]:
    """Bring a database written before migrations up to the baseline; return what was added (tables, columns,
    indexes). Earlier commits of 0.1.0 lack tables and nullable columns that later ones added at start."""
    from .baseline import metadata

    added: List[str] = []
    operations = Operations(MigrationContext.configure(connection))
    existing = set(sa.inspect(connection).get_table_names())
    for table in metadata.sorted_tables:
        if table.name not in existing:
            table.create(connection)  # with its indexes
            added.append(table.name)
            continue
        inspector = sa.inspect(connection)
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:
                raise MigrationError(f"table {table.name} lacks column {column.name}, which cannot be added to "
                                     "existing rows (NOT NULL, no default)")
            operations.add_column(table.name, sa.Column(column.name, column.type))
            added.append(f"{table.name}.{column.name}")
        indexes = {index["name"] for index in inspector.get_indexes(table.name)}
        for index in sorted(table.indexes, key=lambda index: index.name):
            if index.name not in indexes:
                index.create(connection)
                added.append(index.name)
    return added


def written_before_migrations(connection: sa.engine.Connection) -> bool:
    """Tables of the baseline exist but no revision is recorded."""
    from .baseline import metadata

    if current_revision(connection) is not None:
        return False
    return bool(set(metadata.tables) & set(sa.inspect(connection).get_table_names()))


def _known(config: Config, revision: str) -> bool:
    from alembic.util import CommandError

    try:
        return ScriptDirectory.from_config(config).get_revision(revision) is not None
    except CommandError:
        return False


def upgrade(engine: sa.engine.Engine, lock_path: Path) -> None:
    """Migrate the database to the newest revision: one process at a time (the lock file), all or nothing."""
    with lock_file(lock_path), migration_connection(engine) as connection:
        config = alembic_config(connection)
        before = current_revision(connection)
        if before is not None and not _known(config, before):
            raise MigrationError(f"the database is at schema revision {before}, which this portal does not know: "
                                 "a newer version of the portal wrote it")
        if written_before_migrations(connection):
            added = adopt(connection)
            command.stamp(config, BASELINE)
            log.info("database written before migrations: %s; stamped at revision %s",
                     f"added {', '.join(added)}" if added else "nothing to add", BASELINE)
            before = BASELINE
        command.upgrade(config, "head")
        after = current_revision(connection)
    if after != before:
        log.info("database %s revision %s", f"migrated from revision {before} to" if before else "created at", after)
