"""The application each portal worker runs (ASGI, on uvicorn's event loop; see portal/worker.py).

Requests to /services/... and /v1/... with a credential the proxy accepts are relayed on the event loop
(portal/proxy/): thousands of concurrent streams cost one coroutine each, not one thread each. Everything else
(pages, the REST API, /v1/models, and every request the proxy does not accept, which Flask then answers 401 or
403) runs in Flask in a thread pool of PILOTFISH_THREADS threads.
"""
from __future__ import annotations

import logging
import os
import time

from a2wsgi import WSGIMiddleware

from .prefix import split_prefix
from .proxy import (GATEWAY_ENDPOINT, GATEWAY_METHODS, SERVICE_ENDPOINT, SERVICE_METHODS, ClientGone, Incoming, Proxy,
                    json_answer)

DEFAULT_THREADS = 32
access_log = logging.getLogger("gunicorn.access")
log = logging.getLogger(__name__)


def proxied(path: str, method: str):
    """("service", id, rest) or ("gateway", rest) for a path the proxy serves, else None."""
    if path.startswith("/services/"):
        service_id, _, rest = path[len("/services/"):].partition("/")
        if service_id and method in SERVICE_METHODS:
            return "service", service_id, rest
    elif path.startswith("/v1/"):
        rest = path[len("/v1/"):]
        if rest and method in GATEWAY_METHODS and not (rest == "models" and method == "GET"):
            return "gateway", rest
    return None


class PortalApp:
    """ASGI: the proxy for what it accepts, Flask (through a WSGI bridge) for the rest; one access log line each."""

    def __init__(self, flask_app, threads: int = DEFAULT_THREADS):
        self.flask_app = flask_app
        self.wsgi = WSGIMiddleware(flask_app, workers=threads)
        self.proxy = Proxy(flask_app)
        self.prefix = flask_app.config["PILOTFISH"].url_prefix.rstrip("/")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return  # no lifespan or websocket support (uvicorn runs with both off)
        started = time.perf_counter()
        method = scope["method"]
        prefix, path = split_prefix(scope["path"], self.prefix)
        status, sent = 0, 0
        target = proxied(path, method)
        handled = False
        if target is not None:
            incoming = Incoming(scope, receive, send)
            try:
                if await self.proxy.principal(incoming) is not None:
                    handled = True
                    skip = prefix.count("/")
                    if target[0] == "service":
                        status, sent = await self.proxy.service(incoming, target[1], target[2], skip + 2)
                    else:
                        status, sent = await self.proxy.gateway(incoming, target[1], skip)
            except ClientGone:
                handled, status = True, 499
            except Exception:
                log.exception("unexpected error in the proxy")
                handled, status = True, 500
                if not incoming.started:  # else the caller's connection closes: the answer shows as cut short
                    status, sent = await self.proxy.reply(
                        incoming, json_answer(500, {"error": "internal error: see the portal log"}),
                        SERVICE_ENDPOINT if target[0] == "service" else GATEWAY_ENDPOINT)
        if not handled:
            status, sent = await self._flask(scope, receive, send)
        if access_log.handlers:  # gunicorn's access log (accesslog in gunicorn_conf.py)
            access_log.info('%s "%s %s HTTP/%s" %s %s %dms', (scope.get("client") or ("-",))[0], method,
                            scope["path"], scope.get("http_version", "1.1"), status, sent,
                            (time.perf_counter() - started) * 1000)

    async def _flask(self, scope, receive, send):
        answer = [0, 0]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                answer[0] = message["status"]
            elif message["type"] == "http.response.body":
                answer[1] += len(message.get("body", b""))
            await send(message)

        await self.wsgi(scope, receive, counting_send)
        return answer[0], answer[1]


def make_app() -> PortalApp:
    """The worker's application (gunicorn calls this in each worker: `portal.asgi:make_app()`)."""
    from .wsgi import app as flask_app

    return PortalApp(flask_app, int(os.environ.get("PILOTFISH_THREADS") or DEFAULT_THREADS))
