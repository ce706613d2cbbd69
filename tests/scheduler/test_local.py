"""The local scheduler: job scripts as process groups on this host, with the same states as Slurm."""
import json
import time
from datetime import datetime

import psutil

from tests.conftest import wait_for
from portal.scheduler import JobQuery, JobState, Resources
from portal.scheduler.local import RECORD_FILE, LocalScheduler


def submit(tmp_path, body: str, minutes: int = 5):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    script = job_dir / "job.sh"
    script.write_text("#!/bin/bash\n" + body + "\n")
    scheduler = LocalScheduler()
    job_id = scheduler.submit(script, job_dir, "pilotfish-test", Resources(time=minutes))
    return scheduler, JobQuery(job_id, "pilotfish-test", datetime.utcnow(), job_dir)


def state(scheduler, job):
    return scheduler.query([job])[job.job_id]


def test_running_then_cancelled_kills_the_whole_group(tmp_path):
    scheduler, job = submit(tmp_path, "sleep 300 & sleep 300 & wait")
    assert state(scheduler, job).state is JobState.RUNNING
    children = wait_for(lambda: (lambda c: c if len(c) == 2 else None)(
        psutil.Process(int(job.job_id)).children(recursive=True)), timeout=10, what="two children")
    scheduler.cancel(job.job_id, job.job_dir)
    info = wait_for(lambda: (lambda i: i if i.state.finished else None)(state(scheduler, job)), timeout=15,
                    what="cancel")
    assert info.state is JobState.CANCELLED
    wait_for(lambda: not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children),
             timeout=15, what="children to exit")


def test_exit_codes(tmp_path):
    scheduler, job = submit(tmp_path, 'echo "$(false; echo 3)" > exit_code; echo bye; exit 3')
    info = wait_for(lambda: (lambda i: i if i.state.finished else None)(state(scheduler, job)), timeout=15,
                    what="exit")
    assert info.state is JobState.FAILED
    assert info.detail == "exit code 3"
    assert (job.job_dir / "job.log").read_text().strip() == "bye"


def test_time_limit(tmp_path):
    scheduler, job = submit(tmp_path, "sleep 300")
    record = json.loads((job.job_dir / RECORD_FILE).read_text())
    record["deadline"] = time.time() - 1  # as if its minutes had passed
    (job.job_dir / RECORD_FILE).write_text(json.dumps(record))
    info = wait_for(lambda: (lambda i: i if i.state.finished else None)(state(scheduler, job)), timeout=20,
                    what="timeout")
    assert info.state is JobState.TIMEOUT


def test_slurm_variables_are_scrubbed(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    monkeypatch.setenv("SBATCH_PARTITION", "gpu")
    scheduler, job = submit(tmp_path, "env > seen_env; echo 0 > exit_code")
    wait_for(lambda: state(scheduler, job).state.finished, timeout=15, what="exit")
    seen = (job.job_dir / "seen_env").read_text()
    assert "SLURM_JOB_ID" not in seen and "SBATCH_PARTITION" not in seen


def test_cancel_of_an_ended_job_is_quiet(tmp_path):
    scheduler, job = submit(tmp_path, "echo 0 > exit_code")
    wait_for(lambda: state(scheduler, job).state.finished, timeout=15, what="exit")
    scheduler.cancel(job.job_id, job.job_dir)
    assert state(scheduler, job).state is JobState.COMPLETED


def test_resources_are_shown_in_sbatch_words_as_on_slurm(tmp_path):
    from portal.scheduler.sbatch import sbatch_arguments
    from portal.scheduler.slurm import SlurmScheduler

    resources = Resources(time=30, partition="gpu", cpus=4, memory_gb=16, gpus=1, gpu_type="a100", constraint="ib")
    words = ["--time=30", "--partition=gpu", "--cpus-per-task=4", "--mem=16384M", "--gres=gpu:a100:1",
             "--constraint=ib"]
    local, slurm = LocalScheduler(), SlurmScheduler(user="someone")
    assert local.arguments(resources) == slurm.arguments(resources) == words
    job = local.arguments(resources, tmp_path, "pilotfish-x")
    assert job == slurm.arguments(resources, tmp_path, "pilotfish-x") == sbatch_arguments(tmp_path, "pilotfish-x",
                                                                                           resources)
    assert job[:5] == ["--parsable", "--no-requeue", "--job-name=pilotfish-x", f"--chdir={tmp_path}",
                       f"--output={tmp_path}/job.log"] and job[5:] == words
