"""Where jobs run: the scheduler interface (base.py), Slurm (slurm.py) or local process groups (local.py), and the
factory choosing one."""
from __future__ import annotations

from .base import (KEPT_VARIABLES, LOG_NAME, OWNER_SECRETS, PORTAL_PREFIX, PORTAL_VARIABLES,  # noqa: F401
                   SCRUBBED_PREFIXES, TASKS_DIR, Allocation, JobInfo, JobQuery, JobState, Resources, Scheduler, SchedulerError,
                   SchedulerUnreachable, SubmissionRejected, array_ranges, job_environment, scrubbed_environment,
                   task_dir)


def make_scheduler(config) -> Scheduler:
    if config.scheduler == "slurm":
        from .slurm import SlurmScheduler
        return SlurmScheduler(timeout=config.scheduler_timeout, preemptible=config.preemptible_partitions)
    from .local import LocalScheduler
    return LocalScheduler()
