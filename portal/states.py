"""The service state machine: the states and their named groups, the moves allowed between them, and the reconciler's
rules as small tables (what a job's state, and what a health probe, make of a service). Pure: no database, no Flask,
no scheduler calls, so `portal.client` can use the groups and tests/test_states.py can run every table in a second.

    SUBMITTED -> PENDING -> STARTING -> RUNNING <-> UNHEALTHY      (SUBMITTED -> STARTING when the job starts at once)
    RUNNING -> SCALED_TO_ZERO -> SUBMITTED                          (replicas with min 0: no job until a request)
    STARTING, RUNNING or UNHEALTHY -> PENDING                       (its job was requeued: preempted)
    any of them -> STOPPED, FAILED or TIMEOUT, which are final
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Tuple

from .exit_codes import describe_exit
from .scheduler import JobState


try:
    StrEnum = enum.StrEnum
except AttributeError:  # Python before 3.11 (a notebook's Python may be older than the portal's)
    class StrEnum(str, enum.Enum):
        __str__ = str.__str__
        __format__ = str.__format__


class State(StrEnum):
    """A service's state. A str enum: the database and the JSON hold the same plain strings as before."""
    SUBMITTED = "SUBMITTED"  # recorded, its job handed to the scheduler
    PENDING = "PENDING"  # the job waits in the queue
    STARTING = "STARTING"  # the job runs; its server has not answered a health check yet
    RUNNING = "RUNNING"  # the server answers its health check
    UNHEALTHY = "UNHEALTHY"  # it answered once and no longer does
    STOPPED = "STOPPED"  # stopped by its user or cancelled outside the portal
    FAILED = "FAILED"  # refused, crashed, its node went down, ...
    TIMEOUT = "TIMEOUT"  # its job reached its time limit
    SCALED_TO_ZERO = "SCALED_TO_ZERO"  # no job (replicas with min 0, quiet): the next request starts one


# The named groups, each defined once here (an Enum's body cannot hold them: they would become members).
State.ALL = tuple(State)
State.LIVE = (State.SUBMITTED, State.PENDING, State.STARTING, State.RUNNING, State.UNHEALTHY,
              State.SCALED_TO_ZERO)  # followed by the reconciler (its job, when it has one)
State.TERMINAL = (State.STOPPED, State.FAILED, State.TIMEOUT)  # ended ("ENDED" in the API's filter): final
State.COMING_UP = (State.SUBMITTED, State.PENDING, State.STARTING)  # on its way up, has not answered yet
State.ROUTABLE = (State.RUNNING, State.UNHEALTHY)  # has answered: the proxy routes to it, Prometheus scrapes it
State.PROBED = (State.STARTING, State.RUNNING, State.UNHEALTHY)  # the reconciler probes its endpoint (once known)
State.FAST_POLL = (State.SUBMITTED, State.PENDING, State.STARTING, State.UNHEALTHY)  # about to change: poll fast


# --- allowed transitions ----------------------------------------------------------------------------------

_ENDS = frozenset(State.TERMINAL)

TRANSITIONS: Dict[Optional[State], FrozenSet[State]] = {
    None: frozenset({State.SUBMITTED, State.FAILED}),  # recorded at launch; FAILED when the submission is refused
    State.SUBMITTED: frozenset({State.PENDING, State.STARTING}) | _ENDS,  # STARTING: the job started within a cycle
    State.PENDING: frozenset({State.STARTING}) | _ENDS,
    # PENDING again: its job was requeued (preempted, on a partition the site marked preemptible).
    State.STARTING: frozenset({State.RUNNING, State.PENDING}) | _ENDS,
    State.RUNNING: frozenset({State.UNHEALTHY, State.SCALED_TO_ZERO, State.PENDING}) | _ENDS,
    State.SCALED_TO_ZERO: frozenset({State.SUBMITTED}) | _ENDS,  # a request woke it: a new job
    State.UNHEALTHY: frozenset({State.RUNNING, State.PENDING}) | _ENDS,
    State.STOPPED: frozenset(),
    State.FAILED: frozenset(),
    State.TIMEOUT: frozenset(),
}


class IllegalTransition(ValueError):
    """A move the state machine does not allow (a bug in the caller, never a user's mistake)."""


def can_move(from_state: Optional[str], to_state: str) -> bool:
    """Whether a service may move from `from_state` (None: not recorded yet) to `to_state`."""
    return to_state in TRANSITIONS.get(from_state, frozenset())


def check_move(from_state: Optional[str], to_state: str) -> None:
    """Raise IllegalTransition unless the table allows the move."""
    if to_state not in State.ALL:
        raise IllegalTransition(f"{to_state!r} is not a service state (expected one of {', '.join(State.ALL)})")
    if from_state is not None and from_state not in State.ALL:
        raise IllegalTransition(f"{from_state!r} is not a service state (expected one of {', '.join(State.ALL)})")
    if not can_move(from_state, to_state):
        allowed = ", ".join(state for state in State.ALL if state in TRANSITIONS[from_state]) or "nowhere (final)"
        raise IllegalTransition(f"a service cannot move from {from_state or 'nothing'} to {to_state}; "
                                f"from {from_state or 'nothing'} it may move to {allowed}")


# --- the job's state -> the service's state ---------------------------------------------------------------

@dataclass(frozen=True)
class JobFacts:
    """What the reconciler knows of a service's job in one cycle (read from the scheduler and the job's folder)."""
    job_id: str
    state: JobState
    detail: str = ""  # the scheduler's own words: pending reason, raw state (NODE_FAIL, OUT_OF_MEMORY), exit code
    node: Optional[str] = None  # where the scheduler says the job runs or ran
    known_node: Optional[str] = None  # where the portal last saw it run
    stop_requested: bool = False  # its user (or the portal: idle, lease) asked to stop it
    stop_reason: Optional[str] = None  # why, when the portal asked ("idle for 30 min"); None: its user asked
    time_limit: int = 0  # minutes
    exit_code: Optional[int] = None  # the server's exit code, as the job script recorded it
    log_excerpt: str = ""  # the last lines of job.log


# A job still queued or running moves its service forward only: job state -> (from states, to state, reason).
ALIVE_JOB: Dict[JobState, Tuple[FrozenSet[State], State, str]] = {
    JobState.PENDING: (frozenset({State.SUBMITTED}), State.PENDING, "waiting in the queue: {detail}"),
    JobState.RUNNING: (frozenset({State.SUBMITTED, State.PENDING}), State.STARTING, "job {job_id} running on {where}"),
}

# A job that ran and is queued again was requeued (preempted: only jobs on preemptible partitions are submitted so).
REQUEUED_FROM = frozenset({State.STARTING, State.RUNNING, State.UNHEALTHY})
REQUEUED = "job {job_id} was requeued (preempted): waiting in the queue again ({detail})"

STOPPED_BY_USER = "stopped by user"  # whatever the job's end, once its user asked to stop it (else: the stop's reason)

# An ended job that was not a failure: job state -> (service state, reason).
STOPPED_JOB: Dict[JobState, Tuple[State, str]] = {
    JobState.CANCELLED: (State.STOPPED, "job {job_id} was cancelled outside the portal"),
    JobState.TIMEOUT: (State.TIMEOUT, "job {job_id} reached its time limit of {time_limit} min"),
}

# Any other end is FAILED. Its cause, the first that applies: the scheduler's words in the detail, then the server's
# exit code (exit_codes.describe_exit), then the job state alone.
SCHEDULER_CAUSES: Tuple[Tuple[str, str], ...] = (
    ("NODE_FAIL", "its node {node} went down"),
    ("OUT_OF_MEMORY", "the job ran out of memory"),
)
ENDED_BY_ITSELF: Dict[JobState, str] = {
    JobState.COMPLETED: "the server exited by itself",
    JobState.FAILED: "the job failed",
    JobState.UNKNOWN: "the job ended",
}
FAILURE_REASON = "{what} (job {job_id}: {detail})"
LOG_LINES = "; last log lines: {excerpt}"


def without_log_lines(reason: Optional[str]) -> str:
    """A reason without the job log lines an ended service's reason quotes (for answers that point to the log)."""
    return (reason or "").split(LOG_LINES.split("{")[0])[0]


def after_job(service_state: str, job: JobFacts) -> Optional[Tuple[State, str]]:
    """The (state, reason) a service in `service_state` moves to for its job's news, or None to stay."""
    if job.state is JobState.PENDING and service_state in REQUEUED_FROM:
        return State.PENDING, REQUEUED.format(job_id=job.job_id, detail=job.detail)
    if job.state in ALIVE_JOB:
        from_states, to_state, reason = ALIVE_JOB[job.state]
        if service_state not in from_states:
            return None
        return to_state, reason.format(detail=job.detail, job_id=job.job_id, where=job.node or "a node")
    return job_end(job)


def job_end(job: JobFacts) -> Tuple[State, str]:
    """The final (state, reason) of a service whose job ended."""
    if job.stop_requested:
        return State.STOPPED, job.stop_reason or STOPPED_BY_USER
    if job.state in STOPPED_JOB:
        to_state, reason = STOPPED_JOB[job.state]
        return to_state, reason.format(job_id=job.job_id, time_limit=job.time_limit)
    what = next((words for mark, words in SCHEDULER_CAUSES if mark in job.detail), None)
    if what is not None:
        what = what.format(node=job.node or job.known_node or "").replace("  ", " ")
    elif job.exit_code is not None:
        what = describe_exit(job.exit_code)
    else:
        what = ENDED_BY_ITSELF[job.state]
    reason = FAILURE_REASON.format(what=what, job_id=job.job_id, detail=job.detail)
    if job.log_excerpt:
        reason += LOG_LINES.format(excerpt=job.log_excerpt)
    return State.FAILED, reason


# --- a health probe -> the service's state ----------------------------------------------------------------

# A probe answered (HTTP 200): from state -> (to state, reason). The failure count goes back to 0.
PROBE_OK: Dict[State, Tuple[State, str]] = {
    State.STARTING: (State.RUNNING, "answered its health check"),
    State.UNHEALTHY: (State.RUNNING, "answers its health check again"),
}
# A probe failed. A STARTING server is not counted (it may take minutes to load its model); others count failures,
# and only a RUNNING one moves, to UNHEALTHY: at once when nothing listens any more, else after enough failures.
REFUSED = "connection refused"  # the probe's detail when nothing listens on the port
PROBE_REFUSED = (State.UNHEALTHY, "the server no longer accepts connections (connection refused)")
IMPOSTOR = "not the service's certificate"  # the probe's detail when something else answers on the port
PROBE_IMPOSTOR = (State.UNHEALTHY, "another program answers on the server's port (not the service's TLS "
                                   "certificate): the server is no longer there")
PROBE_FAILED = (State.UNHEALTHY, "health check failed {failures} times in a row ({detail})")


@dataclass(frozen=True)
class ProbeStep:
    """What one probe makes of a service: its failure count afterwards, and the move (None: it stays)."""
    failures: int
    move: Optional[Tuple[State, str]] = None


def after_probe(service_state: str, ok: bool, detail: str, failures: int, unhealthy_after: int) -> ProbeStep:
    """The outcome of one health probe of a service in `service_state` with `failures` failures so far."""
    if ok:
        return ProbeStep(0, PROBE_OK.get(service_state))
    if service_state == State.STARTING:
        return ProbeStep(failures)
    failures += 1
    if service_state != State.RUNNING:
        return ProbeStep(failures)
    if detail == REFUSED:
        return ProbeStep(failures, PROBE_REFUSED)
    if detail == IMPOSTOR:
        return ProbeStep(failures, PROBE_IMPOSTOR)
    if failures >= unhealthy_after:
        to_state, reason = PROBE_FAILED
        return ProbeStep(failures, (to_state, reason.format(failures=failures, detail=detail)))
    return ProbeStep(failures)
