"""Authentication: every route needs the portal token (Authorization: Bearer) except the public ones."""
from __future__ import annotations

import hmac

from flask import current_app, g, jsonify, request

PUBLIC_ENDPOINTS = {"api.health"}


def _bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def token_matches(candidate: str | None) -> bool:
    """Compare a presented token with the portal token in constant time."""
    if not candidate:
        return False
    expected = current_app.config["PILOTFISH_TOKEN"]
    return hmac.compare_digest(candidate.encode(), expected.encode())


def authenticate():
    """before_request hook: refuse (401 JSON) any request to a protected route without the portal token."""
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    if token_matches(_bearer_token()):
        g.principal = "owner"
        return None
    response = jsonify(error="authentication required: send the portal token as 'Authorization: Bearer <token>'")
    response.status_code = 401
    response.headers["WWW-Authenticate"] = 'Bearer realm="pilotfish"'
    return response


def init_auth(app) -> None:
    app.before_request(authenticate)
