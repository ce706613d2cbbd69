"""Streaming reverse proxy to each service (/services/<id>/...) and the OpenAI-compatible /v1 gateway.

The proxy runs on the event loop of each portal worker (`portal/asgi.py` hands it the requests to those paths):
one coroutine per request, a pool of keep-alive connections per service, bodies streamed both ways with flow
control, the caller's credential replaced by the service's own key. Anything the proxy does not accept (no valid
credential, a CSRF token missing) goes on to Flask, whose `authenticate` answers it; Flask also serves /v1/models.
The database is only read off the loop (the service directory refreshes in a thread; see ServiceDirectory).

Modules: routing (Proxy: who is asking, which service), relay (sending a request, streaming its answer back),
upstream (connections and their pool), incoming (the caller's request), directory (where services answer),
answers (the portal's own answers, OpenAI-shaped; /v1/models), usage (token usage in the answers), recording
(the metrics of each request).
"""
from __future__ import annotations

from .answers import Answer, bp, json_answer, not_running, openai_error, running_models
from .directory import (ACTIVITY_FLUSH_SECONDS, DIRECTORY_TTL, ROUTABLE, ROUTES_CHANGED_FILE, Route,
                        ServiceDirectory, routes_changed)
from .incoming import BodyTooLarge, ClientGone, Incoming, Spool, SpooledBody, SpoolFull
from .recording import GATEWAY_ENDPOINT, SERVICE_ENDPOINT
from .relay import Relay
from .routing import GATEWAY_METHODS, SERVICE_METHODS, Proxy
from .upstream import UpstreamConnection, UpstreamFailed, UpstreamPool

__all__ = ["ACTIVITY_FLUSH_SECONDS", "Answer", "BodyTooLarge", "ClientGone", "DIRECTORY_TTL", "GATEWAY_ENDPOINT",
           "GATEWAY_METHODS", "Incoming", "Proxy", "ROUTABLE", "ROUTES_CHANGED_FILE", "Relay", "Route",
           "SERVICE_ENDPOINT", "SERVICE_METHODS", "ServiceDirectory", "Spool", "SpoolFull", "SpooledBody",
           "UpstreamConnection", "UpstreamFailed", "UpstreamPool", "bp", "init_proxy", "json_answer", "not_running",
           "openai_error", "routes_changed", "running_models"]


def init_proxy(app) -> None:
    """The Flask side: the service directory every request routes on, and GET /v1/models."""
    app.extensions["pilotfish.directory"] = ServiceDirectory(app.config["PILOTFISH"].home, app)
    app.register_blueprint(bp)
