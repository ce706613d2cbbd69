"""REST route for the cluster as its user sees it: partitions, free nodes and GPUs, the user's queue."""
from __future__ import annotations

from flask import jsonify

from ..cluster import cluster_overview
from .blueprint import bp


@bp.get("/api/cluster")
def cluster():
    return jsonify(cluster_overview())
