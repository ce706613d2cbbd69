"""When each tier would start, on the real test cluster: with partition `remote` (node2, 4 CPUs) filled with sleep
jobs, Slurm's own estimate (sbatch --test-only) for a tier there is later than for a tier on the free partition
`cpu`, and the API, the launch page and `pilotfish tiers --model` say so, the recommendation naming the tier that
would start sooner."""
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml

from tests.conftest import wait_for

pytestmark = pytest.mark.slurm

PILOTFISH = str(Path(sys.executable).parent / "pilotfish")
FILL_MINUTES = 15  # the sleep jobs' time limit: Slurm expects node2 free again then
SPECS = {
    "time": {"default": 10, "max": 60},
    "partitions": {
        "remote": {"default": True, "tiers": [
            {"name": "Tiny", "description": "One CPU on node2", "max_model_size_gb": 1, "gpu_count": 0,
             "cpu_cores": 1, "memory_gb": 0.25}]},
        "cpu": {"tiers": [
            {"name": "Big", "description": "Two CPUs on vm", "max_model_size_gb": None, "gpu_count": 0,
             "cpu_cores": 2, "memory_gb": 1}]},
    },
}


def squeue_states(job_ids):
    out = subprocess.run(["squeue", "--noheader", "--format=%i %T", f"--jobs={','.join(job_ids)}"],
                         capture_output=True, text=True, timeout=30).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


@pytest.fixture(scope="module")
def full_remote(slurm_cluster, tmp_path_factory):
    """Partition remote filled: sleep jobs taking every CPU of node2, running; cancelled at the end."""
    if os.environ.get("PILOTFISH_TEST_NODES") == "1":
        pytest.skip("PILOTFISH_TEST_NODES=1: the test cluster has one node")
    folder = tmp_path_factory.mktemp("fill")
    job_ids = []
    try:
        for index in range(4):  # node2 has 4 CPUs
            result = subprocess.run(
                ["sbatch", "--parsable", "--partition=remote", "--cpus-per-task=1", "--mem=16M",
                 f"--time={FILL_MINUTES}", f"--job-name=pf-fill-{index}", f"--chdir={folder}", "--output=/dev/null",
                 "--wrap", "sleep 600"], capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, result.stderr
            job_ids.append(result.stdout.strip().split(";")[0])
        wait_for(lambda: set(squeue_states(job_ids).values()) == {"RUNNING"}, timeout=60,
                 what="the sleep jobs to run on node2")
        probe = subprocess.run(["sbatch", "--test-only", "--partition=remote", "--cpus-per-task=1", "--wrap", "true"],
                               capture_output=True, text=True, timeout=30)
        assert "to start at" in probe.stderr and "node2" in probe.stderr, probe.stderr
        yield job_ids
    finally:
        if job_ids:
            subprocess.run(["scancel", *job_ids], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def portal(full_remote, start_module_portal, tmp_path_factory):
    specs = tmp_path_factory.mktemp("estimates") / "resource_specs.yaml"
    specs.write_text(yaml.safe_dump(SPECS, sort_keys=False))
    return start_module_portal("slurm", resource_specs=str(specs))


def test_a_tier_on_a_full_partition_starts_later_than_one_on_a_free_partition(portal):
    body = portal.request("GET", "/api/tiers/recommend", params={"model": "test/tiny"}).json()
    starts = {item["ref"]: item["start"] for item in body["fitting"]}
    assert list(starts) == ["remote.Tiny", "cpu.Big"], body
    remote, cpu = starts["remote.Tiny"], starts["cpu.Big"]
    assert remote["at"] and cpu["at"], body
    assert datetime.fromisoformat(remote["at"]) > datetime.fromisoformat(cpu["at"]) + timedelta(minutes=5), body
    assert cpu["now"] is True and cpu["text"] == "now"
    assert remote["now"] is False and remote["text"].startswith("in about ") and remote["in_seconds"] > 5 * 60
    # the smallest tier that fits is on the full partition: the recommendation names the one that starts sooner
    assert body["tier"]["ref"] == "remote.Tiny" and body["tier"]["start"] == remote
    assert body["sooner"]["tier"] == "cpu.Big"
    assert body["sooner"]["reason"].startswith("cpu.Big also fits and would start sooner: now, while remote.Tiny "
                                               "would start in about ")


def test_the_launch_page_shows_both_estimates(portal):
    page = portal.request("GET", "/ui/launch")
    assert page.status_code == 200
    html = page.text
    assert "When it would start" in html
    remote = html.split('data-start="remote.Tiny"', 1)[1].split("</dd>", 1)[0]
    cpu = html.split('data-start="cpu.Big"', 1)[1].split("</dd>", 1)[0]
    assert ">in about " in remote and " min (" in remote, remote
    assert remote.rstrip().endswith(")")
    assert cpu.split(">", 1)[1].strip() == "now", cpu


def test_pilotfish_tiers_says_when_each_tier_would_start(portal):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PILOTFISH_")}
    env.update(PILOTFISH_HOME=str(portal.home), PILOTFISH_SITE_CONFIG=str(portal.site_config))
    result = subprocess.run([PILOTFISH, "tiers", "--model", "test/tiny"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[-1] == "STARTS"
    remote = next(line for line in lines if line.startswith("remote.Tiny"))
    cpu = next(line for line in lines if line.startswith("cpu.Big"))
    assert "in about " in remote and cpu.rstrip().endswith("now")
    assert "recommended for test/tiny: remote.Tiny" in result.stdout
    assert any(line.startswith("sooner: cpu.Big also fits and would start sooner: now") for line in lines)
