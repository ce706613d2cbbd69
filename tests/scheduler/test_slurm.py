"""The Slurm scheduler against the real test cluster: sbatch, squeue, sacct (with and without accounting), scancel."""
import os
import subprocess
from datetime import datetime

import pytest

from portal.scheduler import JobQuery, JobState, Resources, SubmissionRejected
from portal.scheduler.slurm import SlurmScheduler, sbatch_arguments
from tests.conftest import REPO, wait_for

pytestmark = pytest.mark.slurm


def test_sbatch_arguments_honour_gres_type_and_memory(tmp_path):
    args = sbatch_arguments(tmp_path, "pilotfish-x", Resources(time=90, partition="gpu", cpus=4, memory_gb=1.5,
                                                               gpus=2, gpu_type="a100", constraint="ib",
                                                               account="lab"))
    assert args == ["--parsable", "--no-requeue", "--job-name=pilotfish-x", f"--chdir={tmp_path}", f"--output={tmp_path}/job.log",
                    "--time=90", "--partition=gpu", "--account=lab", "--cpus-per-task=4", "--mem=1536M",
                    "--gres=gpu:a100:2", "--constraint=ib"]
    explicit = sbatch_arguments(tmp_path, "n", Resources(time=1, gpus=2, gres="gpu:v100:1"))
    assert "--gres=gpu:v100:1" in explicit and "--gres=gpu:2" not in explicit


def submit(scheduler, tmp_path, name, body, **resources):
    job_dir = tmp_path / name
    job_dir.mkdir()
    script = job_dir / "job.sh"
    script.write_text("#!/bin/bash\n" + body + "\n")
    resources.setdefault("time", 5)
    resources.setdefault("memory_gb", 0.1)
    job_id = scheduler.submit(script, job_dir, f"pilotfish-{name}", Resources(**resources))
    return JobQuery(job_id, f"pilotfish-{name}", datetime.utcnow(), job_dir)


def finished(scheduler, job):
    info = scheduler.query([job])[job.job_id]
    return info if info.state.finished else None


def test_submit_query_cancel(slurm_cluster, tmp_path):
    scheduler = SlurmScheduler(timeout=30)
    job = submit(scheduler, tmp_path, "sleeper", "sleep 300")
    info = wait_for(lambda: (lambda i: i if i.state is JobState.RUNNING else None)(scheduler.query([job])[job.job_id]),
                    timeout=30, what="RUNNING")
    assert info.node
    calls = scheduler.calls
    scheduler.query([job] * 50)
    assert scheduler.calls == calls + 1  # one squeue for any number of jobs
    scheduler.cancel(job.job_id, job.job_dir)
    assert wait_for(lambda: finished(scheduler, job), timeout=30, what="cancel").state is JobState.CANCELLED
    scheduler.cancel(job.job_id, job.job_dir)  # cancelling an ended job is quiet


def test_inherited_slurm_variables_do_not_leak_into_sbatch(slurm_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("SBATCH_PARTITION", "nosuch")  # would make sbatch fail if inherited
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    scheduler = SlurmScheduler()
    job = submit(scheduler, tmp_path, "scrubbed", "echo $SLURM_JOB_PARTITION > partition; echo 0 > exit_code")
    wait_for(lambda: finished(scheduler, job), timeout=30, what="exit")
    assert (job.job_dir / "partition").read_text().strip() == "cpu"


def test_rejection_carries_slurms_message(slurm_cluster, tmp_path):
    scheduler = SlurmScheduler()
    with pytest.raises(SubmissionRejected) as err:
        submit(scheduler, tmp_path, "nowhere", "true", partition="nosuch")
    assert "invalid partition specified: nosuch" in str(err.value)
    with pytest.raises(SubmissionRejected, match="Requested node configuration is not available"):
        submit(scheduler, tmp_path, "greedy", "true", partition="gpu", gpus=9)


def test_left_queue_without_accounting_reads_job_files(slurm_cluster, tmp_path):
    scheduler = SlurmScheduler()
    ok = submit(scheduler, tmp_path, "ok", "echo 0 > exit_code")
    bad = submit(scheduler, tmp_path, "bad", "echo 3 > exit_code; exit 3")
    for job in (ok, bad):
        wait_for(lambda: finished(scheduler, job), timeout=30, what="exit")
    # As if both had left the controller's memory: the sacct path, which finds accounting disabled.
    infos = scheduler._finished([ok, bad])
    assert scheduler.accounting is False
    assert infos[ok.job_id].state is JobState.COMPLETED
    assert infos[bad.job_id].state is JobState.FAILED and infos[bad.job_id].detail == "exit code 3"
    (tmp_path / "ghost").mkdir()
    ghost = JobQuery("999999", "pilotfish-ghost", datetime.utcnow(), tmp_path / "ghost")
    assert scheduler._finished([ghost])["999999"].state is JobState.UNKNOWN


@pytest.fixture
def accounting_cluster(slurm_cluster):
    start = str(REPO / "tests" / "cluster" / "start.sh")
    subprocess.run([start], check=True, timeout=600, capture_output=True,
                   env=dict(os.environ, PILOTFISH_TEST_ACCOUNTING="1"))
    yield
    subprocess.run([start], check=True, timeout=600, capture_output=True,
                   env={k: v for k, v in os.environ.items() if k != "PILOTFISH_TEST_ACCOUNTING"})


def test_left_queue_with_accounting_uses_sacct(accounting_cluster, tmp_path):
    scheduler = SlurmScheduler()
    ok = submit(scheduler, tmp_path, "acct-ok", "true")
    bad = submit(scheduler, tmp_path, "acct-bad", "exit 3")
    cancelled = submit(scheduler, tmp_path, "acct-cancel", "sleep 300")
    wait_for(lambda: scheduler.query([cancelled])[cancelled.job_id].state is JobState.RUNNING, timeout=60,
             what="RUNNING")
    scheduler.cancel(cancelled.job_id, cancelled.job_dir)
    for job in (ok, bad, cancelled):
        wait_for(lambda: finished(scheduler, job), timeout=60, what="end")
    # No exit_code files here: these states can only come from sacct.
    def all_recorded():
        infos = scheduler._finished([ok, bad, cancelled])
        return infos if all(info.state is not JobState.UNKNOWN for info in infos.values()) else None
    infos = wait_for(all_recorded, timeout=60, interval=1, what="sacct to record the jobs")
    assert scheduler.accounting is True
    assert infos[ok.job_id].state is JobState.COMPLETED
    assert infos[bad.job_id].state is JobState.FAILED and "exit code 3:0" in infos[bad.job_id].detail
    assert infos[cancelled.job_id].state is JobState.CANCELLED
    # A job id whose name does not match (a recycled id) is not taken from sacct.
    stranger = JobQuery(ok.job_id, "pilotfish-someone-else", ok.submitted_at, tmp_path / "acct-ok")
    assert scheduler._finished([stranger])[ok.job_id].state is JobState.UNKNOWN


@pytest.mark.parametrize("specs_source", ["test", "defaults-cpu-only"])
def test_every_tier_is_accepted_by_slurm(slurm_cluster, tmp_path, specs_source):
    """Each tier's resources, as the portal builds them, make a job the real cluster runs."""
    from portal.catalog.tiers import all_tiers, default_specs, parse_specs, tier_resources
    from tests.conftest import TEST_SPECS

    if specs_source == "test":
        tiers = all_tiers(parse_specs(TEST_SPECS))
    else:  # the built-in defaults name partitions this cluster lacks: run them on ours, keeping the GPU requests
        tiers = all_tiers(default_specs())
    scheduler = SlurmScheduler()
    jobs = []
    for index, tier in enumerate(tiers):
        resources = tier_resources(tier, 5)
        resources.partition = "gpu" if resources.gpus or resources.gres else "cpu"
        resources.memory_gb = min(resources.memory_gb or 1, 1)
        resources.cpus = min(resources.cpus or 1, 4)
        job_dir = tmp_path / f"tier{index}"
        job_dir.mkdir()
        (job_dir / "job.sh").write_text("#!/bin/bash\necho \"$CUDA_VISIBLE_DEVICES\" > gpus\n")
        job_id = scheduler.submit(job_dir / "job.sh", job_dir, f"pilotfish-tier{index}", resources)
        jobs.append((tier, resources, JobQuery(job_id, f"pilotfish-tier{index}", datetime.utcnow(), job_dir)))
    for tier, resources, job in jobs:
        info = wait_for(lambda: finished(scheduler, job), timeout=60, what=f"tier {tier.ref}")
        assert info.state is JobState.COMPLETED, (tier.ref, info)
        gpus = (job.job_dir / "gpus").read_text().strip()
        assert len([g for g in gpus.split(",") if g]) == resources.gpus, (tier.ref, gpus)
