"""`bin/pilotfish demo`, the README's first command: real services, the README's snippet run against it, Ctrl-C;
and a demo whose engine crashes: one line, exit 1, nothing left running."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from portal.cli.demo import snippet
from portal.engines import installer
from tests.conftest import REPO, free_port, squeue_ids, wait_for

pytestmark = pytest.mark.slurm
README = REPO / "README.md"


def readme_block(marker: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)```", text, re.S)
    assert match, f"README has no block after <!-- {marker} -->"
    return match.group(1)


def test_readme_shows_the_snippet_the_demo_prints():
    assert readme_block("demo-snippet").strip() == snippet(installer.SMOLLM_REPO_ID, installer.WHISPER_REPO_ID)


def test_demo_runs_the_readme_snippet_and_stops_everything_on_ctrl_c(tmp_path, engine_site):
    home = tmp_path / "home"
    port = free_port()
    env = dict(os.environ, PILOTFISH_HOME=str(home))
    demo = subprocess.Popen([str(REPO / "bin" / "pilotfish"), "demo", "--port", str(port)], env=env, cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = [], []
    readers = [threading.Thread(target=lambda s=stream, b=buf: b.extend(iter(s.readline, "")), daemon=True)
               for stream, buf in ((demo.stdout, out), (demo.stderr, err))]
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + 900
        while not any("Press Ctrl-C" in line for line in out):
            assert demo.poll() is None, f"the demo exited with {demo.returncode}:\n{''.join(err)}"
            assert time.monotonic() < deadline, "the demo did not get ready:\n" + "".join(err)
            time.sleep(0.5)
        printed = "".join(out)
        assert f"http://127.0.0.1:{port}" in printed and (home / "token").read_text().strip() in printed
        answer = re.search(r'Asked "What is 2 \+ 2\?", SmolLM2 says: (.*)', printed)
        assert answer and re.search(r"\b4\b|\bfour\b", answer.group(1), re.I), printed
        job_ids = re.findall(r"slurm job (\d+)", printed)
        assert len(job_ids) == 2 and set(job_ids) <= squeue_ids()

        # The README's snippet, verbatim, in a fresh Python that knows only PILOTFISH_HOME.
        result = subprocess.run([sys.executable, "-c", readme_block("demo-snippet")], env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert re.search(r"\b(sea|ocean|waves?)\b", result.stdout, re.I), result.stdout

        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C in the demo's terminal
        assert demo.wait(timeout=120) == 0, "".join(err)
        for reader in readers:
            reader.join(timeout=10)
        assert "pilotfish: stopped" in "".join(err)
        wait_for(lambda: not set(job_ids) & squeue_ids(), timeout=60, what="the demo's jobs to leave the queue")
        assert not (home / "connection.json").exists()
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)


def test_demo_whose_engine_crashes_says_so_in_one_line_and_leaves_nothing_running(tmp_path, engine_site):
    """The demo on an installed llama.cpp whose server dies of SIGSEGV at once (as a build for another CPU does)."""
    engines = tmp_path / "engines"
    python = engines / "llama-cpp" / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\necho 'llama.cpp: loading the model' >&2\nkill -SEGV $$\n")
    python.chmod(0o755)
    stamp = {**installer.install_recipe("llama-cpp"), "check": "made for this test"}
    (engines / "llama-cpp" / "installed.json").write_text(json.dumps(stamp))
    (tmp_path / "models").symlink_to(installer.models_dir())  # the staged models, beside these engines
    env = dict(os.environ, PILOTFISH_HOME=str(tmp_path / "home"), PILOTFISH_ENGINES_DIR=str(engines))
    result = subprocess.run([str(REPO / "bin" / "pilotfish"), "demo", "--no-speech", "--port", str(free_port())],
                            env=env, cwd=str(REPO), capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("pilotfish: ") for line in lines), result.stderr
    last = lines[-1]
    assert re.match(r"pilotfish: the text service \w+ FAILED: the server crashed: segmentation fault "
                    r"\(signal 11, SIGSEGV; exit code 139\) .*; its log: \S+/job\.log$", last), last
    assert Path(last.rsplit("its log: ", 1)[1]).is_file()
    job_ids = re.findall(r"submitted as job (\d+)", result.stderr)
    assert job_ids and not set(job_ids) & squeue_ids()
    assert not (tmp_path / "home" / "connection.json").exists()  # the portal stopped too
