"""The `pilotfish` command line: every command goes through the portal's REST API (portal.client), except
`start` (runs the portal) and `doctor` (checks the site setup without a portal)."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone

import click

from ood_app.connection import write_connection

from .client import ENDED_STATES, PortalClientError, ServiceEnded, WaitTimeout, connect
from .config import ConfigError, ensure_token, load_config, prepare_home

KINDS = ("text-generation", "speech-recognition")


class Failure(Exception):
    """An operation failed: one line on stderr, exit 1 (2 for bad usage)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 1) -> None:
    click.echo(f"pilotfish: {message}", err=True)
    sys.exit(code)


def note(message: str) -> None:
    """A progress or warning line, on stderr so stdout stays for results."""
    click.echo(f"pilotfish: {message}", err=True)


class Commands(click.Group):
    """Turns the errors of every command into one line on stderr and an exit code, never a traceback."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False  # usage errors as one `pilotfish: ...` line too, not click's block
        try:
            code = super().main(*args, **kwargs)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx is not None:  # `pilotfish keys` alone
                click.echo(exc.ctx.get_help(), err=True)
                sys.exit(2)
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            fail(exc.format_message() + hint, 2)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            fail("aborted", 1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PortalClientError as exc:
            fail(exc.message, 2 if exc.status == 400 else 1)
        except Failure as exc:
            fail(str(exc), exc.code)
        except KeyboardInterrupt:
            fail("interrupted", 130)


def portal_of(ctx: click.Context):
    """The portal named by --url/--token (PILOTFISH_URL/PILOTFISH_TOKEN), else by connection.json."""
    obj = ctx.find_root().obj
    if "portal" not in obj:
        obj["portal"] = connect(url=obj.get("url"), token=obj.get("token"))
    return obj["portal"]


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def table(rows, headers) -> None:
    """A plain text table for people (columns padded, no borders)."""
    rows = [["" if cell is None else str(cell) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    for row in [list(headers)] + rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def human_size(count) -> str:
    if count is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return ""


def age(iso_time) -> str:
    if not iso_time:
        return ""
    try:
        then = datetime.fromisoformat(str(iso_time).replace("Z", "+00:00"))
    except ValueError:
        return str(iso_time)
    if then.tzinfo is None:
        then = then.replace(tzinfo=timezone.utc)
    seconds = int((datetime.now(timezone.utc) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def progress_line(service_id: str):
    """on_change callback: one stderr line per state change."""
    def show(old, new):
        before = f"{old['state']} -> " if old else ""
        note(f"{service_id[:12]} {before}{new['state']}: {new.get('reason') or ''}".rstrip(": "))
    return show


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", envvar="PILOTFISH_URL", help="Portal URL (default: from PILOTFISH_HOME/connection.json).")
@click.option("--token", envvar="PILOTFISH_TOKEN", help="Portal token or API key (default: from connection.json).")
@click.pass_context
def main(ctx, url, token):
    """Pilotfish: run AI model services on your cluster behind one authenticated, OpenAI-compatible URL.

    Commands other than `start` and `doctor` talk to the running portal, found through
    PILOTFISH_HOME/connection.json (or --url and --token). Add --json to listing commands for scripts.

    Example: pilotfish run text-generation --model Qwen/Qwen2.5-0.5B-Instruct --wait
    """
    ctx.obj = {"url": url, "token": token}


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
    try:
        config = load_config()
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
def doctor():
    """Check this site's setup without a portal: Slurm, cache_dir, resource_specs.yaml, runtimes.

    Reads the same settings as the portal (PILOTFISH_SITE_CONFIG, PILOTFISH_HOME). One line per check,
    `ok` or `FAIL`; exits 1 if any check fails.

    Example: PILOTFISH_SITE_CONFIG=/etc/pilotfish/site.yaml pilotfish doctor
    """
    results = list(_checks())
    for ok, message in results:
        click.echo(f"{'ok  ' if ok else 'FAIL'}  {message}")
    failed = sum(1 for ok, _ in results if not ok)
    if failed:
        fail(f"{failed} check(s) failed", 1)


def _checks():
    """(ok, message) for each check, in the order a site admin would fix them."""
    from .catalog.images import find_image, pins_from_runtimes
    from .catalog.kinds import KINDS as KIND_TABLE, runtime_for
    from .catalog.models import scan_models
    from .catalog.tiers import all_tiers, load_site_specs
    from .errors import PortalError

    try:
        config = load_config()
    except ConfigError as exc:
        yield False, f"site config: {exc}"
        return
    yield True, f"site config: {config.site_config_path or 'none (defaults)'}; PILOTFISH_HOME {config.home}"
    if config.scheduler == "slurm":
        for command in ("sbatch", "squeue", "scancel", "sacct", "scontrol"):
            path = shutil.which(command)
            yield bool(path), f"slurm: {command} " + (f"found at {path}" if path else "not found on PATH")
        if shutil.which("squeue"):
            try:
                result = subprocess.run(["squeue", "--noheader", "--me", "--format=%i"], capture_output=True,
                                        text=True, timeout=config.scheduler_timeout)
                answer = (result.stderr or result.stdout).strip().splitlines()
                yield result.returncode == 0, ("slurm: the controller answers squeue" if result.returncode == 0 else
                                               f"slurm: squeue failed: {answer[-1] if answer else result.returncode}")
            except subprocess.TimeoutExpired:
                yield False, f"slurm: squeue did not answer within {config.scheduler_timeout:g} s"
    else:
        yield True, f"scheduler: {config.scheduler} (no Slurm needed)"
    if config.cache_dir is None:
        yield True, "cache_dir: not set (models and images come from home_dir only)"
    elif not config.cache_dir.is_dir():
        yield False, f"cache_dir {config.cache_dir}: not a directory"
    else:
        models_dir = config.cache_dir / "models"
        if models_dir.is_dir():
            count = sum(1 for entry in models_dir.iterdir() if entry.name.startswith("models--"))
            yield True, f"cache_dir {config.cache_dir}: models/ holds {count} model repo(s)"
        else:
            yield False, f"cache_dir {config.cache_dir}: no models/ folder (expected the Hugging Face cache layout)"
    try:
        entries = scan_models(config.cache_dir, config.home_dir, metadata=False)
        yield True, f"models: {len(entries)} found in cache_dir and home_dir"
    except (OSError, PortalError) as exc:
        yield False, f"models: cannot scan: {exc}"
    try:
        specs = load_site_specs(config.cache_dir, config.resource_specs)
        yield True, f"resource specs {specs.source}: {len(all_tiers(specs))} tier(s), valid"
    except ConfigError as exc:
        yield False, f"resource specs: {exc}"
    for kind in KIND_TABLE.values():
        try:
            runtime = runtime_for(config, kind)
        except ConfigError as exc:
            yield False, f"runtime {kind.name}: {exc}"
            continue
        if runtime.runtime == "native":
            try:
                program = shlex.split(runtime.command)[0]
            except (ValueError, IndexError):
                yield False, f"runtime {kind.name}: command {runtime.command!r} cannot be parsed"
                continue
            found = (program if os.path.isfile(program) and os.access(program, os.X_OK) else None) if "/" in program \
                else shutil.which(program)
            setup = " (checked without its setup lines)" if runtime.setup else ""
            yield bool(found), (f"runtime {kind.name}: native, {program} " +
                                ("found" if found else "not found or not executable") + setup)
        else:
            apptainer = shutil.which("apptainer") or shutil.which("singularity")
            if not apptainer:
                yield False, f"runtime {kind.name}: apptainer (or singularity) not found on PATH"
                continue
            try:
                image = find_image(kind.name, cache_dir=config.cache_dir, home_dir=config.home_dir,
                                   image=runtime.image, pins=pins_from_runtimes(config.runtimes))
                yield True, f"runtime {kind.name}: apptainer {apptainer}, image {image.path}"
            except PortalError as exc:
                yield False, f"runtime {kind.name}: {exc.message}"


# --- services ----------------------------------------------------------------------------------------------

@main.command()
@click.argument("kind", type=click.Choice(KINDS), metavar="KIND")
@click.option("--model", required=True, help="Model repo id, e.g. Qwen/Qwen2.5-0.5B-Instruct (see `pilotfish models ls`).")
@click.option("--revision", help="Branch, tag or commit of the model (default: the newest local one).")
@click.option("--tier", help="Resource tier, e.g. Small or gpu.Small (default: the recommendation; see `pilotfish tiers`).")
@click.option("--time", "time_limit", help="Time limit: minutes or HH:MM:SS (default: the site's).")
@click.option("--name", help="A name for the service.")
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
def run(ctx, kind, model, revision, tier, time_limit, name, partition, account, memory_gb, cpus, gpus, force,
        dry_run, wait, timeout, as_json, engine_args):
    """Launch a service and print its id. Engine flags go after `--`.

    \b
    Examples:
      pilotfish run text-generation --model Qwen/Qwen2.5-0.5B-Instruct --tier Small --time 60
      pilotfish run text-generation --model Qwen/Qwen2.5-0.5B-Instruct --wait -- --max-model-len 4096
      pilotfish run speech-recognition --model Systran/faster-whisper-small --dry-run
    """
    portal = portal_of(ctx)
    resources = {key: value for key, value in (("partition", partition), ("account", account),
                                               ("memory_gb", memory_gb), ("cpus", cpus), ("gpus", gpus))
                 if value is not None}
    fields = {"revision": revision, "time": time_limit, "name": name, "resources": resources or None,
              "engine_args": list(engine_args) or None, "force": force or None}
    if dry_run:
        plan = portal.dry_run(kind, model, tier=tier, **fields)
        if as_json:
            emit_json(plan)
            return
        click.echo(plan["job_script"].rstrip("\n"))
        click.echo(f"# --- dry run: nothing submitted; tier {plan.get('tier')}: {plan.get('tier_reason')}")
        click.echo("# sbatch " + " ".join(shlex.quote(arg) for arg in plan["sbatch"]))
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
    """List services, newest first (by default only live ones).

    Example: pilotfish ls --state RUNNING --json
    """
    services = portal_of(ctx).services(state or (None if show_all else "LIVE"))
    if as_json:
        emit_json(services)
        return
    table([[s["id"], s["name"], s["kind"], s["model"], s["tier"] or "", s["state"], s["job_id"] or "",
            age(s["created_at"])] for s in services],
          ["ID", "NAME", "KIND", "MODEL", "TIER", "STATE", "JOB", "AGE"])


@main.command()
@click.argument("service_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def details(ctx, service_id, as_json):
    """One service (ID or any unique prefix of it): state, job, resources, phase timings and events.

    Example: pilotfish details 3fa2
    """
    data = portal_of(ctx).service(service_id).refresh()
    if as_json:
        emit_json(data)
        return
    endpoint = data.get("endpoint") or {}
    for label, value in (("id", data["id"]), ("name", data["name"]), ("kind", data["kind"]),
                         ("model", f"{data['model']} @ {data.get('revision') or '?'}"), ("tier", data.get("tier")),
                         ("state", f"{data['state']}: {data.get('reason') or ''}"),
                         ("job", f"{data.get('scheduler')} {data.get('job_id') or '-'} on {data.get('node') or '-'}"),
                         ("endpoint", f"{endpoint.get('host')}:{endpoint.get('port')}" if endpoint else "-"),
                         ("resources", json.dumps(data.get("resources"), sort_keys=True)),
                         ("engine args", " ".join(data.get("engine_args") or []) or "-"),
                         ("time limit", f"{data.get('time_limit')} min")):
        click.echo(f"{label:<12} {value}")
    phases = data.get("phases") or {}
    if phases:
        click.echo("phases       " + ", ".join(f"{k} {'-' if v is None else f'{v:.1f}s'}" for k, v in phases.items()))
    click.echo("events")
    for event in data.get("events", []):
        click.echo(f"  {event['at']}  {event['from'] or '-':>9} -> {event['to']:<9} {event.get('reason') or ''}")


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
    portal = portal_of(ctx)
    removed = 0
    for service in portal.services("ENDED"):
        try:
            portal.request("DELETE", f"/api/services/{service['id']}")
            removed += 1
        except PortalClientError as exc:
            if exc.status != 404:  # another prune got there first
                raise
    click.echo(f"removed {removed} ended service(s)")


# --- what can run ------------------------------------------------------------------------------------------

@main.group()
def models():
    """The model inventory: list, download into your home_dir, remove.

    Example: pilotfish models add Qwen/Qwen2.5-0.5B-Instruct
    """


@models.command(name="ls")
@click.option("--refresh", is_flag=True, help="Rescan cache_dir and home_dir first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def models_ls(ctx, refresh, as_json):
    """List the models you can launch (site cache_dir, then your home_dir).

    Example: pilotfish models ls --refresh
    """
    data = portal_of(ctx).models(refresh=refresh)
    if as_json:
        emit_json(data["models"])
        return
    rows = []
    for model in data["models"]:
        revisions = model.get("revisions") or []
        where = ",".join(sorted({r.get("location") or "?" for r in revisions}))
        rows.append([model["repo_id"], model.get("kind") or "?", where, human_size(model.get("size_bytes")),
                     len(revisions)])
    table(rows, ["MODEL", "KIND", "WHERE", "SIZE", "REVISIONS"])
    if data.get("refreshing"):
        note("the rescan is still running: run this again in a moment")


@models.command(name="add")
@click.argument("repo")
@click.option("--revision", help="Branch, tag or commit (default: main).")
@click.option("--use-cache", is_flag=True, help="Link files already in the site cache instead of downloading them.")
@click.pass_context
def models_add(ctx, repo, revision, use_cache):
    """Download a model from the Hugging Face Hub into your home_dir, with a progress bar (Ctrl-C cancels).

    Example: pilotfish models add Qwen/Qwen2.5-0.5B-Instruct --revision main
    """
    portal = portal_of(ctx)
    task = portal.start_download(repo, revision, use_cache)
    note(f"downloading {repo} (task {task['id']})")
    try:
        with click.progressbar(length=max(task.get("bytes_total") or 0, 1), label=repo, file=sys.stderr,
                               show_pos=False) as bar:
            done = 0
            while task["state"] not in ("done", "completed", "succeeded", "failed", "cancelled", "canceled", "error"):
                time.sleep(0.5)
                task = portal.download(task["id"])
                if task.get("bytes_total"):
                    bar.length = task["bytes_total"]
                bar.update(max((task.get("bytes_done") or 0) - done, 0))
                done = max(done, task.get("bytes_done") or 0)
    except KeyboardInterrupt:
        portal.cancel_download(task["id"])
        raise Failure(f"download of {repo} cancelled")
    if task.get("error") or task["state"] in ("failed", "cancelled", "canceled", "error"):
        raise Failure(f"download of {repo} {task['state']}: {task.get('error') or 'no reason given'}")
    click.echo(f"{repo} @ {task.get('commit') or task.get('revision')} in {task.get('path') or task.get('location')}")


@models.command(name="rm")
@click.argument("repo")
@click.option("--revision", help="Only this revision (default: all of them).")
@click.pass_context
def models_rm(ctx, repo, revision):
    """Remove a model from your home_dir (the site cache_dir is never touched).

    Example: pilotfish models rm Qwen/Qwen2.5-0.5B-Instruct
    """
    portal_of(ctx).delete_model(repo, revision)
    click.echo(f"removed {repo}" + (f" @ {revision}" if revision else ""))


@main.group()
def images():
    """Container images (Apptainer SIF files) the site pins for each service kind.

    Example: pilotfish images ls
    """


@images.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def images_ls(ctx, as_json):
    """List the pinned images and where they are staged.

    Example: pilotfish images ls --json
    """
    found = portal_of(ctx).images()
    if as_json:
        emit_json(found)
        return
    table([[i.get("kind"), i.get("image"), i.get("location") or "", i.get("path") or "not staged"]
           for i in found], ["KIND", "IMAGE", "WHERE", "PATH"])


@main.command()
@click.option("--model", help="Also recommend a tier for this model (repo id), with the reason.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def tiers(ctx, model, as_json):
    """Resource tiers from the site's resource_specs.yaml, and the one a model gets.

    Example: pilotfish tiers --model Qwen/Qwen2.5-0.5B-Instruct
    """
    portal = portal_of(ctx)
    data = portal.tiers()
    advice = portal.recommend(model) if model else None
    if as_json:
        emit_json({**data, "recommendation": advice} if model else data)
        return
    table([[t["ref"], t.get("description") or "", t.get("cpu_cores"), t.get("memory_gb"),
            f"{t.get('gpu_count') or 0}" + (f" {t['gpu_type']}" if t.get("gpu_type") else ""),
            t.get("max_model_size_gb") if t.get("max_model_size_gb") is not None else "any"]
           for t in data["tiers"]], ["TIER", "DESCRIPTION", "CPUS", "MEMORY_GB", "GPUS", "MAX_MODEL_GB"])
    click.echo(f"time limit: default {data['time']['default']} min, max {data['time']['max']} min")
    if advice:
        tier = (advice.get("tier") or {}).get("ref") or "none"
        click.echo(f"recommended for {advice['model']}: {tier} ({advice['reason']})")


@main.group()
def keys():
    """Named API keys for scripts and collaborators.

    Example: pilotfish keys create laptop
    """


@keys.command(name="create")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def keys_create(ctx, name, as_json):
    """Create a key; it is shown once, so store it now.

    Example: pilotfish keys create laptop
    """
    key = portal_of(ctx).create_key(name)
    if as_json:
        emit_json(key)
        return
    click.echo(key["key"])
    note(f"key {key['id']} ({key['name']}) shown once: store it now")


@keys.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def keys_ls(ctx, as_json):
    """List the keys (names and hints, never the keys).

    Example: pilotfish keys ls
    """
    found = portal_of(ctx).keys()
    if as_json:
        emit_json(found)
        return
    table([[k["id"], k["name"], k["hint"], k["created_at"]] for k in found], ["ID", "NAME", "HINT", "CREATED"])


@keys.command(name="revoke")
@click.argument("key_id")
@click.pass_context
def keys_revoke(ctx, key_id):
    """Revoke a key by id (effective within seconds).

    Example: pilotfish keys revoke 1a2b3c4d
    """
    portal_of(ctx).revoke_key(key_id)
    click.echo(f"revoked {key_id}")


# --- recipes -----------------------------------------------------------------------------------------------

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
    tier or resources (partition, account, cpus, memory_gb, gpus), time, count, name, engine_args. The
    student orchestrator's JSON (`job.infrastructure`, `job.service`) is read too. Services are named
    `<recipe name>-<index>` (or their own name), which is how --delete and a second apply find them.

    \b
    Example recipe (demo.yaml):
      name: demo
      services:
        - {kind: text-generation, model: Qwen/Qwen2.5-0.5B-Instruct, tier: Small, time: 60, count: 2}
    Examples:
      pilotfish apply demo.yaml
      pilotfish apply --delete demo.yaml
    """
    from .recipes import RecipeError, load_recipe  # launching and the catalog: imported only when needed

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
                click.echo(f"{body['name']}: {plan['kind']} {plan['model']} on {plan.get('tier') or 'explicit resources'}"
                           f" ({plan.get('tier_reason')}); sbatch {' '.join(plan['sbatch'])}")
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
    from .client import ServiceHandle

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


if __name__ == "__main__":
    main()
