"""Pages for services: the dashboard, one service (timeline, what it cost, endpoints, log, job script) and its
playground."""
from __future__ import annotations

from flask import current_app, jsonify, render_template, request

from .. import services
from ..auth import prefers_html
from ..connection import portal_links, portal_url
from ..errors import UnavailableError
from ..catalog.inventory import model_modalities
from ..catalog.model_kinds import IMAGE
from ..launching import site_specs
from ..reconciler import conditions
from ..service_cost import cost_of
from .blueprint import bp


def _config():
    return current_app.config["PILOTFISH"]


def specs_problem():
    """The site's resource specs file problem in words, or None when the tiers can be used."""
    try:
        site_specs(_config())
    except UnavailableError as exc:
        return exc.message
    return None


def notebook_url():
    """The portal URL notebooks on the cluster use (from connection.json), or None when it is not known."""
    return portal_url(_config().home)


@bp.get("/")
def dashboard():
    """The user's services with live updates; scripts asking for JSON get the API's index (GET /api) instead."""
    if not prefers_html():
        return jsonify(portal_links(request.script_root))
    data = {"services": [service.to_dict() for service in services.list_services()], "conditions": conditions()}
    return render_template("ui/dashboard.html", title="Dashboard", data=data, specs_problem=specs_problem())


@bp.get("/ui/services/<service_id>")
def service(service_id):
    found = services.get_service(service_id)
    return render_template("ui/service.html", title=f"{found.name}", service=found.to_dict(with_events=True),
                           cost=cost_of(current_app._get_current_object(), found),
                           job_script=services.read_job_script(found), notebook_url=notebook_url(),
                           browser_url=request.script_root)  # a path: the page adds its own origin


@bp.get("/ui/services/<service_id>/playground")
def playground(service_id):
    found = services.get_service(service_id)
    config = _config()
    return render_template("ui/playground.html", title=f"Playground · {found.name}", service=found.to_dict(),
                           takes_images=IMAGE in model_modalities(found.model, found.revision),
                           max_upload_mb=config.max_upload_mb)
