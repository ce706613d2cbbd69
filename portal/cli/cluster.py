"""`pilotfish cluster`: partitions, free nodes and GPUs, and your queue, as the portal's scheduler sees them."""
from __future__ import annotations

import click

from .command import emit_json, main, portal_of, table


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (GET /api/cluster) instead of tables.")
@click.pass_context
def cluster(ctx, as_json: bool):
    """Partitions (idle nodes, free CPUs and GPUs) and your jobs, each linked to its service.

    Example: pilotfish cluster
    """
    data = portal_of(ctx).request("GET", "/api/cluster").json()
    if as_json:
        emit_json(data)
        return
    table([[p["name"] + ("*" if p.get("default") else ""), p.get("available"), p.get("time_limit"),
            f"{p.get('nodes_idle')}/{p.get('nodes')}", f"{p.get('cpus_idle')}/{p.get('cpus_total')}",
            f"{p.get('gpus_free')}/{p.get('gpus_total')}" + (f" ({','.join(p['gpu_types'])})" if p.get("gpu_types") else "")]
           for p in data.get("partitions", [])],
          ["PARTITION", "STATE", "TIME LIMIT", "IDLE NODES", "FREE CPUS", "FREE GPUS"])
    queue = data.get("queue", [])
    click.echo("")
    if not queue:
        click.echo(f"no jobs of yours in the queue ({data.get('scheduler')})")
        return
    table([[job["job_id"], job.get("service_id") or "-", job.get("name"), job.get("partition"), job.get("state"),
            job.get("time"), job.get("time_limit"), job.get("where")] for job in queue],
          ["JOB", "SERVICE", "NAME", "PARTITION", "STATE", "TIME", "LIMIT", "NODE/REASON"])
