"""The scheduler interface: job states, what is asked of a job (resources) and known of it (JobInfo), typed errors,
and the environment scheduler commands run in."""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Dict, Iterable, List, Optional


class JobState(enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"  # exited 0
    FAILED = "FAILED"  # exited non-zero, node failure, out of memory, ...
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    UNKNOWN = "UNKNOWN"  # left the scheduler and its end could not be found

    @property
    def finished(self) -> bool:
        return self not in (JobState.PENDING, JobState.RUNNING)


@dataclass
class JobInfo:
    job_id: str
    state: JobState
    node: Optional[str] = None
    detail: str = ""  # scheduler's own words: pending reason, raw state, exit code


@dataclass
class Resources:
    """What a job asks of the scheduler. `time` is in minutes."""
    time: int
    partition: Optional[str] = None
    cpus: Optional[int] = None
    memory_gb: Optional[float] = None
    gpus: int = 0
    gpu_type: Optional[str] = None
    gres: Optional[str] = None  # an explicit gres string overrides gpus/gpu_type
    constraint: Optional[str] = None
    account: Optional[str] = None
    exclude: Optional[str] = None  # nodes the job should not run on (a replica: those its service runs on)
    extra: Dict[str, str] = field(default_factory=dict)


@dataclass
class JobQuery:
    """A job the portal tracks: its id, name and when it was submitted (bounds accounting look-ups)."""
    job_id: str
    name: str
    submitted_at: datetime
    job_dir: Path


@dataclass
class Allocation:
    """What the scheduler's accounting says of a job: how long it has run (seconds; still growing while it runs) and
    the CPUs and GPUs allocated to it."""
    job_id: str
    elapsed_seconds: int
    cpus: int
    gpus: int


class SchedulerError(Exception):
    """Base class of scheduler errors."""


class SchedulerUnreachable(SchedulerError):
    """The scheduler did not answer (slurmctld down, a command timed out or is missing)."""


class SubmissionRejected(SchedulerError):
    """The scheduler refused the job; the message is the scheduler's own."""


class Scheduler:
    """One small interface: how resources are asked for, submit a job script, query many jobs in one call, cancel."""

    name = "abstract"

    def arguments(self, resources: Resources, job_dir: Optional[Path] = None, name: Optional[str] = None) -> List[str]:
        """What this scheduler is asked for a job with `resources`, in its own words: the resources alone (a tier's
        display), or, given the job's folder and name, everything `submit` passes besides the script (a dry run)."""
        raise NotImplementedError

    def submit(self, script: Path, job_dir: Path, name: str, resources: Resources) -> str:
        """Submit `script` to run in `job_dir`; return the job id. Output goes to job_dir/job.log."""
        raise NotImplementedError

    def submit_array(self, script: Path, job_dir: Path, name: str, resources: Resources,
                     indices: List[int]) -> Dict[int, str]:
        """Submit `script` once per index, as one job array: each task runs in `job_dir` with SLURM_ARRAY_TASK_ID set to
        its index and its output appended to `task_dir(job_dir, index)`/job.log (the folder must exist). Returns each
        task's job id by index: what `query` and `cancel` take, with the task's folder as its job_dir."""
        raise NotImplementedError

    def query(self, jobs: Iterable[JobQuery]) -> Dict[str, JobInfo]:
        """States of the given jobs, keyed by job id, with as few scheduler calls as possible."""
        raise NotImplementedError

    def cancel(self, job_id: str, job_dir: Path) -> None:
        """Cancel a job; cancelling a job that already ended is not an error."""
        raise NotImplementedError

    def estimate_start(self, resources: Resources, timeout: float = 5.0) -> Optional[datetime]:
        """When a job asking for `resources` would start if submitted now, by the scheduler's own estimate (an aware
        datetime), without submitting it; None when this scheduler gives no estimate. A job it could never run raises
        SubmissionRejected with its words; one that does not answer within `timeout` seconds, SchedulerUnreachable."""
        return None

    def allocations(self, jobs: Iterable[JobQuery], timeout: float = 5.0) -> Optional[Dict[str, Allocation]]:
        """What the scheduler's accounting says of `jobs` (one command for all of them), by job id; a job it does not
        know is left out. None when this scheduler keeps no accounting; SchedulerUnreachable when its accounting
        does not answer within `timeout` seconds, fails or is switched off."""
        return None

    def describe(self) -> dict:
        return {"kind": self.name}

    def overview(self, jobs: Iterable[JobQuery] = ()) -> dict:
        """The cluster as its user sees it, read-only: {"partitions", "nodes", "queue"}.

        partitions: name, default, available, time_limit, nodes, nodes_idle, nodes_usable, cpus_idle, cpus_total,
        gpus_free, gpus_total; nodes: name, partitions, state, cpus_*, gpus_*, gpu_types, memory_mb; queue: the
        user's jobs (job_id, name, partition, state, time, time_limit, nodes, where, gres). `jobs` are the jobs the
        portal tracks, for schedulers that cannot list a user's jobs themselves.
        """
        raise NotImplementedError


LOG_NAME = "job.log"
TASKS_DIR = "tasks"  # a job array's folder holds one folder per task: tasks/<index>/ (its log, its exit code)


def task_dir(job_dir: Path, index: int) -> Path:
    """The folder of a job array's task `index`: its log (LOG_NAME), exit code and, on the local scheduler, record."""
    return Path(job_dir) / TASKS_DIR / str(index)


def array_ranges(indices: Iterable[int]) -> str:
    """Indices in sbatch --array's words: [0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    ordered = sorted(set(indices))
    parts, start = [], None
    for position, index in enumerate(ordered):
        if start is None:
            start = index
        if position + 1 == len(ordered) or ordered[position + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts)
SCRUBBED_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")
KEPT_VARIABLES = {"SLURM_CONF"}  # names the cluster's config, not the enclosing job
PORTAL_VARIABLES = {"PROMETHEUS_MULTIPROC_DIR"}  # the portal's own metrics folder (portal.metrics): not the engine's
PORTAL_PREFIX = "PILOTFISH_"  # the portal's settings and secrets (token, database URL, Hub token, ...)
OWNER_SECRETS = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"}  # the owner's Hub token: jobs run offline, downloads get theirs


def scrubbed_environment(base: Optional[dict] = None) -> dict:
    """The environment minus inherited SLURM_*/SBATCH_* variables, which break sbatch inside a job, and the
    portal's own settings that a job's programs would misread."""
    env = dict(os.environ if base is None else base)
    return {key: value for key, value in env.items() if key not in PORTAL_VARIABLES
            and (key in KEPT_VARIABLES or not key.startswith(SCRUBBED_PREFIXES))}


def job_environment(base: Optional[dict] = None) -> dict:
    """What a service job (through sbatch, which exports it, or the local scheduler), a download or an engine check
    starts with: the scrubbed environment without any PILOTFISH_* variable (the portal's token, its database URL
    with a password, ...: a job script sets the PILOTFISH_* variables its job needs, the service's own key among
    them) and without the owner's Hub token (OWNER_SECRETS). A child that needs a secret is given it by name."""
    return {key: value for key, value in scrubbed_environment(base).items()
            if not key.startswith(PORTAL_PREFIX) and key not in OWNER_SECRETS}
