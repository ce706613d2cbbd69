"""REST routes for load benchmarks: start one against a RUNNING service, read its figures, list, cancel or delete."""
from __future__ import annotations

from flask import g, jsonify, request

from .. import benchmark_runs
from . import schemas
from .blueprint import bp, json_body, query
from .openapi import described


@bp.post("/api/benchmarks")
@described("Start a load benchmark of a RUNNING service", body=schemas.BenchmarkBody,
           answers={202: schemas.Benchmark}, errors=(400, 404, 409))
def start_benchmark():
    """Start a benchmark (it runs in a process of its own); GET /api/benchmarks/<id> follows it."""
    run = benchmark_runs.start(json_body(), benchmark_runs.own_address(request.environ), g.principal)
    return jsonify(run.to_dict()), 202


@bp.get("/api/benchmarks")
@described("Benchmark runs, newest first", query=schemas.BenchmarksQuery, answers={200: schemas.Benchmarks})
def list_benchmarks():
    """Runs, newest first, with their figures (no per-request lists); ?service=<id prefix> or ?model=<repo id>."""
    asked = query(schemas.BenchmarksQuery)
    runs = benchmark_runs.list_runs(service=asked.service, model=asked.model)
    return jsonify(benchmarks=[run.to_dict() for run in runs])


@bp.get("/api/benchmarks/<run_id>")
@described("One benchmark run with everything", answers={200: schemas.Benchmark}, errors=(404,))
def get_benchmark(run_id):
    """One run with everything: per-request lists (start, ttft, latency, output_tokens, error), sweep points,
    and while it runs, its progress."""
    run = benchmark_runs.get_run(run_id)
    return jsonify({**run.to_dict(full=True), "progress": benchmark_runs.progress(run)})


@bp.delete("/api/benchmarks/<run_id>")
@described("Cancel a running benchmark, or delete an ended one", answers={200: None}, errors=(404, 409))
def delete_benchmark(run_id):
    """Cancel a running benchmark, or delete an ended one."""
    run = benchmark_runs.get_run(run_id)
    full_id = run.id
    return jsonify({benchmark_runs.cancel_or_delete(run): full_id})
