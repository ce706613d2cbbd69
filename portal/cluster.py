"""The cluster as its user sees it: the scheduler's partitions (free nodes, CPUs and GPUs) and the user's queue, each
job linked to the service it runs. GET /api/cluster, the Cluster page and `pilotfish cluster` show this."""
from __future__ import annotations

from flask import current_app

from . import services
from .errors import UnavailableError
from .models import Service, State
from .scheduler import SchedulerUnreachable


def cluster_overview() -> dict:
    """The scheduler's overview, each job of the queue linked to the service it runs (service_id) if any.

    UnavailableError when the scheduler does not answer."""
    scheduler = current_app.extensions["pilotfish.scheduler"]
    live = Service.query.filter(Service.state.in_(State.LIVE), Service.job_id.isnot(None)).all()
    try:
        overview = scheduler.overview(services.job_query(service) for service in live)
    except SchedulerUnreachable as exc:
        raise UnavailableError(f"the scheduler does not answer: {exc}")
    by_job = {(service.job_id, services.job_name(service)): service.id for service in live}
    for job in overview["queue"]:
        job["service_id"] = by_job.get((job["job_id"], job["name"]))
    return {"scheduler": scheduler.name, **overview}
