"""GET /api/usage and `pilotfish usage` against a real portal (gunicorn), its usage table written through the ledger's
own flush: the owner sees every principal, a named key only its own; spans, filters and groupings; bad parameters
are a 400 naming the parameter (the CLI: exit 2 and one line)."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, time as day_time, timedelta, timezone

import pytest
import requests

from portal.app import create_app
from portal.usage_ledger import UsageLedger
from tests.conftest import REPO

TODAY = datetime.now(timezone.utc).date()
DAYS = [TODAY - timedelta(days=n) for n in (9, 2, 0)]  # three days with usage: 9 days ago, 2 days ago, today
S1, S2 = "aaaaaaaaaaaa0001", "aaaaaaaaaaaa0002"


def traffic():
    """(day, principal, service, model, failed, prompt, completion), each one request."""
    sent = []
    for n, day in enumerate(DAYS):
        sent += [(day, "owner", S1, "org/alpha", False, 10, 20)] * (3 + n)
        sent += [(day, "key:alice", S1, "org/alpha", n == 1, 5, 7)] * 2
        sent += [(day, "key:alice", S2, "org/beta", False, 100, 1)]
        sent += [(day, "key:bob", S2, "org/beta", True, 1, 0)] * (n + 1)
    return sent


def expected(sent, key, keep=lambda row: True) -> dict:
    found = {}
    for row in filter(keep, sent):
        entry = found.setdefault(key(row), {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                            "total_tokens": 0})
        entry["requests"] += 1
        entry["errors"] += row[4]
        entry["prompt_tokens"] += row[5]
        entry["completion_tokens"] += row[6]
        entry["total_tokens"] += row[5] + row[6]
    return found


@pytest.fixture(scope="module")
def portal(start_module_portal):
    portal = start_module_portal("local")
    keys = {}
    for name in ("alice", "bob"):
        created = portal.request("POST", "/api/keys", json={"name": name})
        assert created.status_code == 201, created.text
        keys[name] = created.json()["key"]
    portal.keys = keys
    # The portal's own database, written by a ledger of this process as a worker's would be.
    app = create_app({"home": portal.home, "site_config_path": portal.site_config})
    for day in DAYS:
        clock = datetime.combine(day, day_time(12), tzinfo=timezone.utc).timestamp()
        ledger = UsageLedger(app, clock=lambda clock=clock: clock)
        for row_day, principal, service, model, failed, prompt, completion in traffic():
            if row_day == day:
                ledger.count(principal, service, model, failed, prompt, completion)
        ledger.flush()
    return portal


def usage(portal, token=None, **params):
    headers = {"Authorization": f"Bearer {token or portal.token}"}
    return requests.get(portal.url + "/api/usage", params=params, headers=headers, timeout=30)


def by(answer, name) -> dict:
    return {row[name]: {k: v for k, v in row.items() if k not in (name, "name")} for row in answer["rows"]}


def test_the_owner_sees_every_principal_exactly(portal):
    answer = usage(portal).json()
    sent = traffic()
    assert answer["by"] == "principal" and answer["since"] is None and answer["until"] is None
    assert by(answer, "principal") == expected(sent, lambda row: row[1])
    assert [row["principal"] for row in answer["rows"]] == ["owner", "key:alice", "key:bob"]  # most requests first
    assert answer["totals"] == {"requests": len(sent), "errors": sum(row[4] for row in sent),
                                "prompt_tokens": sum(row[5] for row in sent),
                                "completion_tokens": sum(row[6] for row in sent),
                                "total_tokens": sum(row[5] + row[6] for row in sent)}
    assert by(usage(portal, by="model").json(), "model") == expected(sent, lambda row: row[3])
    services = usage(portal, by="service").json()
    assert by(services, "service") == expected(sent, lambda row: row[2])
    assert all(row["name"] is None for row in services["rows"])  # no such service (any more)


def test_spans_and_filters(portal):
    sent = traffic()
    days = usage(portal, by="day").json()
    assert [row["day"] for row in days["rows"]] == [day.isoformat() for day in DAYS]
    assert by(days, "day") == expected(sent, lambda row: row[0].isoformat())
    recent = usage(portal, by="day", since="7d").json()
    assert recent["since"] == (TODAY - timedelta(days=7)).isoformat()
    assert [row["day"] for row in recent["rows"]] == [DAYS[1].isoformat(), DAYS[2].isoformat()]
    middle = usage(portal, since=DAYS[1].isoformat(), until="1d").json()
    assert middle["until"] == (TODAY - timedelta(days=1)).isoformat()
    assert by(middle, "principal") == expected(sent, lambda row: row[1], lambda row: row[0] == DAYS[1])
    two_weeks = usage(portal, since="2w", model="org/beta", by="principal").json()
    assert by(two_weeks, "principal") == expected(sent, lambda row: row[1], lambda row: row[3] == "org/beta")
    alice = usage(portal, principal="key:alice", by="model").json()
    assert by(alice, "model") == expected(sent, lambda row: row[3], lambda row: row[1] == "key:alice")
    assert usage(portal, since=(TODAY + timedelta(days=1)).isoformat()).json()["rows"] == []


def test_a_key_sees_only_its_own_usage(portal):
    sent = traffic()
    for name, token in portal.keys.items():
        answer = usage(portal, token, by="model").json()
        assert answer["principal"] == f"key:{name}"
        assert by(answer, "model") == expected(sent, lambda row: row[3], lambda row: row[1] == f"key:{name}")
        assert [row["principal"] for row in usage(portal, token).json()["rows"]] == [f"key:{name}"]
        assert usage(portal, token, principal=f"key:{name}").status_code == 200
    refused = usage(portal, portal.keys["bob"], principal="key:alice")
    assert refused.status_code == 403 and "its own" in refused.json()["error"]
    assert usage(portal, portal.keys["bob"], principal="owner").status_code == 403


@pytest.mark.parametrize("params, field", [
    ({"by": "key"}, "by"), ({"by": ""}, "by"), ({"since": "yesterday"}, "since"), ({"since": "3h"}, "since"),
    ({"since": "2026-02-30"}, "since"), ({"until": "0d"}, "until"), ({"since": "100000d"}, "since"),
    ({"since": "2026-12-05", "until": "2026-12-01"}, "until"), ({"principal": "k" * 81}, "principal"),
])
def test_bad_parameters_are_a_400_naming_the_parameter(portal, params, field):
    answer = usage(portal, **params)
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] == field and answer.json()["error"].startswith(f"{field}: ")


def pilotfish(portal, *args, token=None):
    return subprocess.run([sys.executable, "-m", "portal.cli", "--url", portal.url, "--token", token or portal.token,
                           *args], capture_output=True, text=True, timeout=60, cwd=str(REPO))


def test_the_command_prints_the_table_and_json(portal):
    sent = traffic()
    result = pilotfish(portal, "usage")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["KEY", "REQUESTS", "ERRORS", "PROMPT", "TOKENS", "COMPLETION", "TOKENS", "TOTAL",
                                "TOKENS"]
    owner = expected(sent, lambda row: row[1])["owner"]
    assert lines[1].split() == ["owner", *(str(owner[name]) for name in ("requests", "errors", "prompt_tokens",
                                                                          "completion_tokens", "total_tokens"))]
    assert lines[4].split()[:2] == ["total", str(len(sent))]
    assert lines[-1] == "from the first day to today (UTC)"
    result = pilotfish(portal, "usage", "--by", "model", "--since", "7d", "--json")
    answer = json.loads(result.stdout)
    assert answer["by"] == "model" and answer["since"] == (TODAY - timedelta(days=7)).isoformat()
    assert by(answer, "model") == expected(sent, lambda row: row[3], lambda row: row[0] != DAYS[0])
    mine = pilotfish(portal, "usage", "--by", "day", token=portal.keys["alice"])
    assert mine.returncode == 0 and len(mine.stdout.splitlines()) == 1 + 3 + 1 + 2  # head, 3 days, total, span
    empty = pilotfish(portal, "usage", "--since", (TODAY + timedelta(days=1)).isoformat())
    assert empty.returncode == 0 and empty.stdout.startswith("no usage from ")


@pytest.mark.parametrize("args, words", [
    (["--by", "user"], "'user' is not one of"), (["--since", "3h"], "since: expected"),
    (["--until", "soon"], "until: expected"),
])
def test_the_command_refuses_bad_values_in_one_line(portal, args, words):
    result = pilotfish(portal, "usage", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and words in result.stderr, result.stderr


def test_the_command_explains_itself():
    result = subprocess.run([sys.executable, "-m", "portal.cli", "usage", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=str(REPO))
    assert result.returncode == 0
    assert "pilotfish usage --by model --since 7d" in result.stdout and "--principal" in result.stdout
