"""Local scheduler: runs job scripts as process groups on this host (a laptop, or inside the portal's own allocation),
as tracked children (processes.py: a record and an end mark in the job folder), with the same states as Slurm."""
from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import psutil

from . import processes
from .base import (LOG_NAME, JobInfo, JobQuery, JobState, Resources, Scheduler, SubmissionRejected,
                   job_environment, task_dir)
from .job_files import state_from_job_files
from .sbatch import resource_options, sbatch_arguments

RECORD_FILE = "local_job.json"


class LocalScheduler(Scheduler):
    name = "local"

    def __init__(self):
        self.calls = 0

    def arguments(self, resources: Resources, job_dir: Optional[Path] = None, name: Optional[str] = None) -> List[str]:
        """The resources in sbatch's words, as Slurm would be asked for them: this scheduler keeps only the time limit
        (a job runs as a process of this host, or of the Open OnDemand session's own allocation, whose sbatch options
        the app's form shows in the same words), so tiers and dry runs read the same on both schedulers."""
        return resource_options(resources) if job_dir is None else sbatch_arguments(job_dir, name or "", resources)

    def submit(self, script: Path, job_dir: Path, name: str, resources: Resources) -> str:
        env = job_environment()  # nothing of the portal's: the job script sets what the job needs
        env["PILOTFISH_JOB_NAME"] = name
        try:
            child = processes.start(["bash", str(script)], Path(job_dir), LOG_NAME, env, name=name,
                                    deadline=time.time() + resources.time * 60, record_name=RECORD_FILE)
        except OSError as exc:
            raise SubmissionRejected(f"cannot start the job script: {exc.strerror}")
        return str(child.pid)

    def submit_array(self, script: Path, job_dir: Path, name: str, resources: Resources,
                     indices: List[int]) -> Dict[int, str]:
        """One process group per task, started at once, each tracked in its task's folder (tasks/<index>/)."""
        ids = {}
        for index in indices:
            env = job_environment()
            env.update(PILOTFISH_JOB_NAME=name, SLURM_ARRAY_TASK_ID=str(index))  # as Slurm tells an array task
            try:
                child = processes.start(["bash", str(script)], task_dir(job_dir, index), LOG_NAME, env,
                                        cwd=Path(job_dir), name=name, deadline=time.time() + resources.time * 60,
                                        record_name=RECORD_FILE)
            except OSError as exc:
                for started, job_id in ids.items():
                    self.cancel(job_id, task_dir(job_dir, started))
                raise SubmissionRejected(f"cannot start the job script: {exc.strerror}")
            ids[index] = str(child.pid)
        return ids

    def query(self, jobs: Iterable[JobQuery]) -> Dict[str, JobInfo]:
        self.calls += 1
        processes.reap()
        found: Dict[str, JobInfo] = {}
        for job in jobs:
            job_dir = Path(job.job_dir)
            record = processes.read_record(job_dir, RECORD_FILE)
            if record is None:
                found[job.job_id] = state_from_job_files(job)
            elif processes.alive(record):
                if processes.past_deadline(record) and not processes.end_mark(job_dir):
                    processes.stop(job_dir, "timeout", RECORD_FILE)
                found[job.job_id] = JobInfo(job.job_id, JobState.RUNNING, node=socket.gethostname(), detail="RUNNING")
            else:
                info = state_from_job_files(job)
                if info.state is JobState.UNKNOWN:
                    info = JobInfo(job.job_id, JobState.FAILED, detail="the process ended without recording an exit code")
                found[job.job_id] = info
        return found

    def estimate_start(self, resources: Resources, timeout: float = 5.0) -> Optional[datetime]:
        """Now: a job starts as soon as it is submitted (this scheduler keeps no queue)."""
        return datetime.now(timezone.utc)

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
        processes.stop(Path(job_dir), "cancelled", RECORD_FILE)
