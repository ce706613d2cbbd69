"""Resources in sbatch's words: what the Slurm adapter submits, and how tiers and dry runs show a job's resources on
either scheduler (the Open OnDemand form, ood_app/site.rb, writes the same options in the same order)."""
from __future__ import annotations

from pathlib import Path
from typing import List

from .base import LOG_NAME, Resources

JOB_OPTIONS = ("--parsable", "--no-requeue", "--requeue", "--job-name=", "--chdir=", "--output=")  # the job's, not its resources'


def resource_options(resources: Resources) -> List[str]:
    """The sbatch options these resources become, e.g. ["--time=30", "--partition=gpu", "--cpus-per-task=4"]."""
    args = [f"--time={resources.time}"]
    if resources.partition:
        args.append(f"--partition={resources.partition}")
    if resources.account:
        args.append(f"--account={resources.account}")
    if resources.cpus:
        args.append(f"--cpus-per-task={resources.cpus}")
    if resources.memory_gb:
        args.append(f"--mem={int(round(resources.memory_gb * 1024))}M")
    if resources.gres:
        args.append(f"--gres={resources.gres}")
    elif resources.gpus:
        gpu = f"gpu:{resources.gpu_type}:{resources.gpus}" if resources.gpu_type else f"gpu:{resources.gpus}"
        args.append(f"--gres={gpu}")
    if resources.constraint:
        args.append(f"--constraint={resources.constraint}")
    if resources.exclude:
        args.append(f"--exclude={resources.exclude}")
    for key, value in sorted(resources.extra.items()):
        args.append(f"--{key}={value}")
    return args


def requeued_on(resources: Resources, preemptible) -> bool:
    """Whether a job with these resources goes back to the queue when preempted: every partition it names is one the
    site marked preemptible."""
    named = [part.strip() for part in (resources.partition or "").split(",") if part.strip()]
    return bool(named) and all(part in preemptible for part in named)


def sbatch_arguments(job_dir: Path, name: str, resources: Resources, preemptible=()) -> List[str]:
    """The sbatch options for a job (without the script), so a dry run can show exactly what is submitted. On the
    site's preemptible partitions a job is requeued when preempted (the portal follows it back); elsewhere a service
    whose node fails ends (FAILED, "node down") instead of waiting unseen."""
    return [
        "--parsable",
        "--requeue" if requeued_on(resources, preemptible) else "--no-requeue",
        f"--job-name={name}",
        f"--chdir={job_dir}",
        f"--output={job_dir / LOG_NAME}",
    ] + resource_options(resources)
