"""GET /metrics: the portal's metrics in the Prometheus text format (same credentials as the API), and the
request counter every answer goes through."""
from __future__ import annotations

from flask import Response, request

from .. import metrics
from ..service_cost import cost_gauges
from .blueprint import bp
from .openapi import described


@bp.get("/metrics")
@described("The portal's metrics (Prometheus text format); each service's GPU-hours, CPU-hours and idle ratio are "
           "read from the database at each scrape", answers={200: "text"})
def metrics_text():
    body, content_type = metrics.exposition(metrics.cost_families(cost_gauges()))
    return Response(body, content_type=content_type)


@bp.after_app_request
def count_request(response):
    metrics.instruments().count_request(request.endpoint, response.status_code)
    return response
