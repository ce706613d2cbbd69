"""`pilotfish apply`: deploy or tear down the services a recipe declares."""
from __future__ import annotations

import time

import click

from .command import Failure, emit_json, main, note, portal_of, progress_line, table
from ..client import ENDED_STATES, PortalClientError, ServiceEnded, WaitTimeout


@main.command()
@click.argument("recipe_file", type=click.Path(dir_okay=False))
@click.option("--delete", is_flag=True, help="Tear down the services this recipe created.")
@click.option("--dry-run", is_flag=True, help="Validate the recipe and plan every service; submit nothing.")
@click.option("--timeout", default=900.0, show_default=True, help="Seconds to wait for the services to be ready.")
@click.option("--json", "as_json", is_flag=True, help="Print the services (or plans) as JSON.")
@click.pass_context
def apply(ctx, recipe_file, delete, dry_run, timeout, as_json):
    """Deploy the services a recipe declares and wait until all are RUNNING (or tear them down with --delete).

    A recipe (YAML or JSON) is `name` plus a list of `services`, each with kind, model and optionally
    tier or resources (partition, account, cpus, memory_gb, gpus), revision, time, count, name, engine_args,
    idle_timeout, renew, replicas, image. The student orchestrator's JSON (`job.infrastructure`, `job.service`) is
    read too. Services are named `<recipe name>-<index>` (or their own name), which is how --delete and a second
    apply find them. `pilotfish export ID` writes the recipe of a service that ran (its revision pinned).

    \b
    Example recipe (demo.yaml):
      name: demo
      services:
        - {kind: text-generation, model: Qwen/Qwen2.5-0.5B-Instruct, tier: Small, time: 60, count: 2}
    Examples:
      pilotfish apply demo.yaml
      pilotfish apply --delete demo.yaml
    """
    from ..recipes import RecipeError, load_recipe  # launching and the catalog: imported only when needed

    try:
        recipe = load_recipe(recipe_file)
    except RecipeError as exc:
        raise Failure(str(exc), 2)
    for warning in recipe.warnings:
        note(f"warning: {warning}")
    portal = portal_of(ctx)
    by_name = {}
    for service in portal.services():  # newest first: keep the newest of each name
        by_name.setdefault(service["name"], service)
    mine = {name: by_name[name] for name in recipe.names if name in by_name}
    if delete:
        _tear_down(portal, recipe, mine, as_json)
        return
    live = {name: s for name, s in mine.items() if s["state"] not in ENDED_STATES}
    plans = []
    for index, body in enumerate(recipe.launches):  # every service is planned before any is submitted
        body = dict(body)
        try:
            plans.append(portal.dry_run(body.pop("kind"), body.pop("model"), **body))
        except PortalClientError as exc:
            raise Failure(f"{recipe.launches[index]['name']}: {exc.message}", 2 if exc.status == 400 else 1)
    if dry_run:
        if as_json:
            emit_json(plans)
        else:
            for body, plan in zip(recipe.launches, plans):
                added = [" ".join(preset["flags"]) for preset in plan.get("presets") or [] if preset["applied"]]
                takes = ",".join(plan.get("model_modalities") or []) or "unknown input"
                click.echo(f"{body['name']}: {plan['kind']} {plan['model']} (taking {takes}) on "
                           f"{plan.get('tier') or 'explicit resources'}"
                           f" ({plan.get('tier_reason')}); sbatch {' '.join(plan['sbatch'])}"
                           + (f"; from the model: {'; '.join(added)}" if added else ""))
        return
    handles = []
    for body in recipe.launches:
        if body["name"] in live:
            note(f"{body['name']}: already {live[body['name']]['state']} as {live[body['name']]['id']}")
            handles.append(portal.service(live[body["name"]]["id"]))
            continue
        fields = dict(body)
        handle = portal.launch(fields.pop("kind"), fields.pop("model"), wait=False, **fields)
        note(f"{body['name']}: submitted as {handle.id}")
        handles.append(handle)
    deadline = time.monotonic() + timeout
    for handle in handles:
        try:
            handle.wait_for("RUNNING", max(deadline - time.monotonic(), 1),
                            on_change=progress_line(f"{handle.data['name']} {handle.id}"))
        except (ServiceEnded, WaitTimeout) as exc:
            raise Failure(f"{handle.data['name']}: {exc.message}")
    if as_json:
        emit_json([handle.data for handle in handles])
    else:
        table([[h.id, h.data["name"], h.data["model"], h.data["state"]] for h in handles], ["ID", "NAME", "MODEL", "STATE"])


def _tear_down(portal, recipe, mine, as_json):
    """Stop the recipe's live services, wait for them to end, and remove them all."""
    from ..client import ServiceHandle

    handles = [ServiceHandle(portal, data) for data in mine.values()]
    for handle in handles:
        if handle.data["state"] not in ENDED_STATES:
            handle.stop()
            note(f"{handle.data['name']}: stopping {handle.id}")
    for handle in handles:
        if handle.data["state"] not in ENDED_STATES:
            handle.wait_ended(120)
        handle.delete()
    if as_json:
        emit_json({"removed": [h.id for h in handles]})
    else:
        click.echo(f"removed {len(handles)} service(s) of recipe {recipe.name}")
