"""The OpenAPI description at /api/openapi.json: every API route in it, nothing in it that is not a route (of Flask
or of the proxy), and the launch request described by the model that checks it."""
import re

import pytest

from portal.api.openapi import PAGES, document, openapi_path
from portal.asgi import proxied
from portal.launching import LaunchBody


def flask_operations(app):
    found = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint.partition(".")[0] in PAGES or rule.endpoint == "static":
            continue
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            found.add((openapi_path(rule.rule), method.lower()))
    return found


def test_served_with_credentials_only(client, auth):
    assert client.get("/api/openapi.json").status_code == 401
    response = client.get("/api/openapi.json", headers=auth)
    assert response.status_code == 200
    assert response.get_json()["openapi"] == "3.1.0"


def test_every_route_is_described_and_every_description_is_a_route(app, client, auth):
    doc = client.get("/api/openapi.json", headers=auth).get_json()
    described = {(path, method) for path, methods in doc["paths"].items() for method in methods}
    routes = flask_operations(app)
    assert routes - described == set(), "Flask routes missing from /api/openapi.json"
    for path, method in described - routes:  # not Flask's: the proxy must relay it
        concrete = re.sub(r"\{[a-z_]+\}", "abc123", path)
        assert proxied(concrete, method.upper()) is not None, f"{method.upper()} {path} is no route"
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/audio/transcriptions",
                 "/v1/models", "/services/{service_id}/{path}"):
        assert path in doc["paths"]


def test_a_route_without_a_description_is_refused(app):
    app.add_url_rule("/api/undescribed", "api.undescribed", lambda: "x")
    with pytest.raises(LookupError, match="/api/undescribed"):
        document(app)


def test_only_health_is_public(client, auth):
    doc = client.get("/api/openapi.json", headers=auth).get_json()
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    public = {path for path, methods in doc["paths"].items() for op in methods.values() if op.get("security") == []}
    assert public == {"/health"}


def test_the_launch_request_is_described_by_the_model_that_checks_it(client, auth):
    doc = client.get("/api/openapi.json", headers=auth).get_json()
    body = doc["paths"]["/api/services"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/LaunchBody"}
    schema = doc["components"]["schemas"]["LaunchBody"]
    assert set(schema["properties"]) == set(LaunchBody.model_fields)
    assert schema["additionalProperties"] is False and schema["required"] == ["kind", "model"]
    refused = client.post("/api/services", json={"kind": "text-generation", "model": "a/b", "tier": "x" * 101},
                          headers=auth).get_json()
    assert refused["field"] == "tier" and schema["properties"]["tier"]["description"] in refused["error"]
    errors = doc["paths"]["/api/services"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert doc["components"]["schemas"][errors["$ref"].rsplit("/", 1)[1]]["required"] == ["error"]


def test_the_document_loads_as_openapi(client, auth):
    schemathesis = pytest.importorskip("schemathesis")
    doc = client.get("/api/openapi.json", headers=auth).get_json()
    schema = schemathesis.openapi.from_dict(doc)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(len(methods) for methods in doc["paths"].values())
