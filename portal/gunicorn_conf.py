"""gunicorn settings for the portal: threaded workers (streams must not block each other), no request timeout.

Chosen by benchmarks/proxy.py on 2 cores (README, "Tuning"): gthread with 2 workers x 256 threads carried 256
concurrent streams best; each open stream holds one thread, so threads x workers caps concurrent streams.
"""
import os

wsgi_app = "portal.wsgi:app"
worker_class = os.environ.get("PILOTFISH_WORKER_CLASS", "gthread")
workers = int(os.environ.get("PILOTFISH_WORKERS", "2"))
threads = int(os.environ.get("PILOTFISH_THREADS", "256"))
timeout = 0  # long streams are normal; a stuck worker is found by its heartbeat, not by killing streams
graceful_timeout = 10
keepalive = 75
accesslog = "-"
# Request lines only, never headers or query strings that might carry a credential.
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'


def on_exit(server):
    """The portal stopped: remove connection.json so notebooks get a clear "no portal" instead of a dead URL."""
    from pathlib import Path

    from ood_app.connection import remove_connection

    home = os.environ.get("PILOTFISH_HOME")
    if home:
        remove_connection(Path(home), os.getpid())
