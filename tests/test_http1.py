"""The HTTP/1.1 client connection the proxy and the load generators share (portal/http1.py), as the load generator
reads answers through it: against a server that answers with scripted bytes, every way an answer can go wrong is
counted as its kind, and event times are those of the reads that brought them."""
import json
import socketserver
import threading
import time

import pytest

from portal.benchmark import LoadSpec, run_load

MODEL = "test/tiny"


class Scripted:
    """A server on 127.0.0.1 answering every request with the same pieces: bytes are sent as they are, a number is
    a pause in seconds; with `close` the connection is closed after the answer."""

    def __init__(self, *pieces, close: bool = False):
        self.pieces, self.close = pieces, close
        self.requests = []

    def __enter__(self):
        scripted = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                data = b""
                while True:
                    while b"\r\n\r\n" not in data:
                        more = self.request.recv(65536)
                        if not more:
                            return
                        data += more
                    head, _, data = data.partition(b"\r\n\r\n")
                    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:"))
                    while len(data) < length:
                        data += self.request.recv(65536)
                    scripted.requests.append(json.loads(data[:length]))
                    data = data[length:]
                    for piece in scripted.pieces:
                        if isinstance(piece, bytes):
                            self.request.sendall(piece)
                        else:
                            time.sleep(piece)
                    if scripted.close:
                        return

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def load(server: Scripted, requests: int = 2, **settings) -> dict:
    return run_load(LoadSpec(base_url=server.url, model=MODEL, clients=1, requests=requests, **settings), "key")


def event(text: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "text": text}]}).encode() + b"\n\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
END = chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


def test_events_are_timed_by_the_read_that_brought_them():
    two = event("a") + event("b")
    split = event("c").replace(b"\n\n", b"\r\n\r\n")
    with Scripted(STREAM_HEAD, 0.05, chunk(two[:7]), 0.05, chunk(two[7:] + split[:-3]), 0.05, chunk(split[-3:]),
                  END) as server:
        figures = load(server, requests=2)
    assert figures["failed"] == 0 and figures["token_source"] == "chunks"
    assert figures["output_tokens"] == 2 * 3  # content events, one split across reads, one with CRLF line ends
    assert figures["ttft_seconds"]["count"] == 2 and figures["ttft_seconds"]["p50"] >= 0.09  # "a" came with the 2nd read
    itl = figures["itl_seconds"]
    assert itl["count"] == 2 * 2
    assert itl["p50"] < 0.01 and itl["max"] >= 0.04  # "b" came in the same read as "a"; "c" a read later
    assert server.requests[0]["stream_options"] == {"include_usage": True} and server.requests[0]["model"] == MODEL


def test_a_body_without_a_length_ends_with_the_connection():
    answer = json.dumps({"choices": [], "usage": {"completion_tokens": 7, "prompt_tokens": 3}}).encode()
    with Scripted(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n", answer[:10], 0.02, answer[10:],
                  close=True) as server:
        figures = load(server, requests=3, stream=False)
    assert figures["failed"] == 0 and figures["completed"] == 3
    assert (figures["output_tokens"], figures["token_source"], figures["prompt_tokens_mean"]) == (21, "usage", 3)


@pytest.mark.parametrize("pieces, close, kind", [
    ((STREAM_HEAD, chunk(event("a"))), True, "connection"),  # closed mid-answer
    ((STREAM_HEAD, chunk(event("a")), b"0\r\n\r\n"), False, "incomplete_stream"),  # no [DONE]
    ((b"HTTP/1.1 2x0 OK\r\n\r\n",), False, "bad_response"),  # a status line that is not HTTP
    ((STREAM_HEAD, chunk(b"data: {not json\n\n"), END), False, "bad_response"),
    ((STREAM_HEAD, b"zz\r\nabc\r\n"), False, "bad_response"),  # a chunk size that is not hex
    ((), True, "connection"),  # closed before answering
    ((STREAM_HEAD, 1.5, END), False, "timeout"),  # no byte for longer than the timeout
])
def test_each_way_an_answer_fails_has_its_kind(pieces, close, kind):
    with Scripted(*pieces, close=close) as server:
        figures = load(server, requests=2, timeout=1.0)
    assert figures["errors"] == {kind: 2} and figures["completed"] == 0


def test_an_http_error_keeps_its_kind_and_message_when_the_connection_closes():
    body = json.dumps({"error": {"message": "prompt too long"}}).encode()
    with Scripted(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n" % (len(body) + 10), body,
                  close=True) as server:
        figures = load(server, requests=2)
    assert figures["errors"] == {"http_400": 2}
    with Scripted(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body), body,
                  close=True) as server:
        figures = load(server, requests=2)
    assert figures["errors"] == {"http_400": 2} and figures["error_examples"] == {"http_400": "prompt too long"}
