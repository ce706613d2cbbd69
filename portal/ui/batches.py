"""The Batches page: batches with their progress, a form that uploads a JSONL file and starts a batch (through
/v1/files and /v1/batches, as the `openai` client does), and one batch's shards, jobs and events (portal/batches/)."""
from __future__ import annotations

from flask import current_app, g, render_template

from ..batches.batches import ENDED, batch_object, get_batch, list_batches
from ..batches.validation import ENDPOINT_KINDS
from ..catalog.tiers import all_tiers
from ..errors import PortalError
from ..launching import site_specs
from .blueprint import bp

LISTED = 100  # batches on the page, newest first (its script polls the same many)


@bp.get("/ui/batches")
def batches():
    found, _ = list_batches(g.principal, limit=LISTED)
    tiers, time_limits = [], None
    try:
        specs = site_specs(current_app.config["PILOTFISH"])
        tiers = [tier.ref for tier in all_tiers(specs)]
        time_limits = {"default": specs.time_default, "max": specs.time_max}
    except PortalError:  # a broken tiers file: the form still starts batches on the recommendation, or says why not
        pass
    # A live batch comes with its shards, so its row shows how many run; the script fetches them again as it polls.
    objects = [batch_object(batch, detail=batch.status not in ENDED)
               for batch in found]
    return render_template("ui/batches.html", title="Batches", batches=objects, listed=LISTED,
                           endpoints=list(ENDPOINT_KINDS), tiers=tiers, time_limits=time_limits)


@bp.get("/ui/batches/<batch_id>")
def batch(batch_id):
    found = batch_object(get_batch(batch_id, g.principal), detail=True)
    return render_template("ui/batch.html", title=f"Batch {found['id']}", batch=found)
