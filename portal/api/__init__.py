"""The JSON REST API: services (and what each cost), catalog, cluster, API keys, usage, benchmarks, metrics, health,
and OpenAI's Files and Batches API under /v1;
errors as {"error": ...} with a fitting status. Routes only: they call the domain modules (portal.services, portal.cluster, portal.keys, ...), as the
pages (portal.ui) do."""
from __future__ import annotations

from . import batches, benchmarks, catalog, cluster, keys, metrics, openapi, services, usage  # noqa: F401  (registers the routes)
from .blueprint import bp, json_body  # noqa: F401
