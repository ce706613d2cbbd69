"""REST routes for what can run: resource tiers and recommendations, the model inventory, downloads, images."""
from __future__ import annotations

from flask import current_app, jsonify, request

from ..catalog import inventory
from ..catalog.images import list_images, pins_from_runtimes
from ..catalog.models import delete_model, find_revision
from ..catalog.tiers import recommend, tiers_as_dicts
from ..errors import ValidationError
from ..launching import site_specs
from .blueprint import bp


def _config():
    return current_app.config["PILOTFISH"]


def _arguments():
    """How the portal's scheduler is asked for a tier's resources (shown with each tier)."""
    return current_app.extensions["pilotfish.scheduler"].arguments


@bp.get("/api/tiers")
def tiers():
    specs = site_specs(_config())
    return jsonify(tiers=tiers_as_dicts(specs, _arguments()),
                   time={"default": specs.time_default, "max": specs.time_max},
                   default_partition=specs.default_partition, source=str(specs.source))


@bp.get("/api/tiers/recommend")
def recommend_tier():
    model = request.args.get("model")
    if not model:
        raise ValidationError("model", "required, e.g. ?model=org/name")
    config = _config()
    found = find_revision(model, request.args.get("revision") or None, cache_dir=config.cache_dir,
                          home_dir=config.home_dir)
    specs = site_specs(config)
    partition = request.args.get("partition") or None
    if partition is not None and partition not in specs.partitions:
        raise ValidationError("partition", f"unknown partition {partition!r}; available: {', '.join(specs.partitions)}")
    choice = recommend(specs, found.repo_id, found.size_gb, partition)
    tier = next((t for t in tiers_as_dicts(specs, _arguments()) if choice.tier and t["ref"] == choice.tier.ref), None)
    return jsonify(model=found.repo_id, revision=found.revision, size_gb=round(found.size_gb, 3), kind=found.kind,
                   tier=tier, reason=choice.reason)


@bp.get("/api/models")
def models():
    app = current_app._get_current_object()
    refreshed = None
    if request.args.get("refresh") in ("1", "true", "yes"):
        refreshed = inventory.refresh_in_background(app, wait=5.0)  # never hold a request longer than that
    return jsonify(models=inventory.list_models(), refreshing=refreshed is False,
                   cache_dir=str(_config().cache_dir) if _config().cache_dir else None,
                   home_dir=str(_config().home_dir))


@bp.delete("/api/models/<path:repo_id>")
def remove_model(repo_id):
    config = _config()
    result = delete_model(repo_id, request.args.get("revision") or None, cache_dir=config.cache_dir,
                          home_dir=config.home_dir)
    inventory.refresh_inventory(current_app._get_current_object())
    return jsonify(result)


@bp.post("/api/models/downloads")
def start_download():
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ValidationError("body", "expected a JSON object such as {\"repo_id\": \"org/name\"}")
    unknown = set(body) - {"repo_id", "revision", "use_cache"}
    if unknown:
        raise ValidationError(sorted(unknown)[0], "unknown field (expected repo_id, revision, use_cache)")
    if "repo_id" not in body:
        raise ValidationError("repo_id", "required, e.g. org/name")
    if not isinstance(body.get("use_cache", False), bool):
        raise ValidationError("use_cache", "expected true or false")
    task = inventory.start_download(current_app._get_current_object(), body["repo_id"], body.get("revision"),
                                    body.get("use_cache", False))
    return jsonify(task), 202


@bp.get("/api/models/downloads")
def downloads():
    return jsonify(downloads=inventory.list_downloads())


@bp.get("/api/models/downloads/<task_id>")
def download(task_id):
    return jsonify(inventory.get_download(task_id))


@bp.delete("/api/models/downloads/<task_id>")
def cancel_download(task_id):
    return jsonify(inventory.cancel_download(current_app._get_current_object(), task_id))


@bp.get("/api/images")
def images():
    config = _config()
    return jsonify(images=list_images(cache_dir=config.cache_dir, home_dir=config.home_dir,
                                      pins=pins_from_runtimes(config.runtimes)))
