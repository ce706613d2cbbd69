"""REST routes for load benchmarks: start one against a RUNNING service, read its figures, list, cancel or delete."""
from __future__ import annotations

from flask import jsonify, request

from .. import benchmark_runs
from .blueprint import bp, json_body


@bp.post("/api/benchmarks")
def start_benchmark():
    """Start a benchmark (it runs in a process of its own); GET /api/benchmarks/<id> follows it."""
    run = benchmark_runs.start(json_body(), fallback_url=request.host_url.rstrip("/") + request.script_root)
    return jsonify(run.to_dict()), 202


@bp.get("/api/benchmarks")
def list_benchmarks():
    """Runs, newest first, with their figures (no per-request lists); ?service=<id prefix> or ?model=<repo id>."""
    runs = benchmark_runs.list_runs(service=request.args.get("service"), model=request.args.get("model"))
    return jsonify(benchmarks=[run.to_dict() for run in runs])


@bp.get("/api/benchmarks/<run_id>")
def get_benchmark(run_id):
    """One run with everything: per-request lists (start, ttft, latency, output_tokens, error), sweep points,
    and while it runs, its progress."""
    run = benchmark_runs.get_run(run_id)
    return jsonify({**run.to_dict(full=True), "progress": benchmark_runs.progress(run)})


@bp.delete("/api/benchmarks/<run_id>")
def delete_benchmark(run_id):
    """Cancel a running benchmark, or delete an ended one."""
    run = benchmark_runs.get_run(run_id)
    full_id = run.id
    return jsonify({benchmark_runs.cancel_or_delete(run): full_id})
