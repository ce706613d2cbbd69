"""Commands run as tracked child processes of the portal on this host, the one way the portal runs its children:
the local scheduler's job scripts, benchmark runs (the load generator) and model downloads.

Each child runs in a process group of its own (so stopping it stops everything it started), with its output in a
log file and what tracks it in files of its folder: RECORD_FILE (pid, start time, deadline, name) and, once someone
ends it, END_MARK_FILE (why: "cancelled", "timeout"). So any process, whichever gunicorn worker or reconciler
reads them, or a portal started again, can tell whether the child still runs and stop it; the process that started
it also reaps it (no zombies) and may wait for its exit code. Standard library and psutil only.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import psutil

RECORD_FILE = "process.json"  # the local scheduler names its own (local_job.json)
END_MARK_FILE = "end_mark"  # why the child was ended: "cancelled" or "timeout"
KILL_GRACE_SECONDS = 10

_children: Dict[int, subprocess.Popen] = {}  # started by this process, reaped on the next reap() or wait()
_lock = threading.Lock()


class Child:
    """A child this process started: its pid, folder and record; `wait` for its exit code."""

    def __init__(self, popen: subprocess.Popen, folder: Path, record: dict):
        self.popen, self.folder, self.record, self.pid = popen, folder, record, popen.pid

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Its exit code once it has ended (negative: the signal that ended it); None if still running at `timeout`."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        with _lock:
            _children.pop(self.pid, None)
        return code


def start(argv: List[str], folder: Path, log_name: str, env: dict, cwd: Optional[Path] = None, name: str = "",
          deadline: Optional[float] = None, record_name: str = RECORD_FILE) -> Child:
    """Run `argv` in a new process group with its output appended to folder/log_name, and record it in
    folder/record_name; `deadline` (epoch seconds) is when `past_deadline` says it should end. OSError if it cannot
    start."""
    folder = Path(folder)
    with open(folder / log_name, "ab") as log_file:
        popen = subprocess.Popen(argv, cwd=str(cwd or folder), env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    with _lock:
        _children[popen.pid] = popen
    try:
        created = psutil.Process(popen.pid).create_time()
    except psutil.Error:  # already gone and reaped: the record still names it, and it reads as ended
        created = time.time()
    record = {"pid": popen.pid, "create_time": created, "deadline": deadline, "name": name}
    _write(folder / record_name, json.dumps(record))
    return Child(popen, folder, record)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def reap() -> None:
    """Collect the exit of every child of this process that has ended."""
    with _lock:
        for pid, popen in list(_children.items()):
            if popen.poll() is not None:
                del _children[pid]


def read_record(folder: Path, record_name: str = RECORD_FILE) -> Optional[dict]:
    """The child's record in `folder`, None if it has none."""
    try:
        record = json.loads((Path(folder) / record_name).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def alive(record: Optional[dict]) -> bool:
    """Whether the recorded child still runs (the same process: a pid used again later does not count)."""
    if not record:
        return False
    try:
        proc = psutil.Process(record["pid"])
        created = record.get("create_time")
        with proc.oneshot():  # one read of /proc/<pid>/stat for both
            return (created is None or abs(proc.create_time() - created) < 1) and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError):
        return False


def running(folder: Path, record_name: str = RECORD_FILE) -> bool:
    reap()
    return alive(read_record(folder, record_name))


def past_deadline(record: dict) -> bool:
    deadline = record.get("deadline")
    return deadline is not None and time.time() > deadline


def end_mark(folder: Path) -> str:
    """Why the child in `folder` was ended ("cancelled", "timeout"), '' if nobody ended it."""
    try:
        return (Path(folder) / END_MARK_FILE).read_text().strip()
    except FileNotFoundError:
        return ""


def stop(folder: Path, mark: str, record_name: str = RECORD_FILE, grace: float = KILL_GRACE_SECONDS) -> bool:
    """End the child in `folder` if it runs: write why (END_MARK_FILE), then SIGTERM its process group and SIGKILL
    it after `grace` seconds (at once with grace 0). False if it was not running."""
    folder = Path(folder)
    reap()
    record = read_record(folder, record_name)
    if not alive(record):
        return False
    _write(folder / END_MARK_FILE, mark)
    pid = record["pid"]
    try:
        os.killpg(pid, signal.SIGKILL if grace <= 0 else signal.SIGTERM)
    except ProcessLookupError:
        return True
    if grace > 0:
        threading.Thread(target=_kill_later, args=(record, grace), name=f"stop-{pid}", daemon=True).start()
    else:
        reap()
    return True


def end_group(process: subprocess.Popen, grace: float = 30) -> None:
    """End a child the caller started and waits on (its own process group): SIGTERM the group, SIGKILL it after
    `grace` seconds, and reap it. Nothing happens if it has already ended."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        process.wait()


def _kill_later(record: dict, grace: float) -> None:
    deadline = time.time() + grace
    while time.time() < deadline:
        reap()
        if not alive(record):
            return
        time.sleep(0.2)
    try:
        os.killpg(record["pid"], signal.SIGKILL)
    except ProcessLookupError:
        pass
    reap()
