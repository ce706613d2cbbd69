"""The OpenAPI 3.1 description of the REST API and the gateway, served at GET /api/openapi.json.

Each API route says what it takes and answers with `described(...)` (the pydantic models of portal/api/schemas.py and
portal.launching.LaunchBody, which the routes also check requests against); `document(app)` walks the app's routes
and describes every one of them, so a route without a description, or a description without a route, cannot go
unnoticed (tests/test_openapi.py). The gateway (/v1/..., /services/<id>/...) is relayed by the proxy, not Flask: it
is described here from the proxy's own rules (GATEWAY)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Type

from apispec import APISpec
from flask import current_app, jsonify
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import schemas
from .blueprint import bp

PAGES = {"ui", "auth", "static"}  # blueprints of HTML pages and their files: not part of the API
ERROR_WORDS = {400: "bad input: the field named", 401: "no or wrong credential", 403: "not allowed for this caller",
               404: "not found", 409: "conflicts with the current state", 413: "request body too large",
               422: "refused by the scheduler",
               429: "over the API key's rate: retry after the Retry-After header's seconds",
               502: "the service did not answer", 503: "unavailable for now", 504: "the service did not answer in time"}


@dataclass
class Operation:
    summary: str
    query: Optional[Type[BaseModel]] = None
    body: Optional[Type[BaseModel]] = None
    answers: Dict[int, object] = field(default_factory=dict)  # status -> answer model, "text", "file", "multipart" or
    # None
    errors: Tuple[int, ...] = ()
    public: bool = False
    tag: str = "portal"
    openai: bool = False  # errors in OpenAI's shape (the gateway)
    body_content: str = "application/json"
    path_patterns: Dict[str, str] = field(default_factory=dict)


def described(summary: str, **details):
    """Mark a view with what it takes and answers (see Operation); `document` reads it."""
    def mark(view):
        view.openapi = Operation(summary, **details)
        return view
    return mark


_ANY_OBJECT = {"type": "object", "additionalProperties": True}
GATEWAY_ERRORS = (400, 401, 403, 404, 413, 429, 502, 503, 504)


def _gateway(summary, body="json"):
    answers = {200: "openai"}
    if body == "multipart":
        return Operation(summary, body=schemas.GatewayBody, answers=answers, errors=GATEWAY_ERRORS, tag="gateway",
                         openai=True, body_content="multipart/form-data")
    return Operation(summary, body=schemas.GatewayBody, answers=answers, errors=GATEWAY_ERRORS, tag="gateway",
                     openai=True)


# The gateway: paths the proxy relays (portal/asgi.proxied), with the body's `model` choosing the service.
GATEWAY = {
    ("/v1/chat/completions", "post"): _gateway("A chat completion (OpenAI's API), by the service of `model`"),
    ("/v1/completions", "post"): _gateway("A text completion (OpenAI's API), by the service of `model`"),
    ("/v1/embeddings", "post"): _gateway("Embeddings (OpenAI's API), by the service of `model`"),
    ("/v1/audio/transcriptions", "post"): _gateway("A transcription (OpenAI's API, a multipart upload with `file` "
                                                   "and `model`), by the service of `model`", body="multipart"),
}
SERVICE_RELAY = ("/services/{service_id}/{path}", ("get", "post", "put", "patch", "delete"))
FLASK_GATEWAY = {  # gateway paths Flask answers itself
    "proxy.gateway_models": Operation("The models of RUNNING services (OpenAI's list)",
                                      answers={200: schemas.ModelList}, tag="gateway", openai=True),
}


def openapi_path(rule: str) -> str:
    """A Flask rule as an OpenAPI path: <converter:name> becomes {name}."""
    return re.sub(r"<(?:[a-z_]+:)?([A-Za-z_][A-Za-z0-9_]*)>", r"{\1}", rule)


def document(app) -> dict:
    """The OpenAPI 3.1 document of `app`'s API routes and the gateway. Raises LookupError naming any API route that
    is not described."""
    spec = APISpec(title="Pilotfish", version=_version(), openapi_version="3.1.0",
                   info={"description": "Model services on an HPC cluster: the REST API and the OpenAI-compatible "
                                        "gateway. Every operation but /health needs `Authorization: Bearer <token>` "
                                        "(the portal token or an API key)."})
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    operations = []  # (path, method, Operation, path parameters)
    missing = []
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        blueprint = rule.endpoint.rpartition(".")[0] if "." in rule.endpoint else rule.endpoint
        if blueprint in PAGES:
            continue
        operation = FLASK_GATEWAY.get(rule.endpoint) or getattr(app.view_functions[rule.endpoint], "openapi", None)
        if operation is None:
            missing.append(rule.rule)
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            operations.append((openapi_path(rule.rule), method.lower(), operation, sorted(rule.arguments)))
    if missing:
        raise LookupError(f"API routes without a description (portal.api.openapi.described): {', '.join(missing)}")
    for (path, method), operation in GATEWAY.items():
        operations.append((path, method, operation, []))
    relay = Operation("Any request to the service itself (its own API), relayed with the service's key",
                      answers={"default": "any"}, errors=(401, 403, 404, 429, 502, 503, 504), tag="gateway",
                      openai=True)
    for method in SERVICE_RELAY[1]:
        operations.append((SERVICE_RELAY[0], method, relay, ["path", "service_id"]))

    models = {model for _, _, op, _ in operations for model in _models_of(op)}
    refs, top = models_json_schema([(model, "validation") for model in sorted(models, key=lambda m: m.__name__)],
                                   ref_template="#/components/schemas/{model}")
    for name, schema in top.get("$defs", {}).items():
        spec.components.schema(name, schema)
    ref = {model: refs[(model, "validation")] for model in models}

    paths: Dict[str, dict] = {}
    for path, method, operation, arguments in operations:
        paths.setdefault(path, {})[method] = _operation(operation, arguments, ref)
    for path, methods in paths.items():
        spec.path(path=path, operations=methods)
    return spec.to_dict()


def _models_of(operation: Operation):
    found = [operation.query, operation.body, schemas.OpenAIError if operation.openai else schemas.ErrorAnswer]
    found += [answer for answer in operation.answers.values() if isinstance(answer, type)]
    return [model for model in found if model is not None]


def _operation(operation: Operation, arguments, ref) -> dict:
    out = {"summary": operation.summary, "tags": [operation.tag], "responses": {}}
    if operation.public:
        out["security"] = []
    parameters = [{"name": name, "in": "path", "required": True,
                   "schema": {"type": "string", "minLength": 1,
                              **({"pattern": operation.path_patterns[name]} if name in operation.path_patterns
                                 else {})}}
                  for name in arguments]
    if operation.query is not None:
        schema = operation.query.model_json_schema(ref_template="#/components/schemas/{model}")
        required = set(schema.get("required", ()))
        for name, prop in schema["properties"].items():
            prop = {key: value for key, value in prop.items() if key != "title"}
            parameters.append({"name": name, "in": "query", "required": name in required, "schema": prop,
                               **({"description": prop["description"]} if "description" in prop else {})})
    if parameters:
        out["parameters"] = parameters
    if operation.body is not None:
        out["requestBody"] = {"required": True, "content": {operation.body_content: {"schema": ref[operation.body]}}}
    for status, answer in operation.answers.items():
        out["responses"][str(status)] = _answer(status, answer, ref)
    error = ref[schemas.OpenAIError if operation.openai else schemas.ErrorAnswer]
    for status in sorted(set(operation.errors) | (set() if operation.public else {401, 403})):  # 403: a key's scopes
        out["responses"][str(status)] = {"description": ERROR_WORDS.get(status, "an error"),
                                         "content": {"application/json": {"schema": error}}}
    return out


def _answer(status, answer, ref) -> dict:
    words = "the answer" if status == "default" or int(status) < 300 else ERROR_WORDS.get(status, "an error")
    if answer == "text":
        return {"description": words, "content": {"text/plain": {"schema": {"type": "string"}}}}
    if answer == "file":
        return {"description": "the file's bytes", "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    if answer == "openai":
        return {"description": "OpenAI's answer (JSON, or server-sent events when streamed)",
                "content": {"application/json": {"schema": _ANY_OBJECT},
                            "text/event-stream": {"schema": {"type": "string"}}}}
    if answer == "any":
        return {"description": "whatever the service answers"}
    if answer is None:
        return {"description": words, "content": {"application/json": {"schema": _ANY_OBJECT}}}
    return {"description": words, "content": {"application/json": {"schema": ref[answer]}}}


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("pilotfish")
    except Exception:  # not installed as a package (a plain checkout)
        return "0"


@bp.get("/api/openapi.json")
@described("This description (OpenAPI 3.1)", answers={200: None})
def openapi_json():
    app = current_app._get_current_object()
    cached = app.extensions.get("pilotfish.openapi")
    if cached is None:
        cached = app.extensions["pilotfish.openapi"] = document(app)
    return jsonify(cached)
