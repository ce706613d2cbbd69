"""REST routes for what can run: resource tiers and recommendations, the model inventory, downloads, images."""
from __future__ import annotations

from datetime import datetime, timezone

from flask import current_app, jsonify

from ..catalog import inventory
from ..catalog.images import list_images, pins_from_runtimes
from ..catalog.models import delete_model, find_revision
from ..catalog.start_times import fitting_tiers, sooner_advice, tier_starts
from ..catalog.tiers import recommend, tiers_as_dicts
from ..errors import ValidationError
from ..launch_options import LaunchOptionsQuery, launch_options as options_for
from ..launching import site_specs
from . import schemas
from .blueprint import bp, json_body, query
from .openapi import described


def _config():
    return current_app.config["PILOTFISH"]


def _arguments():
    """How the portal's scheduler is asked for a tier's resources (shown with each tier)."""
    return current_app.extensions["pilotfish.scheduler"].arguments


@bp.get("/api/tiers")
@described("The site's resource tiers and time limits", answers={200: schemas.Tiers}, errors=(503,))
def tiers():
    specs = site_specs(_config())
    return jsonify(tiers=tiers_as_dicts(specs, _arguments()),
                   time={"default": specs.time_default, "max": specs.time_max},
                   default_partition=specs.default_partition, source=str(specs.source))


@bp.get("/api/tiers/recommend")
@described("The tier recommended for a model, when each tier that fits would start (the scheduler's estimate), and "
           "a tier that would start sooner", query=schemas.RecommendQuery, answers={200: schemas.Recommendation},
           errors=(400, 404, 503))
def recommend_tier():
    asked = query(schemas.RecommendQuery)
    config = _config()
    found = find_revision(asked.model, asked.revision, cache_dir=config.cache_dir, home_dir=config.home_dir)
    specs = site_specs(config)
    partition = asked.partition
    if partition is not None and partition not in specs.partitions:
        raise ValidationError("partition", f"unknown partition {partition!r}; available: {', '.join(specs.partitions)}")
    choice = recommend(specs, found.repo_id, found.size_gb, partition)
    tier = next((t for t in tiers_as_dicts(specs, _arguments()) if choice.tier and t["ref"] == choice.tier.ref), None)
    fitting = fitting_tiers(specs, found.size_gb, choice.tier)
    starts = tier_starts(current_app._get_current_object(), specs, fitting)
    now = datetime.now(timezone.utc)
    if tier is not None:
        tier["start"] = starts[tier["ref"]].as_dict(now)
    return jsonify(model=found.repo_id, revision=found.revision, size_gb=round(found.size_gb, 3), kind=found.kind,
                   tier=tier, reason=choice.reason,
                   fitting=[{"ref": t.ref, "partition": t.partition, "name": t.name,
                             "start": starts[t.ref].as_dict(now)} for t in fitting],
                   sooner=sooner_advice(choice.tier, starts, now) if choice.tier else None)


@bp.get("/api/launch-options")
@described("What a launch of a model as a kind gets: the kinds it can be launched as, its engine, the flags it gets "
           "from what it is (presets) and the engine flags that apply to the kind", query=LaunchOptionsQuery,
           answers={200: schemas.LaunchOptions}, errors=(400,))
def launch_options():
    asked = query(LaunchOptionsQuery)
    return jsonify(options_for(current_app.extensions["pilotfish.site"], asked.model, asked.revision, asked.kind,
                               adapters=inventory.adapters_of(asked.model)))


@bp.get("/api/models")
@described("The model inventory (cache_dir and home_dir); ?refresh=true scans again", query=schemas.ModelsQuery,
           answers={200: schemas.Models}, errors=(400,))
def models():
    app = current_app._get_current_object()
    refreshed = None
    if query(schemas.ModelsQuery).refresh:
        refreshed = inventory.refresh_in_background(app, wait=5.0)  # never hold a request longer than that
    return jsonify(models=inventory.list_models(), refreshing=refreshed is False,
                   cache_dir=str(_config().cache_dir) if _config().cache_dir else None,
                   home_dir=str(_config().home_dir))


@bp.delete("/api/models/<org>/<name>")
@described("Delete a model org/name (or one revision) from home_dir", query=schemas.RevisionQuery, answers={200: None},
           errors=(400, 403, 404, 409), path_patterns={"org": schemas.REPO_PART, "name": schemas.REPO_PART})
def remove_model(org, name):
    repo_id = f"{org}/{name}"
    config = _config()
    result = delete_model(repo_id, query(schemas.RevisionQuery).revision, cache_dir=config.cache_dir,
                          home_dir=config.home_dir)
    inventory.refresh_inventory(current_app._get_current_object())
    return jsonify(result)


@bp.post("/api/models/downloads")
@described("Download a model from the Hub (it runs in a process of its own)", body=schemas.DownloadBody,
           answers={202: schemas.Download}, errors=(400, 409, 503))
def start_download():
    body = json_body(schemas.DownloadBody, example='{"repo_id": "org/name"}')
    task = inventory.start_download(current_app._get_current_object(), body.repo_id, body.revision, body.use_cache)
    return jsonify(task), 202


@bp.get("/api/models/downloads")
@described("Downloads, with their progress", answers={200: schemas.Downloads})
def downloads():
    return jsonify(downloads=inventory.list_downloads())


@bp.get("/api/models/downloads/<task_id>")
@described("One download", answers={200: schemas.Download}, errors=(404,))
def download(task_id):
    return jsonify(inventory.get_download(task_id))


@bp.delete("/api/models/downloads/<task_id>")
@described("Cancel a download", answers={200: schemas.Download}, errors=(404, 409))
def cancel_download(task_id):
    return jsonify(inventory.cancel_download(current_app._get_current_object(), task_id))


@bp.get("/api/images")
@described("Container images staged for the engines", answers={200: schemas.Images})
def images():
    config = _config()
    return jsonify(images=list_images(cache_dir=config.cache_dir, home_dir=config.home_dir,
                                      pins=pins_from_runtimes(config.runtimes)))
