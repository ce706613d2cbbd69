"""Open OnDemand sessions of the app on the real test Slurm: the rendered before/script/after run inside a real
sbatch job under OOD's job wrapper; the portal answers under /node/<host>/<port>/; the Connect button logs a real
browser in; and when the job ends (scancel, or its time limit) no service job it started is left."""
from __future__ import annotations

import json
import math
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import requests

from portal.client import connect
from tests.conftest import port_open, squeue_ids, wait_for, write_site_config
from tests.ood.dashboard import OodFront, connection, form_values, render_form, render_submit, render_view, stage, submit
from tests.support.browser import ARTIFACTS, open_browser

pytestmark = pytest.mark.slurm

NO_SITE = {"PILOTFISH_SITE_CONFIG": None, "PILOTFISH_RESOURCE_SPECS": None, "PILOTFISH_CACHE_DIR": None}


def squeue_field(job_id: str, field: str) -> str:
    """One squeue field of a job still queued or running ("" once it left the queue)."""
    return subprocess.run(["squeue", "--noheader", f"--jobs={job_id}", f"--format={field}"], capture_output=True,
                          text=True, timeout=30).stdout.strip()


def minutes(slurm_time: str) -> float:
    """Slurm's [D-]HH:MM:SS or MM:SS as minutes."""
    days, _, clock = slurm_time.rpartition("-")
    parts = [int(part) for part in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 1440 + parts[0] * 60 + parts[1] + parts[2] / 60



class Session:
    """One session of the app, as the dashboard makes it: form -> submit.yml -> staged templates -> sbatch."""

    def __init__(self, base: Path, env: dict, **choices):
        self.base, self.env = base, env
        self.work_dir = base / "output" / "session"  # the dashboard's staged_root
        self.home = base / "home"  # the user's home directory on the cluster
        self.form = render_form(env)
        self.values = form_values(self.form, **choices)
        self.submit_yml = render_submit(env, self.values, str(self.work_dir))
        self.job_id = None
        self.info = None

    def start(self, extra=()) -> "Session":
        self.work_dir.mkdir(parents=True)
        self.home.mkdir()
        stage(self.work_dir, self.values)
        # The job sees this as the user's home (the wrapper's header, which sites use for such settings).
        self.job_id = submit(self.work_dir, self.submit_yml, header=f"export HOME={self.home}", extra=list(extra))
        return self

    def wait_ready(self, timeout: float = 90) -> dict:
        def ready():
            if squeue_field(self.job_id, "%T") in ("", "FAILED", "CANCELLED", "COMPLETED", "TIMEOUT"):
                pytest.fail(f"the session's job {self.job_id} ended:\n{self.log()}")
            return connection(self.work_dir)
        self.info = wait_for(ready, timeout=timeout, interval=0.5, what=f"connection.yml of job {self.job_id}")
        return self.info

    @property
    def prefix(self) -> str:
        return f"/node/{self.info['host']}/{self.info['port']}"

    @property
    def url(self) -> str:
        return f"http://{self.info['host']}:{self.info['port']}{self.prefix}"

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.info['password']}", **kwargs.pop("headers", {})}
        return requests.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def launch(self, **body) -> dict:
        body = {"kind": "text-generation", "model": "test/tiny", **body}
        response = self.request("POST", "/api/services", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def service(self, service_id: str) -> dict:
        return self.request("GET", f"/api/services/{service_id}").json()

    def wait_state(self, service_id: str, state: str, timeout: float = 60) -> dict:
        return wait_for(lambda: (lambda s: s if s["state"] == state else None)(self.service(service_id)),
                        timeout=timeout, interval=0.5, what=f"service {service_id} to be {state}")

    def log(self) -> str:
        path = self.work_dir / "output.log"
        return path.read_text(errors="replace") if path.exists() else "(no output.log yet)"

    def wait_stopped(self) -> str:
        """The log once the portal reports it has stopped (a cancelled job leaves the queue at once, and its
        processes get KillWait seconds to finish)."""
        return wait_for(lambda: (lambda text: text if "pilotfish: the portal has stopped" in text else None)(self.log()),
                        timeout=15, what="the portal to report it has stopped")

    def cancel(self) -> None:
        if self.job_id:
            subprocess.run(["scancel", self.job_id], capture_output=True, timeout=30)


def gone_from_queue(job_id: str) -> bool:
    return job_id not in squeue_ids()


@pytest.fixture(scope="module")
def site_env(slurm_cluster, tmp_path_factory):
    """The site: its config names the test cache (models, the test tiers) and the tiny stand-in service."""
    site = write_site_config(tmp_path_factory.mktemp("ood-site") / "site.yml", scheduler="slurm")
    return {**NO_SITE, "PILOTFISH_SITE_CONFIG": str(site)}


@pytest.fixture(scope="module")
def walltime(site_env, tmp_path_factory):
    """A session whose job reaches its time limit while a service it started still has half an hour to go.

    Started before the module's other sessions so it ages while they run. Its service is launched while the job
    still has an hour, then the job's limit is lowered to one minute (as `scontrol update` lets a user do): only
    the portal's own cleanup at walltime can end that service's job in time.
    """
    session = Session(tmp_path_factory.mktemp("ood-walltime"), site_env, service_placement="separate_jobs").start()
    try:
        session.wait_ready()
        service = session.launch(name="outlives-walltime", time=30)
        wait_for(lambda: squeue_field(service["job_id"], "%T") == "RUNNING", timeout=60, what="the service's job")
        assert minutes(squeue_field(service["job_id"], "%l")) == 30
        lowered = subprocess.run(["scontrol", "update", f"JobId={session.job_id}", "TimeLimit=1"],
                                 capture_output=True, text=True, timeout=30)
        assert lowered.returncode == 0, lowered.stderr
        yield session, service
    finally:
        session.cancel()


@pytest.fixture(scope="module")
def session(site_env, tmp_path_factory, walltime):
    """A session of the default choice: the portal on a light CPU job, services as Slurm jobs of their own."""
    session = Session(tmp_path_factory.mktemp("ood-session"), site_env, service_placement="separate_jobs").start()
    try:
        session.wait_ready()
        yield session
    finally:
        session.cancel()


def test_portal_answers_under_its_prefix(session):
    assert session.submit_yml["script"]["native"] == ["--time=60", "--cpus-per-task=1", "--mem=2048M"]
    info = session.info
    assert set(info) == {"host", "port", "password"} and info["host"] == socket.gethostname()
    assert squeue_field(session.job_id, "%T|%C|%m|%l") == "RUNNING|1|2G|1:00:00"
    assert requests.get(f"{session.url}/health", timeout=10).json()["status"] == "ok"
    assert requests.get(f"{session.url}/api/services", timeout=10).status_code == 401
    assert session.request("GET", "/api/services").status_code == 200
    status = session.request("GET", "/api/status").json()
    assert status["scheduler"]["kind"] == "slurm"
    bare = requests.get(f"http://{info['host']}:{info['port']}/api/services",
                        headers={"Authorization": f"Bearer {info['password']}"}, timeout=10)
    assert bare.status_code == 200  # direct callers may leave the prefix out
    token_file = session.work_dir / "portal.token"
    assert token_file.read_text().strip() == info["password"]
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((session.work_dir / "connection.yml").stat().st_mode) == 0o600
    log = session.log()
    assert "The Pilotfish portal answers" in log and info["password"] not in log


def test_notebook_finds_the_portal_through_connection_json(session):
    path = session.home / ".pilotfish" / "connection.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert data["url"] == session.url and data["token"] == session.info["password"]
    portal = connect(home=str(session.home / ".pilotfish"))
    assert portal.url == session.url and isinstance(portal.services(), list)
    called = requests.get(f"{data['url']}/v1/models", headers={"Authorization": f"Bearer {data['token']}"}, timeout=10)
    assert called.status_code == 200 and called.json()["object"] == "list"


def test_connect_button_logs_the_browser_in(session):
    html = render_view(session.work_dir / "connection.yml")
    assert session.info["password"] in html and "?" not in html.split('action="')[1].split('"')[0]
    with OodFront(html) as front, open_browser(ARTIFACTS / "ood") as browser:
        page = browser.new_page()
        page.goto(front.url + OodFront.SESSIONS)
        browser.screenshot(page, "session-card")
        with page.context.expect_page() as opened:
            page.get_by_role("button", name="Connect to Pilotfish").click()
        portal_page = opened.value
        portal_page.wait_for_load_state()
        assert portal_page.url == f"{front.url}{session.prefix}/"  # through OOD's proxy, under the prefix
        assert session.info["password"] not in portal_page.url
        status = portal_page.evaluate("fetch('api/services').then(r => r.status)")
        assert status == 200  # the session cookie, not a token, authenticates this call
        cookies = {c["name"]: c for c in page.context.cookies()}
        assert cookies["pilotfish_session"]["path"] == f"{session.prefix}/" and cookies["pilotfish_session"]["httpOnly"]
        browser.screenshot(portal_page, "portal-after-connect")


def test_services_end_by_the_time_the_portal_job_does(session):
    service = session.launch(name="capped", time=120)  # the tiers allow 120 minutes, the portal's job has 60
    running = session.wait_state(service["id"], "RUNNING")
    assert service["job_id"] != session.job_id and service["job_id"] in squeue_ids()
    assert running["time_limit"] <= 60
    child_limit = minutes(squeue_field(service["job_id"], "%l"))
    portal_left = minutes(squeue_field(session.job_id, "%L"))
    assert child_limit <= math.ceil(portal_left), (child_limit, portal_left)


def test_scancel_of_the_portal_job_cancels_every_service(session):
    services = [session.launch(name=f"child-{index}") for index in range(2)]
    for service in services:
        session.wait_state(service["id"], "RUNNING")
    live = [s for s in session.request("GET", "/api/services?state=LIVE").json()["services"]]
    child_jobs = {s["job_id"] for s in live}
    assert {s["job_id"] for s in services} <= child_jobs and child_jobs <= squeue_ids()
    session.cancel()
    wait_for(lambda: gone_from_queue(session.job_id), timeout=30, what="the portal job to leave the queue")
    wait_for(lambda: not (child_jobs & squeue_ids()), timeout=30, what=f"child jobs {sorted(child_jobs)} to go")
    log = session.wait_stopped()
    assert "the session is ending (SIGTERM)" in log, log
    for service in live:
        assert f"cancelled service {service['id']}" in log, log
    assert not (session.home / ".pilotfish" / "connection.json").exists()  # notebooks learn it has gone


def test_services_inside_the_allocation(site_env, tmp_path_factory, walltime):
    session = Session(tmp_path_factory.mktemp("ood-allocation"), site_env, service_placement="this_allocation",
                      tier="cpu.Big", hours="0.5")
    assert session.submit_yml["script"]["native"] == ["--time=30", "--partition=cpu", "--cpus-per-task=2",
                                                      "--mem=1024M"]
    session.start()
    try:
        session.wait_ready()
        assert squeue_field(session.job_id, "%P|%C|%m|%l") == "cpu|2|1G|30:00"
        assert session.request("GET", "/api/status").json()["scheduler"]["kind"] == "local"
        before = squeue_ids()
        service = session.launch(name="inside")
        running = session.wait_state(service["id"], "RUNNING")
        assert squeue_ids() - before == set()  # no job of its own: a process of this allocation
        host, port = running["endpoint"]["host"], running["endpoint"]["port"]
        assert port_open(host, port)
        pid = int(service["job_id"])
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not [v for v in environ if v.startswith((b"SLURM_JOB_ID=", b"SBATCH_"))]
        session.cancel()
        wait_for(lambda: not port_open(host, port), timeout=30, what="the service inside the allocation to stop")
        wait_for(lambda: gone_from_queue(session.job_id), timeout=30, what="the portal job to leave the queue")
        assert not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower()
        assert f"cancelled service {service['id']}" in session.wait_stopped()
    finally:
        session.cancel()


def test_reaching_the_time_limit_cancels_every_service(walltime):
    """Last in the module: the job has aged while the other tests ran."""
    session, service = walltime
    wait_for(lambda: gone_from_queue(session.job_id), timeout=180, interval=1,
             what=f"the portal job {session.job_id} to reach its one-minute limit")
    wait_for(lambda: gone_from_queue(service["job_id"]), timeout=30, what=f"service job {service['job_id']} to go")
    log = session.wait_stopped()
    assert "DUE TO TIME LIMIT" in log and f"cancelled service {service['id']}" in log, log
