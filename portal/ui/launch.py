"""The launch page: a form whose fields become the API's launch request; the launch functions check it."""
from __future__ import annotations

import shlex
from datetime import datetime, timezone

from flask import current_app, g, redirect, render_template, request, url_for

from .. import services
from ..catalog import inventory
from ..catalog.kinds import KINDS
from ..catalog.start_times import PAGE_WAIT, tier_starts
from ..catalog.tiers import all_tiers, tiers_as_dicts
from ..client import replicas_value
from ..errors import PortalError, RejectedError, UnavailableError, ValidationError
from ..launching import site_specs
from .blueprint import bp, place_problem

FORM_FIELDS = ("kind", "model", "revision", "adapters", "tier", "recommended_tier", "time", "idle_timeout", "renew", "renew_until",
               "replicas", "target_in_flight", "name", "engine_args", "account", "force")
# Fields of the launch request shown by a control of the form (others are reported above the form).
FIELD_CONTROLS = {"kind": "kind", "model": "model", "revision": "revision", "adapters": "adapters", "tier": "tier", "time": "time",
                  "idle_timeout": "idle_timeout", "renew": "renew_until", "replicas": "replicas", "name": "name",
                  "engine_args": "engine_args", "resources.account": "account", "force": "force"}


def launch_request(form) -> dict:
    """The launch request (as the API takes it) from the form's fields.

    The tier is left out when it is the recommended one, so the service records the recommendation's reason.
    Renewal: the "until" field as written (it implies renewal), else true when the box is ticked. Replicas: the count
    as written (2, 1:3), or with a target of requests in flight per job the object {min, max, target_in_flight}.
    """
    body = {"kind": form.get("kind") or None, "model": (form.get("model") or "").strip() or None}
    if form.getlist("adapters"):  # the adapters ticked (the page offers the model's own)
        body["adapters"] = form.getlist("adapters")
    for key in ("revision", "name", "time", "idle_timeout"):
        value = (form.get(key) or "").strip()
        if value:
            body[key] = value
    tier = form.get("tier") or ""
    if tier and tier != form.get("recommended_tier"):
        body["tier"] = tier
    try:
        body["engine_args"] = shlex.split(form.get("engine_args") or "")
    except ValueError as exc:
        raise ValidationError("engine_args", f"cannot split into arguments: {exc} (close the quotes)")
    account = (form.get("account") or "").strip()
    if account:
        body["resources"] = {"account": account}
    if form.get("force"):
        body["force"] = True
    renew_until = (form.get("renew_until") or "").strip()
    if renew_until:
        body["renew"] = renew_until
    elif form.get("renew"):
        body["renew"] = True
    replicas = (form.get("replicas") or "").strip()
    target = (form.get("target_in_flight") or "").strip()
    if replicas or target:  # a target alone is sent with an empty count, which the launch refuses naming replicas
        body["replicas"] = replicas_value(replicas, target or None)
    return body


@bp.route("/ui/launch", methods=["GET", "POST"])
def launch():
    source = request.form if request.method == "POST" else request.args
    values = {key: source.get(key, "") for key in FORM_FIELDS}
    values["adapters"] = source.getlist("adapters")
    errors, alert, plan, failed = {}, None, None, None
    if request.method == "POST":
        try:
            body = launch_request(request.form)
            if request.form.get("action") == "check":
                plan = services.dry_run(body, g.principal)
            else:
                service = services.launch(body, g.principal)
                return redirect(url_for("ui.service", service_id=service.id), code=303)
        except ValidationError as exc:
            alert = place_problem(exc, FIELD_CONTROLS, errors)
        except RejectedError as exc:
            alert, failed = exc.message, exc.extra.get("service")
        except PortalError as exc:
            alert = exc.message
    config = current_app.config["PILOTFISH"]
    tiers, time_limits, specs_problem = [], None, None
    try:
        specs = site_specs(config)
        tiers = tiers_as_dicts(specs, current_app.extensions["pilotfish.scheduler"].arguments)
        starts = tier_starts(current_app._get_current_object(), specs, all_tiers(specs), wait_for=PAGE_WAIT)
        now = datetime.now(timezone.utc)
        for tier in tiers:
            tier["start"] = starts[tier["ref"]].as_dict(now)
        time_limits = {"default": specs.time_default, "max": specs.time_max}
    except UnavailableError as exc:
        specs_problem = exc.message
    # A form shown again with its problems is a page like any other (200), as browsers expect of forms.
    return render_template(
        "ui/launch.html", title="Launch a service", values=values, errors=errors, alert=alert, plan=plan,
        failed=failed, kinds=list(KINDS.values()), models=inventory.list_models(), tiers=tiers,
        time_limits=time_limits, specs_problem=specs_problem, idle_default=config.idle_timeout)
