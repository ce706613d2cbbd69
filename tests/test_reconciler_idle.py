"""An idle portal stays idle: the reconciler cycles only while a service is live or something woke it, and a cycle
in which nothing changed writes nothing. Structural checks (cycles counted, statements seen), no CPU timing:
benchmarks/idle.py measures the CPU time itself."""
import threading
import time

import pytest
from sqlalchemy import event

from portal.db import db
from portal.models import Service, State, utcnow
from portal.reconciler import Reconciler
from portal.scheduler import JobInfo, JobState
from tests.conftest import wait_for
from tests.support.prometheus_scrape import scrape


def cycles(portal) -> float:
    return scrape(portal).value("pilotfish_reconcile_cycle_seconds_count")


def test_a_portal_without_live_services_does_not_cycle(start_portal):
    portal = start_portal("local", workers=2)  # poll_interval 1 s: ten cycles in ten seconds if it polled
    wait_for(lambda: cycles(portal) >= 1, timeout=15, what="the first reconcile cycle")
    time.sleep(2)
    before = cycles(portal)
    time.sleep(10)
    assert cycles(portal) - before <= 1

    # A launch wakes it (whichever worker took the request), it follows the service while it lives...
    launched = portal.launch(name="idle").json()
    portal.wait_state(launched["id"], "RUNNING", timeout=60)
    before = cycles(portal)
    wait_for(lambda: cycles(portal) - before >= 3, timeout=10, interval=0.5,
             what="three reconcile cycles while the service is live")
    portal.request("POST", f"/api/services/{launched['id']}/stop")
    assert portal.wait_state(launched["id"], "STOPPED", timeout=30)["reason"] == "stopped by user"

    # ... and goes quiet again once nothing is live.
    time.sleep(2)
    before = cycles(portal)
    time.sleep(8)
    assert cycles(portal) - before <= 1


@pytest.fixture
def reconcilers(app):
    started = []

    def start():
        reconciler = Reconciler(app)
        reconciler.start()
        started.append(reconciler)
        return reconciler

    yield start
    for reconciler in reversed(started):
        reconciler.stop()


def test_a_wake_in_the_worker_that_does_not_lead_reaches_the_leader(app, reconcilers):
    leader = reconcilers()
    wait_for(lambda: leader.is_leader and leader.cycles >= 1, timeout=10, what="the leader's first cycle")
    follower = reconcilers()
    time.sleep(0.5)
    assert not follower.is_leader
    quiet = leader.cycles
    time.sleep(2.5)  # more than poll_interval's fast half: no live service, no cycle
    assert leader.cycles == quiet

    follower.wake()  # a launch taken by the other worker: seen through the wake mark within fast_poll_interval
    wait_for(lambda: leader.cycles > quiet, timeout=3, interval=0.05, what="the leader to cycle")
    quiet = leader.cycles
    leader.wake()
    wait_for(lambda: leader.cycles > quiet, timeout=1, interval=0.05, what="the leader to cycle at once")

    leader.stop()  # the follower takes over
    wait_for(lambda: follower.is_leader and follower.cycles >= 1, timeout=5, what="the follower to take over")


class RunningJobs:
    """A scheduler whose every job runs on node1."""
    calls = 0

    def query(self, jobs):
        self.calls += 1
        return {job.job_id: JobInfo(job.job_id, JobState.RUNNING, node="node1", detail="RUNNING") for job in jobs}


def test_a_cycle_in_which_nothing_changed_writes_nothing(app, tmp_path):
    app.extensions["pilotfish.scheduler"] = RunningJobs()
    reconciler = Reconciler(app)
    writes, lock = [], threading.Lock()

    def seen(conn, cursor, statement, *args):
        if statement.split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            with lock:
                writes.append(statement)

    with app.app_context():
        db.session.add(Service(id="0123456789ab", name="s", kind="text-generation", model="test/tiny",
                               state=State.STARTING, scheduler="local", job_dir=str(tmp_path / "job"), time_limit=10,
                               api_key="k", job_id="42", submitted_at=utcnow()))
        db.session.commit()
        event.listen(db.engine, "before_cursor_execute", seen)
        try:
            assert reconciler.cycle().busy  # the first writes the scheduler's condition and the node
            assert writes
            writes.clear()
            for _ in range(3):
                report = reconciler.cycle(recount=False)
                assert report.services == 1 and report.scheduler_calls == 1 and not report.transitions
            assert writes == []
        finally:
            event.remove(db.engine, "before_cursor_execute", seen)
