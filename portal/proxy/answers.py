"""The answers the portal makes itself on the proxied paths, in the shape OpenAI clients parse.

An Answer is a status, a body and its headers, sent by the relay as one message; openai_error builds the
`{"error": {"message", "type", "param", "code"}}` body the openai client turns into its exceptions (with
Retry-After when retrying helps), and not_running says why a service cannot answer (not found, still starting,
UNHEALTHY, or ended and why). The Flask blueprint serves GET /v1/models, the models of RUNNING services
(running_models, also used for GET /v1/models/<id> by the gateway).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from flask import Blueprint, current_app, g, jsonify

from ..auth import grant_of

from ..models import State
from ..states import without_log_lines
from .directory import Route

bp = Blueprint("proxy", __name__)

STARTING = State.COMING_UP


@dataclass
class Answer:
    status: int
    body: bytes
    headers: List[Tuple[bytes, bytes]]


def json_answer(status: int, payload, headers: Optional[list] = None) -> Answer:
    body = json.dumps(payload).encode()
    return Answer(status, body, [(b"content-type", b"application/json"),
                                 (b"content-length", str(len(body)).encode())] + (headers or []))


def openai_error(status: int, message: str, type_: str, code: Optional[str] = None, param: Optional[str] = None,
                 retry_after: Optional[int] = None, **extra) -> Answer:
    """An error in the shape the openai client parses: {"error": {"message", "type", "param", "code"}}."""
    return json_answer(status, {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}},
                       [(b"retry-after", str(retry_after).encode())] if retry_after is not None else None)


def running_models(routes: Dict[str, Route]) -> List[dict]:
    """The models RUNNING services answer to: each model, and each adapter with its base as `parent` (as vLLM lists
    it)."""
    seen = {}
    for route in routes.values():
        if route.state != State.RUNNING:
            continue
        for name, parent in ((route.model, None), *((adapter, route.model) for adapter in route.adapters)):
            if name not in seen:
                seen[name] = {"id": name, "object": "model", "created": 0, "owned_by": "pilotfish", "parent": parent}
    return list(seen.values())


@bp.get("/v1/models")
def gateway_models():
    """The models of RUNNING services; to a named key limited to models, only those."""
    models = running_models(current_app.extensions["pilotfish.directory"].routes())
    grant = grant_of(current_app, getattr(g, "principal", None))
    if grant is not None and grant.models is not None:
        models = [entry for entry in models if grant.allows_model(entry["id"])]
    return jsonify(object="list", data=models)


SCALED_RETRY_AFTER = 10  # seconds: a service scaled to zero is starting a job
MODEL_REFUSED = "model_not_allowed"  # portal.auth.model_refusal's code


def rate_limited(grant, wait: float) -> Answer:
    """The 429 of a named key over its rate (portal/rate_limits.py), with the seconds until it may call again."""
    rates = [f"{rate} {unit} a minute" for rate, unit in ((grant.requests_per_minute, "requests"),
                                                          (grant.tokens_per_minute, "tokens")) if rate]
    seconds = max(1, math.ceil(wait))
    return openai_error(429, f"API key {grant.name!r} is over its rate ({', '.join(rates)}): retry in {seconds} s",
                        "rate_limit_error", "rate_limit_exceeded", retry_after=seconds)


def not_running(service_id: str, state: Optional[str], reason: Optional[str] = None,
                wait: Optional[int] = None) -> Answer:
    """The answer for a service that is not serving (`wait`: the Retry-After of one coming up, directory.start_wait)."""
    if state is None:
        return openai_error(404, f"no service {service_id!r}", "not_found_error", "service_not_found")
    if state in STARTING:
        return openai_error(503, f"service {service_id} is {state}: it is not answering yet, retry shortly",
                            "service_unavailable", "service_not_running", state=state, retry_after=wait or 5)
    if state == State.SCALED_TO_ZERO:
        return openai_error(503, f"service {service_id} has no job while unused: one is starting now, retry shortly",
                            "service_unavailable", "service_starting", state=state,
                            retry_after=wait or SCALED_RETRY_AFTER)
    if state == State.UNHEALTHY:
        return openai_error(503, f"service {service_id} is UNHEALTHY", "service_unavailable", "service_not_running",
                            state=state, retry_after=5)
    reason = without_log_lines(reason)  # the log is one call away (GET .../logs)
    because = f" ({reason})" if reason else ""
    return openai_error(503, f"service {service_id} is {state}{because}: it has ended, launch it again",
                        "service_unavailable", "service_not_running", state=state)
