"""Replica rules alone (portal/scaling.py): replica counts as written, the workers' load files, and when a job is
added or removed. On the real Slurm with real traffic: tests/test_replicas.py."""
import json
import os
import time

import pytest

from portal.errors import ValidationError
from portal.scaling import LOAD_FRESH_SECONDS, LoadFile, Trend, parse_replicas, read_load, scale_step


@pytest.mark.parametrize("value, expected", [
    (2, (2, 2, 4)), ("3", (3, 3, 4)), ("1:3", (1, 3, 4)),
    ({"max": 4}, (1, 4, 4)), ({"min": 2, "max": 4, "target_in_flight": 8}, (2, 4, 8)), ("0:2", (0, 2, 4)),
    ({"min": 0, "max": 1}, (0, 1, 4)),
])
def test_replicas_as_written(value, expected):
    assert parse_replicas(value) == expected


@pytest.mark.parametrize("value, problem", [
    (0, "max (0) must be at least min (0) and at least 1"), ("0:0", "at least 1"),
    ("3:1", "max (1) must be at least min (3)"),
    ("1:17", "at most 16"), ("x", "expected a number of jobs"), (True, "expected a number of jobs"),
    ({"min": 1}, "expected a number of jobs"), ({"max": "2"}, "whole numbers"), ({"max": 2, "extra": 1}, "expected"),
    ({"max": 2, "target_in_flight": 0}, "target_in_flight must be between 1 and 10000"),
])
def test_bad_replicas_are_refused_naming_the_field(value, problem):
    with pytest.raises(ValidationError) as refused:
        parse_replicas(value)
    assert refused.value.field == "replicas" and problem in refused.value.problem


def step(trend, now, serving=1, coming=0, in_flight=0, low=1, high=3, target=2):
    return scale_step(low, high, target, serving, coming, in_flight, now, trend, up_window=10, down_window=30)


def test_a_job_is_added_only_after_the_load_stayed_above_the_target_for_the_window():
    trend = Trend()
    assert step(trend, 0, in_flight=5) == (0, "")
    assert step(trend, 9, in_flight=5) == (0, "")
    assert step(trend, 10, in_flight=5) == (1, "5.0 requests in flight per job, over 2 for 10 s")
    # A dip below the target starts the window again.
    assert step(trend, 11, in_flight=5)[0] == 0 and step(trend, 12, in_flight=1)[0] == 0
    assert step(trend, 13, in_flight=5)[0] == 0 and step(trend, 22, in_flight=5)[0] == 0
    assert step(trend, 23, in_flight=5)[0] == 1
    # Never over the maximum, nor while a job is on its way up.
    assert all(step(Trend(), t, serving=3, in_flight=50)[0] == 0 for t in (0, 100))
    late = Trend()
    assert step(late, 0, coming=1, in_flight=50)[0] == 0 and step(late, 100, coming=1, in_flight=50)[0] == 0


def test_a_job_is_removed_after_a_quiet_spell_down_to_the_minimum():
    trend = Trend()
    # Two jobs, 1 request in flight: one job fewer could take 2, half of that is quiet.
    assert step(trend, 0, serving=2, in_flight=1) == (0, "")
    assert step(trend, 29, serving=2, in_flight=1) == (0, "")
    assert step(trend, 30, serving=2, in_flight=1) == (-1, "1 requests in flight for 2 jobs, quiet for 30 s")
    assert step(Trend(), 100, serving=2, in_flight=2)[0] == 0  # not quiet enough
    assert step(Trend(), 100, serving=1, in_flight=0)[0] == 0  # at the minimum


def test_with_a_minimum_of_0_the_last_job_goes_only_when_nothing_is_in_flight():
    trend = Trend()
    assert step(trend, 0, low=0, in_flight=1)[0] == 0 and step(trend, 100, low=0, in_flight=1)[0] == 0
    assert step(trend, 101, low=0) == (0, "") and step(trend, 130, low=0)[0] == 0
    assert step(trend, 131, low=0) == (-1, "0 requests in flight for 1 jobs, quiet for 30 s")


def test_below_the_minimum_jobs_are_added_at_once():
    assert step(Trend(), 0, serving=0, coming=0, low=2) == (2, "below the minimum of 2")
    assert step(Trend(), 0, serving=1, coming=0, low=2) == (1, "below the minimum of 2")
    assert step(Trend(), 0, serving=1, coming=1, low=2) == (0, "")


def test_the_workers_load_files_add_up_and_stale_ones_do_not_count(tmp_path):
    mine = LoadFile(tmp_path)
    mine.write({"a": 2, "b": 0})
    assert json.loads(mine.path.read_text()) == {"a": 2} and (tmp_path / "load").stat().st_mode & 0o777 == 0o700
    other = tmp_path / "load" / "999999.json"
    other.write_text('{"a": 3, "c": 1}')
    assert read_load(tmp_path) == {"a": 5, "c": 1}
    old = time.time() - LOAD_FRESH_SECONDS - 1
    os.utime(other, (old, old))
    assert read_load(tmp_path) == {"a": 2}
    (tmp_path / "load" / "broken.json").write_text("{")
    mine.write({})
    assert read_load(tmp_path) == {}
