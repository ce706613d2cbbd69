"""Start estimates without a cluster: sbatch --test-only's words parsed (through a stand-in sbatch on PATH, as the
Slurm adapter runs it), the cache, the wait bounded for a slow scheduler, failures as words, and the advice naming a
tier that would start sooner."""
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from portal.catalog.start_times import (StartEstimate, StartEstimates, describe_start, fitting_tiers, sooner_advice)
from portal.catalog.tiers import parse_specs
from portal.scheduler import Resources, Scheduler, SchedulerUnreachable, SubmissionRejected
from portal.scheduler.local import LocalScheduler
from portal.scheduler.slurm import SlurmScheduler, parse_test_only

NOW = datetime(2026, 12, 1, 7, 30, tzinfo=timezone.utc)
SPECS = parse_specs("""\
partitions:
  remote:
    default: true
    tiers:
      - {name: Tiny, description: t, max_model_size_gb: 1, gpu_count: 0, cpu_cores: 1, memory_gb: 0.25}
      - {name: Big, description: b, max_model_size_gb: null, gpu_count: 0, cpu_cores: 2, memory_gb: 1}
  cpu:
    tiers:
      - {name: Small, description: s, max_model_size_gb: 4, gpu_count: 0, cpu_cores: 1, memory_gb: 0.5}
""")


def test_the_start_time_is_read_from_sbatch_test_only():
    text = "sbatch: Job 4367 to start at 2026-12-01T07:28:18 using 1 processors on nodes vm in partition cpu\n"
    start = parse_test_only(text)
    assert start == datetime(2026, 12, 1, 7, 28, 18).astimezone()  # Slurm's local time, made aware
    assert start.tzinfo is not None
    assert parse_test_only("allocation failure: Requested node configuration is not available") is None
    assert parse_test_only("sbatch: Job 1 to start at soon") is None


def fake_sbatch(tmp_path, monkeypatch, body: str):
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    script = folder / "sbatch"
    script.write_text("#!/bin/bash\necho \"$@\" > " + str(tmp_path / "args") + "\n" + body + "\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{__import__('os').environ['PATH']}")


def test_slurm_asks_sbatch_test_only_with_the_tiers_resources(tmp_path, monkeypatch):
    fake_sbatch(tmp_path, monkeypatch,
                'echo "sbatch: Job 12 to start at 2026-12-01T09:00:00 using 1 processors on nodes node2 in partition '
                'remote" >&2')
    start = SlurmScheduler().estimate_start(Resources(time=10, partition="remote", cpus=1, memory_gb=0.25))
    assert start == datetime(2026, 12, 1, 9, 0).astimezone()
    args = (tmp_path / "args").read_text().split()
    assert args[0] == "--test-only" and "--partition=remote" in args and "--cpus-per-task=1" in args
    assert "--time=10" in args and args[-1] == "--wrap=true"


def test_slurm_refusals_and_silence_are_typed(tmp_path, monkeypatch):
    fake_sbatch(tmp_path, monkeypatch, 'echo "allocation failure: Requested node configuration is not available" >&2; '
                                       'exit 1')
    with pytest.raises(SubmissionRejected, match="^Requested node configuration is not available$"):
        SlurmScheduler().estimate_start(Resources(time=10, partition="remote", cpus=8))
    fake_sbatch(tmp_path, monkeypatch, "sleep 5")
    began = time.monotonic()
    with pytest.raises(SchedulerUnreachable, match="did not answer within 0.5 s"):
        SlurmScheduler().estimate_start(Resources(time=10), timeout=0.5)
    assert time.monotonic() - began < 3


def test_the_local_scheduler_starts_now_and_the_base_gives_no_estimate():
    start = LocalScheduler().estimate_start(Resources(time=10))
    assert abs((start - datetime.now(timezone.utc)).total_seconds()) < 5
    assert Scheduler().estimate_start(Resources(time=10)) is None


class Counting(Scheduler):
    """A scheduler whose estimate for a partition is given (a datetime, an exception, or a delay first)."""
    name = "counting"

    def __init__(self, answers, delay=0.0):
        self.answers, self.delay, self.calls = answers, delay, []

    def arguments(self, resources, job_dir=None, name=None):
        return [f"--partition={resources.partition}", f"--cpus-per-task={resources.cpus}"]

    def estimate_start(self, resources, timeout=5.0):
        self.calls.append(resources.partition)
        time.sleep(self.delay)
        answer = self.answers[resources.partition]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_estimates_are_cached_briefly_and_asked_once_at_a_time():
    clock = [100.0]
    scheduler = Counting({"cpu": NOW, "remote": NOW + timedelta(minutes=9)})
    estimates = StartEstimates(ttl=30, clock=lambda: clock[0])
    asked = [Resources(time=10, partition="cpu", cpus=1), Resources(time=10, partition="remote", cpus=1),
             Resources(time=10, partition="cpu", cpus=1)]
    first = estimates.estimate(scheduler, asked)
    assert [item.at for item in first] == [NOW, NOW + timedelta(minutes=9), NOW]
    assert sorted(scheduler.calls) == ["cpu", "remote"]  # the same question once
    clock[0] += 29
    estimates.estimate(scheduler, asked)
    assert len(scheduler.calls) == 2  # cached
    clock[0] += 2
    estimates.estimate(scheduler, asked)
    assert len(scheduler.calls) == 4  # asked again after 30 s


def test_failures_are_words_and_are_cached_too():
    scheduler = Counting({"cpu": SchedulerUnreachable("sbatch did not answer within 5 s"),
                          "gpu": SubmissionRejected("Requested node configuration is not available"),
                          "remote": None})
    estimates = StartEstimates()
    down, refused, none = estimates.estimate(scheduler, [Resources(time=1, partition=name, cpus=1)
                                                          for name in ("cpu", "gpu", "remote")])
    assert down.at is None and down.problem == "estimate unavailable: sbatch did not answer within 5 s"
    assert not down.refused
    assert refused.refused and refused.problem.startswith("estimate unavailable: the scheduler would not run it: ")
    assert none.problem == "estimate unavailable: the counting scheduler gives no estimates"
    estimates.estimate(scheduler, [Resources(time=1, partition="cpu", cpus=1)])
    assert scheduler.calls.count("cpu") == 1
    assert down.as_dict(NOW) == {"at": None, "in_seconds": None, "now": False, "text": down.problem,
                                 "problem": down.problem}


def test_a_slow_scheduler_is_waited_on_once_not_per_request():
    scheduler = Counting({"cpu": NOW}, delay=1.5)
    estimates = StartEstimates(timeout=0.5)
    began = time.monotonic()
    [late] = estimates.estimate(scheduler, [Resources(time=1, partition="cpu", cpus=1)])
    assert 0.4 < time.monotonic() - began < 1.2
    assert late.problem == "estimate unavailable: the scheduler did not answer within 0.5 s"
    began = time.monotonic()
    [again] = estimates.estimate(scheduler, [Resources(time=1, partition="cpu", cpus=1)])
    assert time.monotonic() - began < 0.2 and again.at is None  # the question still out: no second wait
    assert scheduler.calls == ["cpu"]
    time.sleep(1.3)
    [known] = estimates.estimate(scheduler, [Resources(time=1, partition="cpu", cpus=1)])
    assert known.at == NOW  # the late answer was kept for the next caller
    assert scheduler.calls == ["cpu"]


def test_a_page_waits_less_than_the_timeout():
    gate = threading.Event()

    class Stuck(Counting):
        def estimate_start(self, resources, timeout=5.0):
            gate.wait(5)
            return NOW

    estimates = StartEstimates(timeout=5)
    began = time.monotonic()
    [late] = estimates.estimate(Stuck({}), [Resources(time=1, partition="cpu", cpus=1)], wait_for=0.3)
    assert time.monotonic() - began < 1 and late.problem.endswith("within 0.3 s")
    gate.set()


def test_start_times_in_words():
    assert describe_start(NOW + timedelta(seconds=30), NOW) == "now"
    assert describe_start(NOW - timedelta(minutes=3), NOW) == "now"
    local = (NOW + timedelta(minutes=12)).astimezone()
    assert describe_start(NOW + timedelta(minutes=12), NOW) == f"in about 12 min ({local:%H:%M})"
    assert describe_start(NOW + timedelta(hours=3), NOW).startswith("in about 3 h (")
    assert describe_start(NOW + timedelta(days=3), NOW).startswith("in 3 days (")
    item = StartEstimate(at=NOW + timedelta(minutes=12)).as_dict(NOW)
    assert item["in_seconds"] == 720 and item["now"] is False and item["at"] == "2026-12-01T07:42:00+00:00"
    assert StartEstimate(at=NOW).as_dict(NOW)["now"] is True


def test_the_tiers_a_model_fits_in_every_partition():
    assert [tier.ref for tier in fitting_tiers(SPECS, 0.5)] == ["remote.Tiny", "remote.Big", "cpu.Small"]
    assert [tier.ref for tier in fitting_tiers(SPECS, 2)] == ["remote.Big", "cpu.Small"]
    assert [tier.ref for tier in fitting_tiers(SPECS, None)] == ["remote.Big"]
    tiny = SPECS.partitions["remote"][0]
    assert [tier.ref for tier in fitting_tiers(SPECS, 3, chosen=tiny)] == ["remote.Tiny", "remote.Big", "cpu.Small"]


def test_a_tier_that_starts_sooner_is_named():
    tiny = SPECS.partitions["remote"][0]
    later = NOW + timedelta(minutes=10)
    starts = {"remote.Tiny": StartEstimate(later), "remote.Big": StartEstimate(later + timedelta(minutes=1)),
              "cpu.Small": StartEstimate(NOW)}
    advice = sooner_advice(tiny, starts, NOW)
    assert advice["tier"] == "cpu.Small"
    assert advice["reason"].startswith("cpu.Small also fits and would start sooner: now, while remote.Tiny would start "
                                       "in about 10 min (")
    # a few minutes sooner is not worth a larger tier; a recommendation starting now needs no advice
    assert sooner_advice(tiny, {**starts, "cpu.Small": StartEstimate(later - timedelta(minutes=3))}, NOW) is None
    assert sooner_advice(tiny, {**starts, "remote.Tiny": StartEstimate(NOW)}, NOW) is None
    # the recommendation the scheduler would not run, or whose estimate is missing
    refused = StartEstimate(problem="estimate unavailable: ...", refused=True, detail="Requested node configuration is "
                                                                                      "not available")
    advice = sooner_advice(tiny, {**starts, "remote.Tiny": refused}, NOW)
    assert advice["reason"] == ("remote.Tiny would not run (Requested node configuration is not available); cpu.Small "
                                "also fits and would start now")
    assert sooner_advice(tiny, {**starts, "remote.Tiny": StartEstimate(problem="estimate unavailable: x")}, NOW) is None
    assert sooner_advice(tiny, {"remote.Tiny": StartEstimate(later)}, NOW) is None
