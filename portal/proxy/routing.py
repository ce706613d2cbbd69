"""Where a proxied request goes: a service by its id (/services/<id>/...), or by the body's model (/v1/...).

Proxy, one per worker (portal/asgi.py hands it the requests to those paths), first says whether it takes a request
at all (a valid bearer credential or login cookie; anything else goes on to Flask, which refuses it). A request
for a service goes to that service if it is RUNNING or UNHEALTHY, else gets an answer saying why not. A /v1
request's `model` is read from its JSON body or from the form fields of a multipart upload (spooled, then sent on
as it was), and it goes to a RUNNING service of that model, the one with the fewest requests in flight (an
UNHEALTHY one if none is RUNNING); otherwise the answer says the model is starting, or lists what is served.
Sending it and relaying the answer is the Relay's work (relay.py).
"""
from __future__ import annotations

import json
from typing import Optional, Tuple

from werkzeug.formparser import MultiPartParser
from werkzeug.http import parse_options_header

from ..auth import NEEDS_LOOKUP, Refusal, caller_of_headers, grant_of, model_refusal, scope_refusal
from ..catalog.kinds import kind_of_path
from ..json_facts import JsonFacts
from ..models import State
from ..scaling import request_wake
from .answers import MODEL_REFUSED, json_answer, not_running, openai_error, rate_limited, running_models
from .directory import ROUTABLE, not_served_detail, start_wait, stored_state
from .incoming import BodyTooLarge, Incoming, SpooledBody, raw_tail
from .recording import GATEWAY_ENDPOINT, SERVICE_ENDPOINT
from .relay import Relay
from .usage import USAGE_BODY_LIMIT, wants_json_body

WAKING = State.COMING_UP + (State.SCALED_TO_ZERO,)  # not answering yet, on its way: Retry-After from start_wait

SERVICE_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
GATEWAY_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
MAX_JSON_BODY = 32 * 1024 * 1024
LARGE_JSON = 256 * 1024  # larger JSON bodies are decoded in a helper process (portal/json_facts.py), off the loop
SMALL_BODY = 64 * 1024  # request bodies up to this size are read whole: sent in one write, and sent again if need be


class Proxy(Relay):
    """The proxy and gateway of one worker: who is asking, which service a request goes to (the rest: Relay)."""

    def __init__(self, app):
        super().__init__(app)
        self.json_facts = JsonFacts()

    # who is asking
    async def principal(self, incoming: Incoming) -> Optional[str]:
        """The caller ("owner" or "key:<name>") if the proxy can accept the request; None lets Flask answer it (the
        same rule, portal.auth.caller, then refuses it)."""
        who = caller_of_headers(self.app, incoming.method, incoming.header, True)  # never the database
        if who is NEEDS_LOOKUP:
            who = await self.in_thread(caller_of_headers, self.app, incoming.method, incoming.header, False)
        if isinstance(who, Refusal):
            return None
        if who != "owner":
            incoming.grant = grant_of(self.app, who)
            if incoming.grant is None:  # not in the cache after all: Flask asks the database (the same rule)
                return None
        incoming.principal = who
        return who

    # what a named key may do
    async def key_refusal(self, incoming: Incoming, endpoint: str, model: Optional[str] = None):
        """None if the caller may send this request on (for a named key: its `use` scope, `model` among its models
        and its rates, the request then counted against them), else the answer that refuses it (sent here)."""
        grant = incoming.grant
        if grant is None:
            return None
        refused = scope_refusal(grant, incoming.method, "/v1") or (
            model_refusal(grant, model) if isinstance(model, str) else None)
        if refused is not None:
            kind = "authentication_error" if refused.status == 401 else "permission_error"
            return await self.reply(incoming, openai_error(refused.status, refused.message, kind, refused.code,
                                                           param="model" if refused.code == MODEL_REFUSED else None),
                                    endpoint)
        if grant.rate_limited:
            wait = self.rate_limits.admit(grant.name, grant.requests_per_minute, grant.tokens_per_minute)
            if wait > 0:
                return await self.reply(incoming, rate_limited(grant, wait), endpoint)
        return None

    async def service(self, incoming: Incoming, service_id: str, path: str, skip: int) -> Tuple[int, int]:
        """/services/<id>/<path>: to that service, whatever it is."""
        routes = await self.routes()
        route = routes.get(service_id)
        if route is None or route.state not in ROUTABLE or not route.port:
            route = (await self.routes(fresh=True)).get(service_id)
        if incoming.grant is not None:
            refused = await self.key_refusal(incoming, SERVICE_ENDPOINT, route.model if route is not None else None)
            if refused is not None:
                return refused
            if route is None and incoming.grant.models is not None:  # nothing said of other models' services
                return await self.reply(incoming, not_running(service_id, None), SERVICE_ENDPOINT)
        if route is None or route.state not in ROUTABLE or not route.port:
            state, reason = (route.state, None) if route is not None else await self.in_thread(stored_state, service_id)
            if state == State.SCALED_TO_ZERO:
                request_wake(self.home, service_id)
            wait = await self.in_thread(start_wait, service_id) if state in WAKING else None
            return await self.reply(incoming, not_running(service_id, state, reason, wait), SERVICE_ENDPOINT)
        body = None
        if path.endswith("completions") and wants_json_body(incoming.method, incoming.mimetype, incoming.length):
            body = await incoming.read(USAGE_BODY_LIMIT)  # so a stream can ask for usage (usage.UsageReader.ask)
        elif incoming.length is not None and 0 < incoming.length <= SMALL_BODY:
            body = await incoming.read(SMALL_BODY)
        return await self.forward(incoming, route, raw_tail(incoming.scope, skip), body, None, SERVICE_ENDPOINT)

    async def gateway(self, incoming: Incoming, path: str, skip: int) -> Tuple[int, int]:
        """/v1/<path>: to a running service of the body's `model` (the one with the fewest requests in flight). A
        spooled upload is given back to the worker's spool once answered, whoever answered it."""
        if incoming.grant is not None and not incoming.grant.allows("use"):  # before reading a body
            return await self.key_refusal(incoming, GATEWAY_ENDPOINT)
        model, payload, body, error = await self.model_of(incoming)
        try:
            if error is not None:
                return await self.reply(incoming, error, GATEWAY_ENDPOINT)
            if incoming.grant is not None:
                asked = path[len("models/"):] if path.startswith("models/") and incoming.method == "GET" else model
                refused = await self.key_refusal(incoming, GATEWAY_ENDPOINT, asked)
                if refused is not None:
                    return refused
            return await self._by_model(incoming, path, skip, model, payload, body)
        finally:
            if isinstance(body, SpooledBody):
                body.close()

    async def _by_model(self, incoming: Incoming, path: str, skip: int, model, payload, body) -> Tuple[int, int]:
        routes = await self.routes()
        if path.startswith("models/") and incoming.method == "GET":
            model = path[len("models/"):]
            found = [entry for entry in running_models(routes) if entry["id"] == model]
            if found:
                return await self.reply(incoming, json_answer(200, found[0]), GATEWAY_ENDPOINT)
        if not model or not isinstance(model, str):
            return await self.reply(incoming, openai_error(
                400, "model: required, to choose the service (GET /v1/models lists them)", "invalid_request_error",
                "model_required", param="model"), GATEWAY_ENDPOINT)
        candidates = [route for route in routes.values() if route.serves(model)]
        if not any(route.state == State.RUNNING for route in candidates):
            routes = await self.routes(fresh=True)
            candidates = [route for route in routes.values() if route.serves(model)]
        ready = [route for route in candidates if route.state == State.RUNNING and route.port]
        if not ready:
            ready = [route for route in candidates if route.state == State.UNHEALTHY and route.port]
        if not ready:
            asleep = [route for route in candidates if route.state == State.SCALED_TO_ZERO]
            if asleep and not any(route.state in State.COMING_UP for route in candidates):
                request_wake(self.home, asleep[0].id)
            if candidates:
                states = sorted({route.state for route in candidates})
                coming = [route.id for route in candidates if route.state in WAKING][:4]
                wait = min([await self.in_thread(start_wait, service_id) for service_id in coming] or [5])
                answer = openai_error(503, f"model {model!r} is not ready yet ({', '.join(states)}): retry in about "
                                           f"{wait} s", "service_unavailable", "model_not_ready", param="model",
                                      retry_after=wait)
            else:
                available = sorted(entry["id"] for entry in running_models(routes))
                ended = await self.in_thread(not_served_detail, model)
                answer = openai_error(404, f"model {model!r} is not served here{ended}; available: "
                                           f"{', '.join(available) if available else 'none (launch a service first)'}",
                                      "not_found_error", "model_not_found", param="model")
            return await self.reply(incoming, answer, GATEWAY_ENDPOINT)
        wanted = kind_of_path(path)  # a model served as several kinds: a service of the kind answering this path
        ready = [route for route in ready if route.kind == wanted] or ready
        in_flight = self.directory.in_flight
        route = min(ready, key=lambda r: in_flight.get(r.id, 0))
        return await self.forward(incoming, route, raw_tail(incoming.scope, skip), body, payload, GATEWAY_ENDPOINT)

    async def model_of(self, incoming: Incoming):
        """(model, decoded JSON or None, body to send on or None, error Answer or None) of a /v1 request."""
        mimetype = incoming.mimetype
        if mimetype == "application/json" or (mimetype == "" and (incoming.length or incoming.chunked)):
            if incoming.length and incoming.length > MAX_JSON_BODY:
                return None, None, None, openai_error(413, "request body too large", "invalid_request_error")
            try:
                raw = await incoming.read(MAX_JSON_BODY)
            except BodyTooLarge:
                return None, None, None, openai_error(413, "request body too large", "invalid_request_error")
            try:
                if len(raw) > LARGE_JSON:  # only the fields routing and usage read, decoded in the helper
                    payload = await self.json_facts.facts(raw)
                else:
                    payload = json.loads(raw or b"{}")
                model = payload.get("model")
            except (ValueError, AttributeError):
                return None, None, None, openai_error(400, "the body is not a JSON object", "invalid_request_error")
            return model, payload, raw, None
        if mimetype == "multipart/form-data":
            # Spool the upload (memory up to 1 MB, then the worker's spool folder), read only the form fields, then
            # send it on as it was.
            body = await incoming.spooled()
            _, params = parse_options_header(incoming.content_type.decode("latin-1"))
            try:
                model = await self.in_thread(_form_model, body.spool, params.get("boundary", ""), body.size)
            except ValueError:
                body.close()
                return None, None, None, openai_error(400, "malformed multipart body", "invalid_request_error")
            return model, None, body, None
        return None, None, None, None


class _Discard:
    def write(self, data):
        return len(data)

    def seek(self, *args):
        return 0

    def read(self, *args):
        return b""


def _form_model(spool, boundary: str, size: int):
    """The `model` field of a spooled multipart body (ValueError if it is malformed)."""
    spool.seek(0)
    form, _ = MultiPartParser(stream_factory=lambda *a, **k: _Discard()).parse(spool, boundary.encode(), size)
    return form.get("model")
