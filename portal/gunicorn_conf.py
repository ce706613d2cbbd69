"""gunicorn settings for the portal: threaded workers (streams must not block each other), no request timeout.

Chosen by benchmarks/proxy.py on 2 cores (synthetic SSE upstream, 2-second streams, all clients starting
together; README "Tuning"): gthread 2 x 256 carried 0.85-0.87 of direct throughput at 256 concurrent streams,
TTFT p50/p95 169-197/370-422 ms; gevent 2 workers did better there (0.90-0.91, 142-150/282-314 ms) but is not
the default: the portal's reconciler, SQLite writes and model scans are blocking calls gevent cannot make
cooperative, and each one would stall every stream of its worker. A gthread worker holds one thread per open
stream, so workers x threads caps concurrent streams (gthread 2 x 32 at 256 streams: TTFT 10 s). Sites with
many concurrent streams can set PILOTFISH_WORKER_CLASS=gevent after `pip install gevent`.
"""
import os
import sys

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
