"""`pilotfish models|images|tiers|keys`: what can run, and who may call."""
from __future__ import annotations

import sys
import time

import click

from .command import KINDS, Failure, emit_json, human_size, local_time, main, note, portal_of, table


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
    """List the models you can launch (site cache_dir, then your home_dir). ADAPTER OF: the base a LoRA adapter is
    launched with; ADAPTERS: the local adapters a launch of the model may serve (`pilotfish run --adapter`).

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
        also = [kind for kind in model.get("kinds") or [] if kind != model.get("kind")]
        rows.append([model["repo_id"], model.get("kind") or "?", ",".join(also) or "-",
                     ",".join(model.get("modalities") or []) or "?", where, human_size(model.get("size_bytes")),
                     len(revisions), model.get("base") or "-", ",".join(model.get("adapters") or []) or "-"])
    table(rows, ["MODEL", "KIND", "ALSO AS", "INPUT", "WHERE", "SIZE", "REVISIONS", "ADAPTER OF", "ADAPTERS"])
    if data.get("refreshing"):
        note("the rescan is still running: run this again in a moment")


@models.command(name="options")
@click.argument("repo")
@click.option("--kind", type=click.Choice(KINDS), help="Launched as this kind (default: the model's own).")
@click.option("--revision", help="Branch, tag or commit (default: main, else the newest).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def models_options(ctx, repo, kind, revision, as_json):
    """What a launch of a model gets: its kind, the engine, the flags added from what it is, the engine flags that
    apply (give them after `--` to `pilotfish run`; one of yours replaces the preset it concerns).

    Example: pilotfish models options Qwen/Qwen3-0.6B
    """
    data = portal_of(ctx).get("/api/launch-options", model=repo, kind=kind, revision=revision)
    if as_json:
        emit_json(data)
        return
    others = [name for name in data["kinds"] if name != data["kind"]]
    click.echo(f"{data['model']} @ {data['revision'][:12]}: {data['kind']} on {data['engine_title']}"
               + (f" ({data['kind_reason']})" if data.get("kind_reason") else "")
               + (f"; also launches as {', '.join(others)}" if others else ""))
    click.echo("takes as input: " + (", ".join(data.get("modalities") or []) or "unknown"))
    click.echo("added from what the model is:" + ("" if data["presets"] else " nothing"))
    for preset in data["presets"]:
        click.echo(f"  {preset['purpose']}: {' '.join(preset['flags'])}  ({preset['reason']}; "
                   f"{' or '.join(preset['yields_to'])} replaces it)")
    click.echo("engine options that apply: " + (" ".join(data["flags"]) or "none"))
    if data.get("serves_adapters"):
        click.echo("adapters it may serve (pilotfish run --adapter): "
                   + (", ".join(data["adapters"]) or "none of them is local"))


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
@click.option("--model", help="Also recommend a tier for this model (repo id), with the reason and when each tier "
                              "that fits would start.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def tiers(ctx, model, as_json):
    """Resource tiers from the site's resource_specs.yaml, and the one a model gets.

    With --model, STARTS is when a job on each tier the model fits would start (the scheduler's estimate, e.g.
    sbatch --test-only), and a tier that would start sooner than the recommended one is named.

    Example: pilotfish tiers --model Qwen/Qwen2.5-0.5B-Instruct
    """
    portal = portal_of(ctx)
    data = portal.tiers()
    advice = portal.recommend(model) if model else None
    if as_json:
        emit_json({**data, "recommendation": advice} if model else data)
        return
    starts = {item["ref"]: (item.get("start") or {}).get("text") or "" for item in (advice or {}).get("fitting", [])}
    rows = [[t["ref"], t.get("description") or "", t.get("cpu_cores"), t.get("memory_gb"),
             f"{t.get('gpu_count') or 0}" + (f" {t['gpu_type']}" if t.get("gpu_type") else ""),
             t.get("max_model_size_gb") if t.get("max_model_size_gb") is not None else "any"]
            + ([starts.get(t["ref"], "too small")] if advice else []) for t in data["tiers"]]
    table(rows, ["TIER", "DESCRIPTION", "CPUS", "MEMORY_GB", "GPUS", "MAX_MODEL_GB"] + (["STARTS"] if advice else []))
    click.echo(f"time limit: default {data['time']['default']} min, max {data['time']['max']} min")
    if advice:
        tier = (advice.get("tier") or {}).get("ref") or "none"
        click.echo(f"recommended for {advice['model']}: {tier} ({advice['reason']})")
        if advice.get("sooner"):
            click.echo(f"sooner: {advice['sooner']['reason']}")


@main.group()
def keys():
    """Named API keys for scripts and collaborators, each limited to what it needs.

    \b
    Example: pilotfish keys create student --scope use \\
               --model Qwen/Qwen2.5-0.5B-Instruct --expires 30d --rpm 60
    """


SCOPES = ("use", "read", "launch")


@keys.command(name="create")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, type=click.Choice(SCOPES),
              help="What the key may do (repeat for several; default: all three): use = call models (/v1, "
                   "/services/<id>/), read = see services, models, metrics and pages, launch = launch, stop and "
                   "change (downloads, benchmarks, leases).")
@click.option("--model", "models", multiple=True, metavar="REPO_ID",
              help="A model the key may call and launch (repeat for several; default: any).")
@click.option("--expires", metavar="WHEN",
              help="When the key stops working: after a while (30d, 12h, 90m, 1d12h) or at a time (2026-12-31T18:00, "
                   "the portal's local time, or with Z or an offset); at most 5 years away. Default: never.")
@click.option("--rpm", type=int, metavar="N",
              help="At most N requests per minute to models (N at once after a quiet minute, then one every 60/N s; "
                   "over it: 429 with Retry-After). Default: unlimited.")
@click.option("--tpm", type=int, metavar="N",
              help="At most N tokens per minute (prompt and completion, counted as answers come back). Default: "
                   "unlimited.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def keys_create(ctx, name, scopes, models, expires, rpm, tpm, as_json):
    """Create a key; it is shown once, so store it now.

    The key works as a bearer token (Authorization: Bearer <key>, an OpenAI client's api_key, or this command's
    --token) for what its scopes allow, on its models, until it expires, at its rates. Only the portal token
    manages keys. Revoke a key with `pilotfish keys revoke ID`.

    Example: pilotfish keys create laptop

    \b
    Example: pilotfish keys create student --scope use \\
               --model Qwen/Qwen2.5-0.5B-Instruct --expires 30d --rpm 60
    """
    key = portal_of(ctx).create_key(name, scopes=list(scopes) or None, models=list(models) or None, expires=expires,
                                    requests_per_minute=rpm, tokens_per_minute=tpm)
    if as_json:
        emit_json(key)
        return
    click.echo(key["key"])
    note(f"key {key['id']} ({key['name']}) shown once: store it now")


def _expiry(key: dict) -> str:
    if not key.get("expires_at"):
        return "never"
    return ("expired " if key.get("expired") else "") + local_time(key["expires_at"])


def _limits(key: dict) -> str:
    parts = [f"{key[field]} {unit}/min" for field, unit in (("requests_per_minute", "req"),
                                                              ("tokens_per_minute", "tok")) if key.get(field)]
    return ", ".join(parts) or "-"


@keys.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def keys_ls(ctx, as_json):
    """List the keys (names and hints, never the keys): scopes, models, expiry, rates and last use.

    Example: pilotfish keys ls
    """
    found = portal_of(ctx).keys()
    if as_json:
        emit_json(found)
        return
    rows = [[k["id"], k["name"], k["hint"], ",".join(k.get("scopes") or []), ",".join(k.get("models") or ["any"]),
             _expiry(k), _limits(k), local_time(k["last_used_at"]) if k.get("last_used_at") else "never",
             local_time(k["created_at"])] for k in found]
    table(rows, ["ID", "NAME", "HINT", "SCOPES", "MODELS", "EXPIRES", "LIMITS", "LAST_USED", "CREATED"])


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
