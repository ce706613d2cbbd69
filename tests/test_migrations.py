"""Schema migrations: a fresh database is made by them and matches the models; databases written before them
(release 0.1.0, tests/support/db-0.1.0-*.sql) upgrade with their data; workers starting together migrate once."""
from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.operations import Operations

from portal import models  # noqa: F401  (the tables the database should match)
from portal.app import create_app
from portal.db import db
from portal.migrations import BASELINE, MigrationError, head_revision, lock_file, migration_connection
from tests.conftest import wait_for

REPO = Path(__file__).resolve().parent.parent
SUPPORT = REPO / "tests" / "support"
RELEASE = "db-0.1.0-d276bc8.sql"  # the last commit before migrations
EARLIER = "db-0.1.0-2f867b6.sql"  # before services.engine, services.health_path and benchmark_runs
SERVICE_ID = "a1b2c3d4e5f60718"


def database_from(home: Path, fixture: str) -> Path:
    """A home whose database is the one an old commit wrote (loaded from its dump)."""
    home.mkdir(mode=0o700)
    path = home / "pilotfish.db"
    connection = sqlite3.connect(path)
    connection.executescript((SUPPORT / fixture).read_text())
    connection.close()
    return path


def schema_differences(path: Path) -> list:
    """What Alembic's autogenerate would change to make the database match the models (nothing, if it does)."""
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), db.metadata)
    finally:
        engine.dispose()


def revision_of(path: Path) -> list:
    connection = sqlite3.connect(path)
    try:
        return [row[0] for row in connection.execute("SELECT version_num FROM alembic_version")]
    finally:
        connection.close()


def portal_app(home: Path, site_config: Path):
    return create_app({"home": home, "site_config_path": site_config, "testing": True})


def test_a_fresh_database_is_made_by_the_migrations_and_matches_the_models(tmp_path, site_config):
    app = portal_app(tmp_path / "home", site_config)
    path = tmp_path / "home" / "pilotfish.db"
    assert revision_of(path) == [head_revision()]
    assert schema_differences(path) == []
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with app.app_context():
        assert db.session.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
        assert db.session.execute(sa.text("PRAGMA foreign_keys")).scalar() == 1
        assert db.session.execute(sa.text("PRAGMA busy_timeout")).scalar() == 10000
    portal_app(tmp_path / "home", site_config)  # a restart finds nothing to do
    assert revision_of(path) == [head_revision()]


@pytest.mark.parametrize("fixture", [RELEASE, EARLIER])
def test_a_database_written_before_migrations_upgrades_with_its_data(tmp_path, site_config, fixture, caplog):
    path = database_from(tmp_path / "home", fixture)
    caplog.set_level("INFO", logger="portal.migrations")
    app = portal_app(tmp_path / "home", site_config)
    assert revision_of(path) == [head_revision()]
    assert schema_differences(path) == []
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    added = "nothing to add" if fixture == RELEASE else "added benchmark_runs, services.engine, services.health_path"
    adopted = [r.getMessage() for r in caplog.records if "written before migrations" in r.getMessage()]
    assert adopted == [f"database written before migrations: {added}; stamped at revision {BASELINE}"]

    client = app.test_client()
    headers = {"Authorization": f"Bearer {app.config['PILOTFISH_TOKEN']}"}
    response = client.get(f"/api/services/{SERVICE_ID}", headers=headers)
    assert response.status_code == 200, response.text
    service = response.get_json()
    assert (service["name"], service["model"], service["state"], service["job_id"]) == \
        ("tiny-chat", "test/tiny", "STOPPED", "4242")
    assert service["engine"] == ("vllm" if fixture == RELEASE else None)
    assert service["phases"]["total"] == 6.0
    assert [(e["from"], e["to"]) for e in service["events"]] == [
        (None, "SUBMITTED"), ("SUBMITTED", "STARTING"), ("STARTING", "RUNNING"), ("RUNNING", "STOPPED")]
    assert client.get("/api/services", headers=headers).get_json()["services"][0]["id"] == SERVICE_ID

    with app.app_context():  # the other tables kept their rows, and the foreign key still cascades
        assert db.session.execute(sa.text("SELECT name FROM api_keys")).scalars().all() == ["notebook"]
        assert db.session.execute(sa.text("SELECT ok FROM conditions WHERE name = 'scheduler'")).scalar() == 1
        assert db.session.execute(sa.text("SELECT count(*) FROM benchmark_runs")).scalar() == \
            (1 if fixture == RELEASE else 0)
        db.session.execute(sa.text("DELETE FROM services"))
        db.session.commit()
        assert db.session.execute(sa.text("SELECT count(*) FROM events")).scalar() == 0

    portal_app(tmp_path / "home", site_config)  # and the next start leaves it as it is
    assert revision_of(path) == [head_revision()]


def test_a_migration_that_fails_leaves_the_database_as_it_was(tmp_path):
    path = database_from(tmp_path / "home", RELEASE)
    engine = sa.create_engine(f"sqlite:///{path}")
    with pytest.raises(RuntimeError, match="half way"):
        with migration_connection(engine) as connection:
            connection.exec_driver_sql("CREATE TABLE half (id INTEGER)")
            connection.exec_driver_sql("ALTER TABLE services ADD COLUMN half TEXT")
            connection.exec_driver_sql("DELETE FROM events")
            raise RuntimeError("failed half way")
    with engine.connect() as connection:
        assert "half" not in sa.inspect(connection).get_table_names()
        assert "half" not in {c["name"] for c in sa.inspect(connection).get_columns("services")}
        assert connection.exec_driver_sql("SELECT count(*) FROM events").scalar() == 4
    engine.dispose()


def test_a_table_rebuilt_by_a_batch_migration_keeps_the_rows_that_reference_it(tmp_path):
    """SQLite's ALTER TABLE is limited: Alembic copies the table and drops the old one. With foreign keys on, that
    drop would delete every event by cascade; migration_connection turns them off and checks them before commit."""
    path = database_from(tmp_path / "home", RELEASE)
    engine = sa.create_engine(f"sqlite:///{path}")

    @sa.event.listens_for(engine, "connect")
    def foreign_keys_on(dbapi_connection, _record):
        dbapi_connection.execute("PRAGMA foreign_keys=ON")

    with migration_connection(engine) as connection:
        operations = Operations(MigrationContext.configure(connection))
        with operations.batch_alter_table("services", recreate="always") as batch:
            batch.alter_column("reason", existing_type=sa.Text(), type_=sa.String(2000))
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM events").scalar() == 4
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


STARTER = """
import logging, sys, time
from portal.app import create_app
logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s: %(message)s")
start_at = float(sys.argv[1])
time.sleep(max(0.0, start_at - time.time()))
create_app()
print("started")
"""


@pytest.mark.parametrize("fixture", [None, RELEASE])
def test_two_processes_starting_at_once_on_one_file_both_succeed(tmp_path, site_config, fixture):
    home = tmp_path / "home"
    if fixture:
        database_from(home, fixture)
    env = dict(os.environ, PILOTFISH_HOME=str(home), PILOTFISH_SITE_CONFIG=str(site_config))
    start_at = time.time() + 4  # both have imported Flask, SQLAlchemy and Alembic by then
    processes = [subprocess.Popen([sys.executable, "-c", STARTER, str(start_at)], env=env, cwd=str(REPO),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0 and "started" in output, output
    migrated = [line for output in outputs for line in output.splitlines() if "portal.migrations:" in line]
    assert len({line.split()[0] for line in migrated}) == 1, migrated  # one process migrated, the other waited
    assert ("written before migrations" if fixture else "created at revision") in migrated[0]
    path = home / "pilotfish.db"
    assert revision_of(path) == [head_revision()]
    assert schema_differences(path) == []
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    if fixture:
        connection = sqlite3.connect(path)
        assert connection.execute("SELECT count(*) FROM events").fetchone()[0] == 4
        connection.close()


def test_a_worker_waits_while_another_migrates(tmp_path, site_config):
    """The lock file in the portal's home: a worker that finds it held waits, then finds the database migrated."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    env = dict(os.environ, PILOTFISH_HOME=str(home), PILOTFISH_SITE_CONFIG=str(site_config))
    with lock_file(home / "database.lock"):
        process = subprocess.Popen([sys.executable, "-c", STARTER, "0"], env=env, cwd=str(REPO),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: (home / "token").exists() or process.poll() is not None, timeout=60,
                 what="the worker to reach the database")  # create_app writes the token just before init_db
        time.sleep(1.5)
        assert process.poll() is None, process.communicate()[0]
        connection = sqlite3.connect(home / "pilotfish.db")  # made (empty, 0600) before the lock is taken
        assert connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        connection.close()
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 0 and "created at revision" in output, output
    assert revision_of(home / "pilotfish.db") == [head_revision()]


def test_a_database_a_newer_portal_migrated_is_refused_with_a_reason(tmp_path, site_config):
    portal_app(tmp_path / "home", site_config)
    connection = sqlite3.connect(tmp_path / "home" / "pilotfish.db")
    connection.execute("UPDATE alembic_version SET version_num = 'f00dcafe'")
    connection.commit()
    connection.close()
    with pytest.raises(MigrationError, match="revision f00dcafe, which this portal does not know"):
        portal_app(tmp_path / "home", site_config)
