"""`bin/pilotfish demo`, the README's first command: real services, the README's snippet run against it, Ctrl-C."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

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
    assert readme_block("demo-snippet").strip() == snippet(installer.GEMMA_REPO_ID, installer.WHISPER_REPO_ID)


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
        assert re.search(r"Gemma says: .*[A-Za-z]{3,}", printed), printed
        job_ids = re.findall(r"slurm job (\d+)", printed)
        assert len(job_ids) == 2 and set(job_ids) <= squeue_ids()

        # The README's snippet, verbatim, in a fresh Python that knows only PILOTFISH_HOME.
        result = subprocess.run([sys.executable, "-c", readme_block("demo-snippet")], env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert re.search(r"[A-Za-z]{3,}", result.stdout), result.stdout

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
