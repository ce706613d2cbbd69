"""`pilotfish doctor` starts each engine a site config names, with the site's own command, and asks it one question:
the real llama.cpp and Whisper engines answer; a llama.cpp command that crashes is named with its signal."""
from __future__ import annotations

import os
import subprocess
import sys

import yaml

from portal.engines import installer
from tests.conftest import REPO


def doctor(site, home) -> subprocess.CompletedProcess:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("PILOTFISH_")}
    return subprocess.run([sys.executable, "-m", "portal.cli", "doctor"], capture_output=True, text=True, timeout=600,
                          cwd=str(REPO), env={**clean, "PILOTFISH_SITE_CONFIG": str(site), "PILOTFISH_HOME": str(home)})


def site_with(tmp_path, runtimes: dict):
    site = {"scheduler": "local", "runtimes": runtimes}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(site))
    return path


def engine_lines(result):
    return [line for line in result.stdout.splitlines() if line[6:].startswith("engine ")]


def test_doctor_asks_the_installed_engines_a_question(engine_site, tmp_path):
    runtimes = {name: installer.runtime_config(name) for name in ("llama-cpp", "whisper")}
    result = doctor(site_with(tmp_path, runtimes), tmp_path / "home")
    lines = engine_lines(result)
    assert len(lines) == 2 and all(line.startswith("ok  ") for line in lines), result.stdout + result.stderr
    assert any(line.startswith("ok    engine llama-cpp: llama.cpp answered in ") and "4" in line for line in lines), lines
    assert any(line.startswith("ok    engine whisper: faster-whisper answered in ") for line in lines), lines


def test_doctor_names_the_signal_of_an_engine_that_crashes(engine_site, tmp_path):
    crashing = tmp_path / "llama-server"
    crashing.write_text("#!/bin/sh\necho 'llama.cpp: loading the model'\nkill -SEGV $$\n")
    crashing.chmod(0o755)
    result = doctor(site_with(tmp_path, {"llama-cpp": {"command": str(crashing)}}), tmp_path / "home")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stdout + result.stderr
    [line] = engine_lines(result)
    assert line.startswith("FAIL  engine llama-cpp: llama.cpp ended before it answered: the server crashed: "
                           "segmentation fault (signal 11, SIGSEGV; exit code 139); log: "), line
    log = line.rsplit("log: ", 1)[1]
    assert "llama.cpp: loading the model" in open(log).read()
