"""REST routes for services and portal health."""
from __future__ import annotations

from flask import current_app, g, jsonify, request

from .. import services
from ..connection import portal_links
from ..launching import LaunchBody
from ..reconciler import conditions
from ..service_cost import cost_of
from . import schemas, usage_schemas
from .blueprint import bp, json_body, query
from .openapi import described


@bp.get("/health")
@described("Liveness of the portal and its scheduler (no credential needed)", answers={200: schemas.Health},
           public=True)
def health():
    """Unauthenticated liveness: says whether the portal and its scheduler answer, nothing more."""
    scheduler = conditions().get("scheduler")
    return jsonify(status="ok", scheduler="unreachable" if scheduler and not scheduler["ok"] else "ok")


@bp.get("/api")
@described("What this portal offers: its links", answers={200: None})
def index():
    """What this portal offers, for a person or a script that lands on its root."""
    return jsonify(portal_links(request.script_root))


@bp.get("/api/status")
@described("The scheduler, the portal's conditions and the reconciler", answers={200: schemas.Status})
def status():
    scheduler = current_app.extensions["pilotfish.scheduler"]
    config = current_app.config["PILOTFISH"]
    try:
        leader = int(config.reconciler_lock.read_text().strip() or 0) or None
    except (FileNotFoundError, ValueError):
        leader = None
    return jsonify(scheduler=scheduler.describe(), conditions=conditions(), reconciler={"leader_pid": leader})


@bp.get("/api/services")
@described("Services, newest first", query=schemas.ServicesQuery, answers={200: schemas.Services}, errors=(400,))
def list_services():
    found = services.list_services(query(schemas.ServicesQuery).state)
    return jsonify(services=[service.to_dict() for service in found], conditions=conditions())


@bp.post("/api/services")
@described("Launch a service; with ?dry_run=true, the plan and job script without submitting anything",
           query=schemas.DryRunQuery, body=LaunchBody, answers={200: schemas.DryRun, 201: schemas.Service},
           errors=(400, 403, 404, 409, 422, 503))
def create_service():
    """Launch a service; with ?dry_run=1, show the plan and job script without submitting anything."""
    dry = query(schemas.DryRunQuery).dry_run
    body = json_body(example='{"kind": "text-generation", "model": "org/name"}')  # LaunchBody: checked by launching
    if dry:
        return jsonify(services.dry_run(body, g.principal))
    service = services.launch(body, g.principal)
    return jsonify(service.to_dict(with_events=True)), 201


@bp.get("/api/services/<service_id>")
@described("A service with its events", answers={200: schemas.Service}, errors=(404,))
def get_service(service_id):
    return jsonify(services.get_service(service_id).to_dict(with_events=True))


@bp.get("/api/services/<service_id>/logs")
@described("The end of a service's log", query=schemas.LogsQuery, answers={200: schemas.Log}, errors=(400, 404))
def service_logs(service_id):
    tail = query(schemas.LogsQuery).tail
    service = services.get_service(service_id)
    return jsonify(id=service.id, log=services.read_log(service, tail))


@bp.get("/api/services/<service_id>/script")
@described("The job script submitted for a service", answers={200: schemas.Script}, errors=(404,))
def service_script(service_id):
    """The job script that was submitted for the service."""
    service = services.get_service(service_id)
    return jsonify(id=service.id, script=services.read_job_script(service))


@bp.get("/api/services/<service_id>/provenance")
@described("What a service runs: the model's revision and file sha256s, the engine and its version, the image's "
           "digest, the server and scheduler arguments; a recipe that launches it again and a methods paragraph",
           answers={200: schemas.Provenance}, errors=(404,))
def service_provenance(service_id):
    """Recorded at launch; sha256s of files without a blob name are computed at the first read, then stored."""
    return jsonify(services.read_provenance(services.get_service(service_id)))


@bp.get("/api/services/<service_id>/cost")
@described("What a service cost: GPU-hours and CPU-hours of each of its jobs (Slurm's accounting, else the jobs' "
           "times x their allocation), its tokens, tokens per GPU-hour and the share of its time it was idle",
           answers={200: usage_schemas.Cost}, errors=(404,))
def service_cost(service_id):
    """sacct is waited on for at most 2 s (cached 30 s); past that, or when it fails, the job times count."""
    return jsonify(cost_of(current_app._get_current_object(), services.get_service(service_id)))


@bp.post("/api/services/<service_id>/stop")
@described("Stop a service (202 while its job ends)", answers={200: schemas.Service, 202: schemas.Service},
           errors=(404, 409, 503))
def stop_service(service_id):
    service = services.stop(services.get_service(service_id))
    return jsonify(service.to_dict(with_events=True)), 202 if service.is_live else 200


@bp.post("/api/services/<service_id>/lease")
@described("Renew a service's lease from now (a notebook's heartbeat)", answers={200: schemas.Service},
           errors=(404, 409))
def renew_lease(service_id):
    """Renew the lease of a service launched with one: it lives on for the lease's length from now."""
    return jsonify(services.renew_lease(services.get_service(service_id)).to_dict())


@bp.delete("/api/services")
@described("Remove every ended service (?state=ENDED is required)", query=schemas.PruneQuery,
           answers={200: schemas.Deleted}, errors=(400,))
def prune_services():
    """Remove every ended service (the `state=ENDED` filter is required, so a stray DELETE removes nothing)."""
    query(schemas.PruneQuery)
    return jsonify(deleted=services.prune())


@bp.delete("/api/services/<service_id>")
@described("Delete a service (stopping it first)", answers={200: schemas.Deleted}, errors=(404, 409, 503))
def delete_service(service_id):
    service = services.get_service(service_id)
    services.delete(service)
    return jsonify(deleted=service.id)
