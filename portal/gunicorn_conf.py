"""gunicorn settings for the portal: uvicorn workers (the proxy on an event loop), no request timeout.

Chosen by benchmarks/proxy.py on 2 cores (synthetic SSE upstream, 2-second streams, all clients starting together;
README "Tuning"): with the proxy on each worker's event loop, 2 workers carry 256 concurrent streams at 0.97-0.98
of a direct connection's throughput, TTFT p50 within 20 ms of nginx's, and add 0.45 ms to a request, where
gthread workers (a thread per stream) reached 0.85-0.87 of direct, +135-160 ms, and added 1.4-1.9 ms. Flask (pages,
the REST API) runs in a thread pool of each worker, so its blocking work (SQLite, the scheduler commands) never
stalls a stream.
"""
import os
import sys

from portal.config import PRIVATE_UMASK, use_private_umask

use_private_umask()  # before the master creates anything (worker files, the metrics folder) and workers fork
umask = PRIVATE_UMASK
wsgi_app = "portal.asgi:make_app()"  # built in each worker
worker_class = "portal.worker.PortalWorker"
if os.environ.get("PILOTFISH_WORKER_CLASS", "uvicorn") not in ("", "uvicorn"):
    print("pilotfish: PILOTFISH_WORKER_CLASS is ignored: the portal runs uvicorn workers (portal/worker.py)",
          file=sys.stderr)
workers = int(os.environ.get("PILOTFISH_WORKERS", "2"))
timeout = 0  # no worker timeout at all: a stream of any length is never cut (and no heartbeat kills workers)
graceful_timeout = 10  # on stop, streams still open get a second less (portal/worker.py), then are cancelled
keepalive = 75  # uvicorn's timeout_keep_alive: an idle kept-alive connection closes after it (a request's head
# must arrive within client_read_timeout: portal/http_server.py)
backlog = 4096
control_socket_disable = True  # gunicorn >= 27 would share one ~/.gunicorn/gunicorn.ctl between all servers of a user
accesslog = "-"  # written by portal/asgi.py: request lines only, never headers or query strings


def on_starting(server):
    """Before any worker starts: each worker keeps its metrics in files of one folder, added up by /metrics."""
    from portal.metrics import prepare_multiprocess_dir

    prepare_multiprocess_dir()


def child_exit(server, worker):
    from portal.metrics import worker_exited

    worker_exited(worker.pid)


def worker_exit(server, worker):
    """In the worker, once it stopped serving: the usage it counted since its last flush is written."""
    flask_app = getattr(getattr(worker, "wsgi", None), "flask_app", None)
    if flask_app is not None:
        from portal.usage_ledger import usage_ledger

        usage_ledger(flask_app).close()


def on_exit(server):
    """The portal stopped: remove connection.json so notebooks get a clear "no portal" instead of a dead URL."""
    from portal.connection import remove_connection

    home = os.environ.get("PILOTFISH_HOME")
    if home:
        remove_connection(home, os.getpid())
