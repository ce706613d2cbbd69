"""The JSON REST API: services, catalog, health; errors as {"error": ...} with a fitting status."""
from __future__ import annotations

from flask import Blueprint

bp = Blueprint("api", __name__)

from . import benchmarks, catalog, cluster, metrics, services  # noqa: E402,F401  (registers the routes)
