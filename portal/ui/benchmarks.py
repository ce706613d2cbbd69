"""Pages for load benchmarks: the stored runs (grouped so runs of a model and tier compare) with a form to start one,
and one run's progress, figures and plots. The form's fields become the API's benchmark request, and
portal.benchmark_runs checks and starts it as it does for the API and the CLI."""
from __future__ import annotations

import math
import re

from flask import g, redirect, render_template, request, url_for

from .. import benchmark_runs, services
from ..errors import ConflictError, NotFoundError, PortalError, ValidationError
from ..models import State
from .blueprint import bp, place_problem

FORM_FIELDS = ("service", "mode", "clients", "requests", "prompt_len", "max_tokens", "stream", "sweep", "ttft_target",
               "api", "target")
# Fields of the benchmark request that have a control of their own in the form.
FORM_CONTROLS = {name: name for name in ("service", "clients", "requests", "prompt_len", "max_tokens", "stream", "sweep",
                                         "ttft_target", "api", "target")}
DEFAULTS = {"mode": "load", "clients": "4", "requests": "32", "prompt_len": "128", "max_tokens": "64", "stream": "1",
            "sweep": "1, 2, 4, 8", "ttft_target": "1", "api": "completions", "target": "portal"}


def _number(text: str, kind):
    """The number typed into a field, None when it is empty, or the text itself when it is not a number (the
    request's check then names the field and shows what was typed)."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        return text
    return value if math.isfinite(value) else text  # "nan", "inf": words, not numbers


def _client_counts(text: str):
    """"1, 2, 4" -> [1, 2, 4]; anything else (nothing at all too) is passed on as typed, for the request's check to
    refuse."""
    parts = [part for part in re.split(r"[\s,]+", (text or "").strip()) if part]
    try:
        return [int(part) for part in parts] if parts else (text or "")
    except ValueError:
        return text


def benchmark_request(form) -> dict:
    """The benchmark request (as the API takes it) from the form's fields: a load with `clients`, or a sweep over
    client counts with a TTFT target."""
    body = {"service": (form.get("service") or "").strip(), "stream": bool(form.get("stream")),
            "api": form.get("api") or "completions", "target": form.get("target") or "portal"}
    sweep = form.get("mode") == "sweep"
    numbers = {"requests": int, "prompt_len": int, "max_tokens": int}
    numbers.update({"ttft_target": float} if sweep else {"clients": int})
    for key, kind in numbers.items():
        value = _number(form.get(key), kind)
        if value is not None:
            body[key] = value
    if sweep:
        body["sweep"] = _client_counts(form.get("sweep"))
    return body


def _benchmark_targets(chosen: str) -> tuple:
    """(the services the form offers, the id of the one asked for): RUNNING text-generation services, and the one
    `chosen` names (an id or id prefix) whatever its state, so the reason it cannot be benchmarked shows next to the
    field."""
    offered = [service for service in services.list_services(State.RUNNING) if service.kind == "text-generation"]
    if chosen:
        try:
            named = services.get_service(chosen)
        except (NotFoundError, ValidationError):
            named = None
        if named is not None:
            chosen = named.id
            if named not in offered:
                offered.insert(0, named)
    return [service.to_dict() for service in offered], chosen


@bp.route("/ui/benchmarks", methods=["GET", "POST"])
def benchmarks():
    errors, alert = {}, None
    if request.method == "POST":
        values = {key: request.form.get(key, "") for key in FORM_FIELDS}
        try:
            run = benchmark_runs.start(benchmark_request(request.form),
                                       benchmark_runs.own_address(request.environ), g.principal)
            return redirect(url_for("ui.benchmark", run_id=run.id), code=303)
        except ValidationError as exc:
            alert = place_problem(exc, FORM_CONTROLS, errors)
        except (NotFoundError, ConflictError) as exc:  # the service is gone, not RUNNING, or under another load
            errors["service"] = exc.message
        except PortalError as exc:
            alert = exc.message
    else:
        values = {**DEFAULTS, "service": request.args.get("service", "")}
    targets, values["service"] = _benchmark_targets(values["service"])
    chosen = next((target for target in targets if target["id"] == values["service"]), None)
    runs = [run.to_dict() for run in benchmark_runs.list_runs()]
    model_filter = request.args.get("model") or (chosen["model"] if chosen and request.method == "GET"
                                                 and request.args.get("service") else "")
    # A form shown again with its problems is a page like any other (200), as browsers expect of forms.
    return render_template("ui/benchmarks.html", title="Benchmarks", values=values, errors=errors, alert=alert,
                           targets=targets, runs=runs, model_filter=model_filter,
                           limits={"clients": benchmark_runs.MAX_CLIENTS, "requests": benchmark_runs.MAX_REQUESTS,
                                   "tokens": benchmark_runs.MAX_TOKENS,
                                   "sweep_points": benchmark_runs.MAX_SWEEP_POINTS})


@bp.get("/ui/benchmarks/<run_id>")
def benchmark(run_id):
    run = benchmark_runs.get_run(run_id)
    data = {**run.to_dict(full=True), "progress": benchmark_runs.progress(run)}
    return render_template("ui/benchmark.html", title=f"Benchmark {run.id}", run=data)
