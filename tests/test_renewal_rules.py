"""Renewal's rules alone (portal/lifetimes.py) and the reconciler's renewal steps on a scheduler that answers what
each test says (portal/renewal.py): when a successor is due and how long it runs, a job that ends before its
successor answered, successors that fail. On the real Slurm, with 16 streaming clients: tests/test_renewal.py."""
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from portal.db import db
from portal.errors import ValidationError
from portal.lifetimes import parse_renewal, renewal_lead, successor_due, successor_minutes
from portal.models import Service, ServiceJob, State, utcnow
from portal.reconciler import Reconciler
from portal.scheduler import JobInfo, JobState

NOW = datetime(2026, 12, 1, 12, 0, 0)


@pytest.mark.parametrize("value, expected", [
    (True, (True, None)), (False, (False, None)),
    ("8h", (True, NOW + timedelta(hours=8))), ("1d2h", (True, NOW + timedelta(hours=26))),
    ("2026-12-01T18:30:00Z", (True, datetime(2026, 12, 1, 18, 30))),
    ("2026-12-01T19:30+01:00", (True, datetime(2026, 12, 1, 18, 30))),
])
def test_renewal_as_written(value, expected):
    assert parse_renewal(value, NOW) == expected


def test_a_naive_end_time_is_the_portals_local_time():
    local = datetime(2026, 12, 1, 18, 0)
    assert parse_renewal("2026-12-01T18:00", NOW)[1] == local.astimezone(timezone.utc).replace(tzinfo=None)


@pytest.mark.parametrize("value, problem", [
    ("yes", "expected true"), (1, "expected true"), ("1m", "at least 2 minutes"), ("2026-12-01T11:00Z", "at least"),
    ("400d", "within 366 days"), ("8053871d4964289h", "within 366 days"),
    ("0001-01-01T00:00", "expected true"), ("9999-12-31T23:59+14:00", "within 366 days"), ("2026-13-01T00:00", "expected true"), ("2027-01-02", "expected true"),
])
def test_bad_renewals_are_refused_naming_the_field(value, problem):
    with pytest.raises(ValidationError) as refused:
        parse_renewal(value, NOW)
    assert refused.value.field == "renew" and problem in refused.value.problem


def job(started_minutes_ago: float, time_limit: int = 60, startup: float = 30, **extra):
    started = NOW - timedelta(minutes=started_minutes_ago)
    fields = dict(renew=True, renew_until=None, state=State.RUNNING, stop_requested=False, time_limit=time_limit,
                  job_started_at=started, submitted_at=started - timedelta(seconds=5), created_at=started,
                  ready_at=started + timedelta(seconds=startup - 5))
    fields.update(extra)
    return SimpleNamespace(**fields)


def test_a_successor_is_due_a_lead_before_the_time_limit_and_never_before_half_way():
    lead = renewal_lead(30, 120)  # twice the start-up, the drain, a margin
    assert lead == 60 + 120 + 15
    assert not successor_due(job(60 - lead / 60 - 0.1), NOW, 120, None)
    assert successor_due(job(60 - lead / 60 + 0.01), NOW, 120, None)
    # A start-up as long as the job: not before half-way through it.
    assert not successor_due(job(29, startup=1800), NOW, 120, None)
    assert successor_due(job(30, startup=1800), NOW, 120, None)


def test_no_successor_for_a_service_that_is_not_renewed_stopping_or_ending_with_this_job():
    late = 59
    assert successor_due(job(late), NOW, 120, None)
    assert not successor_due(job(late, renew=False), NOW, 120, None)
    assert not successor_due(job(late, stop_requested=True), NOW, 120, None)
    assert not successor_due(job(late, state=State.UNHEALTHY), NOW, 120, None)
    assert not successor_due(job(late, renew_until=NOW + timedelta(minutes=1)), NOW, 120, None)
    # The Open OnDemand session (the portal's own job) ends before this job: nothing outlives it.
    assert not successor_due(job(late), NOW, 120, NOW + timedelta(seconds=30))
    assert successor_due(job(late, renew_until=NOW + timedelta(hours=2)), NOW, 120, None)


def test_a_successor_runs_the_services_time_limit_or_what_is_left_of_the_renewal():
    assert successor_minutes(job(59), NOW, None) == 60
    assert successor_minutes(job(59, renew_until=NOW + timedelta(minutes=20, seconds=1)), NOW, None) == 21
    assert successor_minutes(job(59), NOW, NOW + timedelta(minutes=10)) == 10


class Jobs:
    """A scheduler whose jobs are in the states the test sets; submits and cancels are recorded."""

    def __init__(self):
        self.states, self.submitted, self.cancelled, self.calls = {}, [], [], 0

    def query(self, jobs):
        self.calls += 1
        return {query.job_id: JobInfo(query.job_id, self.states[query.job_id], node="node2",
                                      detail=self.states[query.job_id].value)
                for query in jobs if query.job_id in self.states}

    def submit(self, script, job_dir, name, resources):
        job_id = str(100 + len(self.submitted))
        self.submitted.append((job_id, Path(job_dir), resources.time))
        self.states[job_id] = JobState.PENDING
        return job_id

    def cancel(self, job_id, job_dir):
        self.cancelled.append(job_id)
        self.states[job_id] = JobState.CANCELLED


@pytest.fixture
def renewed(app, tmp_path):
    """A RUNNING renewed service whose one-minute job is 50 s old, on a reconciler whose probes all answer."""
    scheduler = app.extensions["pilotfish.scheduler"] = Jobs()
    reconciler = Reconciler(app)
    reconciler._probe = lambda *target: (True, "HTTP 200")
    job_dir = tmp_path / "00000000aa01"
    job_dir.mkdir()
    (job_dir / "job.sh").write_text("#!/bin/bash\n")
    scheduler.states["7"] = JobState.RUNNING
    with app.app_context():
        started = utcnow() - timedelta(seconds=50)
        db.session.add(Service(id="00000000aa01", name="renewed", kind="text-generation", model="org/m",
                               state=State.RUNNING, scheduler="slurm", job_dir=str(job_dir), time_limit=1,
                               resources_json=json.dumps({"time": 1, "cpus": 1}), api_key="k", job_id="7",
                               node="node1", host="node1", port=9000, created_at=started, submitted_at=started,
                               job_started_at=started, ready_at=started + timedelta(seconds=2), renew=True))
        db.session.commit()
        yield SimpleNamespace(scheduler=scheduler, reconciler=reconciler, job_dir=job_dir)


def service():
    return db.session.get(Service, "00000000aa01")


def test_a_job_that_ends_before_its_successor_answered_hands_over_at_once(renewed):
    renewed.reconciler.cycle()
    successor_id, run_dir, minutes = renewed.scheduler.submitted[0]
    assert run_dir == renewed.job_dir / "generation-2" and (run_dir / "job.sh").read_text() == "#!/bin/bash\n"
    assert minutes == 1 and service().jobs[0].phase == ServiceJob.SUCCESSOR
    assert service().events[-1].reason.startswith(f"renewal: generation 2 submitted as job {successor_id} (1 min;")

    renewed.scheduler.states["7"] = JobState.TIMEOUT  # the successor still waits in the queue
    renewed.reconciler.cycle()
    current = service()
    assert current.state == State.UNHEALTHY and current.generation == 2 and current.job_id == successor_id
    assert current.port is None and current.run_dir == str(renewed.job_dir / "generation-2")
    assert current.reason.startswith("job 7 ended (TIMEOUT) before its successor answered: waiting for generation 2")
    assert [(job.generation, job.job_id, job.phase) for job in current.jobs] == [(1, "7", ServiceJob.ENDED)]

    renewed.scheduler.states[successor_id] = JobState.RUNNING  # it starts and writes where it listens
    (renewed.job_dir / "generation-2" / "endpoint.json").write_text('{"host": "node2", "port": 9001}')
    renewed.reconciler.cycle()
    renewed.reconciler.cycle()
    current = service()
    assert (current.state, current.host, current.port) == (State.RUNNING, "node2", 9001)
    assert current.job_started_at is not None  # so its own successor comes when due
    assert renewed.scheduler.cancelled == []


def test_successors_that_end_before_they_answer_end_the_renewal(renewed):
    renewed.reconciler.cycle()
    renewed.scheduler.states["100"] = JobState.FAILED
    renewed.reconciler.cycle()  # the first ended before it answered: another is submitted at once
    assert [(job.job_id, job.phase) for job in service().jobs] == [("100", ServiceJob.FAILED),
                                                                   ("101", ServiceJob.SUCCESSOR)]
    assert any(event.reason.startswith("successor generation 2 (job 100) ended before it answered: the job failed")
               for event in service().events), [event.reason for event in service().events]
    renewed.scheduler.states["101"] = JobState.FAILED
    renewed.reconciler.cycle()
    renewed.reconciler.cycle()
    assert len(renewed.scheduler.submitted) == 2
    assert not service().renew and service().state == State.RUNNING and service().job_id == "7"
    assert service().events[-1].reason == "renewal stopped: 2 successors in a row ended before they answered"


def test_stopping_a_renewed_service_cancels_its_successor_too(renewed, app):
    from portal.services import stop
    renewed.reconciler.cycle()
    successor_id = renewed.scheduler.submitted[0][0]
    with app.test_request_context():
        stop(service())
    assert renewed.scheduler.cancelled == [successor_id, "7"]
    assert service().jobs[0].phase == ServiceJob.ENDED
