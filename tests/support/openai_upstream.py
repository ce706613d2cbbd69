"""An OpenAI-shaped test server standing in for vLLM/Whisper behind the proxy (run as a service's command).

Serves on $PILOTFISH_PORT, requires $PILOTFISH_API_KEY on every path (as the engines behind the key guard), answers
as $PILOTFISH_MODEL.
Options: --token-delay S (pause between streamed tokens), --answer-delay S (before each whole answer), --delay S
(before listening), --exit CODE.
Extra routes for tests: /echo (what arrived), /status/<code>, /slow?seconds=N, /pauses?gaps=S,S (an event stream
with pauses), /stats (streams, disconnects);
/metrics answers Prometheus text (with the key, as vLLM's behind the key guard).
"""
import argparse
import hashlib
import json
import os
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import serving_tls  # beside this file

# Answers carry the job that gave them (a renewed service's generations are different jobs).
ANSWER_ID = f"cmpl-{os.environ.get('SLURM_JOB_ID') or os.getpid()}"
STATS = {"disconnects": 0, "streams_started": 0, "streams_completed": 0, "requests": 0, "api_requests": 0,
         "dropped": 0}
LOCK = threading.Lock()


def bump(name):
    with LOCK:
        STATS[name] += 1


class Sink:
    """A write-only file that hashes and counts, so uploads are never held in memory."""

    def __init__(self):
        self.hash, self.size, self.head = hashlib.sha256(), 0, b""

    def write(self, data):
        if len(self.head) < 16:
            self.head += data[:16 - len(self.head)]
        self.hash.update(data)
        self.size += len(data)
        return len(data)

    def seek(self, *a):
        return 0

    def read(self, *a):
        return b""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: without this each answer waits 40 ms
    token_delay = 0.0
    answer_delay = 0.0
    key = ""
    model = ""

    def log_message(self, *args):
        pass

    # --- plumbing ---
    def send_json(self, status, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def send_metrics(self):
        data = (f'# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name="{self.model}"}} 0\n'
                f'# TYPE upstream_requests counter\nupstream_requests_total {STATS["requests"]}\n').encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, status, message):
        self.send_json(status, {"object": "error", "message": message, "type": "BadRequestError", "param": None,
                                "code": status})

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def authorized(self):
        if self.headers.get("Authorization") == f"Bearer {self.key}":
            return True
        self.send_json(401, {"error": "invalid API key"})
        return False

    def handle_any(self):
        if getattr(self, "drop_next", False):  # after /once: this keep-alive connection ends without an answer
            bump("dropped")
            self.close_connection = True
            return None
        bump("requests")
        url = urlsplit(self.path)
        if url.path in ("/health", "/metrics") and not self.authorized():  # the key guard: every path needs the key
            return None
        if url.path == "/health":
            return self.send_json(200, {"status": "ok"})
        if url.path == "/metrics":  # as vLLM's: Prometheus text
            return self.send_metrics()
        bump("api_requests")  # all but the health and metrics probes
        if not self.authorized():
            return None
        if url.path == "/echo":
            body = self.read_body()
            return self.send_json(200, {"method": self.command, "path": url.path, "query": url.query,
                                        "headers": dict(self.headers.items()), "length": len(body),
                                        "sha256": hashlib.sha256(body).hexdigest()},
                                  {"X-Pilotfish-Service": "impostor"})  # the portal names what answered, not this
        if url.path.startswith("/status/"):
            self.read_body()
            code = int(url.path.rsplit("/", 1)[1])
            return self.send_json(code, {"error": {"message": f"status {code} on purpose", "code": code}})
        if url.path == "/slow":
            time.sleep(float(parse_qs(url.query).get("seconds", ["5"])[0]))
            return self.send_json(200, {"slept": True})
        if url.path == "/stats":
            return self.send_json(200, STATS)
        if url.path == "/once":  # answered (after ?seconds=), kept alive, but the next request on it is dropped
            self.read_body()
            time.sleep(float(parse_qs(url.query).get("seconds", ["0"])[0]))
            self.drop_next = True
            return self.send_json(200, {"once": True})
        if url.path == "/big":  # N MiB of bytes 0..255 repeated, as fast as the reader takes them
            size = int(parse_qs(url.query).get("mb", ["1"])[0]) << 20
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            block = bytes(range(256)) * 256
            for _ in range(size // len(block)):
                self.wfile.write(block)
            return None
        if url.path == "/refuse":  # answers 413 at once without reading the body, then holds the connection
            self.send_json(413, {"error": {"message": "too large for this service", "code": 413}})
            time.sleep(float(parse_qs(url.query).get("hold", ["20"])[0]))
            self.close_connection = True
            return None
        if url.path == "/cut":  # an event stream that stops short: N events, then the connection closes mid-body
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for index in range(int(parse_qs(url.query).get("events", ["2"])[0])):
                self.chunk(b"data: {\"n\": %d}\n\n" % index)
            self.close_connection = True
            return None
        if url.path == "/pauses":  # an event stream with pauses: an event, then each gap (seconds), then another
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            gaps = [float(gap) for gap in parse_qs(url.query).get("gaps", ["1"])[0].split(",")]
            self.chunk(b"data: {\"n\": 0}\n\n")
            for index, gap in enumerate(gaps, 1):
                time.sleep(gap)
                self.chunk(b"data: {\"n\": %d}\n\n" % index)
            self.chunk(b"")
            return None
        if url.path == "/v1/models":
            return self.send_json(200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "created": 0, "owned_by": "test"}]})
        if url.path == "/v1/audio/transcriptions":
            return self.transcribe()
        if self.command != "POST":
            return self.error(404, f"no route {self.command} {url.path}")
        try:
            request = json.loads(self.read_body() or b"{}")
        except ValueError:
            return self.error(400, "body is not JSON")
        if request.get("model") != self.model:
            return self.send_json(404, {"object": "error", "message": f"The model `{request.get('model')}` does not exist.",
                                        "type": "NotFoundError", "param": None, "code": 404})
        if url.path == "/v1/embeddings":
            return self.send_json(200, {"object": "list", "model": self.model, "data": [
                {"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "usage": {"prompt_tokens": 3, "total_tokens": 3}})
        if url.path not in ("/v1/chat/completions", "/v1/completions"):
            return self.error(404, f"no route {url.path}")
        chat = url.path == "/v1/chat/completions"
        if chat and not isinstance(request.get("messages"), list):
            return self.error(400, "messages: field required")
        max_tokens = request.get("max_tokens", request.get("max_completion_tokens", 8))
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return self.error(400, f"max_tokens must be at least 1, got {max_tokens}.")
        words = [f"tok{i} " for i in range(max_tokens)]
        if request.get("stream"):
            return self.stream(chat, words, request)
        text = "".join(words)
        if self.answer_delay:
            time.sleep(self.answer_delay)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                  if chat else {"index": 0, "text": text, "finish_reason": "length"})
        return self.send_json(200, {"id": ANSWER_ID, "object": "chat.completion" if chat else "text_completion",
                                    "created": int(time.time()), "model": self.model, "choices": [choice],
                                    "usage": {"prompt_tokens": 5, "completion_tokens": max_tokens,
                                              "total_tokens": 5 + max_tokens}})

    def stream(self, chat, words, request):
        bump("streams_started")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for index, word in enumerate(words):
                delta = {"index": 0, "delta": {"content": word}, "finish_reason": None} if chat else \
                    {"index": 0, "text": word, "finish_reason": None}
                event = {"id": ANSWER_ID, "object": "chat.completion.chunk" if chat else "text_completion",
                         "created": int(time.time()), "model": self.model, "choices": [delta],
                         "sent_at": time.time()}
                self.chunk(f"data: {json.dumps(event)}\n\n".encode())
                if self.token_delay and index < len(words) - 1:
                    time.sleep(self.token_delay)
            if (request.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5 + len(words)}
                self.chunk(f"data: {json.dumps({'id': ANSWER_ID, 'choices': [], 'usage': usage})}\n\n".encode())
            self.chunk(b"data: [DONE]\n\n")
            self.chunk(b"")
            bump("streams_completed")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):  # over TLS a gone peer is an SSL error
            bump("disconnects")
            self.close_connection = True

    def chunk(self, data: bytes):
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def transcribe(self):
        from werkzeug.formparser import MultiPartParser, parse_options_header

        _, options = parse_options_header(self.headers.get("Content-Type", ""))
        sinks = []

        def stream_factory(*args, **kwargs):
            sinks.append(Sink())
            return sinks[-1]

        parser = MultiPartParser(stream_factory=stream_factory)
        length = int(self.headers.get("Content-Length") or 0)
        from werkzeug.wsgi import LimitedStream

        stream = LimitedStream(self.rfile, length) if length else _ChunkedReader(self.rfile)
        form, files = parser.parse(stream, options["boundary"].encode(), length or None)
        if form.get("model") != self.model:
            return self.send_json(404, {"message": f"The model `{form.get('model')}` does not exist.", "code": 404})
        upload = sinks[0] if sinks else Sink()
        if upload.head.startswith(b"not audio"):  # as the Whisper server answers a file it cannot decode
            return self.send_json(400, {"error": {"message": "could not decode the file as audio", "param": "file"}})
        if self.answer_delay:
            time.sleep(self.answer_delay)
        text = f"received {upload.size} bytes"
        if form.get("response_format") in ("text", "srt", "vtt"):
            data = f"{form['response_format']}: {text} {upload.hash.hexdigest()}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return None
        return self.send_json(200, {"text": text, "sha256": upload.hash.hexdigest(),
                                    "fields": {name: form[name] for name in ("language", "prompt", "temperature")
                                               if name in form}})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_any

    def do_HEAD(self):  # the GET answer's status and headers, no body
        self.wfile = _Headless(self.wfile)
        self.handle_any()


class _ChunkedReader:
    """Reads a chunked request body as a plain stream."""

    def __init__(self, raw):
        self.raw, self.left, self.done = raw, 0, False

    def read(self, size=-1):
        out = b""
        while not self.done and (size < 0 or len(out) < size):
            if self.left == 0:
                self.left = int(self.raw.readline().strip() or b"0", 16)
                if self.left == 0:
                    self.raw.readline()
                    self.done = True
                    break
            take = self.left if size < 0 else min(self.left, size - len(out))
            out += self.raw.read(take)
            self.left -= take
            if self.left == 0:
                self.raw.readline()
        return out


class _Headless:
    """A HEAD answer: writes end with the blank line after the headers."""

    def __init__(self, wfile):
        self.wfile, self.done = wfile, False

    def write(self, data):
        if not self.done:
            head, end, _ = data.partition(b"\r\n\r\n")
            self.wfile.write(head + end)
            self.done = bool(end)
        return len(data)

    def flush(self):
        self.wfile.flush()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--answer-delay", type=float, default=0.0)
    parser.add_argument("--exit", type=int, default=None)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before listening")
    serving_tls.add_arguments(parser)
    args, _ = parser.parse_known_args()  # the standard server flags (--model, --port, ...) are not needed here
    if args.exit is not None:
        print(f"openai_upstream: exiting with {args.exit} on purpose", flush=True)
        sys.exit(args.exit)
    time.sleep(args.delay)
    Handler.token_delay = args.token_delay
    Handler.answer_delay = args.answer_delay
    Handler.key = os.environ["PILOTFISH_API_KEY"]
    Handler.model = os.environ["PILOTFISH_MODEL"]
    server = ThreadingHTTPServer(("0.0.0.0", int(os.environ["PILOTFISH_PORT"])), Handler)
    server.daemon_threads = True
    server.request_queue_size = 1024
    serving_tls.serve_tls(server, args)
    print(f"openai_upstream: listening on {server.server_address[1]} at {time.time():.3f}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
