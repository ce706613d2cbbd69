"""REST routes for services and portal health."""
from __future__ import annotations

from flask import current_app, jsonify, request

from .. import services
from ..connection import portal_links
from ..errors import ValidationError
from ..reconciler import conditions
from .blueprint import bp, json_body



@bp.get("/health")
def health():
    """Unauthenticated liveness: says whether the portal and its scheduler answer, nothing more."""
    scheduler = conditions().get("scheduler")
    return jsonify(status="ok", scheduler="unreachable" if scheduler and not scheduler["ok"] else "ok")


@bp.get("/api")
def index():
    """What this portal offers, for a person or a script that lands on its root."""
    return jsonify(portal_links(request.script_root))


@bp.get("/api/status")
def status():
    scheduler = current_app.extensions["pilotfish.scheduler"]
    config = current_app.config["PILOTFISH"]
    try:
        leader = int(config.reconciler_lock.read_text().strip() or 0) or None
    except (FileNotFoundError, ValueError):
        leader = None
    return jsonify(scheduler=scheduler.describe(), conditions=conditions(), reconciler={"leader_pid": leader})


@bp.get("/api/services")
def list_services():
    found = services.list_services(request.args.get("state"))
    return jsonify(services=[service.to_dict() for service in found], conditions=conditions())


@bp.post("/api/services")
def create_service():
    """Launch a service; with ?dry_run=1, show the plan and job script without submitting anything."""
    if request.args.get("dry_run") in ("1", "true", "yes"):
        return jsonify(services.dry_run(json_body()))
    service = services.launch(json_body())
    return jsonify(service.to_dict(with_events=True)), 201


@bp.get("/api/services/<service_id>")
def get_service(service_id):
    return jsonify(services.get_service(service_id).to_dict(with_events=True))


@bp.get("/api/services/<service_id>/logs")
def service_logs(service_id):
    tail_text = request.args.get("tail", "200")
    if not tail_text.isdigit():
        raise ValidationError("tail", f"expected a number of lines, got {tail_text!r}")
    service = services.get_service(service_id)
    return jsonify(id=service.id, log=services.read_log(service, int(tail_text)))


@bp.get("/api/services/<service_id>/script")
def service_script(service_id):
    """The job script that was submitted for the service."""
    service = services.get_service(service_id)
    return jsonify(id=service.id, script=services.read_job_script(service))


@bp.post("/api/services/<service_id>/stop")
def stop_service(service_id):
    service = services.stop(services.get_service(service_id))
    return jsonify(service.to_dict(with_events=True)), 202 if service.is_live else 200


@bp.delete("/api/services")
def prune_services():
    """Remove every ended service (the `state=ENDED` filter is required, so a stray DELETE removes nothing)."""
    if (request.args.get("state") or "").upper() != "ENDED":
        raise ValidationError("state", "DELETE /api/services removes ended services only: add ?state=ENDED")
    return jsonify(deleted=services.prune())


@bp.delete("/api/services/<service_id>")
def delete_service(service_id):
    service = services.get_service(service_id)
    services.delete(service)
    return jsonify(deleted=service.id)
