"""Tracked child processes (portal/scheduler/processes.py), the one way the portal runs its children: state read
from the files in the child's folder by anyone, stop of the whole process group, the end's reason kept."""
import os
import sys
import time

import psutil

from portal.scheduler import processes
from tests.conftest import wait_for


def start(tmp_path, code: str, **kwargs):
    return processes.start([sys.executable, "-c", code], tmp_path, "child.log", dict(os.environ), name="test",
                           **kwargs)


def test_state_is_read_from_the_folder(tmp_path):
    child = start(tmp_path, "import time; print('hello', flush=True); time.sleep(300)", deadline=time.time() - 1)
    record = processes.read_record(tmp_path)
    assert (record["pid"], record["name"]) == (child.pid, "test") and record == child.record
    assert processes.alive(record) and processes.running(tmp_path) and processes.past_deadline(record)
    assert processes.end_mark(tmp_path) == ""
    wait_for(lambda: (tmp_path / "child.log").read_text() == "hello\n", timeout=10, what="the child's output")
    assert processes.stop(tmp_path, "cancelled", grace=5)
    assert child.wait(10) == -15  # SIGTERM was enough
    assert not processes.running(tmp_path) and processes.end_mark(tmp_path) == "cancelled"
    assert not processes.stop(tmp_path, "timeout")  # nothing runs: the first reason stays
    assert processes.end_mark(tmp_path) == "cancelled"


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period_with_its_group(tmp_path):
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); print('ready', flush=True); "
            "time.sleep(300)")
    child = start(tmp_path, code)
    wait_for(lambda: (tmp_path / "child.log").read_text() == "ready\n", timeout=10, what="the child to start")
    grandchild = psutil.Process(child.pid).children()[0]
    started = time.monotonic()
    processes.stop(tmp_path, "timeout", grace=1)
    assert child.wait(10) == -9 and time.monotonic() - started >= 0.9
    wait_for(lambda: not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE, timeout=10,
             what="the grandchild to end")


def test_stop_at_once_and_exit_codes(tmp_path):
    child = start(tmp_path, "import time; time.sleep(300)", record_name="other.json")
    assert processes.read_record(tmp_path) is None and processes.running(tmp_path, "other.json")
    processes.stop(tmp_path, "cancelled", "other.json", grace=0)
    assert child.wait(5) == -9
    ended = start(tmp_path, "raise SystemExit(3)")
    assert ended.wait(10) == 3 and not processes.running(tmp_path)
    assert ended.wait(0) == 3  # again: the code is kept


def test_a_recycled_pid_is_not_taken_for_the_child(tmp_path):
    record = {"pid": os.getpid(), "create_time": psutil.Process().create_time() - 100}
    assert not processes.alive(record) and processes.alive({**record, "create_time": psutil.Process().create_time()})
    assert not processes.alive(None) and not processes.alive({"pid": 2 ** 22 + 1, "create_time": 0})
