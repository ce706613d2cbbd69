"""The service key in front of every path of an engine's port: a request without `Authorization: Bearer <key>`
(the key in $PILOTFISH_API_KEY, which every service job sets) is answered 401 before the server routes it, on
every path and method (/health, /metrics, /docs, /openapi.json, /tokenize, ... included).

This file is the whole module, in a folder of its own, with nothing but the standard library: service jobs put
the folder on PYTHONPATH (and bind it into the Apptainer container), so an engine's own virtualenv or image, which
has no Pilotfish, imports it as `pilotfish_guard`. How each engine gets it:

- vLLM: `--middleware pilotfish_guard.KeyGuard` (vLLM adds a class with `app.add_middleware`, as the outermost layer);
- llama.cpp's server (uvicorn + FastAPI, no middleware option): `python -m pilotfish_guard llama_cpp.server ...`
  runs the server's module with every application uvicorn loads wrapped in KeyGuard;
- our Whisper server (WSGI): WsgiKeyGuard around its application.

Without a key in the environment the guard refuses to start (the server must not answer anyone).
"""
from __future__ import annotations

import hmac
import json
import os
import runpy
import sys

KEY_VARIABLE = "PILOTFISH_API_KEY"
REALM = b'Bearer realm="pilotfish service"'
REFUSAL = json.dumps({"error": {
    "message": "missing or wrong API key: send Authorization: Bearer <the service's key>",
    "type": "authentication_error", "param": None, "code": "invalid_api_key"}}).encode()


def service_key(key=None) -> bytes:
    """The key to check against: `key`, else $PILOTFISH_API_KEY; RuntimeError when there is none."""
    key = key if key is not None else os.environ.get(KEY_VARIABLE, "")
    if not key:
        raise RuntimeError(f"pilotfish_guard: no service key (${KEY_VARIABLE} is empty): refusing to serve without one")
    return key.encode() if isinstance(key, str) else bytes(key)


def authorized(authorization, key: bytes) -> bool:
    """Whether an Authorization header value (str, bytes or None) is `Bearer <key>`, compared in constant time."""
    if authorization is None:
        return False
    if isinstance(authorization, str):
        authorization = authorization.encode("latin-1", "replace")
    scheme, _, sent = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(sent.strip(), key)


class KeyGuard:
    """ASGI middleware: HTTP requests without the key get 401, WebSocket handshakes are closed (HTTP 403); the
    rest (lifespan) passes."""

    def __init__(self, app, key=None):
        self.app = app
        self.key = service_key(key)

    async def __call__(self, scope, receive, send):
        kind = scope.get("type")
        if kind not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        sent = [value for name, value in scope.get("headers") or () if name.lower() == b"authorization"]
        if len(sent) == 1 and authorized(sent[0], self.key):
            return await self.app(scope, receive, send)
        if kind == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(REFUSAL)).encode()),
            (b"www-authenticate", REALM)]})
        await send({"type": "http.response.body", "body": REFUSAL})


class WsgiKeyGuard:
    """WSGI middleware: requests without the key get 401."""

    def __init__(self, app, key=None):
        self.app = app
        self.key = service_key(key)

    def __call__(self, environ, start_response):
        if authorized(environ.get("HTTP_AUTHORIZATION"), self.key):
            return self.app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "application/json"),
                                            ("Content-Length", str(len(REFUSAL))),
                                            ("WWW-Authenticate", REALM.decode())])
        return [REFUSAL]


def guard_uvicorn(key=None) -> None:
    """Wrap every application uvicorn loads in this process in KeyGuard (the outermost layer)."""
    import uvicorn.config

    checked = service_key(key)
    load = uvicorn.config.Config.load
    if getattr(load, "pilotfish_guarded", False):
        return

    def guarded_load(self):
        load(self)
        if not isinstance(self.loaded_app, KeyGuard):
            self.loaded_app = KeyGuard(self.loaded_app, checked)

    guarded_load.pilotfish_guarded = True
    uvicorn.config.Config.load = guarded_load


def main(argv=None) -> None:
    """python -m pilotfish_guard MODULE [ARGS...]: run `python -m MODULE ARGS...` behind the key guard."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: python -m pilotfish_guard MODULE [ARGS...] (runs a uvicorn server's module behind the key "
                 f"in ${KEY_VARIABLE})")
    guard_uvicorn()
    sys.argv = [argv[0]] + argv[1:]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
