"""A tiny HTTP service for lifecycle tests: serves /health on $PILOTFISH_PORT, requiring $PILOTFISH_API_KEY on every
path and method (as the real engines behind the key guard).

Options (as engine args): --delay S (wait before listening), --exit CODE (print a message and exit),
--sick-file PATH (answer 503 on /health while PATH exists). GET /stop-listening closes the listening socket and
keeps the process alive (a server that no longer accepts connections while its job runs on). GET /stream?seconds=N
answers a line a second for N seconds (a long stream, as a long generation is).
"""
import argparse
import hmac
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import serving_tls  # beside this file


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0)
    parser.add_argument("--exit", type=int, default=None)
    parser.add_argument("--sick-file", default=None)
    parser.add_argument("--bind", default="0.0.0.0")  # e.g. 127.0.0.1: a server only its own node can reach
    serving_tls.add_arguments(parser)
    args, _ = parser.parse_known_args()  # the standard server flags (--model, --port, ...) are not needed here
    with open("argv.json", "w") as handle:  # in the job directory: what the job script really passed
        json.dump(sys.argv[1:], handle)
    if args.exit is not None:
        print(f"tiny_service: giving up on purpose with exit code {args.exit}", flush=True)
        sys.exit(args.exit)
    time.sleep(args.delay)
    key = os.environ["PILOTFISH_API_KEY"]

    class Handler(BaseHTTPRequestHandler):
        def _refused(self):
            sent = self.headers.get("Authorization") or ""
            if hmac.compare_digest(sent.encode(), f"Bearer {key}".encode()):
                return False
            self._send(401, {"error": "bad key"})
            return True

        def do_other(self):
            if not self._refused():
                self._send(405, {"error": f"{self.command} not served"})

        do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = do_other

        def do_GET(self):
            if self._refused():
                return None
            if self.path == "/health":
                if args.sick_file and os.path.exists(args.sick_file):
                    return self._send(503, {"status": "sick"})
                return self._send(200, {"status": "ok"})
            if self.path.startswith("/stream?seconds="):
                return self._stream(int(self.path.partition("=")[2]))
            if self.path == "/stop-listening":
                self._send(200, {"listening": False})
                threading.Thread(target=server.shutdown).start()  # serve_forever returns, then the socket closes
                return None
            return self._send(200, {"path": self.path, "model": os.environ.get("PILOTFISH_MODEL")})

        def _stream(self, seconds):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(6 * seconds))
            self.end_headers()
            for _ in range(seconds):
                self.wfile.write(b"token\n")
                self.wfile.flush()
                time.sleep(1)

        def _send(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer((args.bind, int(os.environ["PILOTFISH_PORT"])), Handler)
    serving_tls.serve_tls(server, args)
    print(f"tiny_service: listening on {server.server_address[1]} at {time.time():.3f}", flush=True)
    server.serve_forever()
    server.server_close()
    while True:  # alive, but deaf
        time.sleep(3600)


if __name__ == "__main__":
    main()
