"""Scoped named keys (portal/keys.py, portal/auth.py) against a real portal: what each scope opens and closes, a key
limited to models launching another, a key past its end, bad values refused whole; and the rule's parts alone (which
scope a request needs, the grant the proxy reads from the cache without the database, last use)."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
import requests

from portal.auth import NEEDS_LOOKUP, Refusal, caller_of_headers, grant_of, model_refusal, scope_for, scope_refusal
from portal.keys import KeyGrant, mark_used
from portal.models import ApiKey
from portal.db import db


def raw(headers: dict):
    encoded = {name.lower().encode(): value.encode("latin-1") for name, value in headers.items()}
    return encoded.get


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def portal(start_module_portal):
    return start_module_portal("local")


def make_key(portal, **body) -> dict:
    made = portal.request("POST", "/api/keys", json=body)
    assert made.status_code == 201, made.text
    return made.json()


def call(portal, key: str, method: str, path: str, headers=None, **kwargs):
    return requests.request(method, portal.url + path, headers={**bearer(key), **(headers or {})}, timeout=30,
                            **kwargs)


# --- which scope a request needs -------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, scope", [
    ("POST", "/v1/chat/completions", "use"), ("GET", "/v1/models", "use"), ("GET", "/v1", "use"),
    ("GET", "/services/abc/health", "use"), ("DELETE", "/services/abc/v1/x", "use"),
    ("GET", "/api/services", "read"), ("HEAD", "/api/services", "read"), ("GET", "/metrics", "read"),
    ("GET", "/", "read"), ("GET", "/ui/launch", "read"), ("GET", "/api/openapi.json", "read"),
    ("POST", "/api/services", "launch"), ("POST", "/api/services/abc/stop", "launch"),
    ("POST", "/api/services/abc/lease", "launch"), ("DELETE", "/api/services/abc", "launch"),
    ("POST", "/api/models/downloads", "launch"), ("POST", "/api/benchmarks", "launch"),
    ("POST", "/ui/launch", "launch"),
    ("GET", "/health", None), ("POST", "/login", None), ("POST", "/logout", None),
])
def test_each_request_needs_one_scope(method, path, scope):
    assert scope_for(method, path) == scope


def test_refusals_name_the_key_what_it_may_not_do_and_what_it_has():
    grant = KeyGrant("ro", frozenset({"read", "use"}), frozenset({"org/a"}), None, None, None)
    assert scope_refusal(grant, "GET", "/api/services") is None
    assert scope_refusal(None, "POST", "/api/services") is None  # the owner
    refused = scope_refusal(grant, "POST", "/api/services")
    assert refused == Refusal(403, "API key 'ro' may not launch, stop or change anything (scope launch): it has scopes "
                                   "use, read", "insufficient_scope")
    assert model_refusal(grant, "org/a") is None and model_refusal(None, "org/b") is None
    assert model_refusal(grant, "org/b") == Refusal(403, "API key 'ro' may not use model 'org/b': it may use org/a",
                                                    "model_not_allowed")


# --- the grant on the proxy's path: from the cache alone ---------------------------------------------------------

def test_the_proxy_reads_a_keys_grant_and_its_end_without_the_database(app, client, auth):
    made = client.post("/api/keys", json={"name": "limited", "scopes": ["use"], "models": ["org/a", "org/b"],
                                          "requests_per_minute": 30, "tokens_per_minute": 5000}, headers=auth)
    assert made.status_code == 201, made.get_json()
    header = raw(bearer(made.get_json()["key"]))
    assert grant_of(app, "key:limited") is None  # not verified in this process yet
    with app.app_context():
        assert caller_of_headers(app, "POST", header, False) == "key:limited"
    # Outside an app context any database access would raise: the cached-only rule and the grant never try.
    assert caller_of_headers(app, "POST", header, True) == "key:limited"
    grant = grant_of(app, "key:limited")
    assert grant == KeyGrant("limited", frozenset({"use"}), frozenset({"org/a", "org/b"}), None, 30, 5000)
    assert grant.allows("use") and not grant.allows("read") and grant.allows_model("org/b")
    assert not grant.allows_model("org/c") and grant.rate_limited
    assert grant_of(app, "owner") is None

    # A key past its end: refused by the same rule, from the cache too (its end is in the grant).
    with app.app_context():
        row = ApiKey.query.filter_by(name="limited").one()
        ended = row.expires_at = (datetime.now(timezone.utc) - timedelta(seconds=1)).replace(tzinfo=None, microsecond=0)
        db.session.commit()
        app.extensions["pilotfish.keys"].forget()
        assert caller_of_headers(app, "POST", header, True) is NEEDS_LOOKUP
        refused = caller_of_headers(app, "POST", header, False)
    assert isinstance(refused, Refusal) and (refused.status, refused.code) == (401, "expired_api_key")
    assert refused.message == f"API key 'limited' expired at {ended.isoformat()}Z"
    assert caller_of_headers(app, "POST", header, True) == refused


def test_last_use_is_recorded_for_live_keys_and_never_moves_back(app, client, auth):
    for name in ("one", "two", "gone"):
        assert client.post("/api/keys", json={"name": name}, headers=auth).status_code == 201
    gone = next(k for k in client.get("/api/keys", headers=auth).get_json()["keys"] if k["name"] == "gone")
    client.delete(f"/api/keys/{gone['id']}", headers=auth)
    later, earlier = datetime(2026, 12, 1, 12, 0, 30), datetime(2026, 12, 1, 12, 0, 0)
    with app.app_context():
        assert mark_used({"one": later, "gone": later, "nobody": later}) == 1
        an_hour_east = timezone(timedelta(hours=1))
        assert mark_used({"one": earlier, "two": datetime(2026, 12, 1, 13, 0, tzinfo=an_hour_east)}) == 1
    listed = {k["name"]: k for k in client.get("/api/keys", headers=auth).get_json()["keys"]}
    assert listed["one"]["last_used_at"] == "2026-12-01T12:00:30Z"
    assert listed["two"]["last_used_at"] == "2026-12-01T12:00:00Z"


# --- against a real portal ---------------------------------------------------------------------------------------

def test_a_read_only_key_reads_but_launches_nothing_and_calls_no_model(portal):
    key = make_key(portal, name="reader", scopes=["read"])
    assert key["scopes"] == ["read"] and key["models"] is None and key["expires_at"] is None
    secret = key["key"]
    assert call(portal, secret, "GET", "/api/services").status_code == 200
    assert call(portal, secret, "GET", "/metrics").status_code == 200
    assert call(portal, secret, "GET", "/ui/launch", headers={"Accept": "text/html"}).status_code == 200
    launched = call(portal, secret, "POST", "/api/services", json={"kind": "text-generation", "model": "test/tiny"})
    assert launched.status_code == 403
    assert launched.json() == {"error": "API key 'reader' may not launch, stop or change anything (scope launch): it "
                                        "has scopes read"}
    models = call(portal, secret, "GET", "/v1/models")
    assert models.status_code == 403
    assert models.json()["error"]["code"] == "insufficient_scope"  # OpenAI's shape on /v1
    assert models.json()["error"]["type"] == "permission_error"
    # Keys are the owner's alone, whatever a key's scopes.
    assert call(portal, secret, "GET", "/api/keys").status_code == 403
    assert portal.request("GET", "/api/services?state=LIVE").json()["services"] == []


def test_a_use_only_key_calls_models_but_reads_and_launches_nothing(portal):
    secret = make_key(portal, name="user", scopes=["use"])["key"]
    assert call(portal, secret, "GET", "/v1/models").status_code == 200
    for method, path in (("GET", "/api/services"), ("GET", "/metrics"), ("GET", "/api/status"), ("GET", "/"),
                         ("POST", "/api/services?dry_run=1"), ("POST", "/api/models/downloads")):
        refused = call(portal, secret, method, path, json={})
        assert refused.status_code == 403, (method, path, refused.text)
        assert refused.json()["error"].startswith("API key 'user' may not ")
        assert refused.json()["error"].endswith("it has scopes use")


def test_the_proxy_refuses_what_a_keys_scopes_and_models_do_not_allow(portal):
    reader = make_key(portal, name="proxy-reader", scopes=["read"])["key"]
    limited = make_key(portal, name="proxy-limited", models=["test/tiny"])["key"]
    body = {"model": "test/slow", "messages": [{"role": "user", "content": "hi"}]}
    refused = call(portal, reader, "POST", "/v1/chat/completions", json=body)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_scope", refused.text
    refused = call(portal, limited, "POST", "/v1/chat/completions", json=body)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed", refused.text


def test_a_key_limited_to_a_model_launches_only_that_model(portal):
    secret = make_key(portal, name="tiny-only", models=["test/tiny"])["key"]
    body = {"kind": "text-generation", "model": "test/slow", "tier": "Tiny"}
    for path in ("/api/services", "/api/services?dry_run=1"):
        refused = call(portal, secret, "POST", path, json=body)
        assert refused.status_code == 403, refused.text
        assert refused.json() == {"error": "model: API key 'tiny-only' may not launch 'test/slow': it may use "
                                           "test/tiny", "field": "model"}
    allowed = call(portal, secret, "POST", "/api/services?dry_run=1", json={**body, "model": "test/tiny"})
    assert allowed.status_code == 200, allowed.text
    # Nor may it load another model's service through a benchmark (which would call it with a key of its own).
    other = portal.launch(model="test/slow", tier="Tiny")
    assert other.status_code == 201, other.text
    try:
        portal.wait_state(other.json()["id"], "RUNNING", timeout=60)
        refused = call(portal, secret, "POST", "/api/benchmarks",
                       json={"service": other.json()["id"], "clients": 1, "requests": 1})
        assert refused.status_code == 403 and refused.json()["field"] == "model", refused.text
        assert "may not benchmark 'test/slow'" in refused.json()["error"]
    finally:
        portal.request("POST", f"/api/services/{other.json()['id']}/stop")
    assert [s["model"] for s in portal.request("GET", "/api/services").json()["services"]] == ["test/slow"]


def test_an_expired_key_is_refused_with_its_end(portal):
    ends = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=3)
    key = make_key(portal, name="brief", expires=ends.isoformat().replace("+00:00", "Z"))
    assert key["expires_at"] == ends.isoformat().replace("+00:00", "Z") and key["expired"] is False
    secret = key["key"]
    assert call(portal, secret, "GET", "/v1/models").status_code == 200  # cached now, in this worker
    time.sleep(max(0.0, ends.timestamp() - time.time()) + 0.2)
    message = f"API key 'brief' expired at {key['expires_at']}"
    refused = call(portal, secret, "GET", "/api/services")
    assert (refused.status_code, refused.json()) == (401, {"error": message})
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):  # Flask's, then the proxy's path
        refused = call(portal, secret, method, path, json={"model": "test/tiny", "messages": []})
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "expired_api_key" and refused.json()["error"]["message"] == message
    listed = {k["name"]: k for k in portal.request("GET", "/api/keys").json()["keys"]}
    assert listed["brief"]["expired"] is True


@pytest.mark.parametrize("body, field, words", [
    ({"scopes": ["admin"]}, "scopes", None), ({"scopes": []}, "scopes", None), ({"scopes": "use"}, "scopes", None),
    ({"models": []}, "models", None), ({"models": [""]}, "models", None), ({"models": ["  "]}, "models", None),
    ({"models": "test/tiny"}, "models", None), ({"expires": "soon"}, "expires", "expected how long it lasts"),
    ({"expires": "2020-01-01T00:00Z"}, "expires", "must be in the future"),
    ({"expires": "9000d"}, "expires", "within 1830 days"), ({"expires": 30}, "expires", None),
    ({"requests_per_minute": 0}, "requests_per_minute", None),
    ({"requests_per_minute": 10_000_001}, "requests_per_minute", None),
    ({"tokens_per_minute": "100"}, "tokens_per_minute", None), ({"tokens_per_minute": 1.5}, "tokens_per_minute", None),
    ({"tokens_per_minute": True}, "tokens_per_minute", None),
])
def test_bad_values_are_refused_naming_the_field_and_create_nothing(portal, body, field, words):
    refused = portal.request("POST", "/api/keys", json={"name": f"bad-{field}", **body})
    assert refused.status_code == 400, refused.text
    assert refused.json()["field"] == field and refused.json()["error"].startswith(f"{field}: ")
    if words:
        assert words in refused.json()["error"]
    assert f"bad-{field}" not in {k["name"] for k in portal.request("GET", "/api/keys").json()["keys"]}


def test_keys_list_what_they_may_do(portal):
    key = make_key(portal, name="listed", scopes=["launch", "use"], models=["test/tiny", "test/tiny"], expires="30d",
                   requests_per_minute=60, tokens_per_minute=10_000)
    listed = next(k for k in portal.request("GET", "/api/keys").json()["keys"] if k["name"] == "listed")
    assert "key" not in listed and listed["id"] == key["id"]
    assert listed["scopes"] == ["use", "launch"] and listed["models"] == ["test/tiny"]
    ends = datetime.fromisoformat(listed["expires_at"].replace("Z", "+00:00"))
    assert abs((ends - datetime.now(timezone.utc)) - timedelta(days=30)) < timedelta(minutes=1)
    assert (listed["requests_per_minute"], listed["tokens_per_minute"]) == (60, 10_000)
    assert listed["expired"] is False and listed["last_used_at"] is None


def test_a_keys_last_use_counts_what_the_portal_answers_itself(portal):
    """A key that only reads the portal's state (no model called) shows its last use all the same."""
    from tests.conftest import wait_for
    made = make_key(portal, name="only-reads", scopes=["read"])
    assert made["last_used_at"] is None
    assert call(portal, made["key"], "GET", "/api/services").status_code == 200

    def last_use():
        return {key["name"]: key["last_used_at"] for key in portal.request("GET", "/api/keys").json()["keys"]}
    wait_for(lambda: last_use()["only-reads"] is not None, timeout=15, what="the key's last use to be written")
