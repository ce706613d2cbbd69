"""GET /api/usage: requests, errors and tokens per principal, model, day or service (portal/usage_report.py); the
owner sees everyone's, a named key only its own."""
from __future__ import annotations

from flask import g, jsonify

from ..usage_report import usage_query, usage_summary
from . import schemas, usage_schemas
from .blueprint import bp, query
from .openapi import described


@bp.get("/api/usage")
@described("Usage by principal, model, UTC day or service: requests, errors, prompt and completion tokens, and their "
           "totals (a named key sees only its own)", query=schemas.UsageQuery, answers={200: usage_schemas.UsageAnswer},
           errors=(400, 403))
def usage():
    asked = query(schemas.UsageQuery)
    found = usage_query(g.principal, asked.by, asked.since, asked.until, asked.principal, asked.model)
    return jsonify(usage_summary(found))
