"""The REST API's blueprint and what its routes share: the JSON body of a request, or a 400 naming what was expected."""
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
