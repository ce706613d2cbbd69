"""Idle timeouts and leases without a scheduler: the values users write (one check for the API, recipes, tiers and the
site), the reconciler's decision and what it does with it, and the directory's activity timer. The same features on the
real test Slurm: tests/test_idle_and_leases.py."""
import asyncio
from datetime import timedelta
from types import SimpleNamespace

import pytest

from portal.app import create_app
from portal.config import ConfigError, load_config
from portal.db import db
from portal.lifetimes import due_stop, expected_stop, parse_idle_timeout, parse_lease
from portal.models import Service, State, utcnow
from portal.proxy import directory as directory_module
from portal.proxy.directory import ServiceDirectory
from portal.reconciler import Reconciler
from portal.recipes import RecipeError, parse_recipe
from portal.scheduler import JobInfo, JobState
from tests.conftest import TEST_SPECS, write_site_config

NOW = utcnow()


@pytest.mark.parametrize("value, minutes", [(30, 30), ("30", 30), ("30m", 30), ("1h", 60), ("1h30m", 90),
                                            ("2d", 2880), (0, 0), ("0", 0), ("off", 0), ("never", 0)])
def test_idle_timeouts_as_written(value, minutes):
    assert parse_idle_timeout(value) == minutes


@pytest.mark.parametrize("value", ["", "soon", "90s", "1h30", "1.5", 1.5, -1, True, None, [30], "٣٠", "30 m",
                                   10 ** 9])
def test_bad_idle_timeouts_are_refused_naming_the_field(value):
    with pytest.raises(Exception) as info:
        parse_idle_timeout(value)
    assert info.value.field == "idle_timeout" and str(info.value).startswith("idle_timeout: ")


@pytest.mark.parametrize("value, seconds", [(600, 600), ("600", 600), ("10m", 600), ("90s", 90), ("1m30s", 90),
                                            ("1h", 3600)])
def test_leases_as_written(value, seconds):
    assert parse_lease(value) == seconds


@pytest.mark.parametrize("value", [0, 29, "10s", "soon", "", 1.5, False, 10 ** 9])
def test_bad_leases_are_refused_naming_the_field(value):
    with pytest.raises(Exception) as info:
        parse_lease(value)
    assert info.value.field == "lease"


def service(**fields):
    values = dict(state="RUNNING", idle_timeout=None, lease_seconds=None, last_activity=None, ready_at=None,
                  lease_renewed_at=None, created_at=NOW - timedelta(hours=1), stop_requested=False)
    values.update(fields)
    return SimpleNamespace(**values)


def ago(seconds):
    return NOW - timedelta(seconds=seconds)


def test_an_idle_service_stops_once_its_timeout_has_passed_since_its_last_request():
    idle = service(idle_timeout=30, ready_at=ago(3600), last_activity=ago(30 * 60 - 1))
    assert due_stop(idle, NOW) is None
    assert due_stop(idle, NOW + timedelta(seconds=1)) == "idle for 30 min"
    assert expected_stop(idle) == (ago(-1), "idle for 30 min")
    assert due_stop(service(idle_timeout=90, ready_at=ago(7200), last_activity=ago(5401)), NOW) == "idle for 1 h 30 min"


def test_idle_time_counts_from_readiness_only_once_it_serves():
    assert due_stop(service(idle_timeout=1, ready_at=ago(59)), NOW) is None  # ready 59 s ago, never used
    assert due_stop(service(idle_timeout=1, ready_at=ago(61)), NOW) == "idle for 1 min"
    assert due_stop(service(idle_timeout=1, ready_at=ago(61), state="UNHEALTHY"), NOW) == "idle for 1 min"
    for state in ("SUBMITTED", "PENDING", "STARTING", "STOPPED"):  # a queued or loading service is not idle
        assert due_stop(service(idle_timeout=1, ready_at=None, state=state), NOW) is None
    assert due_stop(service(idle_timeout=1, ready_at=ago(61), stop_requested=True), NOW) is None  # already stopping
    assert due_stop(service(idle_timeout=None, ready_at=ago(10 ** 6)), NOW) is None
    assert expected_stop(service(ready_at=ago(10))) is None


def test_a_lease_holds_while_it_is_renewed_or_used():
    leased = dict(lease_seconds=60, created_at=ago(600))
    assert due_stop(service(**leased, lease_renewed_at=ago(59)), NOW) is None
    assert due_stop(service(**leased, lease_renewed_at=ago(300), last_activity=ago(10)), NOW) is None  # traffic
    assert due_stop(service(**leased, lease_renewed_at=ago(75)), NOW) == "lease expired (no heartbeat for 75 s)"
    assert due_stop(service(**leased, state="PENDING"), NOW) == "lease expired (no heartbeat for 600 s)"  # any live
    assert due_stop(service(lease_seconds=60, created_at=ago(30), state="SUBMITTED"), NOW) is None
    assert due_stop(service(**leased, state="FAILED"), NOW) is None
    # Both: the first to come says when and why.
    both = service(lease_seconds=60, lease_renewed_at=ago(10), idle_timeout=1, ready_at=ago(3600),
                   last_activity=ago(55))
    assert expected_stop(both) == (ago(-5), "idle for 1 min")


def test_every_launch_path_refuses_a_bad_idle_timeout_or_lease_naming_it(client, auth):
    for body, field in (({"idle_timeout": "soon"}, "idle_timeout"), ({"idle_timeout": -5}, "idle_timeout"),
                        ({"idle_timeout": 1.5}, "idle_timeout"), ({"lease": 5}, "lease"), ({"lease": "10x"}, "lease"),
                        ({"lease": True}, "lease")):
        response = client.post("/api/services", json={"kind": "text-generation", "model": "test/tiny", **body},
                               headers=auth)
        assert response.status_code == 400, response.get_json()
        assert response.get_json()["field"] == field and response.get_json()["error"].startswith(f"{field}: ")
    with pytest.raises(RecipeError, match=r"^services\[0\]\.idle_timeout: expected minutes"):
        parse_recipe({"services": [{"kind": "text-generation", "model": "a/b", "idle_timeout": "1x"}]})
    assert parse_recipe([{"kind": "text-generation", "model": "a/b", "idle_timeout": "1h"}]).launches[0][
        "idle_timeout"] == 60
    with pytest.raises(ConfigError, match="^idle_timeout: expected minutes"):
        load_config({"home": "/nonexistent"}, environ={"PILOTFISH_IDLE_TIMEOUT": "half an hour"})
    assert load_config({"home": "/nonexistent"}, environ={"PILOTFISH_IDLE_TIMEOUT": "1h"}).idle_timeout == 60


def test_the_idle_timeout_is_the_launchs_else_its_tiers_else_the_sites(tmp_path):
    specs = tmp_path / "specs.yaml"
    specs.write_text(TEST_SPECS.replace("        cpu_cores: 2\n", "        cpu_cores: 2\n        idle_timeout: 2h\n"))
    site = write_site_config(tmp_path / "site.yaml", scheduler="local", idle_timeout="45m", resource_specs=str(specs))
    app = create_app({"home": tmp_path / "home", "site_config_path": site, "testing": True})
    client = app.test_client()
    auth = {"Authorization": f"Bearer {app.config['PILOTFISH_TOKEN']}"}

    def plan(**fields):
        response = client.post("/api/services?dry_run=1", json={"kind": "text-generation", "model": "test/tiny",
                                                                **fields}, headers=auth)
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    assert (plan()["idle_timeout"], plan()["idle_timeout_reason"]) == (
        45, "stops after 45 min without a request (the site's default)")
    assert plan(tier="Big")["idle_timeout_reason"] == "stops after 2 h without a request (tier cpu.Big's default)"
    assert plan(tier="Big", idle_timeout="10m")["idle_timeout"] == 10
    assert plan(idle_timeout="off")["idle_timeout"] is None
    specs.write_text(TEST_SPECS.replace("        cpu_cores: 2\n", "        cpu_cores: 2\n        idle_timeout: soon\n"))
    broken = client.post("/api/services?dry_run=1", json={"kind": "text-generation", "model": "test/tiny"},
                         headers=auth)
    assert broken.status_code == 503 and "partitions.cpu.tiers[1].idle_timeout: expected minutes" in \
        broken.get_json()["error"]


def test_a_lease_is_renewed_through_the_api_only_for_a_live_service_with_one(app, client, auth, tmp_path):
    with app.app_context():
        for service_id, state, lease in (("0000000000b1", "RUNNING", 60), ("0000000000b2", "RUNNING", None),
                                         ("0000000000b3", "STOPPED", 60)):
            db.session.add(Service(id=service_id, name=service_id, kind="text-generation", model="org/m", state=state,
                                   scheduler="local", job_dir=str(tmp_path / service_id), time_limit=5, api_key="k",
                                   lease_seconds=lease, created_at=ago(50)))
        db.session.commit()
    before = client.get("/api/services/0000000000b1", headers=auth).get_json()
    assert before["lease"] == 60 and before["stop_reason_expected"] == "lease expired (no heartbeat for 60 s)"
    renewed = client.post("/api/services/0000000000b1/lease", headers=auth)
    assert renewed.status_code == 200, renewed.get_json()
    assert renewed.get_json()["lease_renewed_at"] and renewed.get_json()["stops_at"] > before["stops_at"]
    assert client.post("/api/services/0000000000b2/lease", headers=auth).status_code == 409
    assert "has ended" in client.post("/api/services/0000000000b3/lease", headers=auth).get_json()["error"]
    assert client.post("/api/services/ffffffffffff/lease", headers=auth).status_code == 404
    assert client.post("/api/services/0000000000b1/lease").status_code == 401


class CancellableJobs:
    """A scheduler whose jobs run until cancelled, then show CANCELLED."""
    calls = 0

    def __init__(self):
        self.cancelled = []

    def query(self, jobs):
        self.calls += 1
        return {job.job_id: JobInfo(job.job_id, JobState.CANCELLED if job.job_id in self.cancelled else
                                    JobState.RUNNING, node="node1", detail="") for job in jobs}

    def cancel(self, job_id, job_dir):
        self.cancelled.append(job_id)


def test_the_reconciler_stops_an_idle_service_as_its_user_would_with_the_reason(app, tmp_path):
    scheduler = app.extensions["pilotfish.scheduler"] = CancellableJobs()
    reconciler = Reconciler(app)
    with app.app_context():
        for service_id, last in (("0000000000c1", 61), ("0000000000c2", 50)):
            db.session.add(Service(id=service_id, name=service_id, kind="text-generation", model="org/m",
                                   state=State.RUNNING, scheduler="local", job_dir=str(tmp_path / service_id),
                                   time_limit=10, api_key="k", job_id=service_id[-2:], node="node1",
                                   submitted_at=ago(600), ready_at=ago(300), last_activity=utcnow() - timedelta(
                                       seconds=last), idle_timeout=1))
        db.session.commit()
        reconciler.cycle()  # decides: c1 has been idle for more than a minute, c2 not yet
        assert scheduler.cancelled == ["c1"]
        idle = db.session.get(Service, "0000000000c1")
        assert idle.stop_requested and idle.stop_reason == "idle for 1 min" and idle.state == State.RUNNING
        assert idle.events[-1].reason == "stopping: idle for 1 min"
        assert idle.to_dict()["stops_at"] is None  # already stopping
        reconciler.cycle()  # the scheduler confirms
        assert db.session.get(Service, "0000000000c1").state == State.STOPPED
        assert db.session.get(Service, "0000000000c1").reason == "idle for 1 min"
        assert db.session.get(Service, "0000000000c2").state == State.RUNNING
        reconciler.cycle()
        assert scheduler.cancelled == ["c1"]  # once


def test_the_directory_notes_requests_in_flight_and_sets_no_timer_when_quiet(app, tmp_path, monkeypatch):
    monkeypatch.setattr(directory_module, "ACTIVITY_FLUSH_SECONDS", 0.3)
    with app.app_context():
        db.session.add(Service(id="0000000000d1", name="d", kind="text-generation", model="org/m", state=State.RUNNING,
                               scheduler="local", job_dir=str(tmp_path / "d"), time_limit=10, api_key="k"))
        db.session.commit()

    def last_activity():
        with app.app_context():
            try:
                return db.session.get(Service, "0000000000d1").last_activity
            finally:
                db.session.remove()

    directory = ServiceDirectory(tmp_path, app)
    slack = timedelta(milliseconds=1)

    async def until(predicate, what: str, timeout: float = 10):
        """Poll `predicate` without holding up the event loop (the timer runs on it) until it returns a truthy
        value."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not (value := predicate()):
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
            await asyncio.sleep(0.05)
        return value

    async def traffic():
        directory.begin("0000000000d1")  # a long stream
        assert directory._timer is not None
        seen_in_flight = await until(last_activity, "the activity of a request in flight to be written")
        await until(lambda: last_activity() > seen_in_flight, "it to be written again while the request lasts")
        directory.end("0000000000d1")
        before = utcnow()
        directory.begin("0000000000d1")  # a short request right after: its end is written by the timer, later
        directory.end("0000000000d1")
        assert "0000000000d1" in directory._pending  # not written by the request: the timer writes it
        ended = utcnow()
        await until(lambda: before - slack <= last_activity() <= ended + slack, "the timer to write the request's end")
        assert directory._timer is None  # nothing in flight, nothing to write: no timer
        return seen_in_flight

    assert asyncio.run(traffic()) is not None
