"""Input checked against pydantic models, the one source of both the checks and the API's description
(portal/api/openapi.py): strict JSON bodies (no NaN or Infinity), strict types, whole values, and any refusal as
portal.errors.ValidationError naming its field, so the user sees HTTP 400 {"error": "<field>: <problem>", "field"}."""
from __future__ import annotations

import json
import math
from typing import Any, Type, TypeVar

from pydantic import BaseModel, ConfigDict
from pydantic import ValidationError as PydanticError

from .errors import ValidationError

Model = TypeVar("Model", bound=BaseModel)


class Strict(BaseModel):
    """A request body: every field of its declared type (no coercion), no field outside those declared, finite
    numbers only. A field's `description` completes the refusal's words: "expected <description>, got <value>"."""
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class Query(BaseModel):
    """Query parameters (text by nature: numbers and flags are read from it); parameters not declared are ignored."""
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class _NotJSON(ValueError):
    pass


def _refuse_constant(name: str):
    raise _NotJSON(f"{name} is not JSON (numbers must be finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJSON(f"{text} is out of range (numbers must be finite)")
    return value


def loads_strict(data: bytes) -> Any:
    """JSON as RFC 8259 defines it: NaN, Infinity and numbers beyond a float's range are refused (ValueError)."""
    return json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)


def parse_json_object(data: bytes, example: str = "") -> dict:
    """A request body that must be one JSON object; else ValidationError("body")."""
    expected = "expected a JSON object" + (f" such as {example}" if example else "") + \
        " (Content-Type: application/json)"
    try:
        body = loads_strict(data)
    except _NotJSON as exc:
        raise ValidationError("body", f"{expected}: {exc}")
    except ValueError:  # including UnicodeDecodeError
        raise ValidationError("body", f"{expected}: not valid JSON")
    if not isinstance(body, dict):
        raise ValidationError("body", f"{expected}, got a JSON {_json_type(body)}")
    return body


def _json_type(value) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def validated(model: Type[Model], data: Any) -> Model:
    """`data` as `model`; the first problem is a ValidationError naming its field (nested fields with dots)."""
    if issubclass(model, Strict) and not isinstance(data, dict):
        raise ValidationError("body", f"expected a JSON object, got {_json_type(data)}")
    try:
        return model.model_validate(data)
    except PydanticError as exc:
        raise refusal(model, exc.errors()[0]) from None


def refusal(model: Type[BaseModel], error: dict) -> ValidationError:
    """One pydantic error in the portal's words: the field it is about and what was expected there."""
    kind, value = error["type"], error.get("input")
    names = _field_names(model, error["loc"], stray=kind == "extra_forbidden")
    if kind == "extra_forbidden":
        owner = _model_at(model, names[:-1])
        allowed = ", ".join(sorted(owner.model_fields)) if owner else ""
        if len(names) > 1:  # a stray field inside an object is about that object
            return ValidationError(".".join(names[:-1]), f"unknown field(s): {names[-1]} (expected some of: {allowed})")
        return ValidationError(names[-1], f"unknown field (expected some of: {allowed})")
    field = ".".join(names) or "body"
    description = _description(model, names)
    if kind == "missing" or (value is None and "input" in error):  # null where a value is required
        return ValidationError(field, f"required ({description})" if description else "required")
    if kind in ("value_error", "assertion_error"):
        return ValidationError(field, str(error["ctx"]["error"]))
    if kind == "finite_number":
        return ValidationError(field, f"expected a finite number, got {value!r}")
    if description:
        return ValidationError(field, f"expected {description}, got {value!r}")
    return ValidationError(field, f"{error['msg'][:1].lower()}{error['msg'][1:]}, got {value!r}")


def _field_names(model, loc, stray: bool) -> list:
    """The fields a pydantic error location goes through (list indices and union members left out); with `stray`,
    its last part is a field that was not expected, kept as it is."""
    names, current = [], model
    parts = list(loc[:-1]) if stray else list(loc)
    for part in parts:
        if current is not None and isinstance(part, str) and part in current.model_fields:
            names.append(part)
            current = _inner_model(current.model_fields[part].annotation)
    return names + ([str(loc[-1])] if stray and loc else [])


def _model_at(model, names):
    for name in names:
        field = model.model_fields.get(name) if model else None
        model = _inner_model(field.annotation) if field else None
    return model


def _inner_model(annotation):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found:
            return found
    return None


def _description(model, names) -> str:
    if not names:
        return ""
    owner = _model_at(model, names[:-1])
    field = owner.model_fields.get(names[-1]) if owner else None
    return (field.description or "") if field else ""
