"""Strict input: whole values (a trailing newline is refused), finite numbers only (NaN and Infinity are refused at
the door), and a body that is not a JSON object is a 400 naming `body` on every route that takes one."""
import pytest

from portal.catalog.models import validate_repo_id, validate_revision
from portal.errors import ValidationError
from portal.launching import parse_time

LAUNCH = {"kind": "text-generation", "model": "test/tiny"}


@pytest.mark.parametrize("change, field", [
    ({"model": "test/tiny\n"}, "model"),
    ({"revision": "main\n"}, "revision"),
    ({"tier": "cpu.Tiny\n"}, "tier"),
    ({"name": "mine\n"}, "name"),
    ({"image": "vllm.sif\n"}, "image"),
    ({"time": "45\n"}, "time"),
    ({"time": " 45"}, "time"),
    ({"resources": {"partition": "cpu\n"}}, "resources.partition"),
    ({"resources": {"account": "lab\n"}}, "resources.account"),
])
def test_a_trailing_newline_is_refused(client, auth, change, field):
    response = client.post("/api/services?dry_run=1", json={**LAUNCH, **change}, headers=auth)
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["field"] == field


def test_the_same_values_without_the_newline_pass(client, auth):
    response = client.post("/api/services?dry_run=1", json={**LAUNCH, "tier": "cpu.Tiny", "name": "mine",
                                                            "time": "45", "resources": {"partition": "cpu"}},
                           headers=auth)
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize("check, value", [(validate_repo_id, "org/name\n"), (validate_revision, "main\n"),
                                          (parse_time, "30\n")])
def test_checks_match_whole_values(check, value):
    with pytest.raises(ValidationError):
        check(value)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_nan_and_infinity_are_refused_at_the_door(client, auth, literal):
    body = b'{"kind": "text-generation", "model": "test/tiny", "resources": {"memory_gb": ' + literal + b'}}'
    response = client.post("/api/services", data=body, headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 400, response.get_data()
    assert response.get_json()["field"] == "body" and "finite" in response.get_json()["error"]
    listed = client.get("/api/services", headers=auth)
    assert listed.get_json()["services"] == [] and b"NaN" not in listed.get_data()


def test_nan_is_refused_in_every_numeric_field_of_the_model(client, auth):
    from portal.launching import parse_launch_request
    for field in ("memory_gb", "cpus", "gpus"):
        with pytest.raises(ValidationError) as refused:
            parse_launch_request({**LAUNCH, "resources": {field: float("nan")}})
        assert refused.value.field == f"resources.{field}"
    with pytest.raises(ValidationError):
        parse_launch_request({**LAUNCH, "time": float("inf")})


JSON_ROUTES = [("POST", "/api/services"), ("POST", "/api/services?dry_run=1"), ("POST", "/api/keys"),
               ("POST", "/api/models/downloads"), ("POST", "/api/benchmarks")]


@pytest.mark.parametrize("method, path", JSON_ROUTES)
@pytest.mark.parametrize("payload, words", [(b"[1, 2]", "got a JSON array"), (b"7", "got a JSON number"),
                                            (b'"text"', "got a JSON string"), (b"null", "got a JSON null"),
                                            (b"{not json", "not valid JSON"), (b"", "not valid JSON"),
                                            (b'{"name": NaN}', "finite"), (b"\xff\xfe", "not valid JSON")])
def test_a_body_that_is_not_a_json_object_is_400_on_every_route(client, auth, method, path, payload, words):
    response = client.open(path, method=method, data=payload, headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 400, (path, payload, response.get_data())
    data = response.get_json()
    assert data["field"] == "body" and data["error"].startswith("body: ") and words in data["error"]


@pytest.mark.parametrize("method, path", JSON_ROUTES)
def test_a_body_that_is_not_json_at_all_is_400(client, auth, method, path):
    response = client.open(path, method=method, data="name=x", headers={**auth,
                                                                        "Content-Type": "text/plain"})
    assert response.status_code == 400 and response.get_json()["field"] == "body"


@pytest.mark.parametrize("body, field", [({"name": "laptop\n"}, "name"), ({"name": 7}, "name"), ({}, "name"),
                                         ({"name": "x", "scope": "all"}, "scope")])
def test_key_bodies_are_checked_by_their_model(client, auth, body, field):
    response = client.post("/api/keys", json=body, headers=auth)
    assert response.status_code == 400 and response.get_json()["field"] == field


@pytest.mark.parametrize("body, field", [({"repo_id": "org/name\n"}, "repo_id"), ({}, "repo_id"),
                                         ({"repo_id": "org/name", "use_cache": "yes"}, "use_cache"),
                                         ({"repo_id": "org/name", "mirror": 1}, "mirror")])
def test_download_bodies_are_checked_by_their_model(client, auth, body, field):
    response = client.post("/api/models/downloads", json=body, headers=auth)
    assert response.status_code == 400 and response.get_json()["field"] == field


@pytest.mark.parametrize("query, field", [("tail=-1", "tail"), ("tail=1_000", "tail"), ("tail=%2012", "tail"),
                                          ("tail=5%0A", "tail")])
def test_query_numbers_are_whole_digits(client, auth, query, field):
    response = client.get(f"/api/services/abc/logs?{query}", headers=auth)
    assert response.status_code == 400 and response.get_json()["field"] == field


def test_a_dry_run_flag_that_means_nothing_is_refused_not_taken_as_a_launch(client, auth):
    response = client.post("/api/services?dry_run=maybe", json=LAUNCH, headers=auth)
    assert response.status_code == 400 and response.get_json()["field"] == "dry_run"
    assert client.get("/api/services", headers=auth).get_json()["services"] == []
