"""A key's rates (portal/rate_limits.py) hold across the portal's processes: two real processes admitting against one
key never get more than its limit between them, tokens spent in one are felt in the other, the wait is what the
answer's Retry-After says, and the shared file is private and small."""
from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
import time

import pytest

from portal import rate_limits
from portal.rate_limits import RateLimits
from tests.conftest import REPO

# One process of the portal: admits requests of one key from a common start until `seconds` later, as fast as it can;
# prints how many it was admitted, how many it tried, and when its first and last attempts were.
ADMITTER = """
import json, sys, time
from portal.rate_limits import RateLimits
home, name, rpm, start, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
limits = RateLimits(home)
limits.admit("warm-up", 10_000_000, None)  # the file mapped before the start
while time.time() < start:
    pass
admitted = tried = 0
first = time.time()
while time.time() < start + seconds:
    tried += 1
    if limits.admit(name, rpm, None) == 0.0:
        admitted += 1
print(json.dumps({"admitted": admitted, "tried": tried, "first": first, "last": time.time()}))
"""


def run_processes(home, name: str, rpm: int, seconds: float, count: int = 2) -> list:
    start = time.time() + 1.5  # after both have started and imported
    processes = [subprocess.Popen([sys.executable, "-c", ADMITTER, str(home), name, str(rpm), str(start),
                                   str(seconds)], stdout=subprocess.PIPE, text=True, cwd=str(REPO),
                                  env=dict(os.environ, PYTHONPATH=str(REPO)))
                 for _ in range(count)]
    results = []
    for process in processes:
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        results.append(json.loads(out))
    return results


def test_two_processes_never_get_more_than_the_limit_between_them(tmp_path):
    # A burst of 20 within a second: exactly the limit, whichever process asks first (refills add one per 3 s).
    results = run_processes(tmp_path, "small", 20, 1.0)
    assert sum(r["admitted"] for r in results) == 20, results
    assert all(r["tried"] > 1000 for r in results), results  # both asked many times over the same second

    # A larger limit over two seconds: both processes get some, the total is the burst plus what refilled meanwhile.
    rpm = 6000
    results = run_processes(tmp_path, "large", rpm, 2.0)
    span = max(r["last"] for r in results) - min(r["first"] for r in results)
    total = sum(r["admitted"] for r in results)
    assert all(r["admitted"] > 0 for r in results), results
    assert rpm <= total <= rpm + math.floor(span * rpm / 60) + 1, (total, span, results)


def test_the_wait_is_the_retry_after_and_the_key_is_admitted_after_it(tmp_path):
    limits = RateLimits(tmp_path)
    assert [limits.admit("k", 120, None) for _ in range(120)] == [0.0] * 120
    wait = limits.admit("k", 120, None)
    assert 0.45 < wait <= 0.5  # one request every 0.5 s once the burst is spent
    assert limits.admit("k", 120, None) == pytest.approx(wait, abs=0.02)  # a refused request is not counted
    time.sleep(wait)
    assert limits.admit("k", 120, None) == 0.0
    assert limits.admit("k", 120, None) > 0.4
    # Another key is not affected, nor is the same name with no rate.
    assert limits.admit("other", 120, None) == 0.0
    assert limits.admit("k", None, None) == 0.0


def test_tokens_spent_in_one_process_are_felt_in_another(tmp_path):
    spender, other = RateLimits(tmp_path), RateLimits(tmp_path)
    assert spender.admit("t", None, 1000) == 0.0
    spender.spend("t", 999)
    assert other.admit("t", None, 1000) == 0.0  # a token is left
    spender.spend("t", 1001)  # 2000 of 1000 a minute: empty for a minute
    wait = other.admit("t", None, 1000)
    assert 59 < wait <= 60.01
    # Spending for a key without a token rate, or one never admitted, counts nothing.
    spender.spend("nobody", 10**6)
    assert other.admit("nobody", None, 1000) == 0.0
    code = (f"from portal.rate_limits import RateLimits; import sys; "
            f"sys.exit(0 if RateLimits({str(tmp_path)!r}).admit('t', None, 1000) > 59 else 1)")
    assert subprocess.run([sys.executable, "-c", code], cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)),
                          timeout=60).returncode == 0


def test_the_file_is_private_small_and_untouched_by_keys_without_rates(tmp_path):
    limits = RateLimits(tmp_path)
    assert limits.admit("free", None, None) == 0.0
    assert not (tmp_path / "rate_limits").exists()
    limits.admit("limited", 10, None)
    mode = os.stat(tmp_path / "rate_limits")
    assert stat.S_IMODE(mode.st_mode) == 0o600
    assert mode.st_size == rate_limits.HEADER_SIZE + rate_limits.SLOTS * rate_limits.SLOT.size < 200_000
    # A file of another layout (or garbage) is started afresh.
    limits.close()
    (tmp_path / "rate_limits").write_bytes(b"garbage")
    assert RateLimits(tmp_path).admit("limited", 10, None) == 0.0


def test_idle_slots_are_reused_before_a_busy_key_loses_its_count(tmp_path, monkeypatch):
    monkeypatch.setattr(rate_limits, "SLOTS", 2)
    limits = RateLimits(tmp_path)
    assert limits.admit("busy", 1, None) == 0.0  # its slot is busy for a minute
    assert limits.admit("brief", 10_000_000, None) == 0.0  # its slot is idle within microseconds
    time.sleep(0.01)
    assert limits.admit("third", 10_000_000, None) == 0.0  # takes brief's slot
    time.sleep(0.01)
    assert limits.admit("fourth", 2, None) == 0.0  # takes third's slot: busy for 30 s
    assert limits.admit("busy", 1, None) > 50  # still counted
    # No idle slot left: the least busy key (fourth) loses its count, the busiest keeps it.
    assert limits.admit("fifth", 1, None) == 0.0
    assert limits.admit("busy", 1, None) > 50
    assert limits.admit("fifth", 1, None) > 50
