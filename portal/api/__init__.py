"""The JSON REST API: services, catalog, cluster, API keys, benchmarks, metrics, health; errors as {"error": ...} with
a fitting status. Routes only: they call the domain modules (portal.services, portal.cluster, portal.keys, ...), as the
pages (portal.ui) do."""
from __future__ import annotations

from flask import Blueprint, request

from ..errors import ValidationError

bp = Blueprint("api", __name__)


def json_body():
    """The request's JSON body; anything else is a 400 naming what was expected."""
    body = request.get_json(silent=True)
    if body is None:
        raise ValidationError("body", "expected a JSON object (Content-Type: application/json)")
    return body


from . import benchmarks, catalog, cluster, keys, metrics, services  # noqa: E402,F401  (registers the routes)
