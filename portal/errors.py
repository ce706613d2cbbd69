"""Errors with a meaning for the user; the API turns them into JSON with a status, the CLI into one line."""
from __future__ import annotations


class PortalError(Exception):
    status = 500

    def __init__(self, message: str, **extra):
        super().__init__(message)
        self.message = message
        self.extra = extra

    def to_dict(self) -> dict:
        return {"error": self.message, **self.extra}


class ValidationError(PortalError):
    """Bad input; the message starts with the field it is about."""
    status = 400

    def __init__(self, field: str, problem: str, **extra):
        super().__init__(f"{field}: {problem}", field=field, **extra)
        self.field, self.problem = field, problem


def check_fields(body, allowed) -> dict:
    """`body` as a JSON object with no field outside `allowed`; else ValidationError naming the first stray one."""
    if not isinstance(body, dict):
        raise ValidationError("body", "expected a JSON object")
    unknown = set(body) - set(allowed)
    if unknown:
        raise ValidationError(sorted(unknown)[0], f"unknown field (expected some of: {', '.join(sorted(allowed))})")
    return body


class ForbiddenError(PortalError):
    """The caller may not do this (e.g. an API key asking for what only the portal owner may)."""
    status = 403


class NotFoundError(PortalError):
    status = 404


class ConflictError(PortalError):
    status = 409


class RejectedError(PortalError):
    """The scheduler refused what was asked (e.g. an unknown partition)."""
    status = 422


class UnavailableError(PortalError):
    """Something the portal depends on (the scheduler) does not answer."""
    status = 503
