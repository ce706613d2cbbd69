"""Pages for what can run and where: the model inventory and downloads, container images, the cluster, API keys."""
from __future__ import annotations

from flask import current_app, render_template

from ..auth import require_owner
from ..catalog import inventory
from ..catalog.images import list_images, pins_from_runtimes
from ..cluster import cluster_overview
from ..errors import UnavailableError
from ..keys import list_api_keys
from .blueprint import bp


def _config():
    return current_app.config["PILOTFISH"]


@bp.get("/ui/models")
def models():
    config = _config()
    entries = inventory.list_models()
    locations = []
    places = (("cache", "Site cache", config.cache_dir), ("home", "Your models", config.home_dir))
    for location, label, folder in places:
        if folder is None:
            continue
        rows = [{**entry, "revisions": [r for r in entry["revisions"] if r.get("location") == location]}
                for entry in entries]
        locations.append({"name": location, "label": label, "folder": str(folder / "models"),
                          "models": [row for row in rows if row["revisions"]]})
    return render_template("ui/models.html", title="Models", locations=locations,
                           downloads=inventory.list_downloads())


@bp.get("/ui/images")
def images():
    config = _config()
    return render_template("ui/images.html", title="Container images",
                           images=list_images(cache_dir=config.cache_dir, home_dir=config.home_dir,
                                              pins=pins_from_runtimes(config.runtimes)))


@bp.get("/ui/cluster")
def cluster():
    try:
        overview, problem = cluster_overview(), None
    except UnavailableError as exc:
        overview, problem = None, exc.message
    return render_template("ui/cluster.html", title="Cluster", overview=overview, problem=problem)


@bp.get("/ui/keys")
def keys():
    require_owner()
    return render_template("ui/keys.html", title="API keys", keys=[key.to_dict() for key in list_api_keys()],
                           models=[entry["repo_id"] for entry in inventory.list_models()])
