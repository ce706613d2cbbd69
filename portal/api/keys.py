"""REST routes for named API keys (the portal owner only): list, create (the secret is shown once), revoke."""
from __future__ import annotations

from flask import jsonify, request

from ..auth import require_owner
from ..errors import ValidationError
from ..keys import create_api_key, list_api_keys, revoke_api_key
from .blueprint import bp


@bp.get("/api/keys")
def list_keys():
    require_owner()
    return jsonify(keys=[key.to_dict() for key in list_api_keys()])


@bp.post("/api/keys")
def create_key():
    require_owner()
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ValidationError("body", "expected a JSON object such as {\"name\": \"laptop\"}")
    key, secret = create_api_key(body.get("name"))
    return jsonify({**key.to_dict(), "key": secret, "note": "shown once: store it now"}), 201


@bp.delete("/api/keys/<key_id>")
def revoke_key(key_id):
    require_owner()
    revoke_api_key(key_id)
    return jsonify(revoked=key_id)
