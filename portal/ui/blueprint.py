"""The pages' blueprint and what every page shares: the navigation bar, template filters, error pages, and placing a
validation error next to its form control."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from flask import Blueprint, current_app, render_template, request, url_for
from werkzeug.exceptions import HTTPException

from ..catalog.models import human_bytes
from ..errors import PortalError, ValidationError

bp = Blueprint("ui", __name__)

# The navigation bar: (endpoint, label). A feature adds its page with one entry here.
NAV = [
    ("ui.dashboard", "Dashboard"),
    ("ui.launch", "Launch"),
    ("ui.batches", "Batches"),
    ("ui.benchmarks", "Benchmarks"),
    ("ui.models", "Models"),
    ("ui.images", "Images"),
    ("ui.cluster", "Cluster"),
    ("ui.usage", "Usage"),
    ("ui.keys", "API keys"),
]


def place_problem(exc: ValidationError, controls, errors: dict) -> Optional[str]:
    """Show a validation error next to its form control (in `errors`), or return its message for the page's alert.

    `controls` maps request fields to form controls; a nested field (resources.account) falls back to its top.
    """
    control = controls.get(exc.field) or controls.get(exc.field.split(".")[0])
    if control:
        errors[control] = exc.problem
        return None
    return exc.message


def static_url(filename: str) -> str:
    """The URL of a file in static/, with its modification time so a changed file is fetched again."""
    try:
        version = int(os.stat(Path(current_app.static_folder) / filename).st_mtime)
    except OSError:
        version = 0
    return url_for("static", filename=filename, v=version)


@bp.app_template_filter("bytes")
def bytes_filter(count) -> str:
    """A byte count as the Hub and the inventory show sizes: 2100000 -> 2.1 MB."""
    return "—" if count is None else human_bytes(int(count))


@bp.app_template_filter("parameters")
def parameters_filter(count) -> str:
    """A parameter count for people: 494032768 -> 494.0 M."""
    if not count:
        return "—"
    if count >= 1e9:
        return f"{count / 1e9:.1f} B"
    return f"{count / 1e6:.1f} M" if count >= 1e6 else f"{count:,}"


@bp.app_template_filter("resources")
def resources_filter(resources: dict) -> str:
    """A service's resources in words: 10 min, partition cpu, 1 CPU, 0.25 GB memory, 1 GPU (a100)."""
    words = []
    if resources.get("time"):
        words.append(f"{resources['time']} min")
    if resources.get("partition"):
        words.append(f"partition {resources['partition']}")
    if resources.get("account"):
        words.append(f"account {resources['account']}")
    if resources.get("cpus"):
        words.append(f"{resources['cpus']} CPU{'s' if resources['cpus'] != 1 else ''}")
    if resources.get("memory_gb"):
        words.append(f"{resources['memory_gb']:g} GB memory")
    if resources.get("gres"):
        words.append(f"GRES {resources['gres']}")
    elif resources.get("gpus"):
        kind = f" ({resources['gpu_type']})" if resources.get("gpu_type") else ""
        words.append(f"{resources['gpus']} GPU{'s' if resources['gpus'] != 1 else ''}{kind}")
    if resources.get("constraint"):
        words.append(f"constraint {resources['constraint']}")
    return ", ".join(words) or "—"


@bp.context_processor
def page_globals() -> dict:
    nav = [(endpoint, label) for endpoint, label in NAV if endpoint in current_app.view_functions]
    return {"nav": nav, "static_url": static_url, "base_url": request.script_root}


@bp.errorhandler(PortalError)
def portal_error(exc: PortalError):
    return render_template("ui/error.html", title="Problem", status=exc.status, message=exc.message), exc.status


@bp.errorhandler(HTTPException)
def http_error(exc: HTTPException):
    message = "There is no such page." if exc.code == 404 else exc.description
    return render_template("ui/error.html", title=exc.name, status=exc.code, message=message), exc.code or 500
