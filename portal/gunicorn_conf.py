"""gunicorn settings for the portal: threaded workers (streams must not block each other), no request timeout.

Chosen by benchmarks/proxy.py on 2 cores (synthetic SSE upstream, 2-second streams, all clients starting
together; README "Tuning"): gthread 2 x 256 carries 0.86-0.91 of direct throughput at 256 concurrent streams
with the proxy's fast path (0.81-0.84 without); gevent 2 workers carried 0.90-0.91 before that fast path, but is not
the default: the portal's reconciler, SQLite writes and model scans are blocking calls gevent cannot make
cooperative, and each one would stall every stream of its worker. A gthread worker holds one thread per open
stream, so workers x threads caps concurrent streams (gthread 2 x 32 at 256 streams: TTFT 10 s). Sites with
many concurrent streams can set PILOTFISH_WORKER_CLASS=gevent after `pip install gevent`.
"""
import os
import sys
import traceback

from gunicorn import glogging

wsgi_app = "portal.wsgi:app"
worker_class = os.environ.get("PILOTFISH_WORKER_CLASS") or "gthread"
if worker_class == "sync":  # one request per worker at a time: streams would queue behind each other
    print("pilotfish: PILOTFISH_WORKER_CLASS=sync serializes streams; using gthread instead", file=sys.stderr)
    worker_class = "gthread"
workers = int(os.environ.get("PILOTFISH_WORKERS", "2"))
threads = int(os.environ.get("PILOTFISH_THREADS", "256"))  # gthread only: concurrent requests per worker
timeout = 0  # no worker timeout at all: a stream of any length is never cut (and no heartbeat kills workers)
graceful_timeout = 10  # on stop, streams still open get this long
keepalive = 75
control_socket_disable = True  # gunicorn >= 27 would share one ~/.gunicorn/gunicorn.ctl between all servers of a user
accesslog = "-"
# Request lines only, never headers or query strings that might carry a credential.
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'


class RequestLineLogger(glogging.Logger):
    """gunicorn's logger, but an access line costs only the fields the format above uses: gunicorn's own builds
    every request and response header into its atoms for each request (~0.1 ms on the proxy's hot path)."""

    def access(self, resp, req, environ, request_time):
        if not self.access_log_enabled or self.cfg.access_log_format != access_log_format:
            return super().access(resp, req, environ, request_time)
        status = resp.status
        atoms = {"h": environ.get("REMOTE_ADDR", "-"), "m": environ.get("REQUEST_METHOD"),
                 "U": environ.get("PATH_INFO"), "H": environ.get("SERVER_PROTOCOL"),
                 "s": status.split(None, 1)[0] if isinstance(status, str) else status,
                 "B": getattr(resp, "sent", None), "M": request_time.seconds * 1000 + request_time.microseconds // 1000}
        try:
            self.access_log.info(access_log_format, atoms)
        except Exception:
            self.error(traceback.format_exc())


logger_class = RequestLineLogger


def on_starting(server):
    """Before any worker starts: each worker keeps its metrics in files of one folder, added up by /metrics."""
    from portal.metrics import prepare_multiprocess_dir

    prepare_multiprocess_dir()


def child_exit(server, worker):
    from portal.metrics import worker_exited

    worker_exited(worker.pid)


def on_exit(server):
    """The portal stopped: remove connection.json so notebooks get a clear "no portal" instead of a dead URL."""
    from pathlib import Path

    from ood_app.connection import remove_connection

    home = os.environ.get("PILOTFISH_HOME")
    if home:
        remove_connection(Path(home), os.getpid())
