"""The gunicorn worker class of the portal: uvicorn's, on uvloop with the httptools parser (with limits on request
heads: portal/http_server.py).

Kept apart from portal/asgi.py because gunicorn's master imports the worker class, and the application must only
be built in the workers (each runs its own reconciler thread and proxy connection pools).

uvicorn's server wakes ten times a second for its housekeeping (the Date header, gunicorn's heartbeat, the stop
flag), which is most of what an idle worker costs; PortalServer does it once a second, and a stop signal still
wakes it at once.
"""
import asyncio
import logging
import signal
import sys

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from .http_server import PortalHttpProtocol

TICK_SECONDS = 1.0  # how often an idle worker refreshes its Date header and heartbeat (uvicorn: every 0.1 s)


def _release(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class PortalServer(Server):
    """uvicorn's Server with its main loop ticking once a second (the Date header, the heartbeat and the request
    limit are all it does per tick), woken at once by a stop signal."""

    _waiter = None

    async def main_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not await self.on_tick(0):  # tick 0: uvicorn's once-a-second work, on every tick
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(TICK_SECONDS, _release, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        waiter = self._waiter
        if waiter is not None:  # in the main thread, from a signal handler: wake the loop, never block it
            waiter.get_loop().call_soon_threadsafe(_release, waiter)

    def quit_now(self) -> None:
        """Stop without waiting for open connections (the loop's SIGQUIT handler)."""
        self.should_exit = self.force_exit = True
        if self._waiter is not None:
            _release(self._waiter)


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
        # A log record (one per request: the access log) skips what no format of the portal shows: the caller's
        # source line (a walk up the stack), thread and multiprocessing names (the logging HOWTO's "Optimization").
        logging._srcfile = None
        logging.logThreads = False
        logging.logMultiprocessing = False
        # On stop, open streams get a second less than gunicorn's graceful_timeout: then they are cancelled (each
        # closes its upstream connection, so the engine aborts the request) before the master would kill the worker.
        self.config.timeout_graceful_shutdown = max(1, self.cfg.graceful_timeout - 1)

    async def _serve(self) -> None:
        """UvicornWorker._serve with PortalServer."""
        self.config.app = self.wsgi
        server = PortalServer(config=self.config)
        # gunicorn's quick stop (SIGINT or SIGQUIT to the master) sends its workers SIGQUIT: the server stops at once,
        # open connections closed, instead of lingering until the master kills it after graceful_timeout.
        asyncio.get_running_loop().add_signal_handler(signal.SIGQUIT, server.quit_now)
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
