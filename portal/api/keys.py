"""REST routes for named API keys (the portal owner only): list, create (the secret is shown once; with its scopes,
models, end and rates), revoke."""
from __future__ import annotations

from flask import jsonify

from ..auth import require_owner
from ..keys import create_api_key, list_api_keys, revoke_api_key
from . import schemas
from .blueprint import bp, json_body
from .openapi import described


@bp.get("/api/keys")
@described("API keys (the portal owner only)", answers={200: schemas.Keys}, errors=(403,))
def list_keys():
    require_owner()
    return jsonify(keys=[key.to_dict() for key in list_api_keys()])


@bp.post("/api/keys")
@described("Create an API key (the portal owner only), optionally limited to scopes, models, an end and rates; the "
           "key is shown once", body=schemas.KeyBody,
           answers={201: schemas.NewKey}, errors=(400, 403))
def create_key():
    require_owner()
    body = json_body(schemas.KeyBody, example='{"name": "laptop"}')
    key, secret = create_api_key(body.name, scopes=body.scopes, models=body.models, expires=body.expires,
                                 requests_per_minute=body.requests_per_minute,
                                 tokens_per_minute=body.tokens_per_minute)
    return jsonify({**key.to_dict(), "key": secret, "note": "shown once: store it now"}), 201


@bp.delete("/api/keys/<key_id>")
@described("Revoke an API key (the portal owner only)", answers={200: schemas.Revoked}, errors=(403, 404))
def revoke_key(key_id):
    require_owner()
    revoke_api_key(key_id)
    return jsonify(revoked=key_id)
