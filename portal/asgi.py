"""The application each portal worker runs (ASGI, on uvicorn's event loop; see portal/worker.py).

Requests to /services/... and /v1/... with a credential the proxy accepts are relayed on the event loop
(portal/proxy/): thousands of concurrent streams cost one coroutine each, not one thread each. Everything else
(pages, the REST API, /v1/models, and every request the proxy does not accept, which Flask then answers 401 or
403) runs in Flask in a thread pool of PILOTFISH_THREADS threads.

What a caller can hold is bounded here: a request for Flask has its body read whole on the event loop (at most
MAX_REQUEST_BODY bytes, within client_read_timeout seconds, else 413 or 408) before a thread is taken, so slow
callers cannot take Flask's threads; a proxied body is refused above max_upload_mb (413, at once by its
Content-Length, else when the count passes it), and a gateway upload that does not fit the spool's cap is answered
503. Request heads are bounded in size and time by the worker's protocol (portal/http_server.py).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

from a2wsgi import WSGIMiddleware

from .config import MAX_REQUEST_BODY
from .prefix import split_prefix
from .proxy import (GATEWAY_ENDPOINT, GATEWAY_METHODS, SERVICE_ENDPOINT, SERVICE_METHODS, BodyTooLarge, ClientGone,
                    Incoming, Proxy, Spool, SpoolFull, json_answer, openai_error)

DEFAULT_THREADS = 32
access_log = logging.getLogger("gunicorn.access")
log = logging.getLogger(__name__)


FLASK_GATEWAY_PATHS = ("files", "batches")  # OpenAI's Files and Batches API: the portal's own (portal/api/batches.py)
UPLOAD_PATH = "/v1/files"  # its body streams to Flask as it arrives (an upload of up to batch_max_file_mb)


def proxied(path: str, method: str):
    """("service", id, rest) or ("gateway", rest) for a path the proxy serves, else None."""
    if path.startswith("/services/"):
        service_id, _, rest = path[len("/services/"):].partition("/")
        if service_id and method in SERVICE_METHODS:
            return "service", service_id, rest
    elif path.startswith("/v1/"):
        rest = path[len("/v1/"):]
        if rest and method in GATEWAY_METHODS and not (rest == "models" and method == "GET") \
                and rest.partition("/")[0] not in FLASK_GATEWAY_PATHS:
            return "gateway", rest
    return None


class PortalApp:
    """ASGI: the proxy for what it accepts, Flask (through a WSGI bridge) for the rest; one access log line each."""

    def __init__(self, flask_app, threads: int = DEFAULT_THREADS):
        self.flask_app = flask_app
        self.wsgi = WSGIMiddleware(flask_app, workers=threads)
        self.proxy = Proxy(flask_app)
        settings = flask_app.config["PILOTFISH"]
        self.prefix = settings.url_prefix.rstrip("/")
        self.max_upload = int(settings.max_upload_mb * 1024 * 1024)
        self.client_read_timeout = settings.client_read_timeout  # also read by portal/http_server.py
        self.spool = Spool(settings.spool_dir, int(settings.spool_limit_mb * 1024 * 1024))

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
            incoming = Incoming(scope, receive, send, self.max_upload, self.spool)
            endpoint = SERVICE_ENDPOINT if target[0] == "service" else GATEWAY_ENDPOINT
            try:
                if await self.proxy.principal(incoming) is not None:
                    handled = True
                    skip = prefix.count("/")
                    if incoming.length is not None and incoming.length > self.max_upload:
                        raise BodyTooLarge()
                    if target[0] == "service":
                        status, sent = await self.proxy.service(incoming, target[1], target[2], skip + 2)
                    else:
                        status, sent = await self.proxy.gateway(incoming, target[1], skip)
            except ClientGone:
                handled, status = True, 499
            except (BodyTooLarge, SpoolFull) as refusal:
                handled, status = True, 413 if isinstance(refusal, BodyTooLarge) else 503
                if not incoming.started:  # the rest of the body is read and dropped by the server
                    status, sent = await self.proxy.reply(incoming, self._refusal(refusal), endpoint)
            except Exception:
                log.exception("unexpected error in the proxy")
                handled, status = True, 500
                if not incoming.started:  # else the caller's connection closes: the answer shows as cut short
                    status, sent = await self.proxy.reply(
                        incoming, json_answer(500, {"error": "internal error: see the portal log"}), endpoint)
        if not handled:
            status, sent = await self._flask(scope, receive, send, path, target is not None)
        if access_log.handlers:  # gunicorn's access log (accesslog in gunicorn_conf.py)
            access_log.info('%s "%s %s HTTP/%s" %s %s %dms', (scope.get("client") or ("-",))[0], method,
                            scope["path"], scope.get("http_version", "1.1"), status, sent,
                            (time.perf_counter() - started) * 1000)

    def _refusal(self, refusal: Exception):
        if isinstance(refusal, SpoolFull):
            return openai_error(503, "too many uploads at once: retry shortly", "service_unavailable", "spool_full",
                                retry_after=5)
        return openai_error(413, f"request body too large: at most {self.max_upload / 1048576:g} MB (max_upload_mb)",
                            "invalid_request_error", "request_too_large")

    async def _flask(self, scope, receive, send, path: str, refused: bool):
        """Flask answers (in a thread of its pool) once the whole body is here; a request the proxy refused gets no
        body (Flask refuses it without reading one)."""
        answer = [0, 0]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                answer[0] = message["status"]
            elif message["type"] == "http.response.body":
                answer[1] += len(message.get("body", b""))
            await send(message)

        if not refused and path == UPLOAD_PATH and scope["method"] == "POST":
            # The Files API's upload is read by its view as it arrives, straight into its file (portal/batches/
            # files.py, with its own size limit): a caller silent for client_read_timeout is cut off.
            async def arriving():
                try:
                    return await asyncio.wait_for(receive(), self.client_read_timeout)
                except asyncio.TimeoutError:
                    return {"type": "http.disconnect"}

            await self.wsgi(scope, arriving, counting_send)
            return answer[0], answer[1]
        body = b"" if refused else await self._flask_body(scope, receive, counting_send, path)
        if body is not None:
            whole = [{"type": "http.request", "body": body, "more_body": False}]

            async def replay():
                return whole.pop() if whole else await receive()  # after the body: only a disconnect

            await self.wsgi(scope, replay, counting_send)
        return answer[0], answer[1]

    async def _flask_body(self, scope, receive, send, path: str):
        """The body of a request for Flask, read on the event loop; None once answered 413 or 408 (or the caller
        left)."""
        length, chunked = None, False
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = int(value) if value.isdigit() else None
            elif name == b"transfer-encoding":
                chunked = True
        if not length and not chunked:
            return b""
        if length is not None and length > MAX_REQUEST_BODY:
            await self._answer(send, path, 413, f"request body too large: at most {MAX_REQUEST_BODY >> 10} KiB")
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.client_read_timeout
        parts, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                await self._answer(send, path, 408, f"the request body did not arrive within "
                                                    f"{self.client_read_timeout:g} s", close=True)
                return None
            if message["type"] == "http.disconnect":
                return None
            data = message.get("body", b"")
            size += len(data)
            if size > MAX_REQUEST_BODY:
                await self._answer(send, path, 413, f"request body too large: at most {MAX_REQUEST_BODY >> 10} KiB")
                return None
            parts.append(data)
            more = message.get("more_body", False)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    @staticmethod
    async def _answer(send, path: str, status: int, message: str, close: bool = False) -> None:
        """The portal's own refusal of a request for Flask: {"error": message}, in OpenAI's shape under /v1."""
        if path.startswith("/v1/"):
            answer = openai_error(status, message, "invalid_request_error",
                                  "request_too_large" if status == 413 else "request_timeout")
        else:
            answer = json_answer(status, {"error": message})
        headers = answer.headers + ([(b"connection", b"close")] if close else [])
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body, "more_body": False})


def make_app() -> PortalApp:
    """The worker's application (gunicorn calls this in each worker: `portal.asgi:make_app()`)."""
    from .wsgi import app as flask_app

    return PortalApp(flask_app, int(os.environ.get("PILOTFISH_THREADS") or DEFAULT_THREADS))
