"""Local scheduler: runs job scripts as process groups on this host (a laptop, or inside the portal's own allocation)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import psutil

from . import (LOG_NAME, JobInfo, JobQuery, JobState, Resources, Scheduler, SubmissionRejected,
               scrubbed_environment)
from .job_files import END_MARK_FILE, state_from_job_files
from .sbatch import resource_options, sbatch_arguments

RECORD_FILE = "local_job.json"
KILL_GRACE_SECONDS = 10


class LocalScheduler(Scheduler):
    name = "local"

    def __init__(self):
        self._children: Dict[int, subprocess.Popen] = {}  # reaped on query so no zombies linger
        self._lock = threading.Lock()
        self.calls = 0

    def arguments(self, resources: Resources, job_dir: Optional[Path] = None, name: Optional[str] = None) -> List[str]:
        """The resources in sbatch's words, as Slurm would be asked for them: this scheduler keeps only the time limit
        (a job runs as a process of this host, or of the Open OnDemand session's own allocation, whose sbatch options
        the app's form shows in the same words), so tiers and dry runs read the same on both schedulers."""
        return resource_options(resources) if job_dir is None else sbatch_arguments(job_dir, name or "", resources)

    def submit(self, script: Path, job_dir: Path, name: str, resources: Resources) -> str:
        job_dir = Path(job_dir)
        env = scrubbed_environment()
        env["PILOTFISH_JOB_NAME"] = name
        try:
            with open(job_dir / LOG_NAME, "ab") as log_file:
                proc = subprocess.Popen(["bash", str(script)], cwd=job_dir, stdout=log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        except OSError as exc:
            raise SubmissionRejected(f"cannot start the job script: {exc.strerror}")
        with self._lock:
            self._children[proc.pid] = proc
        record = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(),
                  "deadline": time.time() + resources.time * 60, "name": name}
        (job_dir / RECORD_FILE).write_text(json.dumps(record))
        return str(proc.pid)

    def _reap(self) -> None:
        with self._lock:
            for pid, proc in list(self._children.items()):
                if proc.poll() is not None:
                    del self._children[pid]

    @staticmethod
    def _alive(record: dict) -> bool:
        try:
            proc = psutil.Process(record["pid"])
            return abs(proc.create_time() - record["create_time"]) < 1 and proc.status() != psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
            return False

    def _end(self, job_dir: Path, record: dict, mark: str) -> None:
        """Write why the job ends, then stop its process group: TERM now, KILL after a grace period."""
        (job_dir / END_MARK_FILE).write_text(mark)
        pid = record["pid"]
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return

        def kill_later():
            deadline = time.time() + KILL_GRACE_SECONDS
            while time.time() < deadline:
                self._reap()
                if not self._alive(record):
                    return
                time.sleep(0.2)
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._reap()

        threading.Thread(target=kill_later, daemon=True).start()

    def query(self, jobs: Iterable[JobQuery]) -> Dict[str, JobInfo]:
        self.calls += 1
        self._reap()
        found: Dict[str, JobInfo] = {}
        for job in jobs:
            job_dir = Path(job.job_dir)
            try:
                record = json.loads((job_dir / RECORD_FILE).read_text())
            except (FileNotFoundError, ValueError):
                found[job.job_id] = state_from_job_files(job)
                continue
            if self._alive(record):
                if time.time() > record["deadline"] and not (job_dir / END_MARK_FILE).exists():
                    self._end(job_dir, record, "timeout")
                found[job.job_id] = JobInfo(job.job_id, JobState.RUNNING, node=socket.gethostname(), detail="RUNNING")
            else:
                info = state_from_job_files(job)
                if info.state is JobState.UNKNOWN:
                    info = JobInfo(job.job_id, JobState.FAILED, detail="the process ended without recording an exit code")
                found[job.job_id] = info
        return found

    def overview(self, jobs: Iterable[JobQuery] = ()) -> dict:
        """This host as the one node of a "local" partition; the queue is the portal's jobs that still run."""
        cpus = psutil.cpu_count() or 1
        busy = min(cpus, round(os.getloadavg()[0]))  # CPUs in use, by the load average
        memory = psutil.virtual_memory()
        host = socket.gethostname()
        node = {"name": host, "partitions": ["local"], "state": "mixed" if busy else "idle", "cpus_alloc": busy,
                "cpus_idle": cpus - busy, "cpus_total": cpus, "gpus_total": 0, "gpus_used": 0, "gpu_types": [],
                "memory_mb": memory.total // 2**20, "memory_alloc_mb": (memory.total - memory.available) // 2**20}
        partition = {"name": "local", "default": True, "available": "up", "time_limit": "infinite", "nodes": 1,
                     "nodes_idle": int(not busy), "nodes_usable": 1, "cpus_idle": cpus - busy, "cpus_total": cpus,
                     "gpus_free": 0, "gpus_total": 0, "gpu_types": []}
        jobs = list(jobs)
        infos = self.query(jobs)
        queue = [{"job_id": job.job_id, "name": job.name, "partition": "local", "state": info.state.value,
                  "time": "", "time_limit": "", "nodes": 1, "where": info.node or host, "gres": ""}
                 for job in jobs for info in [infos.get(job.job_id)] if info and not info.state.finished]
        return {"partitions": [partition], "nodes": [node], "queue": queue}

    def cancel(self, job_id: str, job_dir: Path) -> None:
        try:
            record = json.loads((Path(job_dir) / RECORD_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return
        if self._alive(record):
            self._end(Path(job_dir), record, "cancelled")
