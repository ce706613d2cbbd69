"""The service state machine as pure functions (no Slurm, no portal): every (from, to) pair of the transition table,
every job-state rule and every probe outcome, with the exact reasons the portal shows."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from portal.scheduler import JobState
from portal.states import (IllegalTransition, JobFacts, ProbeStep, State, after_job, after_probe, can_move,
                           check_move)

S = State
ENDS = {S.STOPPED, S.FAILED, S.TIMEOUT}

# Written out by hand, not read from the table: the moves the portal makes, and no others.
ALLOWED = {
    (None, S.SUBMITTED), (None, S.FAILED),
    (S.SUBMITTED, S.PENDING), (S.SUBMITTED, S.STARTING), (S.PENDING, S.STARTING), (S.STARTING, S.RUNNING),
    (S.RUNNING, S.UNHEALTHY), (S.UNHEALTHY, S.RUNNING), (S.RUNNING, S.SCALED_TO_ZERO), (S.SCALED_TO_ZERO, S.SUBMITTED),
    (S.STARTING, S.PENDING), (S.RUNNING, S.PENDING), (S.UNHEALTHY, S.PENDING),  # requeued (preempted)
    *((live, end) for live in (S.SUBMITTED, S.PENDING, S.STARTING, S.RUNNING, S.UNHEALTHY, S.SCALED_TO_ZERO)
      for end in ENDS),
}
PAIRS = [(from_state, to_state) for from_state in (None, *State) for to_state in State]


# --- states and groups ------------------------------------------------------------------------------------

def test_states_are_the_plain_strings_the_database_and_the_json_hold():
    assert [state.value for state in State] == ["SUBMITTED", "PENDING", "STARTING", "RUNNING", "UNHEALTHY",
                                                "STOPPED", "FAILED", "TIMEOUT", "SCALED_TO_ZERO"]
    for state in State:
        assert state == state.value and f"{state}" == str(state) == state.value
        assert type(state.value) is str
        assert {state.value: 1}[state] == 1  # a row's plain string and the member are the same key
    assert json.dumps({"state": State.RUNNING}) == '{"state": "RUNNING"}'
    assert ", ".join(State.ALL) == ("SUBMITTED, PENDING, STARTING, RUNNING, UNHEALTHY, STOPPED, FAILED, TIMEOUT, "
                                    "SCALED_TO_ZERO")


def test_each_group_holds_exactly_its_states():
    assert State.ALL == tuple(State)
    assert State.LIVE == (S.SUBMITTED, S.PENDING, S.STARTING, S.RUNNING, S.UNHEALTHY, S.SCALED_TO_ZERO)
    assert State.TERMINAL == (S.STOPPED, S.FAILED, S.TIMEOUT)
    assert State.COMING_UP == (S.SUBMITTED, S.PENDING, S.STARTING)
    assert State.ROUTABLE == (S.RUNNING, S.UNHEALTHY)
    assert State.PROBED == (S.STARTING, S.RUNNING, S.UNHEALTHY)
    assert State.FAST_POLL == (S.SUBMITTED, S.PENDING, S.STARTING, S.UNHEALTHY)
    assert set(State.LIVE) | set(State.TERMINAL) == set(State.ALL) and not set(State.LIVE) & set(State.TERMINAL)
    assert set(State.COMING_UP) | set(State.ROUTABLE) | {S.SCALED_TO_ZERO} == set(State.LIVE)
    for group in (State.COMING_UP, State.ROUTABLE, State.PROBED, State.FAST_POLL):
        assert set(group) <= set(State.LIVE)
    assert "RUNNING" in State.ROUTABLE and "STOPPED" in State.TERMINAL  # plain strings from a row or JSON


def test_the_old_names_still_work():
    from portal import client, models
    assert models.State is State
    assert client.LIVE_STATES == State.LIVE and client.ENDED_STATES == State.TERMINAL


# --- the transition table ---------------------------------------------------------------------------------

@pytest.mark.parametrize("from_state,to_state", PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_transition_table(from_state, to_state):
    if (from_state, to_state) in ALLOWED:
        assert can_move(from_state, to_state)
        check_move(from_state, to_state)
        check_move(from_state and from_state.value, to_state.value)  # as plain strings, read from a row
    else:
        assert not can_move(from_state, to_state)
        with pytest.raises(IllegalTransition, match=f"cannot move from {from_state or 'nothing'} to {to_state};"):
            check_move(from_state, to_state)


def test_a_refusal_says_where_the_service_may_go():
    with pytest.raises(IllegalTransition) as refused:
        check_move(S.RUNNING, S.SUBMITTED)
    assert str(refused.value) == ("a service cannot move from RUNNING to SUBMITTED; from RUNNING it may move to "
                                  "PENDING, UNHEALTHY, STOPPED, FAILED, TIMEOUT, SCALED_TO_ZERO")
    with pytest.raises(IllegalTransition, match="from FAILED it may move to nowhere \\(final\\)"):
        check_move("FAILED", "RUNNING")


@pytest.mark.parametrize("from_state,to_state", [("RUNNING", "READY"), ("BOOTING", "RUNNING"), (None, "running")])
def test_unknown_states_are_refused(from_state, to_state):
    with pytest.raises(IllegalTransition, match="is not a service state"):
        check_move(from_state, to_state)


def test_transition_refuses_a_move_outside_the_table():
    from portal.services import transition
    service = SimpleNamespace(id="abc", state="STOPPED", reason="stopped by user")
    with pytest.raises(IllegalTransition):
        transition(service, State.RUNNING, "answered its health check")
    assert service.state == "STOPPED" and service.reason == "stopped by user"
    assert transition(service, "STOPPED", "again") is False  # staying put is no move


# --- the job's state -> the service's state ---------------------------------------------------------------

def job(state: JobState, **facts) -> JobFacts:
    return JobFacts(job_id="42", state=state, **{"time_limit": 30, **facts})


ALIVE_CASES = [  # (service state, job facts, expected move)
    (S.SUBMITTED, job(JobState.PENDING, detail="Priority"), (S.PENDING, "waiting in the queue: Priority")),
    (S.SUBMITTED, job(JobState.PENDING, detail="PENDING"), (S.PENDING, "waiting in the queue: PENDING")),
    (S.PENDING, job(JobState.PENDING, detail="Resources"), None),
    *((state, job(JobState.PENDING, detail="PENDING (BeginTime)"),
       (S.PENDING, "job 42 was requeued (preempted): waiting in the queue again (PENDING (BeginTime))"))
      for state in (S.STARTING, S.RUNNING, S.UNHEALTHY)),  # a job that ran, queued again: requeued
    (S.SUBMITTED, job(JobState.RUNNING, node="node2"), (S.STARTING, "job 42 running on node2")),
    (S.PENDING, job(JobState.RUNNING, node="vm"), (S.STARTING, "job 42 running on vm")),
    (S.PENDING, job(JobState.RUNNING), (S.STARTING, "job 42 running on a node")),
    (S.PENDING, job(JobState.RUNNING, known_node="node1"), (S.STARTING, "job 42 running on a node")),
    *((state, job(JobState.RUNNING, node="vm"), None) for state in (S.STARTING, S.RUNNING, S.UNHEALTHY)),
]

SEGFAULT = "the server crashed: segmentation fault (signal 11, SIGSEGV; exit code 139)"
END_CASES = [  # (job facts, expected final state, expected reason), whatever the service's live state
    *((job(end, stop_requested=True, detail="CANCELLED by 0", exit_code=143, log_excerpt="bye"), S.STOPPED,
       "stopped by user") for end in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT,
                                      JobState.UNKNOWN)),
    (job(JobState.CANCELLED, detail="CANCELLED by 1000", exit_code=143), S.STOPPED,
     "job 42 was cancelled outside the portal"),
    (job(JobState.TIMEOUT, detail="TIMEOUT", log_excerpt="slurmstepd: CANCELLED DUE TO TIME LIMIT"), S.TIMEOUT,
     "job 42 reached its time limit of 30 min"),
    (job(JobState.TIMEOUT, time_limit=1), S.TIMEOUT, "job 42 reached its time limit of 1 min"),
    (job(JobState.FAILED, detail="NODE_FAIL", node="node2", known_node="node1"), S.FAILED,
     "its node node2 went down (job 42: NODE_FAIL)"),
    (job(JobState.FAILED, detail="NODE_FAIL", known_node="node1", exit_code=137), S.FAILED,
     "its node node1 went down (job 42: NODE_FAIL)"),
    (job(JobState.FAILED, detail="NODE_FAIL"), S.FAILED, "its node went down (job 42: NODE_FAIL)"),
    (job(JobState.FAILED, detail="OUT_OF_MEMORY", exit_code=137, log_excerpt="Killed"), S.FAILED,
     "the job ran out of memory (job 42: OUT_OF_MEMORY); last log lines: Killed"),
    (job(JobState.FAILED, detail="FAILED (NonZeroExitCode)", exit_code=139, log_excerpt="loading | Segfault"),
     S.FAILED, f"{SEGFAULT} (job 42: FAILED (NonZeroExitCode)); last log lines: loading | Segfault"),
    (job(JobState.FAILED, detail="exit code 1", exit_code=1), S.FAILED,
     "the server exited with code 1 (job 42: exit code 1)"),
    (job(JobState.COMPLETED, detail="COMPLETED", exit_code=0), S.FAILED,
     "the server exited with code 0 (job 42: COMPLETED)"),
    (job(JobState.COMPLETED, detail="COMPLETED"), S.FAILED, "the server exited by itself (job 42: COMPLETED)"),
    (job(JobState.FAILED, detail="FAILED"), S.FAILED, "the job failed (job 42: FAILED)"),
    (job(JobState.UNKNOWN, detail="left the queue", log_excerpt="a | b"), S.FAILED,
     "the job ended (job 42: left the queue); last log lines: a | b"),
]


@pytest.mark.parametrize("service_state,facts,move", ALIVE_CASES)
def test_a_queued_or_running_job(service_state, facts, move):
    assert after_job(service_state, facts) == move
    assert after_job(service_state.value, facts) == move


@pytest.mark.parametrize("facts,state,reason", END_CASES)
@pytest.mark.parametrize("service_state", State.LIVE)
def test_an_ended_job(service_state, facts, state, reason):
    assert after_job(service_state, facts) == (state, reason)


def test_every_job_rule_makes_an_allowed_move():
    for service_state in State.LIVE:
        for facts in [case[1] for case in ALIVE_CASES] + [case[0] for case in END_CASES]:
            move = after_job(service_state, facts)
            if move is not None:
                check_move(service_state, move[0])


# --- a health probe -> the service's state ----------------------------------------------------------------

REFUSED = "connection refused"
PROBE_CASES = [  # (service state, ok, detail, failures so far, unhealthy_after) -> ProbeStep
    (S.STARTING, True, "HTTP 200", 0, 3, ProbeStep(0, (S.RUNNING, "answered its health check"))),
    (S.RUNNING, True, "HTTP 200", 2, 3, ProbeStep(0)),
    (S.UNHEALTHY, True, "HTTP 200", 7, 3, ProbeStep(0, (S.RUNNING, "answers its health check again"))),
    (S.STARTING, False, REFUSED, 0, 3, ProbeStep(0)),  # still loading its model: not counted
    (S.STARTING, False, "HTTP 503", 5, 1, ProbeStep(5)),
    (S.RUNNING, False, REFUSED, 0, 3,
     ProbeStep(1, (S.UNHEALTHY, "the server no longer accepts connections (connection refused)"))),
    (S.RUNNING, False, "HTTP 503", 0, 3, ProbeStep(1)),
    (S.RUNNING, False, "HTTP 503", 1, 3, ProbeStep(2)),
    (S.RUNNING, False, "HTTP 503", 2, 3,
     ProbeStep(3, (S.UNHEALTHY, "health check failed 3 times in a row (HTTP 503)"))),
    (S.RUNNING, False, "ReadTimeout", 4, 3,
     ProbeStep(5, (S.UNHEALTHY, "health check failed 5 times in a row (ReadTimeout)"))),
    (S.RUNNING, False, "HTTP 500", 0, 1, ProbeStep(1, (S.UNHEALTHY, "health check failed 1 times in a row (HTTP 500)"))),
    (S.UNHEALTHY, False, REFUSED, 3, 3, ProbeStep(4)),
    (S.UNHEALTHY, False, "HTTP 503", 9, 3, ProbeStep(10)),
]


@pytest.mark.parametrize("service_state,ok,detail,failures,unhealthy_after,step", PROBE_CASES)
def test_a_probe(service_state, ok, detail, failures, unhealthy_after, step):
    assert after_probe(service_state, ok, detail, failures, unhealthy_after) == step
    assert after_probe(service_state.value, ok, detail, failures, unhealthy_after) == step
    if step.move is not None:
        check_move(service_state, step.move[0])


def test_every_probed_state_and_outcome_is_covered():
    outcomes = {(True, False), (False, True), (False, False)}  # (ok, refused): answered, refused, failed otherwise
    covered = {(case[0], case[1], case[2] == REFUSED) for case in PROBE_CASES}
    assert covered == {(state, ok, refused) for state in State.PROBED for ok, refused in outcomes}
