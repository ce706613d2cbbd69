"""The usage ledger against a real SQLite database: counts become exactly the rows they describe, flushes add up
(across real processes too), a failed flush loses and repeats nothing, days turn at UTC midnight, the flush thread
writes on its own, and a stopping gunicorn worker writes what is left."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from portal import db as portal_db
from portal import keys
from portal.app import create_app
from portal.db import db
from portal.models import Service, State, Usage, utcnow
from portal.usage_ledger import UsageLedger, usage_ledger
from tests.conftest import REPO, wait_for

NOON = datetime(2026, 12, 1, 12, tzinfo=timezone.utc).timestamp()


def rows(app) -> dict:
    """The usage table: (day, principal, model, service) -> (requests, errors, prompt, completion)."""
    with app.app_context():
        try:
            return {(r.day, r.principal, r.model, r.service_id): (r.requests, r.errors, r.prompt_tokens,
                                                                  r.completion_tokens) for r in Usage.query.all()}
        finally:
            db.session.remove()


def add_service(app, tmp_path, service_id="0123456789ab") -> None:
    with app.app_context():
        db.session.add(Service(id=service_id, name="s", kind="text-generation", model="test/tiny",
                               state=State.RUNNING, scheduler="local", job_dir=str(tmp_path / service_id),
                               time_limit=10, api_key="k", submitted_at=utcnow()))
        db.session.commit()
        db.session.remove()


def busy_seconds(app, service_id="0123456789ab") -> float:
    with app.app_context():
        try:
            return db.session.get(Service, service_id).busy_seconds
        finally:
            db.session.remove()


def database_path(app) -> str:
    return app.config["SQLALCHEMY_DATABASE_URI"].replace("sqlite:///", "")


def test_counts_become_exactly_their_rows_and_later_flushes_add_to_them(app, tmp_path):
    add_service(app, tmp_path)
    ledger = UsageLedger(app, clock=lambda: NOON)
    for _ in range(3):
        ledger.count("owner", "0123456789ab", "test/tiny", False, 5, 7)
    ledger.count("key:alice", "0123456789ab", "test/tiny", True, 4, 0)
    ledger.count("key:alice", "0123456789ab", "test/other", False, 1, 2)
    ledger.busy("0123456789ab", NOON - 10, NOON - 8.75)
    assert rows(app) == {}  # nothing is written before a flush
    assert ledger.flush() == 3
    assert rows(app) == {("2026-12-01", "owner", "test/tiny", "0123456789ab"): (3, 0, 15, 21),
                         ("2026-12-01", "key:alice", "test/tiny", "0123456789ab"): (1, 1, 4, 0),
                         ("2026-12-01", "key:alice", "test/other", "0123456789ab"): (1, 0, 1, 2)}
    assert busy_seconds(app) == 1.25
    assert ledger.flush() == 0  # nothing new: nothing written again
    ledger.count("owner", "0123456789ab", "test/tiny", True, 10, 20)
    ledger.busy("0123456789ab", NOON - 5, NOON - 4.25)
    assert ledger.flush() == 1
    assert rows(app)[("2026-12-01", "owner", "test/tiny", "0123456789ab")] == (4, 1, 25, 41)
    assert busy_seconds(app) == 2.0
    # Another worker's ledger adds to the same rows.
    other = UsageLedger(app, clock=lambda: NOON)
    other.count("owner", "0123456789ab", "test/tiny", False, 1, 1)
    other.flush()
    assert rows(app)[("2026-12-01", "owner", "test/tiny", "0123456789ab")] == (5, 1, 26, 42)


def test_days_turn_at_utc_midnight(app):
    now = [datetime(2026, 12, 1, 23, 59, 59, 500000, tzinfo=timezone.utc).timestamp()]
    ledger = UsageLedger(app, clock=lambda: now[0])
    ledger.count("owner", "s1", "m", False, 1, 1)
    now[0] += 0.4  # 23:59:59.9
    ledger.count("owner", "s1", "m", False, 1, 1)
    now[0] += 0.1  # 00:00:00.0, the next day
    ledger.count("owner", "s1", "m", False, 1, 1)
    now[0] -= 2 * 86400  # a clock set back two days: counted on that day, not on the last one seen
    ledger.count("owner", "s1", "m", False, 1, 1)
    ledger.flush()
    assert rows(app) == {("2026-12-01", "owner", "m", "s1"): (2, 0, 2, 2),
                         ("2026-12-02", "owner", "m", "s1"): (1, 0, 1, 1),
                         ("2026-11-30", "owner", "m", "s1"): (1, 0, 1, 1)}


def test_a_flush_on_a_missing_table_keeps_its_counts_for_the_next(app):
    ledger = UsageLedger(app, clock=lambda: NOON)
    ledger.count("owner", "s1", "m", False, 3, 4)
    with sqlite3.connect(database_path(app)) as connection:
        connection.execute("ALTER TABLE usage RENAME TO usage_away")
    with pytest.raises(Exception, match="usage"):
        ledger.flush()
    assert ledger.failures == 1
    ledger.count("owner", "s1", "m", True, 1, 1)  # counted while the database is away
    with sqlite3.connect(database_path(app)) as connection:
        connection.execute("ALTER TABLE usage_away RENAME TO usage")
    assert rows(app) == {}
    assert ledger.flush() == 1
    assert rows(app) == {("2026-12-01", "owner", "m", "s1"): (2, 1, 4, 5)}
    ledger.flush()
    assert rows(app) == {("2026-12-01", "owner", "m", "s1"): (2, 1, 4, 5)}  # written once


def test_a_flush_fails_whole_or_not_at_all(app, tmp_path):
    """The usage rows are written, then the busy seconds fail: neither stays, and the next flush writes both once."""
    add_service(app, tmp_path)
    ledger = UsageLedger(app, clock=lambda: NOON)
    ledger.count("key:bob", "0123456789ab", "m", False, 2, 3)
    ledger.busy("0123456789ab", NOON - 4.0, NOON)
    with sqlite3.connect(database_path(app)) as connection:
        connection.execute("CREATE TRIGGER refuse BEFORE UPDATE ON services BEGIN SELECT RAISE(ABORT, 'refused'); "
                           "END")
    with pytest.raises(Exception, match="refused"):
        ledger.flush()
    assert rows(app) == {} and busy_seconds(app) == 0.0
    with sqlite3.connect(database_path(app)) as connection:
        connection.execute("DROP TRIGGER refuse")
    ledger.flush()
    assert rows(app) == {("2026-12-01", "key:bob", "m", "0123456789ab"): (1, 0, 2, 3)}
    assert busy_seconds(app) == 4.0


@pytest.fixture
def impatient_app(tmp_path, site_config, monkeypatch):
    """An app whose SQLite connections give up on a lock after 3 s (the portal waits 10 s)."""
    def pragmas(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=3000")
        cursor.close()

    monkeypatch.setattr(portal_db, "_sqlite_pragmas", pragmas)
    return create_app({"home": tmp_path / "home", "site_config_path": site_config, "testing": True})


def test_a_locked_database_keeps_the_counts_and_a_brief_lock_is_waited_out(impatient_app):
    app = impatient_app
    ledger = UsageLedger(app, clock=lambda: NOON)
    ledger.count("owner", "s1", "m", False, 1, 2)
    holder = sqlite3.connect(database_path(app), isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock past the busy timeout
    with pytest.raises(Exception, match="locked"):
        ledger.flush()
    holder.execute("COMMIT")
    assert rows(app) == {}
    ledger.count("owner", "s1", "m", False, 1, 2)
    holder.execute("BEGIN IMMEDIATE")  # held for 1 s, 2 s less than the busy timeout: the flush waits for it
    released = []
    release = threading.Timer(1.0, lambda: (released.append(time.monotonic()), holder.execute("COMMIT")))
    release.start()
    flushing = time.monotonic()
    ledger.flush()
    release.join()
    holder.close()
    assert released[0] > flushing  # the lock was still held when the flush began
    assert rows(app) == {("2026-12-01", "owner", "m", "s1"): (2, 0, 2, 4)}


def test_the_flush_thread_writes_on_its_own_and_marks_keys_used(app, monkeypatch):
    marked = []
    monkeypatch.setattr(keys, "mark_used", marked.append, raising=False)
    ledger = usage_ledger(app)
    assert ledger._thread is None  # started with the first count, not before
    before = time.time()
    ledger.count("key:laptop", "s1", "m", False, 1, 1)
    ledger.count("owner", "s1", "m", False, 1, 1)
    assert ledger._thread is not None and ledger._thread.daemon
    written = wait_for(lambda: rows(app), timeout=10, what="the flush thread to write")
    assert sum(values[0] for values in written.values()) == 2
    wait_for(lambda: marked, timeout=5, what="mark_used")
    assert list(marked[0]) == ["laptop"]  # key principals only, by name
    at = marked[0]["laptop"]
    assert at.tzinfo is None and before - 1 <= at.replace(tzinfo=timezone.utc).timestamp() <= time.time()


def test_without_mark_used_a_flush_still_writes(app, monkeypatch):
    monkeypatch.delattr(keys, "mark_used", raising=False)
    ledger = UsageLedger(app, clock=lambda: NOON)
    ledger.count("key:laptop", "s1", "m", False, 1, 1)
    assert ledger.flush() == 1


def test_a_stopping_gunicorn_worker_writes_what_is_left(app):
    from portal import gunicorn_conf

    ledger = usage_ledger(app)
    ledger.flush_seconds = 3600  # only the worker's exit writes
    ledger.count("owner", "s1", "m", False, 2, 2)
    gunicorn_conf.worker_exit(None, SimpleNamespace(wsgi=SimpleNamespace(flask_app=app)))
    assert sum(values[0] for values in rows(app).values()) == 1
    ledger._thread.join(timeout=5)
    assert not ledger._thread.is_alive()


WRITER = """
import sys, time
from portal.app import create_app
from portal.usage_ledger import UsageLedger
home, site, start, rounds, writer = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
app = create_app({"home": home, "site_config_path": site, "testing": True})
ledger = UsageLedger(app, clock=lambda: 1796126400.0, flush_seconds=3600)  # 2026-12-01 12:00 UTC
time.sleep(max(0.0, start - time.time()))
failures = 0
for n in range(rounds):
    for key in range(10):
        for _ in range(5):
            ledger.count(f"key:k{key}", "0123456789ab", "m", key % 2 == 0, 3, 7)
    begins = 1796126400.0 - 115 + 0.75 * n + 0.25 * writer  # within the ledger's BUSY_MEMORY of its clock
    ledger.busy("0123456789ab", begins, begins + 0.5)
    while True:
        try:
            ledger.flush()
            break
        except Exception:
            failures += 1
print(failures)
"""


def test_two_processes_flushing_the_same_rows_add_up_exactly(app, tmp_path, site_config):
    add_service(app, tmp_path)
    rounds = 150
    start = time.time() + 3  # both have built their app by then
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "home"), str(site_config), str(start),
                                 str(rounds), str(writer)], cwd=str(REPO), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for writer in range(2)]
    for writer in writers:
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
    found = rows(app)
    assert len(found) == 10
    for key in range(10):
        errors = 2 * rounds * 5 if key % 2 == 0 else 0
        assert found[("2026-12-01", f"key:k{key}", "m", "0123456789ab")] == (
            2 * rounds * 5, errors, 2 * rounds * 5 * 3, 2 * rounds * 5 * 7)
    # Each round, one process was busy 0.5 s and the other 0.5 s from a quarter second later: 0.75 s of busy time.
    # Summed per process it would be 1 s.
    assert busy_seconds(app) == pytest.approx(rounds * 0.75, abs=0.01)


@pytest.mark.parametrize("order", ["long first", "short first"])
def test_two_workers_busy_at_once_count_that_time_once_whichever_writes_first(app, tmp_path, order):
    """One worker busy from 0 to 10 s, the other in three spells, two inside that and one beyond it, then both again
    from 19 to 22 s: 12 + 3 s of busy time, in either order of their flushes (a worker's own spells that touch are
    one)."""
    add_service(app, tmp_path)
    long, short = UsageLedger(app, clock=lambda: NOON), UsageLedger(app, clock=lambda: NOON)
    base = NOON - 60
    long.busy("0123456789ab", base, base + 10)
    for start, end in ((2, 4), (6, 8), (9, 12)):
        short.busy("0123456789ab", base + start, base + end)
    for ledger in ((long, short) if order == "long first" else (short, long)):
        ledger.flush()
    assert busy_seconds(app) == pytest.approx(12.0)
    long.busy("0123456789ab", base + 20, base + 21)
    long.busy("0123456789ab", base + 21, base + 22)  # goes on from its last spell
    short.busy("0123456789ab", base + 19, base + 21)
    for ledger in ((long, short) if order == "long first" else (short, long)):
        ledger.flush()
    assert busy_seconds(app) == pytest.approx(15.0)
    long.busy("0123456789ab", base - 300, base - 299)  # older than what is remembered: counted whole
    long.flush()
    assert busy_seconds(app) == pytest.approx(16.0)
