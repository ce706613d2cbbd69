"""The key guard (portal/engines/guard/pilotfish_guard.py) alone: every path and method without the service key is
refused before the application sees it (ASGI and WSGI), the launcher puts it in front of a uvicorn server, and each
engine gets it (vLLM's --middleware, llama.cpp's launcher). The real engines behind it: tests/e2e/test_service_keys.py.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import requests
from werkzeug.test import Client

from portal.catalog.kinds import ENGINES
from portal.engines.base import GUARD_DIR, with_guard_path
from portal.engines.guard import pilotfish_guard
from portal.engines.guard.pilotfish_guard import KeyGuard, WsgiKeyGuard

KEY = "s3rvice-key"
PATHS = ["/health", "/metrics", "/version", "/docs", "/openapi.json", "/tokenize", "/v1/models", "/invocations",
         "/", "/no/such/path", "/v1/../health", "/%2e%2e/health"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
WRONG = [None, "", "Bearer", "Bearer ", "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}",
         f"Token {KEY}", KEY]


class Inner:
    """The application behind the guard: answers 200 and counts what reached it."""

    def __init__(self):
        self.seen = []

    async def __call__(self, scope, receive, send):
        self.seen.append((scope["type"], scope.get("path")))
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})


def call(app, scope: dict) -> list:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def http(path: str, method: str = "GET", authorization=None, headers=()) -> dict:
    raw = [(b"host", b"node:1234"), *headers]
    if authorization is not None:
        raw.append((b"authorization", authorization.encode()))
    return {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "root_path": "",
            "query_string": b"", "headers": raw}


def test_every_path_and_method_without_the_key_is_refused_before_the_app():
    inner = Inner()
    guard = KeyGuard(inner, KEY)
    for path in PATHS:
        for method in METHODS:
            for authorization in WRONG:
                sent = call(guard, http(path, method, authorization))
                assert sent[0]["status"] == 401, (path, method, authorization)
                headers = dict(sent[0]["headers"])
                assert headers[b"www-authenticate"].startswith(b"Bearer")
                assert json.loads(sent[1]["body"])["error"]["code"] == "invalid_api_key"
    # two Authorization headers (one right, one wrong, in either order) are refused too
    for pair in ([f"Bearer {KEY}", "Bearer wrong"], ["Bearer wrong", f"Bearer {KEY}"]):
        headers = [(b"authorization", value.encode()) for value in pair]
        assert call(guard, http("/health", headers=headers))[0]["status"] == 401
    assert inner.seen == []
    for authorization in (f"Bearer {KEY}", f"bearer {KEY}", f"BEARER  {KEY} "):
        assert call(guard, http("/health", authorization=authorization))[0]["status"] == 200
    assert inner.seen == [("http", "/health")] * 3


def test_websockets_without_the_key_are_closed_and_lifespan_passes():
    inner = Inner()
    guard = KeyGuard(inner, KEY)
    scope = {"type": "websocket", "path": "/v1/realtime", "headers": [(b"authorization", b"Bearer wrong")]}
    assert call(guard, scope) == [{"type": "websocket.close", "code": 1008}]
    assert inner.seen == []
    call(guard, {"type": "lifespan"})
    call(guard, {"type": "websocket", "path": "/v1/realtime", "headers": [(b"authorization", f"Bearer {KEY}".encode())]})
    assert inner.seen == [("lifespan", None), ("websocket", "/v1/realtime")]


def test_the_key_comes_from_the_environment_and_there_must_be_one(monkeypatch):
    monkeypatch.setenv("PILOTFISH_API_KEY", "from-env")
    guard = KeyGuard(Inner())
    assert call(guard, http("/health", authorization="Bearer from-env"))[0]["status"] == 200
    assert call(guard, http("/health", authorization=f"Bearer {KEY}"))[0]["status"] == 401
    monkeypatch.delenv("PILOTFISH_API_KEY")
    for guard_class in (KeyGuard, WsgiKeyGuard):
        with pytest.raises(RuntimeError, match="no service key"):
            guard_class(Inner())
    monkeypatch.setenv("PILOTFISH_API_KEY", "")
    with pytest.raises(RuntimeError, match="no service key"):
        KeyGuard(Inner())


def test_wsgi_guard():
    seen = []

    def inner(environ, start_response):
        seen.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    client = Client(WsgiKeyGuard(inner, KEY))
    for path in PATHS:
        for method in METHODS:
            for authorization in WRONG:
                headers = {} if authorization is None else {"Authorization": authorization}
                response = client.open(path, method=method, headers=headers)
                assert response.status_code == 401, (path, method, authorization)
    assert seen == []
    assert client.get("/health", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_each_engine_gets_the_guard():
    vllm = ENGINES["vllm"]
    args = vllm.server_arguments("/snap", "org/m", gpus=0)
    assert args[:2] == ["--middleware", "pilotfish_guard.KeyGuard"]  # vLLM adds a class with app.add_middleware
    assert "--middleware" not in vllm.allowed_flags
    llama = ENGINES["llama-cpp"]
    assert llama.guarded_command("python -m llama_cpp.server") == "python -m pilotfish_guard llama_cpp.server"
    assert llama.guarded_command("$HOME/venv/bin/python  -m llama_cpp.server --verbose false") == \
        "$HOME/venv/bin/python  -m pilotfish_guard llama_cpp.server --verbose false"  # the rest as written
    assert llama.guarded_command("python3 -m llama_cpp.server_x") == "python3 -m llama_cpp.server_x"
    assert vllm.guarded_command("python -m vllm.entrypoints.openai.api_server") == \
        "python -m vllm.entrypoints.openai.api_server"
    # the guard's folder holds only the guard, with nothing of Pilotfish: an engine's own venv imports it
    assert sorted(path.name for path in GUARD_DIR.iterdir() if path.name != "__pycache__") == ["pilotfish_guard.py"]
    source = (GUARD_DIR / "pilotfish_guard.py").read_text()
    assert "portal" not in "".join(line for line in source.splitlines() if line.startswith(("import", "from")))
    assert pilotfish_guard.KeyGuard is KeyGuard


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_launcher_guards_a_uvicorn_server(tmp_path):
    """`python -m pilotfish_guard MODULE`, as llama.cpp's server is run: whatever app the module hands uvicorn."""
    (tmp_path / "open_server.py").write_text(
        "import os, uvicorn\n"
        "async def app(scope, receive, send):\n"
        "    if scope['type'] == 'http':\n"
        "        await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "        await send({'type': 'http.response.body', 'body': b'open to all'})\n"
        "if __name__ == '__main__':\n"
        "    uvicorn.run(app, host='127.0.0.1', port=int(os.environ['PORT']), lifespan='off', log_level='warning')\n")
    port = _free_port()
    env = with_guard_path(dict(os.environ, PORT=str(port), PILOTFISH_API_KEY=KEY))
    env["PYTHONPATH"] += os.pathsep + str(tmp_path)
    process = subprocess.Popen([sys.executable, "-m", "pilotfish_guard", "open_server"], env=env, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                refused = requests.get(base + "/health", timeout=2)
                break
            except requests.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert refused.status_code == 401
        assert requests.post(base + "/anything", headers={"Authorization": "Bearer wrong"}).status_code == 401
        allowed = requests.get(base + "/health", headers={"Authorization": f"Bearer {KEY}"})
        assert (allowed.status_code, allowed.text) == (200, "open to all")
    finally:
        process.terminate()
        process.wait(10)
    # without a key the server does not start at all
    env.pop("PILOTFISH_API_KEY")
    ended = subprocess.run([sys.executable, "-m", "pilotfish_guard", "open_server"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=30)
    assert ended.returncode != 0 and "no service key" in ended.stderr
