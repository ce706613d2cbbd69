"""`pilotfish start|status|run|ls|details|export|logs|stop|rm|prune`: the portal and its services (`details` with
what a service cost)."""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time

import click

from .command import (Failure, KINDS, age, emit_json, fail, main, portal_of, progress_line, renewal, replicas, table,
                      until)
from .usage import cost_lines
from ..client import ENDED_STATES, LIVE_STATES, ServiceEnded, WaitTimeout, replicas_value
from ..config import ConfigError, ensure_token, load_config, prepare_home, use_private_umask
from ..connection import write_connection


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 to accept callers from other nodes).")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64), help="gunicorn worker processes.")
def start(host: str, port: int, workers: int):
    """Run the portal under gunicorn (outside Open OnDemand; inside it, the app starts the portal for you).

    Settings come from PILOTFISH_HOME (default ~/.pilotfish) and the site config named by
    PILOTFISH_SITE_CONFIG. The portal token is read from, or generated into, PILOTFISH_HOME/token (0600).

    Example: pilotfish start --host 0.0.0.0 --port 8765
    """
    from ..site import build_site  # the catalog and the engines: imported only for the commands that use them

    use_private_umask()  # the token, connection.json and what gunicorn and the workers create: the user's alone
    try:
        config = load_config()
        build_site(config)  # what the site config means: a bad entry stops here, in one line, before any worker
        prepare_home(config)
        token = ensure_token(config)  # before forking workers, so they all read the same token
    except ConfigError as exc:
        fail(str(exc), 2)
    connection = write_connection(config.home, host, port, token, config.url_prefix)
    click.echo(f"pilotfish: portal on http://{host}:{port}{config.url_prefix} "
               f"(token in {config.token_file}; notebooks read {connection})", err=True)
    env = dict(os.environ, PILOTFISH_WORKERS=str(workers), PILOTFISH_HOME=str(config.home))
    args = [sys.executable, "-m", "gunicorn", "--config", "python:portal.gunicorn_conf", "--bind", f"{host}:{port}"]
    os.execve(sys.executable, args, env)


# --- the portal --------------------------------------------------------------------------------------------

@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def status(ctx, as_json):
    """Where the portal is, whether the scheduler answers, and how many services are in each state.

    Example: pilotfish status
    """
    portal = portal_of(ctx)
    info = portal.status()
    services = portal.services()
    counts = {}
    for service in services:
        counts[service["state"]] = counts.get(service["state"], 0) + 1
    scheduler = (info.get("conditions") or {}).get("scheduler") or {"ok": True}
    if as_json:
        emit_json({"url": portal.url, "scheduler": info.get("scheduler"), "conditions": info.get("conditions"),
                   "services": counts})
        return
    click.echo(f"portal     {portal.url}")
    described = info.get("scheduler") or {}
    kind = described.get("kind") or described.get("name") or "scheduler"
    click.echo(f"scheduler  {kind}: {'ok' if scheduler.get('ok') else 'UNREACHABLE: ' + str(scheduler.get('message'))}")
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none"
    click.echo(f"services   {summary}")


@main.command()
@click.argument("kind", type=click.Choice(KINDS), metavar="KIND")
@click.option("--model", required=True, help="Model repo id, e.g. Qwen/Qwen2.5-0.5B-Instruct (see `pilotfish models ls`).")
@click.option("--revision", help="Branch, tag or commit of the model (default: the newest local one).")
@click.option("--adapter", "adapters", multiple=True, metavar="REPO[@REV]",
              help="A local LoRA adapter of the model to serve beside it under its repo id; REPO@REV pins its "
                   "revision (repeat for more; see `pilotfish models options MODEL`).")
@click.option("--tier", help="Resource tier, e.g. Small or gpu.Small (default: the recommendation; see `pilotfish tiers`).")
@click.option("--time", "time_limit", help="Time limit: minutes or HH:MM:SS (default: the site's).")
@click.option("--name", help="A name for the service.")
@click.option("--idle", "idle_timeout", metavar="DURATION",
              help="Stop it after this long without a request: minutes or 30m, 1h, 1h30m; 0 or off: never "
                   "(default: the tier's, else the site's, else never).")
@click.option("--renew", is_flag=True,
              help="Renew it before each job's time limit, until stopped: a successor job takes over (same id and "
                   "URLs) once it answers, and the old job finishes its open requests.")
@click.option("--renew-until", metavar="DURATION|TIME",
              help="Renew it (as --renew) until then: how long it lives in all (8h, 2d, 1h30m) or when it ends "
                   "(2026-12-01T18:00, the portal's local time, or with Z or an offset).")
@click.option("--replicas", "replica_count", metavar="N|MIN:MAX",
              help="Serve it from several jobs behind the same id and URLs, each request to the least busy: 2 keeps "
                   "two jobs; 1:3 one to three (a job added while requests in flight per job stay above the target, "
                   "one removed after a quiet spell); 0:2 gives up its last job while unused and starts one at the "
                   "next request.")
@click.option("--target-in-flight", type=int, metavar="N",
              help="With --replicas MIN:MAX: requests in flight per job above which a job is added (default 4).")
@click.option("--partition", help="Override the tier's partition.")
@click.option("--account", help="Slurm account to charge.")
@click.option("--memory-gb", type=float, help="Override the tier's memory.")
@click.option("--cpus", type=int, help="Override the tier's CPU cores.")
@click.option("--gpus", type=int, help="Override the tier's GPU count.")
@click.option("--force", is_flag=True, help="Launch even on a tier smaller than the model.")
@click.option("--dry-run", is_flag=True, help="Print the job script and sbatch arguments; submit nothing.")
@click.option("--wait", is_flag=True, help="Block until RUNNING, printing state changes on stderr.")
@click.option("--timeout", default=900.0, show_default=True, help="Seconds --wait waits.")
@click.option("--json", "as_json", is_flag=True, help="Print the service (or the dry-run plan) as JSON.")
@click.argument("engine_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(ctx, kind, model, revision, adapters, tier, time_limit, name, idle_timeout, renew, renew_until,
        replica_count, target_in_flight, partition, account, memory_gb, cpus, gpus, force, dry_run, wait, timeout,
        as_json, engine_args):
    """Launch a service and print its id. Engine flags go after `--`.

    \b
    Examples:
      pilotfish run text-generation --model Qwen/Qwen2.5-0.5B-Instruct --tier Small --time 60
      pilotfish run text-generation --model Qwen/Qwen2.5-0.5B-Instruct --idle 30m
      pilotfish run text-generation --model Qwen/Qwen2.5-0.5B-Instruct --time 60 --renew-until 8h
      pilotfish run text-generation --model Qwen/Qwen2.5-0.5B-Instruct --replicas 1:3 --target-in-flight 8
      pilotfish run text-generation --model Qwen/Qwen2.5-0.5B-Instruct --adapter me/qwen-lora-legal
      pilotfish run text-generation --model Qwen/Qwen2.5-0.5B-Instruct --wait -- --max-model-len 4096
      pilotfish run speech-recognition --model Systran/faster-whisper-small --dry-run
      pilotfish run text-embedding --model BAAI/bge-small-en-v1.5

    What a model is and which engine flags apply to it: `pilotfish models options MODEL`.
    """
    if target_in_flight is not None and replica_count is None:
        raise click.UsageError("--target-in-flight needs --replicas MIN:MAX", ctx)
    portal = portal_of(ctx)
    resources = {key: value for key, value in (("partition", partition), ("account", account),
                                               ("memory_gb", memory_gb), ("cpus", cpus), ("gpus", gpus))
                 if value is not None}
    fields = {"revision": revision, "time": time_limit, "name": name, "idle_timeout": idle_timeout,
              "renew": renew_until or (True if renew else None),
              "replicas": replicas_value(replica_count, target_in_flight), "resources": resources or None,
              "engine_args": list(engine_args) or None, "force": force or None, "adapters": list(adapters) or None}
    if dry_run:
        plan = portal.dry_run(kind, model, tier=tier, **fields)
        if as_json:
            emit_json(plan)
            return
        click.echo(plan["job_script"].rstrip("\n"))
        renewed = plan.get("renew")
        click.echo(f"# --- dry run: nothing submitted; tier {plan.get('tier')}: {plan.get('tier_reason')}; "
                   f"{plan.get('idle_timeout_reason')}"
                   + (f"; renewed before its time limit {'until stopped' if renewed is True else f'({renewed})'}"
                      if renewed else "")
                   + (f"; replicas: {replicas(plan)}" if plan.get("replicas") else ""))
        click.echo("# sbatch " + " ".join(shlex.quote(arg) for arg in plan["sbatch"]))
        click.echo(f"# the model: {plan['kind']}, taking {', '.join(plan.get('model_modalities') or ['unknown input'])}")
        for preset in plan.get("presets") or []:
            click.echo(f"# from the model ({preset['purpose']}): {' '.join(preset['flags'])} "
                       + (f"({preset['reason']})" if preset["applied"] else "(replaced by your engine options)"))
        return
    handle = portal.launch(kind, model, tier=tier, wait=False, **fields)
    if as_json and not wait:
        emit_json(handle.data)
        return
    if not as_json:
        click.echo(handle.id)
        sys.stdout.flush()
    if wait:
        try:
            data = handle.wait_for("RUNNING", timeout, on_change=progress_line(handle.id))
        except ServiceEnded as exc:
            raise Failure(exc.message)
        except WaitTimeout as exc:
            raise Failure(f"{exc.message}; it keeps going: `pilotfish stop {handle.id}` to cancel it")
        if as_json:
            emit_json(data)


@main.command(name="ls")
@click.option("--all", "show_all", is_flag=True, help="Include ended services.")
@click.option("--state", help="Only these states, e.g. RUNNING,PENDING (or LIVE, ENDED).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def list_services(ctx, show_all, state, as_json):
    """List services, newest first (by default only live ones). STOPS IN: when an unused service stops (its idle
    timeout or lease), if nobody uses it. REPLICAS: how many jobs serve a service with replicas, of how many it may
    run (1 of 1:3). RENEWS: until when a renewed service's jobs are replaced before their time
    limit, and the current job's generation.

    Example: pilotfish ls --state RUNNING --json
    """
    services = portal_of(ctx).services(state or (None if show_all else "LIVE"))
    if as_json:
        emit_json(services)
        return
    table([[s["id"], s["name"], s["kind"], s["model"], s["tier"] or "", s["state"], s["job_id"] or "",
            replicas(s, short=True) if s["state"] in LIVE_STATES else "", age(s["created_at"]),
            until(s.get("stops_at")), renewal(s, short=True) if s["state"] in LIVE_STATES else ""]
           for s in services],
          ["ID", "NAME", "KIND", "MODEL", "TIER", "STATE", "JOB", "REPLICAS", "AGE", "STOPS IN", "RENEWS"])


@main.command()
@click.argument("service_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def details(ctx, service_id, as_json):
    """One service (ID or any unique prefix of it): state, job, resources, idle stop and lease (and when it stops if
    unused), replicas (how many jobs serve of how many it may run), renewal (until when, the current job's
    generation), what it cost (GPU-hours and CPU-hours of each job from Slurm's accounting, else from the job's
    times; tokens, tokens per GPU-hour, idle share), the service's other jobs (a renewal's successor, replicas
    starting or serving, the draining and the ended ones), phase timings and events. --json adds `cost`.

    Example: pilotfish details 3fa2
    """
    data = portal_of(ctx).service(service_id).refresh()
    cost = portal_of(ctx).get(f"/api/services/{data['id']}/cost")
    if as_json:
        emit_json({**data, "cost": cost})
        return
    endpoint = data.get("endpoint") or {}
    for label, value in (("id", data["id"]), ("name", data["name"]), ("kind", data["kind"]),
                         ("engine", data.get("engine") or "-"),
                         ("model", f"{data['model']} @ {data.get('revision') or '?'}"), ("tier", data.get("tier")),
                         ("state", f"{data['state']}: {data.get('reason') or ''}"),
                         ("job", f"{data.get('scheduler')} {data.get('job_id') or '-'} on {data.get('node') or '-'}"),
                         ("endpoint", f"{endpoint.get('host')}:{endpoint.get('port')}" if endpoint else "-"),
                         ("resources", json.dumps(data.get("resources"), sort_keys=True)),
                         ("engine args", " ".join(data.get("engine_args") or []) or "-"),
                         ("time limit", f"{data.get('time_limit')} min"),
                         ("idle stop", f"after {data['idle_timeout']} min without a request"
                          if data.get("idle_timeout") else "never"),
                         ("lease", f"{data['lease']} s" if data.get("lease") else "none"),
                         ("replicas", replicas(data) or "none (one job)"),
                         ("renewal", renewal(data) or "none (it ends at its time limit)")):
        click.echo(f"{label:<12} {value}")
    for index, line in enumerate(cost_lines(cost)):
        click.echo(f"{'cost' if index == 0 else '':<12} {line}")
    if data.get("stops_at"):
        click.echo(f"{'stops in':<12} {until(data['stops_at'])} if unused ({data.get('stop_reason_expected')})")
    if data.get("jobs"):
        click.echo("jobs")
        for job in data["jobs"]:
            serving = ("serving" if job.get("ready_at") else "starting") if job.get("phase") == "replica" else ""
            click.echo(f"  generation {job.get('generation')}  {job.get('phase') or '-':<9} "
                       f"job {job.get('job_id') or '-'} on {job.get('node') or '-'}"
                       + "".join(f"  {note}" for note in (serving, job.get("reason")) if note))
    phases = data.get("phases") or {}
    if phases:
        click.echo("phases       " + ", ".join(f"{k} {'-' if v is None else f'{v:.1f}s'}" for k, v in phases.items()))
    click.echo("events")
    for event in data.get("events", []):
        click.echo(f"  {event['at']}  {event['from'] or '-':>9} -> {event['to']:<9} {event.get('reason') or ''}")


@main.command()
@click.argument("service_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the recipe to this file (YAML).")
@click.option("--name", callback=lambda ctx, param, value: _recipe_name(value),
              help="The name the recipe gives the service (default: its own; `pilotfish apply` reuses a live "
                             "service of that name instead of launching another).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole provenance as JSON.")
@click.pass_context
def export(ctx, service_id, output, name, as_json):
    """What a service (ID or unique prefix) ran, as a recipe that launches the identical service again (revision
    pinned, the same engine arguments, tier and resources) and a paragraph for a methods section: the model's
    revision and weight sha256s, the engine and its version, the image's digest.

    Without -o, the recipe goes to stdout with the provenance as comments; with -o, it is written there and the
    paragraph is printed.

    \b
    Examples:
      pilotfish export 3fa2 -o llama.yaml && pilotfish apply llama.yaml
      pilotfish export 3fa2 --json
    """
    import yaml

    data = portal_of(ctx).service(service_id).provenance()
    if as_json:
        emit_json(data)
        return
    model, engine = data["model"], data["engine"]
    header = [f"Provenance of service {data['service']} ({data['name']}), recorded {data.get('recorded_at')}:",
              f"model {model['repo_id']} at revision {model['revision']}",
              *(f"  {entry['name']}  sha256 {entry['sha256'] or '-'} ({entry['sha256_from'] or 'not hashed'})"
                for entry in model["files"]),
              f"engine {engine['title']} {engine.get('version')} ({engine['runtime']}: {engine['command']})"]
    if data.get("image"):
        header.append(f"image {data['image'].get('reference') or '-'}: {data['image']['file']} "
                      f"sha256 {data['image'].get('sha256') or '-'}")
    header += [f"server arguments: {shlex.join(data['server_arguments'])}",
               f"tier {data.get('tier') or '-'}; {data['scheduler']} arguments: "
               f"{shlex.join(data['scheduler_arguments'])}",
               "", *_wrapped(data["methods"])]
    if name:
        data["recipe"]["services"][0]["name"] = data["recipe"]["name"] = name
    text = "".join(f"# {line}".rstrip() + "\n" for line in header) + yaml.safe_dump(
        data["recipe"], sort_keys=False, default_flow_style=False, width=1000)
    if not output:
        click.echo(text, nl=False)
        return
    with open(output, "w") as handle:
        handle.write(text)
    click.echo(data["methods"])
    click.echo(f"# recipe written to {output}: `pilotfish apply {shlex.quote(output)}` launches it again", err=True)


def _recipe_name(value):
    if value is not None and not re.fullmatch(r"[A-Za-z0-9_.\-]{1,80}", value):
        raise click.BadParameter("up to 80 letters, digits, '.', '_' or '-'")
    return value


def _wrapped(text: str, width: int = 110):
    import textwrap
    return textwrap.wrap(text, width) or [""]


@main.command()
@click.argument("service_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the service ends (Ctrl-C stops).")
@click.option("--tail", default=200, show_default=True, type=click.IntRange(1, 100000), help="Lines to show.")
@click.pass_context
def logs(ctx, service_id, follow, tail):
    """The job log of a service (ID or unique prefix).

    Example: pilotfish logs 3fa2 -f --tail 50
    """
    handle = portal_of(ctx).service(service_id)
    text = handle.logs(tail)
    click.echo(text, nl=False)
    if not follow:
        return
    seen = handle.logs(100000).splitlines()
    try:
        while True:
            ended = handle.state in ENDED_STATES
            lines = handle.logs(100000).splitlines()
            # the log only grows; if it was rewritten, print it all again
            new = lines[len(seen):] if lines[:len(seen)] == seen else lines
            for line in new:
                click.echo(line)
            seen = lines
            if ended:
                return
            time.sleep(1)
    except KeyboardInterrupt:
        return


@main.command()
@click.argument("service_id")
@click.option("--wait", is_flag=True, help="Wait until the scheduler confirms the job ended.")
@click.pass_context
def stop(ctx, service_id, wait):
    """Stop a service (cancel its Slurm job).

    Example: pilotfish stop 3fa2 --wait
    """
    handle = portal_of(ctx).service(service_id)
    data = handle.stop(wait=wait)
    click.echo(f"{handle.id} {data['state']}" + ("" if data["state"] in ENDED_STATES else " (stopping)"))


@main.command()
@click.argument("service_id")
@click.pass_context
def rm(ctx, service_id):
    """Remove an ended service and its job folder (stop it first).

    Example: pilotfish rm 3fa2
    """
    handle = portal_of(ctx).service(service_id)
    handle.delete()
    click.echo(f"removed {handle.id}")


@main.command()
@click.pass_context
def prune(ctx):
    """Remove every ended service (STOPPED, FAILED, TIMEOUT) and its job folder.

    Example: pilotfish prune
    """
    removed = portal_of(ctx).request("DELETE", "/api/services", params={"state": "ENDED"}).json()["deleted"]
    click.echo(f"removed {len(removed)} ended service(s)")


# --- what can run ------------------------------------------------------------------------------------------
