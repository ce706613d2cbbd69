"""The proxy benchmark's synthetic upstream: a small asyncio HTTP/1.1 server, run as a text-generation service's
command (`benchmarks/proxy.py --serve-upstream`, PILOTFISH_PORT, PILOTFISH_API_KEY, PILOTFISH_MODEL from the job):
GET /health, POST /v1/chat/completions (a small JSON answer, or with "stream": true an SSE stream of --chunks events
spread over --stream-seconds, chunked, then `data: [DONE]`; the events have vLLM's fields, and a stream asking for
usage (`stream_options.include_usage`, which the portal adds) ends with vLLM's usage event), GET /stats (its own
counters), GET /v1/models. It reads requests with asyncio's stream reader; it is the server side, not a client.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import time
from typing import List, Optional

LOOPBACK = "127.0.0.1"
MODEL = "test/tiny"
PROMPT_TOKENS = 12  # what the usage event reports for every request  # a model of the test site cache (tests/support/portal_process.py stages it)


def serve_upstream(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(prog="proxy.py --serve-upstream", allow_abbrev=False)
    parser.add_argument("--serve-upstream", action="store_true")
    parser.add_argument("--chunks", type=int, default=40, help="SSE events per stream (before [DONE])")
    parser.add_argument("--stream-seconds", type=float, default=2.0, help="how long a stream lasts")
    parser.add_argument("--bind", default=LOOPBACK, help="address to listen on (the job's --host is ignored)")
    parser.add_argument("--ssl-keyfile", help="serve TLS on PILOTFISH_PORT with this key (the job passes it)")
    parser.add_argument("--ssl-certfile", help="... and this certificate; then a plain HTTP port is opened too, "
                                               "its number in ./plain_port, for the direct and nginx targets")
    args, _ = parser.parse_known_args(argv)  # the job script adds --model, --host, --port ...: not needed here
    port = int(os.environ["PILOTFISH_PORT"])
    key = os.environ.get("PILOTFISH_API_KEY", "")
    model = os.environ.get("PILOTFISH_MODEL", MODEL)
    expected_auth = f"Bearer {key}".encode() if key else None
    stats = {"pid": os.getpid(), "connections": 0, "requests": 0, "streams_started": 0, "streams_completed": 0,
             "streams_aborted": 0}
    model_json = json.dumps(model)

    def head(status: int, reason: str, content_type: bytes, length: Optional[int], keep: bool) -> bytes:
        lines = [b"HTTP/1.1 %d %s" % (status, reason.encode()), b"Content-Type: " + content_type]
        lines.append(b"Content-Length: %d" % length if length is not None else b"Transfer-Encoding: chunked")
        if content_type == b"text/event-stream":
            lines.append(b"Cache-Control: no-cache")
        if not keep:
            lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def json_response(status: int, body: dict, keep: bool) -> bytes:
        data = json.dumps(body).encode()
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}.get(status, "Error")
        return head(status, reason, b"application/json", len(data), keep) + data

    def completion(req: dict) -> dict:
        return {"id": f"chatcmpl-{stats['requests']}", "object": "chat.completion", "created": int(time.time()),
                "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok0 tok1 tok2 "},
                                              "finish_reason": "length"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}

    async def read_chunked(reader) -> bytes:
        parts = []
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readline()

    async def stream(reader, writer, req: dict, keep: bool) -> bool:
        loop = asyncio.get_running_loop()
        n = max(1, int(req.get("max_tokens") or args.chunks))
        seconds = float(req.get("stream_seconds") or args.stream_seconds)
        interval = seconds / n
        stats["streams_started"] += 1
        head_fields = ('"id":"chatcmpl-%d","object":"chat.completion.chunk","created":%d,"model":%s'
                       % (stats["requests"], int(time.time()), model_json))
        prefix = ('data: {%s,"choices":[{"index":0,"delta":{"content":"' % head_fields).encode()
        suffix = b'"},"logprobs":null,"finish_reason":null}]}\n\n'
        options = req.get("stream_options")
        usage_event = b""
        if isinstance(options, dict) and options.get("include_usage"):  # as vLLM: one last event, no choices
            usage_event = ('data: {%s,"choices":[],"usage":{"prompt_tokens":%d,"total_tokens":%d,'
                           '"completion_tokens":%d}}\n\n' % (head_fields, PROMPT_TOKENS, PROMPT_TOKENS + n, n)).encode()
        writer.write(head(200, "OK", b"text/event-stream", None, keep))
        start = loop.time()
        transport = writer.transport
        for i in range(n + 1):
            delay = start + i * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if transport.is_closing() or reader.at_eof():
                stats["streams_aborted"] += 1
                return False
            if i < n:
                event = prefix + b"tok%d " % i + suffix
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            else:
                done = b"data: [DONE]\n\n"
                if usage_event:
                    writer.write(b"%x\r\n%s\r\n" % (len(usage_event), usage_event))
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            try:
                await writer.drain()
            except ConnectionError:
                stats["streams_aborted"] += 1
                return False
        stats["streams_completed"] += 1
        return True

    async def handle(reader, writer):
        stats["connections"] += 1
        try:
            while True:
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = raw[:-4].split(b"\r\n")
                try:
                    method, target, version = lines[0].split(b" ", 2)
                except ValueError:
                    writer.write(json_response(400, {"error": "bad request line"}, False))
                    return
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                    body = await read_chunked(reader)
                else:
                    body = await reader.readexactly(int(headers.get(b"content-length", b"0") or 0))
                connection = headers.get(b"connection", b"").lower()
                keep = connection != b"close" if version == b"HTTP/1.1" else connection == b"keep-alive"
                stats["requests"] += 1
                path = target.split(b"?", 1)[0]
                if path == b"/health":
                    writer.write(json_response(200, {"status": "ok"}, keep))
                elif expected_auth is not None and headers.get(b"authorization") != expected_auth:
                    writer.write(json_response(401, {"error": "missing or wrong API key"}, keep))
                elif path == b"/stats":
                    writer.write(json_response(200, stats, keep))
                elif path == b"/v1/models":
                    writer.write(json_response(200, {"object": "list", "data": [{"id": model, "object": "model"}]}, keep))
                elif path == b"/v1/chat/completions" and method == b"POST":
                    try:
                        req = json.loads(body or b"{}")
                        assert isinstance(req, dict)
                    except (ValueError, AssertionError):
                        writer.write(json_response(400, {"error": "body is not a JSON object"}, keep))
                    else:
                        if req.get("stream"):
                            if not await stream(reader, writer, req, keep):
                                return
                        else:
                            writer.write(json_response(200, completion(req), keep))
                else:
                    writer.write(json_response(404, {"error": f"no route {path.decode('latin-1')}"}, keep))
                if not keep:
                    await writer.drain()
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            return
        finally:
            writer.close()

    async def main():
        context = None
        if args.ssl_keyfile and args.ssl_certfile:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
            plain = await asyncio.start_server(handle, args.bind, 0, backlog=4096)
            with open("plain_port.tmp", "w") as out:
                out.write(str(plain.sockets[0].getsockname()[1]))
            os.replace("plain_port.tmp", "plain_port")
        server = await asyncio.start_server(handle, args.bind, port, backlog=4096, ssl=context)
        print(f"bench upstream: listening on {args.bind}:{port}{' (TLS)' if context else ''} pid {os.getpid()} "
              f"({args.chunks} chunks / {args.stream_seconds:g} s per stream)", flush=True)
        async with server:
            await server.serve_forever()

    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))  # no shutdown noise from open streams
    asyncio.run(main())
