"""The gunicorn worker class of the portal: uvicorn's, on uvloop with the httptools parser (with limits on request
heads: portal/http_server.py).

Kept apart from portal/asgi.py because gunicorn's master imports the worker class, and the application must only
be built in the workers (each runs its own reconciler thread and proxy connection pools).
"""
from uvicorn_worker import UvicornWorker

from .http_server import PortalHttpProtocol


class PortalWorker(UvicornWorker):
    CONFIG_KWARGS = {
        "loop": "uvloop",
        "http": PortalHttpProtocol,
        "ws": "none",
        "lifespan": "off",
        "access_log": False,  # portal/asgi.py writes the access log: request lines only, never query strings
        "server_header": False,
        "proxy_headers": False,
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # On stop, open streams get a second less than gunicorn's graceful_timeout: then they are cancelled (each
        # closes its upstream connection, so the engine aborts the request) before the master would kill the worker.
        self.config.timeout_graceful_shutdown = max(1, self.cfg.graceful_timeout - 1)
