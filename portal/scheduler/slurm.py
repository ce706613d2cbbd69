"""Slurm scheduler: sbatch, one squeue for all live jobs, sacct for jobs that left the queue and for what jobs were
allocated, scancel."""
from __future__ import annotations

import getpass
import logging
import re
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from .base import (LOG_NAME, TASKS_DIR, Allocation, JobInfo, JobQuery, JobState, Resources, Scheduler,
                   SchedulerUnreachable, SubmissionRejected, array_ranges, job_environment)
from .job_files import state_from_job_files
from .sbatch import resource_options, sbatch_arguments

log = logging.getLogger(__name__)

# Slurm's words for "the controller did not answer", as opposed to "the controller said no".
UNREACHABLE_PATTERNS = re.compile(
    r"Unable to contact slurm controller|Socket timed out|Connection refused|Connection timed out|"
    r"Zero Bytes were transmitted|Communication connection failure|Unable to establish|"
    r"standby mode|slurm_persist_conn_open|Insane message length",
    re.IGNORECASE,
)
ACCOUNTING_DISABLED = re.compile(r"accounting storage is disabled|accounting_storage/none", re.IGNORECASE)
SQUEUE_FORMAT = "%i|%T|%N|%r|%j"
SINFO_NODE_FIELDS = ",".join(f"{field}:|" for field in (  # "field:|": unpadded, "|" after each
    "NodeList", "Partition", "StateLong", "CPUsState", "Gres", "GresUsed", "Memory", "AllocMem", "Time", "Available"))
QUEUE_FORMAT = "%i|%P|%T|%M|%l|%D|%b|%R|%j"  # the name last: it may contain '|'
TEST_ONLY_START = re.compile(r"\bto start at (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)")
USABLE_NODE_STATES = ("idle", "mixed")  # states in which a node takes new jobs

STATE_MAP = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "RESIZING": JobState.RUNNING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "SUSPENDED": JobState.RUNNING,
    "STOPPED": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED,
    "CANCELLED": JobState.CANCELLED,
    "TIMEOUT": JobState.TIMEOUT,
    "DEADLINE": JobState.TIMEOUT,
    "FAILED": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "PREEMPTED": JobState.FAILED,
    "SPECIAL_EXIT": JobState.FAILED,
    "REVOKED": JobState.CANCELLED,
}


def _clean_message(stderr: str) -> str:
    """Slurm's error lines without the command prefixes, joined: 'invalid partition specified: x; ...'."""
    kept = []
    for line in stderr.strip().splitlines():
        text = line.strip()
        for prefix in ("allocation failure: ", "sbatch: error: ", "squeue: error: ", "sacct: error: ",
                       "scancel: error: ", "error: "):
            if text.startswith(prefix):
                text = text[len(prefix):]
        text = text.replace("Batch job submission failed: ", "")
        if text and text not in kept:
            kept.append(text)
    return "; ".join(kept) or "no message"


class SlurmScheduler(Scheduler):
    name = "slurm"

    def __init__(self, timeout: float = 30.0, user: Optional[str] = None, preemptible=()):
        self.timeout = timeout
        self.preemptible = tuple(preemptible)  # partitions where jobs are requeued when preempted
        self.user = user or getpass.getuser()
        self.accounting: Optional[bool] = None  # learnt from the first sacct call
        self.calls = 0  # scheduler commands run, for metrics and the reconcile benchmark
        self._lock = threading.Lock()

    def _run(self, args: List[str], timeout: Optional[float] = None) -> subprocess.CompletedProcess:
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            self.calls += 1
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                                  env=job_environment(), stdin=subprocess.DEVNULL)  # sbatch exports it to the job
        except FileNotFoundError:
            raise SchedulerUnreachable(f"{args[0]} not found: is Slurm installed on this node?")
        except subprocess.TimeoutExpired:
            raise SchedulerUnreachable(f"{args[0]} did not answer within {timeout:g} s")

    def _check(self, result: subprocess.CompletedProcess, command: str) -> None:
        if result.returncode == 0:
            return
        message = _clean_message(result.stderr or result.stdout)
        if UNREACHABLE_PATTERNS.search(result.stderr or ""):
            raise SchedulerUnreachable(f"Slurm controller unreachable ({command}: {message})")
        raise SubmissionRejected(message)

    def arguments(self, resources: Resources, job_dir: Optional[Path] = None, name: Optional[str] = None) -> List[str]:
        """sbatch's options: for the resources alone, or (with the job's folder and name) all that submit passes."""
        return resource_options(resources) if job_dir is None else sbatch_arguments(job_dir, name or "", resources,
                                                                                       self.preemptible)

    def submit(self, script: Path, job_dir: Path, name: str, resources: Resources) -> str:
        result = self._run(["sbatch", *self.arguments(resources, job_dir, name), str(script)])
        self._check(result, "sbatch")
        job_id = result.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise SubmissionRejected(f"sbatch gave no job id: {result.stdout.strip()!r}")
        return job_id

    def submit_array(self, script: Path, job_dir: Path, name: str, resources: Resources,
                     indices: List[int]) -> Dict[int, str]:
        """One `sbatch --array=<indices>`; each task's output in tasks/<index>/job.log (appended: a task submitted again
        for the same index writes after the last one's lines)."""
        args = [arg for arg in self.arguments(resources, job_dir, name) if not arg.startswith("--output=")]
        result = self._run(["sbatch", f"--array={array_ranges(indices)}",
                            f"--output={Path(job_dir) / TASKS_DIR / '%a' / LOG_NAME}", "--open-mode=append", *args,
                            str(script)])
        self._check(result, "sbatch")
        job_id = result.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise SubmissionRejected(f"sbatch gave no job id: {result.stdout.strip()!r}")
        return {index: f"{job_id}_{index}" for index in indices}

    def estimate_start(self, resources: Resources, timeout: float = 5.0) -> Optional[datetime]:
        """Slurm's own estimate: `sbatch --test-only` with the job's resources (nothing is submitted)."""
        result = self._run(["sbatch", "--test-only", "--job-name=pilotfish-estimate", "--output=/dev/null",
                            *resource_options(resources), "--wrap=true"], timeout=min(timeout, self.timeout))
        self._check(result, "sbatch --test-only")
        start = parse_test_only(result.stderr + result.stdout)
        if start is None:
            raise SubmissionRejected(f"sbatch --test-only gave no start time: {_clean_message(result.stderr)}")
        return start

    def query(self, jobs: Iterable[JobQuery]) -> Dict[str, JobInfo]:
        jobs = list(jobs)
        if not jobs:
            return {}
        wanted = {job.job_id: job for job in jobs}
        # --array: a job array's pending tasks one line each ("123_4"), as its running ones are
        result = self._run(["squeue", "--noheader", "--array", "--states=all", f"--user={self.user}",
                            f"--format={SQUEUE_FORMAT}"])
        try:
            self._check(result, "squeue")
        except SubmissionRejected as exc:
            raise SchedulerUnreachable(f"squeue failed: {exc}")
        found: Dict[str, JobInfo] = {}
        for line in result.stdout.splitlines():
            parts = line.strip().split("|", 4)
            if len(parts) != 5 or parts[0] not in wanted:
                continue
            job_id, raw_state, node, reason, name = parts
            if name != wanted[job_id].name:
                continue  # a recycled job id belonging to another job
            state = STATE_MAP.get(raw_state.split()[0], JobState.RUNNING)
            detail = raw_state if reason in ("None", "") else f"{raw_state} ({reason})"
            found[job_id] = JobInfo(job_id, state, node=node if node and node != "(null)" else None, detail=detail)
        missing = [job for job in jobs if job.job_id not in found]
        if missing:
            found.update(self._finished(missing))
        return found

    def _finished(self, jobs: List[JobQuery]) -> Dict[str, JobInfo]:
        """Final states of jobs no longer in the controller: sacct if accounting is on, else the job files."""
        found: Dict[str, JobInfo] = {}
        if self.accounting is not False:
            since = min(job.submitted_at for job in jobs) - timedelta(minutes=1)
            since_local = since.replace(tzinfo=timezone.utc).astimezone().strftime("%Y-%m-%dT%H:%M:%S")
            result = self._run(["sacct", "--noheader", "--parsable2", "--allocations",
                                f"--starttime={since_local}", f"--jobs={','.join(job.job_id for job in jobs)}",
                                "--format=JobID,JobName,State,ExitCode,NodeList"])
            if result.returncode != 0 and UNREACHABLE_PATTERNS.search(result.stderr or ""):
                raise SchedulerUnreachable(f"sacct failed: {_clean_message(result.stderr)}")
            if ACCOUNTING_DISABLED.search(result.stderr + result.stdout):
                log.info("Slurm accounting storage is disabled: final states come from the job files")
                self.accounting = False
            elif result.returncode == 0:
                self.accounting = True
                names = {job.job_id: job.name for job in jobs}
                for line in result.stdout.splitlines():
                    parts = line.split("|")
                    if len(parts) < 5 or parts[0] not in names or parts[1] != names[parts[0]]:
                        continue
                    raw_state = parts[2]
                    state = STATE_MAP.get(raw_state.split()[0], JobState.FAILED)
                    found[parts[0]] = JobInfo(parts[0], state, node=parts[4] or None,
                                              detail=f"{raw_state}, exit code {parts[3]}")
        for job in jobs:
            if job.job_id not in found:
                found[job.job_id] = state_from_job_files(job)
        return found

    def allocations(self, jobs: Iterable[JobQuery], timeout: float = 5.0) -> Optional[Dict[str, Allocation]]:
        """Elapsed seconds and allocated CPUs and GPUs from one `sacct -X -P -n -j <ids>` (ElapsedRaw, AllocTRES); a
        job id whose name is not the job's (a recycled id) is left out."""
        names = {job.job_id: job.name for job in jobs if job.job_id}
        if not names:
            return {}
        if self.accounting is False:
            raise SchedulerUnreachable("Slurm accounting storage is disabled")
        since = min(job.submitted_at for job in jobs if job.job_id) - timedelta(minutes=1)
        since_local = since.replace(tzinfo=timezone.utc).astimezone().strftime("%Y-%m-%dT%H:%M:%S")
        result = self._run(["sacct", "-X", "-P", "-n", f"--starttime={since_local}", "-j", ",".join(names),
                            "--format=JobIDRaw,ElapsedRaw,AllocTRES,JobName"], timeout=min(timeout, self.timeout))
        if ACCOUNTING_DISABLED.search(result.stderr + result.stdout):
            self.accounting = False
            raise SchedulerUnreachable("Slurm accounting storage is disabled")
        if result.returncode != 0:
            raise SchedulerUnreachable(f"sacct failed: {_clean_message(result.stderr)}")
        self.accounting = True
        return parse_allocations(result.stdout, names)

    def cancel(self, job_id: str, job_dir: Path) -> None:
        result = self._run(["scancel", job_id])
        if result.returncode != 0 and "Invalid job id" not in (result.stderr or ""):
            self._check(result, "scancel")

    def describe(self) -> dict:
        return {"kind": self.name, "user": self.user, "accounting": self.accounting}

    def overview(self, jobs: Iterable[JobQuery] = ()) -> dict:
        """Partitions and nodes from one `sinfo`, the user's jobs from one `squeue`."""
        nodes_result = self._run(["sinfo", "--noheader", "--Node", f"--Format={SINFO_NODE_FIELDS}"])
        self._check_query(nodes_result, "sinfo")
        queue_result = self._run(["squeue", "--noheader", f"--user={self.user}", f"--format={QUEUE_FORMAT}"])
        self._check_query(queue_result, "squeue")
        partitions, nodes = parse_sinfo_nodes(nodes_result.stdout)
        return {"partitions": partitions, "nodes": nodes, "queue": parse_user_queue(queue_result.stdout)}

    def _check_query(self, result: subprocess.CompletedProcess, command: str) -> None:
        """A read-only command that fails is the scheduler not answering, whatever Slurm's words."""
        try:
            self._check(result, command)
        except SubmissionRejected as exc:
            raise SchedulerUnreachable(f"{command} failed: {exc}")


def parse_test_only(text: str) -> Optional[datetime]:
    """The start time in `sbatch --test-only`'s words ("sbatch: Job 1234 to start at 2026-12-01T07:30:00 using 1
    processors on nodes vm in partition cpu"), Slurm's local time, as an aware datetime; None if there is none."""
    match = TEST_ONLY_START.search(text or "")
    if not match:
        return None
    try:
        return datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S").astimezone()
    except ValueError:
        return None


def parse_allocations(text: str, names: Dict[str, str]) -> Dict[str, Allocation]:
    """`sacct -P --format=JobIDRaw,ElapsedRaw,AllocTRES,JobName` lines as Allocations of the jobs in `names` (job id
    -> its name). AllocTRES reads "billing=2,cpu=2,gres/gpu=1,mem=512M,node=1" (GPUs by type, "gres/gpu:a100=1",
    when the untyped count is not there); a job not yet allocated has none."""
    found: Dict[str, Allocation] = {}
    for line in text.splitlines():
        parts = line.strip().split("|", 3)
        if len(parts) != 4 or names.get(parts[0]) != parts[3]:
            continue
        job_id, elapsed, tres, _name = parts
        counts = dict(item.partition("=")[::2] for item in tres.split(",") if "=" in item)
        gpus = counts.get("gres/gpu")
        if gpus is None:
            gpus = sum(_number(value) for key, value in counts.items() if key.startswith("gres/gpu:"))
        found[job_id] = Allocation(job_id, _number(elapsed), _number(counts.get("cpu", "0")), _number(str(gpus)))
    return found


def _number(text: str) -> int:
    return int(text) if text.strip().isdigit() else 0


def parse_gpus(gres: str) -> Dict[str, int]:
    """GPUs per type from a Slurm GRES string: "gpu:a100:4(S:0-1),gpu:2" -> {"a100": 4, "": 2}."""
    counts: Dict[str, int] = {}
    for item in re.sub(r"\([^)]*\)", "", gres or "").split(","):
        match = re.fullmatch(r"gpu(?::([^:]+))?:(\d+)", item.strip())
        if match:
            kind = match.group(1) or ""
            counts[kind] = counts.get(kind, 0) + int(match.group(2))
    return counts


def parse_sinfo_nodes(text: str) -> tuple:
    """(partitions, nodes) from `sinfo --Node --Format=SINFO_NODE_FIELDS` (one line per node and partition)."""
    partitions: Dict[str, dict] = {}
    nodes: Dict[str, dict] = {}
    for line in text.splitlines():
        parts = [part.strip() for part in line.split("|")]
        if len(parts) < 10 or not parts[0]:
            continue
        name, partition, raw_state, cpus, gres, gres_used, memory, alloc_memory, time_limit, available = parts[:10]
        default = partition.endswith("*")
        partition = partition.rstrip("*")
        state = raw_state.rstrip("*~#!%$@^-+").lower()
        alloc, idle, _other, total = ([_number(n) for n in cpus.split("/")] + [0, 0, 0, 0])[:4]
        gpus = parse_gpus(gres)
        used = parse_gpus(gres_used)
        gpus_total, gpus_used = sum(gpus.values()), sum(used.values())
        node = nodes.setdefault(name, {
            "name": name, "partitions": [], "state": state, "cpus_alloc": alloc, "cpus_idle": idle,
            "cpus_total": total, "gpus_total": gpus_total, "gpus_used": gpus_used,
            "gpu_types": sorted(kind for kind in gpus if kind), "memory_mb": _number(memory),
            "memory_alloc_mb": _number(alloc_memory)})
        node["partitions"].append(partition)
        usable = state in USABLE_NODE_STATES
        entry = partitions.setdefault(partition, {
            "name": partition, "default": default, "available": available, "time_limit": time_limit, "nodes": 0,
            "nodes_idle": 0, "nodes_usable": 0, "cpus_idle": 0, "cpus_total": 0, "gpus_free": 0, "gpus_total": 0,
            "gpu_types": []})
        entry["nodes"] += 1
        entry["nodes_idle"] += state == "idle"
        entry["nodes_usable"] += usable
        entry["cpus_total"] += total
        entry["cpus_idle"] += idle if usable else 0
        entry["gpus_total"] += gpus_total
        entry["gpus_free"] += max(0, gpus_total - gpus_used) if usable else 0
        entry["gpu_types"] = sorted(set(entry["gpu_types"]) | {kind for kind in gpus if kind})
    return list(partitions.values()), list(nodes.values())


def parse_user_queue(text: str) -> List[dict]:
    """The user's jobs from `squeue --format=QUEUE_FORMAT`."""
    jobs = []
    for line in text.splitlines():
        parts = line.strip().split("|", 8)
        if len(parts) != 9:
            continue
        job_id, partition, state, elapsed, limit, count, gres, where, name = parts
        jobs.append({"job_id": job_id, "name": name, "partition": partition, "state": state, "time": elapsed,
                     "time_limit": limit, "nodes": _number(count), "where": where,
                     "gres": "" if gres in ("N/A", "(null)") else gres})
    return jobs
