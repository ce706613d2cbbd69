"""The REST API's blueprint and what its routes share: the JSON body and the query of a request, checked against
their models (portal/api/schemas.py), or a 400 naming the field."""
from __future__ import annotations

from typing import Optional, Type

from flask import Blueprint, request

from ..errors import ValidationError
from ..validation import parse_json_object, validated

bp = Blueprint("api", __name__)


def json_body(model: Optional[Type] = None, example: str = ""):
    """The request's JSON body: one JSON object, parsed strictly (no NaN or Infinity), as `model` if given; anything
    else is a 400 naming what was expected (field "body", or the field at fault)."""
    if not request.is_json:
        raise ValidationError("body", "expected a JSON object" + (f" such as {example}" if example else "") +
                              " (Content-Type: application/json)")
    body = parse_json_object(request.get_data(cache=True), example)
    return validated(model, body) if model is not None else body


def query(model: Type):
    """The request's query parameters as `model` (the first value of each); a 400 naming the parameter at fault."""
    return validated(model, request.args.to_dict(flat=True))
