"""What a service cost: each job's hours from the job times and the service's allocation, or from Slurm's accounting
(a stand-in `sacct` on PATH speaking sacct's format, and none at all); accounting that is slow or failing never holds
the answer; tokens and the idle share; the API route and the /metrics gauges. Then services on the real test Slurm,
checked against Slurm's own view of their jobs, in the API, `pilotfish details`, the service page and /metrics."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from datetime import datetime, timedelta

import pytest

from portal.app import create_app
from portal.db import db
from portal.models import Service, ServiceJob, State
from portal.scheduler import Allocation, SchedulerUnreachable
from portal.scheduler.local import LocalScheduler
from portal.scheduler.slurm import SlurmScheduler
from portal.service_cost import Accounting, idle_share, service_cost
from portal.usage_ledger import UsageLedger
from tests.conftest import REPO

SID = "c0ffee0123456789"
START = datetime(2026, 12, 1, 10, 0, 0)


def add_service(app, tmp_path, **fields) -> None:
    """A stopped service whose current job (101, generation 3) ran 30 min on 2 CPUs and 1 GPU, with a replica (102)
    that ran 10 min of that time, and a successor (103) that never started; busy 15 min."""
    values = dict(id=SID, name="costly", kind="text-generation", model="test/tiny", state=State.STOPPED,
                  scheduler="slurm", job_dir=str(tmp_path / SID), time_limit=60, api_key="k", job_id="101",
                  generation=3, resources_json='{"cpus": 2, "gpus": 1, "time": 60}', submitted_at=START,
                  job_started_at=START, ended_at=START + timedelta(minutes=30), busy_seconds=900.0)
    values.update(fields)
    with app.app_context():
        service = Service(**values)
        service.jobs.append(ServiceJob(generation=1, phase=ServiceJob.ENDED, job_id="102", time_limit=60,
                                       submitted_at=START, job_started_at=START + timedelta(minutes=10),
                                       ended_at=START + timedelta(minutes=20)))
        service.jobs.append(ServiceJob(generation=2, phase=ServiceJob.FAILED, job_id="103", time_limit=60,
                                       submitted_at=START, ended_at=START + timedelta(minutes=5)))
        db.session.add(service)
        db.session.commit()
        db.session.remove()


def cost(app, **kwargs) -> dict:
    with app.app_context():
        try:
            return service_cost(db.session.get(Service, SID), **kwargs)
        finally:
            db.session.remove()


def test_job_times_times_the_allocation_with_tokens_and_idle_share(app, tmp_path):
    add_service(app, tmp_path)
    ledger = UsageLedger(app)
    ledger.count("owner", SID, "test/tiny", False, 1000, 500)
    ledger.count("key:a", SID, "test/tiny", False, 1000, 500)
    ledger.count("key:a", "another", "test/tiny", False, 7, 7)  # another service's: not counted
    ledger.flush()
    found = cost(app)
    assert found["source"] == "job times"
    assert [(job["job_id"], job["seconds"], job["cpus"], job["gpus"], job["source"]) for job in found["jobs"]] == [
        ("102", 600.0, 2, 1, "job times"), ("103", 0.0, 2, 1, "job times"), ("101", 1800.0, 2, 1, "job times")]
    assert found["cpu_hours"] == pytest.approx((1800 + 600) * 2 / 3600)
    assert found["gpu_hours"] == pytest.approx((1800 + 600) / 3600)
    assert found["tokens"] == {"prompt": 2000, "completion": 1000, "total": 3000}
    assert found["tokens_per_gpu_hour"] == pytest.approx(3000 / ((1800 + 600) / 3600), rel=1e-4)
    assert found["running_seconds"] == 1800.0  # the replica ran within the current job's time
    assert found["idle_share"] == 0.5  # busy 900 of 1800 s
    assert found["jobs"][2]["ended_at"] == "2026-12-01T10:30:00Z" and not found["jobs"][2]["running"]


def test_a_running_job_counts_until_now_and_without_gpus_there_is_no_rate(app, tmp_path):
    add_service(app, tmp_path, state=State.RUNNING, ended_at=None, resources_json='{"cpus": 4}', busy_seconds=0.0)
    found = cost(app, now=START + timedelta(minutes=15))
    current = found["jobs"][-1]
    assert current["running"] and current["ended_at"] is None and current["seconds"] == 900.0
    assert found["cpu_hours"] == pytest.approx((900 + 600) * 4 / 3600)
    assert found["gpu_hours"] == 0 and found["tokens_per_gpu_hour"] is None
    assert found["idle_share"] == 1.0


def test_idle_share_stays_within_zero_and_one():
    assert idle_share(0, 0) is None
    assert idle_share(50, 100) == 0.5
    assert idle_share(250, 100) == 0.0  # two workers busy at once add up past the wall time
    assert idle_share(-1, 100) == 1.0


class Accounted:
    """A scheduler whose accounting answers what it is given, after `delay` seconds, counting the questions."""
    name = "stub"

    def __init__(self, answer, delay=0.0):
        self.answer, self.delay, self.asked = answer, delay, []

    def allocations(self, jobs, timeout=5.0):
        self.asked.append(sorted(job.job_id for job in jobs))
        time.sleep(self.delay)
        if isinstance(self.answer, Exception):
            raise self.answer
        return {job.job_id: self.answer[job.job_id] for job in jobs if job.job_id in self.answer}


def test_accounting_counts_where_it_knows_the_job_and_is_asked_once_per_ttl(app, tmp_path):
    add_service(app, tmp_path)
    scheduler = Accounted({"101": Allocation("101", 1790, 4, 2), "102": Allocation("102", 610, 4, 2),
                           "103": Allocation("103", 0, 0, 0)})
    clock = [100.0]
    accounting = Accounting(ttl=30, clock=lambda: clock[0])
    found = cost(app, scheduler=scheduler, accounting=accounting)
    assert scheduler.asked == [["101", "102", "103"]]  # one question for every job
    assert found["source"] == "sacct" and found["accounting_problem"] is None
    assert found["cpu_hours"] == pytest.approx((1790 + 610) * 4 / 3600)
    assert found["gpu_hours"] == pytest.approx((1790 + 610) * 2 / 3600)
    cost(app, scheduler=scheduler, accounting=accounting)
    assert len(scheduler.asked) == 1  # cached
    clock[0] += 31
    cost(app, scheduler=scheduler, accounting=accounting)
    assert len(scheduler.asked) == 2


def test_slow_accounting_never_holds_the_answer(app, tmp_path):
    add_service(app, tmp_path)
    scheduler = Accounted({"101": Allocation("101", 1790, 4, 2)}, delay=1.5)
    accounting = Accounting()
    started = time.monotonic()
    found = cost(app, scheduler=scheduler, accounting=accounting, wait=0.2)
    assert time.monotonic() - started < 1.0
    assert found["source"] == "job times" and found["accounting_problem"] == "sacct did not answer within 0.2 s"
    assert found["cpu_hours"] == pytest.approx((1800 + 600) * 2 / 3600)
    time.sleep(1.6)  # its answer came meanwhile and was kept: the next page has it at once
    found = cost(app, scheduler=scheduler, accounting=accounting, wait=0)
    assert found["jobs"][-1]["source"] == "sacct" and found["jobs"][-1]["seconds"] == 1790
    assert len(scheduler.asked) == 1


def test_failing_accounting_falls_back_and_is_not_asked_again_at_once(app, tmp_path):
    add_service(app, tmp_path)
    scheduler = Accounted(SchedulerUnreachable("sacct failed: Connection refused"))
    accounting = Accounting()
    for _ in range(2):
        found = cost(app, scheduler=scheduler, accounting=accounting)
        assert found["source"] == "job times"
        assert found["accounting_problem"] == "sacct failed: Connection refused"
    assert len(scheduler.asked) == 1
    found = cost(app, scheduler=LocalScheduler(), accounting=Accounting())
    assert found["accounting_problem"] == "the local scheduler keeps no accounting"


def stand_in_sacct(folder, out: str, code: int = 0) -> str:
    """A `sacct` that records its arguments in `folder`/argv and prints `out` (exit `code`)."""
    folder.mkdir(exist_ok=True)
    script = folder / "sacct"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {folder}/argv\ncat <<'EOF'\n{out}\nEOF\nexit {code}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(folder)


def test_slurm_accounting_is_one_sacct_for_every_job_in_its_own_format(app, tmp_path, monkeypatch):
    add_service(app, tmp_path)
    name = f"pilotfish-{SID}"
    bin_dir = stand_in_sacct(tmp_path / "bin", "\n".join([
        f"101|1795|billing=2,cpu=2,gres/gpu=1,mem=512M,node=1|{name}",
        f"102|605|billing=4,cpu=4,gres/gpu:a100=2,mem=1G,node=1|{name}",  # GPUs by type only
        "103|999|cpu=16,node=1|pilotfish-someone-else",  # a recycled id: another job's
    ]))
    monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ["PATH"])
    scheduler = SlurmScheduler()
    found = cost(app, scheduler=scheduler, accounting=Accounting())
    argv = (tmp_path / "bin" / "argv").read_text().split()
    assert argv[:3] == ["-X", "-P", "-n"] and argv[3].startswith("--starttime=2026-1")
    assert argv[4] == "-j" and sorted(argv[5].split(",")) == ["101", "102", "103"]
    assert argv[6:] == ["--format=JobIDRaw,ElapsedRaw,AllocTRES,JobName"]
    jobs = {job["job_id"]: job for job in found["jobs"]}
    assert (jobs["101"]["seconds"], jobs["101"]["cpus"], jobs["101"]["gpus"], jobs["101"]["source"]) == (
        1795, 2, 1, "sacct")
    assert (jobs["102"]["seconds"], jobs["102"]["cpus"], jobs["102"]["gpus"]) == (605, 4, 2)
    assert jobs["103"]["source"] == "job times" and jobs["103"]["seconds"] == 0  # never started
    assert found["source"] == "sacct"  # every job that ran was accounted
    assert found["cpu_hours"] == pytest.approx((1795 * 2 + 605 * 4) / 3600)
    assert found["gpu_hours"] == pytest.approx((1795 + 605 * 2) / 3600)
    assert scheduler.accounting is True


def test_slurm_without_accounting_or_without_sacct_falls_back_to_job_times(app, tmp_path, monkeypatch):
    add_service(app, tmp_path)
    bin_dir = stand_in_sacct(tmp_path / "bin", "sacct: error: Slurm accounting storage is disabled", code=1)
    monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ["PATH"])
    scheduler = SlurmScheduler()
    found = cost(app, scheduler=scheduler, accounting=Accounting())
    assert found["source"] == "job times" and "accounting storage is disabled" in found["accounting_problem"]
    assert scheduler.accounting is False
    assert found["cpu_hours"] == pytest.approx((1800 + 600) * 2 / 3600)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    found = cost(app, scheduler=SlurmScheduler(), accounting=Accounting())
    assert found["source"] == "job times" and found["accounting_problem"] == \
        "sacct not found: is Slurm installed on this node?"


def test_the_cost_route_and_the_metrics_gauges(app, client, auth, tmp_path):
    add_service(app, tmp_path)
    add_service(app, tmp_path, id="feedfacefeedface", job_id="201", resources_json='{"cpus": 1}', busy_seconds=0.0)
    answer = client.get(f"/api/services/{SID[:6]}/cost", headers=auth)
    assert answer.status_code == 200
    body = answer.json
    assert body["service"] == SID and body["source"] == "job times"  # the local scheduler keeps no accounting
    assert body["cpu_hours"] == pytest.approx((1800 + 600) * 2 / 3600)
    assert client.get("/api/services/nosuch/cost", headers=auth).status_code == 404
    metrics = client.get("/metrics", headers=auth).data.decode()
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
             if line.startswith("pilotfish_service_")}
    assert lines[f'pilotfish_service_cpu_hours{{model="test/tiny",service="{SID}"}}'] == pytest.approx(
        body["cpu_hours"])
    assert lines[f'pilotfish_service_gpu_hours{{model="test/tiny",service="{SID}"}}'] == pytest.approx(
        body["gpu_hours"])
    assert lines[f'pilotfish_service_idle_ratio{{model="test/tiny",service="{SID}"}}'] == 0.5
    assert lines['pilotfish_service_idle_ratio{model="test/tiny",service="feedfacefeedface"}'] == 1.0
    assert lines['pilotfish_service_gpu_hours{model="test/tiny",service="feedfacefeedface"}'] == 0.0


# --- on the real test Slurm ---------------------------------------------------------------------------------

def slurm_job(job_id: str) -> dict:
    """`scontrol show job -o`: Slurm's own view of a job (kept for about a minute after it ended)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)


def run_seconds(text: str) -> int:
    """Slurm's [D-]HH:MM:SS as seconds."""
    days, _, clock = text.rpartition("-")
    hours, minutes, seconds = (int(part) for part in clock.split(":"))
    return int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds


def sacct_allocation(job_id: str):
    """(ElapsedRaw, cpus, gpus) by sacct itself, or None when Slurm keeps no accounting."""
    out = subprocess.run(["sacct", "-X", "-P", "-n", "-j", job_id, "--format=ElapsedRaw,AllocTRES"],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not out.stdout.strip():
        return None
    elapsed, tres = out.stdout.strip().splitlines()[0].split("|")
    counts = dict(item.split("=", 1) for item in tres.split(",") if "=" in item)
    return int(elapsed), int(counts.get("cpu", 0)), int(counts.get("gres/gpu", 0))


def iso_seconds(start: str, end: str) -> float:
    parse = lambda text: datetime.fromisoformat(text.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


@pytest.mark.slurm
def test_a_service_on_slurm_costs_its_run_time_times_its_allocation(slurm_cluster, start_portal):
    portal = start_portal("slurm")
    cpu = portal.launch(name="cost-cpu", time=10, resources={"cpus": 2})
    gpu = portal.launch(name="cost-gpu", time=10, tier="gpu.Small")
    assert cpu.status_code == 201 and gpu.status_code == 201, (cpu.text, gpu.text)
    cpu, gpu = (portal.wait_state(answer.json()["id"], "RUNNING", timeout=120) for answer in (cpu, gpu))
    while_running = {service["id"]: slurm_job(service["job_id"]) for service in (cpu, gpu)}
    assert while_running[cpu["id"]]["NumCPUs"] == "2"
    assert while_running[gpu["id"]]["TresPerNode"] == "gres:gpu:a100:1"
    running = portal.request("GET", f"/api/services/{cpu['id']}/cost").json()
    assert running["jobs"][0]["running"] and running["jobs"][0]["ended_at"] is None and running["cpu_hours"] > 0
    # Tokens and busy time, as the proxy's ledger would write them.
    app = create_app({"home": portal.home, "site_config_path": portal.site_config})
    ledger = UsageLedger(app)
    ledger.count("owner", gpu["id"], gpu["model"], False, 300, 700)
    ledger.busy(gpu["id"], time.time() - 2.0, time.time())
    ledger.flush()
    time.sleep(4)
    for service in (cpu, gpu):
        portal.request("POST", f"/api/services/{service['id']}/stop")
    cpu, gpu = (portal.wait_state(service["id"], "STOPPED", timeout=60) for service in (cpu, gpu))

    for service, cpus, gpus in ((cpu, 2, 0), (gpu, 1, 1)):
        found = portal.request("GET", f"/api/services/{service['id']}/cost").json()
        job = found["jobs"][0]
        assert len(found["jobs"]) == 1 and job["job_id"] == service["job_id"] and not job["running"]
        slurm = slurm_job(service["job_id"])
        accounted = sacct_allocation(service["job_id"])
        if accounted is not None:  # a cluster with accounting: sacct's own numbers, exactly
            assert found["source"] == "sacct"
            assert (job["seconds"], job["cpus"], job["gpus"]) == accounted
        else:  # this test cluster keeps none: the job's times x its allocation, close to Slurm's own run time
            assert found["source"] == "job times" and "disabled" in found["accounting_problem"]
            seconds = iso_seconds(service["job_started_at"], service["ended_at"])
            assert job["seconds"] == pytest.approx(seconds, abs=0.1)
            assert abs(job["seconds"] - run_seconds(slurm["RunTime"])) <= 3, (job, slurm["RunTime"])
            assert (job["cpus"], job["gpus"]) == (int(slurm["NumCPUs"]), gpus)
        assert job["cpus"] == cpus and job["seconds"] >= 4
        assert found["cpu_hours"] == pytest.approx(job["seconds"] * cpus / 3600, abs=1e-6)
        assert found["gpu_hours"] == pytest.approx(job["seconds"] * gpus / 3600, abs=1e-6)
    gpu_cost = portal.request("GET", f"/api/services/{gpu['id']}/cost").json()
    assert gpu_cost["tokens"] == {"prompt": 300, "completion": 700, "total": 1000}
    assert gpu_cost["tokens_per_gpu_hour"] == pytest.approx(1000 / gpu_cost["gpu_hours"], rel=1e-3)
    assert gpu_cost["idle_share"] == pytest.approx(1 - 2.0 / gpu_cost["running_seconds"], abs=1e-3)
    cpu_cost = portal.request("GET", f"/api/services/{cpu['id']}/cost").json()
    assert cpu_cost["tokens_per_gpu_hour"] is None and cpu_cost["idle_share"] == 1.0

    # The same numbers in `pilotfish details`, on the service page and in /metrics.
    details = subprocess.run([sys.executable, "-m", "portal.cli", "--url", portal.url, "--token", portal.token,
                              "details", cpu["id"][:8]], capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert details.returncode == 0, details.stderr
    assert f"cost         0.0000 GPU-hours, {cpu_cost['cpu_hours']:.4f} CPU-hours ({cpu_cost['source']}" \
        in details.stdout
    assert "idle 100% of its running time" in details.stdout
    as_json = subprocess.run([sys.executable, "-m", "portal.cli", "--url", portal.url, "--token", portal.token,
                              "details", cpu["id"], "--json"], capture_output=True, text=True, timeout=60,
                             cwd=str(REPO))
    assert json.loads(as_json.stdout)["cost"]["cpu_hours"] == cpu_cost["cpu_hours"]
    page = portal.request("GET", f"/ui/services/{gpu['id']}", headers={"Accept": "text/html"}).text
    assert f'data-cost="gpu_hours">{gpu_cost["gpu_hours"]:.4f}</dd>' in page
    assert f'data-cost="tokens_per_gpu_hour">{gpu_cost["tokens_per_gpu_hour"]:,.0f}</dd>' in page
    metrics = portal.request("GET", "/metrics").text
    line = f'pilotfish_service_cpu_hours{{model="{cpu["model"]}",service="{cpu["id"]}"}} '
    gauge = float(next(text for text in metrics.splitlines() if text.startswith(line)).split()[-1])
    assert gauge == pytest.approx(cpu_cost["cpu_hours"], abs=1e-6)
