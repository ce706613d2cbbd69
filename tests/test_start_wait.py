"""The Retry-After of a request to a service on its way up (portal/proxy/directory.py's start_wait): how long its last
start took, less how long the current one has been going; 10 s for one that never answered, half its last start
(at least 5 s) once overdue, never above 60 s (what the openai client honours). The real wake of a service scaled to zero, with the official client's own
retries carrying a chat across it: tests/test_replicas.py."""
from __future__ import annotations

from datetime import timedelta

import pytest

from portal.db import db
from portal.models import Service, ServiceJob, State, utcnow
from portal.proxy.directory import START_WAIT_FIRST, START_WAIT_MAX, START_WAIT_OVERDUE, start_wait


def service(state: str, submitted_ago=None, earlier=None) -> str:
    """A service in `state`, its current job submitted `submitted_ago` seconds ago, and an earlier job of its own that
    took `earlier` seconds from submission to its first answer."""
    now = utcnow()
    row = Service(id="5e7a1c0ffee00001", name="waking", kind="text-generation", model="org/model", state=state,
                  scheduler="local", job_dir="/x", time_limit=30, api_key="k",
                  submitted_at=now - timedelta(seconds=submitted_ago) if submitted_ago is not None else None)
    db.session.add(row)
    if earlier is not None:
        db.session.add(ServiceJob(service_id=row.id, generation=1, phase=ServiceJob.DRAINING, time_limit=30,
                                  submitted_at=now - timedelta(hours=1),
                                  ready_at=now - timedelta(hours=1) + timedelta(seconds=earlier)))
    db.session.commit()
    return row.id


@pytest.mark.parametrize("state, submitted_ago, earlier, wait", [
    (State.SCALED_TO_ZERO, None, 42.2, 46),  # asleep: its last start, the reconciler's second, the 2 s margin
    (State.SUBMITTED, 10, 42.2, 35),  # on its way for 10 s
    (State.STARTING, 50, 42.2, 22),  # slower than last time: half the last start more
    (State.STARTING, 12, 8.0, START_WAIT_OVERDUE),  # ... at least this
    (State.PENDING, 5, 600, START_WAIT_MAX),  # a long start: clients would not wait longer than this at once
    (State.STARTING, 5, None, START_WAIT_FIRST),  # its first start
])
def test_the_wait_is_what_is_left_of_its_last_start(app, state, submitted_ago, earlier, wait):
    with app.app_context():
        assert start_wait(service(state, submitted_ago, earlier)) == wait


def test_an_unknown_service_gets_the_first_starts_wait(app):
    with app.app_context():
        assert start_wait("no-such-service") == start_wait("x" * 40) == START_WAIT_FIRST
