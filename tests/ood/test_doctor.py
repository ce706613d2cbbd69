"""`pilotfish doctor` on an installation: Slurm, the cache_dir layout, the specs file, the runtimes and the Open
OnDemand app (its files, the Python its sessions run, its form rendered as the dashboard renders it)."""
import os
import subprocess
import sys

import pytest

from tests.catalog.test_tiers import SEED
from tests.conftest import REPO, write_site_config

pytestmark = pytest.mark.slurm


def doctor(env: dict) -> subprocess.CompletedProcess:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("PILOTFISH_")}
    return subprocess.run([sys.executable, "-m", "portal.cli", "doctor", "--no-engines"], env={**clean, **env}, capture_output=True,
                          text=True, timeout=120, cwd=str(REPO))


def lines(result, status):
    return [line[6:] for line in result.stdout.splitlines() if line.startswith(status)]


def test_a_good_installation(slurm_cluster, tmp_path):
    site = write_site_config(tmp_path / "site.yml", scheduler="slurm")
    result = doctor({"PILOTFISH_SITE_CONFIG": str(site), "PILOTFISH_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(line.startswith(("ok  ", "FAIL")) for line in result.stdout.splitlines()), result.stdout
    good = lines(result, "ok  ")
    for expected in ("slurm: the controller answers squeue", "images/ folder (not needed: every runtime is native)",
                     "readable", "resource specs", f"ood app {REPO}: manifest, form, submit, view and job templates",
                     f"ood app: sessions run {REPO}/.venv/bin/python", "ood form: offers 3 tier(s), as the portal"):
        assert any(expected in line for line in good), (expected, result.stdout)


def test_each_problem_has_its_line(slurm_cluster, tmp_path):
    (tmp_path / "specs.yaml").write_text(SEED.replace("cpu_cores: 8", "cpu_cores: eight"))
    site = write_site_config(tmp_path / "site.yml", scheduler="slurm", resource_specs=str(tmp_path / "specs.yaml"),
                             runtimes={"text-generation": {"runtime": "apptainer"},
                                       "speech-recognition": {"runtime": "native", "command": sys.executable}})
    result = doctor({"PILOTFISH_SITE_CONFIG": str(site), "PILOTFISH_HOME": str(tmp_path / "home"),
                     "PILOTFISH_VENV": str(tmp_path / "no-venv")})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stdout + result.stderr
    failed = lines(result, "FAIL")
    for expected in ("no images/ folder (the apptainer runtime takes its images there)",
                     'partitions.gpu.tiers[1].cpu_cores: expected an integer, got "eight"',
                     f"ood app: sessions run {tmp_path}/no-venv/bin/python: not found",
                     "ood form: rendering failed: /"):
        assert any(expected in line for line in failed), (expected, result.stdout)
    assert sum("cpu_cores" in line for line in failed) == 2  # the portal's reader and the form's say the same
