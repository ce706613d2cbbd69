"""Streaming reverse proxy to each service (/services/<id>/...) and the OpenAI-compatible /v1 gateway."""
from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import urllib3
import urllib3.connection
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ReadTimeoutError
from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.formparser import MultiPartParser
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wrappers import Request as IncomingRequest

from . import metrics
from .auth import bearer_from_header, principal_from_bearer
from .db import db
from .models import Service, State, utcnow

log = logging.getLogger(__name__)
bp = Blueprint("proxy", __name__)

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade"}
REQUEST_DROP = HOP_BY_HOP | {"host", "authorization", "cookie", "content-length", "x-csrf-token"}
RESPONSE_DROP = HOP_BY_HOP | {"set-cookie", "content-length"}
ROUTABLE = (State.RUNNING, State.UNHEALTHY)
STARTING = (State.SUBMITTED, State.PENDING, State.STARTING)
CHUNK = 64 * 1024
MAX_JSON_BODY = 32 * 1024 * 1024
SPOOL_IN_MEMORY = 1024 * 1024
DIRECTORY_TTL = 1.0
ACTIVITY_FLUSH_SECONDS = 10.0


def openai_error(status: int, message: str, type_: str, code: Optional[str] = None, param: Optional[str] = None,
                 retry_after: Optional[int] = None, **extra) -> Response:
    """An error in the shape the openai client parses: {"error": {"message", "type", "param", "code"}}."""
    response = jsonify(error={"message": message, "type": type_, "param": param, "code": code, **extra})
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


@dataclass
class Route:
    id: str
    state: str
    model: str
    kind: str
    host: Optional[str]
    port: Optional[int]
    api_key: str

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


class ServiceDirectory:
    """Where each live service answers, cached for a second so the hot path does not query the database."""

    def __init__(self):
        self._routes: Dict[str, Route] = {}
        self._loaded = 0.0
        self._lock = threading.Lock()  # counters and activity: held for microseconds on the hot path
        self._refresh_lock = threading.Lock()  # reloading from the database: never blocks the counters
        self.in_flight: Dict[str, int] = {}
        self._activity: Dict[str, float] = {}
        self._flushed: Dict[str, float] = {}

    def routes(self, fresh: bool = False) -> Dict[str, Route]:
        """The live services; `fresh` reloads now (used on a miss, so a just-launched service is found)."""
        if fresh or time.monotonic() - self._loaded > DIRECTORY_TTL:
            with self._refresh_lock:
                if fresh or time.monotonic() - self._loaded > DIRECTORY_TTL:
                    rows = db.session.query(Service.id, Service.state, Service.model, Service.kind, Service.host,
                                            Service.port, Service.api_key).filter(
                        Service.state.in_(State.LIVE)).all()
                    db.session.remove()
                    self._routes = {row.id: Route(*row) for row in rows}
                    self._loaded = time.monotonic()
        return self._routes

    def get(self, service_id: str) -> Optional[Route]:
        return self.routes().get(service_id)

    def begin(self, service_id: str) -> None:
        with self._lock:
            self.in_flight[service_id] = self.in_flight.get(service_id, 0) + 1

    def end(self, service_id: str) -> None:
        """A request finished: count it out and note the activity (written to the database now and then)."""
        now = time.time()
        with self._lock:
            self.in_flight[service_id] = max(0, self.in_flight.get(service_id, 1) - 1)
            self._activity[service_id] = now
            due = now - self._flushed.get(service_id, 0) >= ACTIVITY_FLUSH_SECONDS
            if due:
                self._flushed[service_id] = now
        if due:
            try:
                Service.query.filter_by(id=service_id).update({"last_activity": utcnow()})
                db.session.commit()
            except Exception:  # activity is best effort; never fail a request over it
                db.session.rollback()
                log.exception("could not record activity of %s", service_id)
            finally:
                db.session.remove()


def _directory() -> ServiceDirectory:
    return current_app.extensions["pilotfish.directory"]


def _session() -> urllib3.PoolManager:
    return current_app.extensions["pilotfish.upstream"]


class _UpstreamConnection(urllib3.connection.HTTPConnection):
    """Sends the request line and headers in one write with the first block of the body: one segment and one wake-up
    of the service instead of two per request."""

    _held: Optional[bytes] = None
    _holding = False

    def request(self, *args, **kwargs):
        self._holding = True
        try:
            super().request(*args, **kwargs)
        finally:
            self._holding = False
            held, self._held = self._held, None
        if held is not None:  # no body
            super().send(held)

    def _send_output(self, message_body=None, encode_chunked=False):
        if not self._holding or message_body is not None:
            return super()._send_output(message_body, encode_chunked=encode_chunked)
        self._buffer.extend((b"", b""))
        self._held = b"\r\n".join(self._buffer)
        del self._buffer[:]

    def send(self, data):
        if self._held is not None and isinstance(data, (bytes, bytearray)):
            data, self._held = self._held + data, None
        return super().send(data)


class _UpstreamPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _UpstreamConnection


def make_upstream_session(pool_size: int = 512) -> urllib3.PoolManager:
    """urllib3 directly: requests' per-call preparation costs ~0.5 ms, and a PoolManager never reads proxy settings
    from the environment (straight to the node)."""
    manager = urllib3.PoolManager(num_pools=64, maxsize=pool_size, block=False, retries=False)
    manager.pool_classes_by_scheme = {**manager.pool_classes_by_scheme, "http": _UpstreamPool}
    return manager


class _LengthBody:
    """A request body of known length, read on demand, so uploads stream through without being held in memory."""

    def __init__(self, stream, length: int):
        self.stream, self.length = stream, length

    def __len__(self):
        return self.length

    def read(self, size: int = -1) -> bytes:
        return self.stream.read(size)

    def __iter__(self):
        while True:
            data = self.stream.read(CHUNK)
            if not data:
                return
            yield data


def _request_body(incoming, spooled=None):
    if spooled is not None:
        return spooled
    if incoming.method in ("GET", "HEAD", "OPTIONS", "DELETE") and not incoming.content_length:
        return None
    if incoming.content_length is not None:
        return _LengthBody(incoming.stream, incoming.content_length)
    return iter(lambda: incoming.stream.read(CHUNK), b"")  # chunked upload: sent on chunked


class Relay:
    """An upstream answer on its way to the caller: status, headers, then the body as it arrives.

    `close()` ends it once, however the relay stops (last byte, client gone, no body at all): it closes the upstream
    (a client that went away makes the engine abort) and counts the request out.
    """

    def __init__(self, app, directory: ServiceDirectory, route: Route, upstream, watch: metrics.ProxyWatch,
                 headers: list):
        self.app, self.directory, self.route, self.upstream, self.watch = app, directory, route, upstream, watch
        self.status = upstream.status
        self.headers = headers
        self._chunks = None
        self._finished = False

    def __iter__(self):
        self._chunks = self._relay()
        return self._chunks

    def _relay(self):
        try:
            yield from self.watch.relay(self.upstream.stream(CHUNK, decode_content=False))
        except (HTTPError, OSError) as exc:
            self.watch.failed("interrupted")
            log.info("stream from service %s ended early: %s", self.route.id, type(exc).__name__)
        finally:
            self._finish()

    def close(self) -> None:
        if self._chunks is not None:
            self._chunks.close()  # a relay that started ends through its own `finally`
        self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self.upstream.close()
        self.upstream.release_conn()  # (a fully read response went back to the pool already)
        self.watch.finish()
        with self.app.app_context():
            self.directory.end(self.route.id)

    def response(self) -> Response:
        response = Response(self, status=self.status, headers=self.headers, direct_passthrough=True)
        # HEAD, 1xx, 204 and 304 answers: Werkzeug sends no body and never iterates the relay.
        response.call_on_close(self.close)
        return response


Answer = Union[Response, Relay]


def forward(route: Route, upstream_path: str, body=None, incoming=None) -> Answer:
    """Send the request (Flask's current one unless `incoming` is given) to `route`; the answer streams back byte
    for byte as it arrives."""
    incoming = request if incoming is None else incoming
    config = current_app.config["PILOTFISH"]
    headers = {key: value for key, value in incoming.headers.items() if key.lower() not in REQUEST_DROP}
    headers["Authorization"] = f"Bearer {route.api_key}"
    url = route.base_url + upstream_path
    if incoming.query_string:
        url += "?" + incoming.query_string.decode("latin-1")
    directory = _directory()
    directory.begin(route.id)
    watch = metrics.watch_proxy(route.id, route.model, incoming.method, upstream_path)
    data = _request_body(incoming, watch.prepare(body))
    if isinstance(data, _LengthBody):
        headers["Content-Length"] = str(len(data))  # urllib3 would send a file-like body chunked
    try:
        upstream = _session().urlopen(incoming.method, url, body=data, headers=headers, redirect=False, retries=False,
                                      preload_content=False, decode_content=False,
                                      timeout=urllib3.Timeout(connect=config.proxy_connect_timeout,
                                                              read=config.proxy_read_timeout))
    except NewConnectionError as exc:
        directory.end(route.id)
        watch.failed("refused")
        return openai_error(502, f"service {route.id} ({route.model}) refused the connection at "
                                 f"{route.host}:{route.port} ({type(exc).__name__})", "upstream_error",
                            "upstream_unreachable")
    except (ConnectTimeoutError, ReadTimeoutError):
        directory.end(route.id)
        watch.failed("timeout")
        return openai_error(504, f"service {route.id} ({route.model}) did not answer within "
                                 f"{config.proxy_read_timeout:g} s", "upstream_timeout", "upstream_timeout")
    except (HTTPError, OSError) as exc:
        directory.end(route.id)
        watch.failed("connection")
        return openai_error(502, f"service {route.id} ({route.model}) refused the connection at "
                                 f"{route.host}:{route.port} ({type(exc).__name__})", "upstream_error",
                            "upstream_unreachable")
    except Exception:
        directory.end(route.id)
        raise
    watch.answered(upstream.status, upstream.headers)

    out_headers = [(key, value) for key, value in upstream.headers.items() if key.lower() not in RESPONSE_DROP]
    chunked = "chunked" in upstream.headers.get("Transfer-Encoding", "").lower()
    if not chunked and "Content-Length" in upstream.headers:
        out_headers.append(("Content-Length", upstream.headers["Content-Length"]))
    if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
        if "X-Accel-Buffering" not in upstream.headers:
            out_headers.append(("X-Accel-Buffering", "no"))
        if "Cache-Control" not in upstream.headers:
            out_headers.append(("Cache-Control", "no-cache"))
    return Relay(current_app._get_current_object(), directory, route, upstream, watch, out_headers)


def _not_running(service_id: str, state: Optional[str]) -> Response:
    if state is None:
        return openai_error(404, f"no service {service_id!r}", "not_found_error", "service_not_found")
    if state in STARTING:
        return openai_error(503, f"service {service_id} is {state}: it is not answering yet, retry shortly",
                            "service_unavailable", "service_not_running", state=state, retry_after=5)
    if state == State.UNHEALTHY:
        return openai_error(503, f"service {service_id} is UNHEALTHY", "service_unavailable", "service_not_running",
                            state=state, retry_after=5)
    return openai_error(503, f"service {service_id} is {state}: it has ended, launch it again",
                        "service_unavailable", "service_not_running", state=state)


@bp.route("/services/<service_id>", defaults={"path": ""}, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
@bp.route("/services/<service_id>/", defaults={"path": ""}, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
@bp.route("/services/<service_id>/<path:path>", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
def service_proxy(service_id: str, path: str):
    return _as_response(service_answer(service_id, path, request))


def _as_response(answer: Answer) -> Response:
    return answer.response() if isinstance(answer, Relay) else answer


def service_answer(service_id: str, path: str, incoming) -> Answer:
    directory = _directory()
    route = directory.get(service_id)
    if route is None or route.state not in ROUTABLE or not route.port:
        route = directory.routes(fresh=True).get(service_id)
    if route is None or route.state not in ROUTABLE or not route.port:
        if route is None:
            row = db.session.query(Service.state).filter_by(id=service_id).first() if len(service_id) <= 16 else None
            return _not_running(service_id, row.state if row else None)
        return _not_running(service_id, route.state)
    # A completion's JSON body is read first, so a stream can ask for the usage event (see metrics.ProxyWatch).
    body = metrics.small_json_body(incoming) if path.endswith("completions") else None
    return forward(route, "/" + path, body, incoming)


# --- the /v1 gateway ------------------------------------------------------------------------------------

class _Discard:
    def write(self, data):
        return len(data)

    def seek(self, *args):
        return 0

    def read(self, *args):
        return b""


def _model_from_request(incoming):
    """(model, spooled body or None, error response or None) for a /v1 request."""
    mimetype = incoming.mimetype
    if mimetype == "application/json" or (mimetype == "" and incoming.content_length):
        if incoming.content_length and incoming.content_length > MAX_JSON_BODY:
            return None, None, openai_error(413, "request body too large", "invalid_request_error")
        raw = incoming.get_data(cache=True)
        try:
            model = json.loads(raw or b"{}").get("model")
        except (ValueError, AttributeError):
            return None, None, openai_error(400, "the body is not a JSON object", "invalid_request_error")
        return model, raw, None
    if mimetype == "multipart/form-data":
        # Spool the upload (memory up to 1 MB, then disk), read only the form fields, then send it on as it was.
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
        size = 0
        while True:
            data = incoming.stream.read(CHUNK)
            if not data:
                break
            spool.write(data)
            size += len(data)
        spool.seek(0)
        boundary = incoming.mimetype_params.get("boundary", "")
        try:
            form, _ = MultiPartParser(stream_factory=lambda *a, **k: _Discard()).parse(spool, boundary.encode(), size)
        except ValueError:
            return None, None, openai_error(400, "malformed multipart body", "invalid_request_error")
        spool.seek(0)
        return form.get("model"), _LengthBody(spool, size), None
    return None, None, None


def running_models() -> List[dict]:
    seen = {}
    for route in _directory().routes().values():
        if route.state == State.RUNNING and route.model not in seen:
            seen[route.model] = {"id": route.model, "object": "model", "created": 0, "owned_by": "pilotfish"}
    return list(seen.values())


@bp.get("/v1/models")
def gateway_models():
    return jsonify(object="list", data=running_models())


@bp.route("/v1/<path:path>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def gateway(path: str):
    return _as_response(gateway_answer(path, request))


def gateway_answer(path: str, incoming) -> Answer:
    model, body, error = _model_from_request(incoming)
    if error is not None:
        return error
    if path.startswith("models/") and incoming.method == "GET":
        model = path[len("models/"):]
        found = [m for m in running_models() if m["id"] == model]
        if found:
            return jsonify(found[0])
    if not model or not isinstance(model, str):
        return openai_error(400, "model: required, to choose the service (GET /v1/models lists them)",
                            "invalid_request_error", "model_required", param="model")
    directory = _directory()
    candidates = [route for route in directory.routes().values() if route.model == model]
    if not any(route.state == State.RUNNING for route in candidates):
        candidates = [route for route in directory.routes(fresh=True).values() if route.model == model]
    ready = [route for route in candidates if route.state == State.RUNNING and route.port]
    if not ready:
        ready = [route for route in candidates if route.state == State.UNHEALTHY and route.port]
    if not ready:
        if candidates:
            states = sorted({route.state for route in candidates})
            return openai_error(503, f"model {model!r} is not ready yet ({', '.join(states)}): retry shortly",
                                "service_unavailable", "model_not_ready", param="model", retry_after=5)
        available = sorted(m["id"] for m in running_models())
        return openai_error(404, f"model {model!r} is not served here; available: "
                                 f"{', '.join(available) if available else 'none (launch a service first)'}",
                            "not_found_error", "model_not_found", param="model")
    route = min(ready, key=lambda r: directory.in_flight.get(r.id, 0))
    return forward(route, "/v1/" + path, body, incoming)


# --- the hot path without Flask --------------------------------------------------------------------------

PROXY_METHODS = {"/services/": frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}),
                 "/v1/": frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})}


class ProxyFastPath:
    """WSGI in front of Flask for what the proxy answers with a bearer credential (the portal token or a known API
    key): the same functions as the proxy's views, without Flask's request context, routing, hooks and response
    object. Everything else (cookies, unknown credentials, odd paths, /v1/models) goes to Flask unchanged."""

    def __init__(self, app, flask_app):
        self.app = app
        self.flask_app = flask_app

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith("/services/"):
            prefix, endpoint = "/services/", "proxy.service_proxy"
        elif path.startswith("/v1/"):
            prefix, endpoint = "/v1/", "proxy.gateway"
        else:
            return self.flask_app(environ, start_response)
        rest = path[len(prefix):]
        if (environ.get("REQUEST_METHOD") not in PROXY_METHODS[prefix] or not rest or "//" in path
                or not path.isascii()):
            return self.flask_app(environ, start_response)
        if prefix == "/services/":
            service_id, _, sub_path = rest.partition("/")
        elif rest == "models" or rest.startswith("models/"):
            return self.flask_app(environ, start_response)
        token = bearer_from_header(environ.get("HTTP_AUTHORIZATION", ""))
        if token is None:
            return self.flask_app(environ, start_response)
        with self.app.app_context():
            if principal_from_bearer(token) is None:
                answer = None  # Flask answers the 401
            else:
                incoming = IncomingRequest(environ)
                try:
                    if endpoint == "proxy.service_proxy":
                        answer = service_answer(service_id, sub_path, incoming)
                    else:
                        answer = gateway_answer(rest, incoming)
                except Exception:
                    log.exception("unexpected error")
                    answer = jsonify(error="internal error: see the portal log")
                    answer.status_code = 500
        if answer is None:
            return self.flask_app(environ, start_response)
        metrics.instruments().count_request(endpoint, answer.status_code if isinstance(answer, Response)
                                            else answer.status)
        if isinstance(answer, Response):
            return answer(environ, start_response)
        if environ["REQUEST_METHOD"] == "HEAD" or answer.status < 200 or answer.status in (204, 304):
            return answer.response()(environ, start_response)  # no body: Werkzeug's rules for such answers
        headers = answer.headers
        if not any(key.lower() == "content-type" for key, _ in headers):
            headers.append(("Content-Type", "text/html; charset=utf-8"))  # as Flask's Response would
        start_response(f"{answer.status} {HTTP_STATUS_CODES.get(answer.status, 'unknown').upper()}", headers)
        return answer


def init_proxy(app) -> None:
    app.extensions["pilotfish.directory"] = ServiceDirectory()
    app.extensions["pilotfish.upstream"] = make_upstream_session()
    app.register_blueprint(bp)
    app.wsgi_app = ProxyFastPath(app, app.wsgi_app)
