"""REST route for the cluster as its user sees it: partitions, free nodes and GPUs, the user's queue."""
from __future__ import annotations

from flask import jsonify

from ..cluster import cluster_overview
from .blueprint import bp
from .openapi import described


@bp.get("/api/cluster")
@described("Partitions, free nodes and GPUs, the user's queue", answers={200: None}, errors=(503,))
def cluster():
    return jsonify(cluster_overview())
