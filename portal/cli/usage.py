"""`pilotfish usage`: who used what (GET /api/usage), and a service's cost in words for `pilotfish details`."""
from __future__ import annotations

import click

from .command import emit_json, main, portal_of, table

GROUPS = {"key": "principal", "model": "model", "day": "day", "service": "service"}  # --by -> the API's `by`
FIGURES = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens")


@main.command()
@click.option("--by", type=click.Choice(sorted(GROUPS)), default="key", show_default=True,
              help="What each row is: a key (the principal: owner or key:<name>), a model, a UTC day or a service.")
@click.option("--since", metavar="DAY", help="The first UTC day: a date (2026-12-01) or a span back from today (7d, "
                                             "2w). Default: the first day with usage.")
@click.option("--until", metavar="DAY", help="The last UTC day, included (as --since). Default: today.")
@click.option("--principal", metavar="WHO", help="Only this principal's rows: owner or key:<name>.")
@click.option("--model", metavar="REPO", help="Only this model's rows.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (GET /api/usage) for scripts.")
@click.pass_context
def usage(ctx, by, since, until, principal, model, as_json):
    """Requests, errors and tokens (prompt, completion, total) through the portal, per key, model, day or service,
    with the totals. The portal owner sees everyone's; an API key only its own.

    \b
    Examples:
      pilotfish usage                         # per key, every day with usage
      pilotfish usage --by model --since 7d   # per model, the last 7 days (UTC) and today
      pilotfish usage --by day --since 2026-12-01 --until 2026-12-07 --principal key:laptop
    """
    params = {"by": GROUPS[by], "since": since, "until": until, "principal": principal, "model": model}
    data = portal_of(ctx).get("/api/usage", **params)
    if as_json:
        emit_json(data)
        return
    span = f"{data.get('since') or 'the first day'} to {data.get('until') or 'today'} (UTC)"
    if not data["rows"]:
        click.echo(f"no usage from {span}")
        return
    name = data["by"]
    headers = [{"principal": "KEY"}.get(name, name.upper())] + (["NAME"] if name == "service" else []) + \
        ["REQUESTS", "ERRORS", "PROMPT TOKENS", "COMPLETION TOKENS", "TOTAL TOKENS"]
    rows = [[row[name]] + ([row.get("name") or "-"] if name == "service" else []) + [row[f] for f in FIGURES]
            for row in data["rows"]]
    totals = data["totals"]
    rows.append(["total"] + ([""] if name == "service" else []) + [totals[f] for f in FIGURES])
    table(rows, headers)
    click.echo(f"\nfrom {span}")


def cost_lines(cost: dict) -> list:
    """A service's cost for people: its hours (and where they come from), tokens, tokens per GPU-hour and idle
    share, then one line per job."""
    tokens = cost.get("tokens") or {}
    per_gpu_hour = cost.get("tokens_per_gpu_hour")
    idle = cost.get("idle_share")
    source = cost.get("source")
    if cost.get("accounting_problem"):
        source = f"{source}; sacct: {cost['accounting_problem']}"
    lines = [f"{cost['gpu_hours']:.4f} GPU-hours, {cost['cpu_hours']:.4f} CPU-hours ({source})",
             f"{tokens.get('total', 0)} tokens ({tokens.get('prompt', 0)} prompt, {tokens.get('completion', 0)} "
             f"completion), " + (f"{per_gpu_hour:g} per GPU-hour" if per_gpu_hour is not None else "no GPUs"),
             "idle " + (f"{idle:.0%} of its running time" if idle is not None else "-: it has not run")]
    for job in cost.get("jobs") or []:
        lines.append(f"  generation {job['generation']}  job {job.get('job_id') or '-'}  {job['seconds']:.0f} s x "
                     f"{job['cpus']} CPUs, {job['gpus']} GPUs" + ("  (running)" if job.get("running") else "")
                     + f"  [{job['source']}]")
    return lines
