"""Checks of our own for the schemathesis run of tests/test_openapi_fuzz.py (loaded through SCHEMATHESIS_HOOKS)."""
import json

import schemathesis


def _refuse(name):
    raise ValueError(f"{name} is not JSON")


@schemathesis.check
def strict_json(ctx, response, case):
    """A JSON answer is JSON as RFC 8259 defines it: no NaN or Infinity, which Python's parser would let through."""
    content_type = response.headers.get("Content-Type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    if "json" not in content_type.lower():
        return
    try:
        json.loads(response.content, parse_constant=_refuse)
    except ValueError as exc:
        raise AssertionError(f"the answer is not strict JSON: {exc}")
