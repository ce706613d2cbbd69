"""What a job wrote in its folder: where its server listens (endpoint.json), and its end, when the scheduler no longer
knows the job."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from .base import LOG_NAME, JobInfo, JobQuery, JobState
from .processes import END_MARK_FILE  # written by the local scheduler: "cancelled" or "timeout"

EXIT_CODE_FILE = "exit_code"  # written by the job script when the server exits by itself
STEPD_TIMEOUT = re.compile(r"\*\*\* JOB \S+ ON \S+ CANCELLED AT \S+ DUE TO TIME LIMIT")
STEPD_CANCELLED = re.compile(r"\*\*\* JOB \S+ ON \S+ CANCELLED AT")


def read_endpoint(job_dir) -> Optional[tuple]:
    """(host, port) from the endpoint.json a job wrote in its folder, or None while it is absent or incomplete."""
    try:
        data = json.loads((Path(job_dir) / "endpoint.json").read_text())
        host, port = str(data["host"]), int(data["port"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    if not host or not 0 < port < 65536:
        return None
    return host, port


def read_tail(path: Path, max_bytes: int = 16384) -> str:
    """The last `max_bytes` of a text file ('' if it does not exist)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            return handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def read_exit_code(job_dir: Path):
    """The server's exit code the job script recorded, or None (still running, or the job never got that far)."""
    try:
        return int((Path(job_dir) / EXIT_CODE_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def state_from_job_files(job: JobQuery) -> JobInfo:
    job_dir = Path(job.job_dir)
    try:
        mark = (job_dir / END_MARK_FILE).read_text().strip()
    except FileNotFoundError:
        mark = ""
    if mark == "timeout":
        return JobInfo(job.job_id, JobState.TIMEOUT, detail="time limit reached")
    if mark == "cancelled":
        return JobInfo(job.job_id, JobState.CANCELLED, detail="cancelled")
    tail = read_tail(job_dir / LOG_NAME)
    if STEPD_TIMEOUT.search(tail):
        return JobInfo(job.job_id, JobState.TIMEOUT, detail="DUE TO TIME LIMIT (from the job log)")
    if STEPD_CANCELLED.search(tail):
        return JobInfo(job.job_id, JobState.CANCELLED, detail="CANCELLED (from the job log)")
    code = read_exit_code(job_dir)
    if code is None:
        return JobInfo(job.job_id, JobState.UNKNOWN,
                       detail="the job left the queue and its end is not recorded (no accounting storage)")
    state = JobState.COMPLETED if code == 0 else JobState.FAILED
    return JobInfo(job.job_id, state, detail=f"exit code {code}")
