"""The REST API's contract: authentication on every route, JSON errors naming the field, state filters."""
import re
import socket

import pytest

from portal.launching import parse_time
from portal.errors import ValidationError


def test_health_is_public(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ok"


def test_every_route_but_health_and_login_requires_a_credential(app, client):
    """Walk every registered route, so a new route cannot slip through unprotected."""
    from portal.auth import PUBLIC_ENDPOINTS

    assert PUBLIC_ENDPOINTS == {"api.health", "auth.login", "auth.login_form"}
    checked = 0
    for rule in app.url_map.iter_rules():
        if rule.endpoint in PUBLIC_ENDPOINTS:
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", lambda m: "x.css" if m.group(1) == "filename" else "abc123",
                      rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            for prefix in ("", "/node/vm/8080"):
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic Zm9vOmJhcg=="},
                                {"Authorization": "Bearer pf_notakey"}, {"Cookie": "pilotfish_session=forged"}):
                    response = client.open(prefix + path, method=method, headers=headers)
                    assert response.status_code == 401, (method, prefix + path, headers)
                    assert "error" in response.get_json()
                    checked += 1
    assert checked >= 5 * 2 * 15


def test_unknown_route_is_json_404_with_token(client, auth):
    response = client.get("/api/nothing", headers=auth)
    assert response.status_code == 404
    assert response.get_json() == {"error": "not found"}


@pytest.mark.parametrize("body, field", [
    ({"model": "a/b"}, "kind"),
    ({"kind": "painting", "model": "a/b"}, "kind"),
    ({"kind": "text-generation"}, "model"),
    ({"kind": "text-generation", "model": 7}, "model"),
    ({"kind": "text-generation", "model": "a/b", "time": "soon"}, "time"),
    ({"kind": "text-generation", "model": "a/b", "time": 0}, "time"),
    ({"kind": "text-generation", "model": "a/b", "resources": {"cpus": "two"}}, "resources.cpus"),
    ({"kind": "text-generation", "model": "a/b", "resources": {"partition": "gpu; rm -rf /"}}, "resources.partition"),
    ({"kind": "text-generation", "model": "a/b", "resources": {"memory_gb": -1}}, "resources.memory_gb"),
    ({"kind": "text-generation", "model": "a/b", "resources": {"disk": 1}}, "resources"),
    ({"kind": "text-generation", "model": "a/b", "engine_args": "--x"}, "engine_args"),
    ({"kind": "text-generation", "model": "a/b", "name": "x" * 101}, "name"),
    ({"kind": "text-generation", "model": "a/b", "colour": "red"}, "colour"),
])
def test_bad_launch_bodies_name_the_field_and_store_nothing(client, auth, body, field):
    response = client.post("/api/services", json=body, headers=auth)
    assert response.status_code == 400, response.get_json()
    data = response.get_json()
    assert data["field"] == field
    assert data["error"].startswith(f"{field}: ")
    assert client.get("/api/services", headers=auth).get_json()["services"] == []


@pytest.mark.parametrize("payload", [b"{not json", b"[1, 2]", b""])
def test_malformed_json_is_400(client, auth, payload):
    response = client.post("/api/services", data=payload, headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.get_json()["field"] == "body"


def test_unknown_service_is_404(client, auth):
    for method, path in (("GET", "/api/services/abc"), ("POST", "/api/services/abc/stop"),
                         ("DELETE", "/api/services/abc"), ("GET", "/api/services/abc/logs"),
                         ("GET", "/api/services/..%2f..%2fetc/logs")):
        response = client.open(path, method=method, headers=auth)
        assert response.status_code == 404, (method, path)
        assert "error" in response.get_json()


def test_bad_state_filter_is_400(client, auth):
    response = client.get("/api/services?state=SLEEPING", headers=auth)
    assert response.status_code == 400
    assert response.get_json()["field"] == "state"


def test_bad_log_tail_is_400(client, auth):
    response = client.get("/api/services/abc/logs?tail=lots", headers=auth)
    assert response.status_code == 400


@pytest.mark.parametrize("text, minutes", [(30, 30), ("45", 45), ("1:30:00", 90), ("2-00:00", 2880),
                                           ("10:30", 11), ("0:00:59", 1)])
def test_parse_time(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("text", ["", "1h", True, 1.5, "-5", None])
def test_parse_time_rejects(text):
    with pytest.raises(ValidationError):
        parse_time(text)


def test_refused_upstream_is_502_naming_the_service(app, auth):
    """A RUNNING service whose port refuses connections: the proxy answers 502 in the OpenAI error shape."""
    import asyncio
    import json

    from portal.asgi import PortalApp
    from portal.db import db
    from portal.models import Service

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    with app.app_context():
        db.session.add(Service(id="00000000beef", name="gone", kind="text-generation", model="org/gone",
                               state="RUNNING", scheduler="local", job_dir="/nonexistent", time_limit=5,
                               api_key="k", host="127.0.0.1", port=closed_port))
        db.session.commit()
    paths = ("/services/00000000beef/v1/models", "/v1/chat/completions")

    body = json.dumps({"model": "org/gone", "messages": []}).encode()

    async def post(portal, path):  # one request to the ASGI application, as uvicorn hands it over
        headers = [(b"authorization", auth["Authorization"].encode()), (b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": headers, "http_version": "1.1", "scheme": "http", "client": ("127.0.0.1", 1)}
        messages, done, asked = [], asyncio.Event(), []

        async def receive():
            if not asked:
                asked.append(True)
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            messages.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done.set()

        await portal(scope, receive, send)
        return messages[0]["status"], json.loads(b"".join(m.get("body", b"") for m in messages[1:]))

    async def ask():  # the portal's ASGI application in this process (what each gunicorn worker runs)
        portal = PortalApp(app, threads=2)
        return [await post(portal, path) for path in paths]

    for path, (status, answer) in zip(paths, asyncio.run(ask())):
        assert status == 502, path
        assert answer["error"]["code"] == "upstream_unreachable" and "00000000beef" in answer["error"]["message"]


def test_prune_removes_only_ended_services(app, client, auth, tmp_path):
    from portal.db import db
    from portal.models import Service

    with app.app_context():
        for service_id, state in (("0000000000a1", "STOPPED"), ("0000000000a2", "FAILED"),
                                  ("0000000000a3", "RUNNING")):
            job_dir = tmp_path / service_id
            job_dir.mkdir()
            db.session.add(Service(id=service_id, name=state, kind="text-generation", model="org/m", state=state,
                                   scheduler="local", job_dir=str(job_dir), time_limit=5, api_key="k"))
        db.session.commit()
    refused = client.delete("/api/services", headers=auth)
    assert refused.status_code == 400 and refused.get_json()["field"] == "state"
    pruned = client.delete("/api/services?state=ENDED", headers=auth)
    assert sorted(pruned.get_json()["deleted"]) == ["0000000000a1", "0000000000a2"]
    left = [s["id"] for s in client.get("/api/services", headers=auth).get_json()["services"]]
    assert left == ["0000000000a3"]
    assert not (tmp_path / "0000000000a1").exists() and (tmp_path / "0000000000a3").exists()
