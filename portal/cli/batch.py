"""`pilotfish batch create|ls|show|cancel|download`: batches of OpenAI requests run as Slurm job arrays, through the
portal's Files and Batches API (/v1/files, /v1/batches)."""
from __future__ import annotations

import re
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import click

from .command import Failure, emit_json, main, note, portal_of, table
from ..client import PortalClientError

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/audio/transcriptions",
             "/v1/audio/translations")
ENDED = ("completed", "failed", "expired", "cancelled")
FILE_ID = re.compile(r"^file-[0-9a-f]{1,36}$")
BAD_INPUT = (400, 404, 413)  # the caller's input: a refused line, an unknown batch or file, a file over the limit
POLL_SECONDS = 2.0


class BadInput:
    """Turns the API's refusal of the caller's input (400, 404, 413) into exit 2, its message in one line."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        if isinstance(exc, PortalClientError) and exc.status in BAD_INPUT:
            raise Failure(exc.message, 2) from None
        return False


def counts(batch: dict) -> str:
    """"12 done, 1 failed of 30"."""
    numbers = batch.get("request_counts") or {}
    return f"{numbers.get('completed', 0)} done, {numbers.get('failed', 0)} failed of {numbers.get('total', 0)}"


def shard_words(batch: dict) -> str:
    """A batch's shards in words: "2 of 4 shards running, 1 done" (with its detail), else "4 shards"."""
    shards = (batch.get("pilotfish") or {}).get("shards")
    if not isinstance(shards, list):
        return f"{shards} shard{'s' if shards != 1 else ''}" if shards is not None else ""
    states = {}
    for shard in shards:
        states[shard["state"]] = states.get(shard["state"], 0) + 1
    words = [f"{states.pop('running', 0)} of {len(shards)} shard{'s' if len(shards) != 1 else ''} running"]
    words += [f"{count} {state.replace('_', ' ')}" for state, count in sorted(states.items())]
    return ", ".join(words)


def moment(when) -> str:
    """A time from the API (Unix seconds, or ISO for events) in this machine's local time ("" for none)."""
    if not when:
        return ""
    if isinstance(when, str):
        try:
            at = datetime.fromisoformat(when.replace("Z", "+00:00"))
        except ValueError:
            return when
        at = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
    else:
        at = datetime.fromtimestamp(when, timezone.utc)
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S")


@main.group()
def batch():
    """Batches: a JSONL file of OpenAI requests answered by a model as Slurm jobs (a job array of shards), the answers
    written to an output file in input order and the lines that failed to an error file.

    Each input line is OpenAI's batch format: {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions",
    "body": {"model": "...", ...}}; every line names the same endpoint and model, and a custom_id once. An audio
    line (url /v1/audio/transcriptions or /v1/audio/translations) names its audio in "body": {"model": "...",
    "file": "/abs/path.wav" or "file-..."} with Whisper's language, prompt, response_format and temperature. The
    same batches are reachable with the official `openai` client (client.batches.create). `pilotfish batch
    transcribe` turns a whole folder of audio into transcripts.

    \b
    Examples:
      ID=$(pilotfish batch create prompts.jsonl --wait) && pilotfish batch download "$ID" -o results/
      pilotfish batch transcribe recordings/ --model Systran/faster-whisper-small --out transcripts/ --format srt
    """


@batch.command()
@click.argument("source", metavar="FILE")
@click.option("--endpoint", default=ENDPOINTS[0], show_default=True,
              help=f"The endpoint every line names in its `url`: {', '.join(ENDPOINTS)}.")
@click.option("--tier", help="Resource tier of each task, e.g. Small (default: the model's recommendation; see "
                             "`pilotfish tiers`).")
@click.option("--time", "time_limit", metavar="MIN",
              help="Time limit of each task: minutes or HH:MM:SS (default: the site's). A task killed by it is "
                   "submitted again and resumes.")
@click.option("--partition", help="Override the tier's partition.")
@click.option("--shard-size", type=click.IntRange(1), metavar="N",
              help="Lines per shard, each shard one task of the job array (default: the site's).")
@click.option("--concurrency", type=click.IntRange(1, 1024), metavar="N",
              help="Requests in flight per task (default: the engine's).")
@click.option("--window", "completion_window", default="24h", show_default=True,
              help="How long the batch may take before it expires: 24h (OpenAI's), 90m, 7d.")
@click.option("--wait", is_flag=True, help="Show progress on stderr until the batch ends; exit 1 unless it completed.")
@click.option("--timeout", type=float, metavar="SECONDS", help="With --wait: stop waiting after this long (the batch "
                                                              "goes on).")
@click.option("--json", "as_json", is_flag=True, help="Print the batch as JSON (after --wait: as it ended).")
@click.argument("engine_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def create(ctx, source, endpoint, tier, time_limit, partition, shard_size, concurrency, completion_window, wait,
           timeout, as_json, engine_args):
    """Start a batch and print its id. FILE is a JSONL file of OpenAI batch requests (uploaded first), or the id of a
    file uploaded before (file-...). The portal checks every line before anything runs: a bad line is refused
    naming it (exit 2) and nothing is started. Engine flags go after `--`, as for `pilotfish run`.

    Which model answers is each line's `body.model` (one model the inventory has, the same on every line); the
    tier follows the model's recommendation unless --tier says otherwise.

    \b
    Examples:
      pilotfish batch create prompts.jsonl
      pilotfish batch create prompts.jsonl --tier Small --time 120 --shard-size 500 --wait
      pilotfish batch create vectors.jsonl --endpoint /v1/embeddings
      pilotfish batch create file-0123abcd --json
      pilotfish batch create prompts.jsonl --wait -- --max-model-len 4096
    """
    if timeout is not None and not wait:
        raise click.UsageError("--timeout needs --wait", ctx)
    path = Path(source)
    uploaded = None
    portal = portal_of(ctx)
    with BadInput():
        if FILE_ID.fullmatch(source) and not path.exists():
            file_id = source
        else:
            if not path.is_file():
                raise Failure(f"{source}: no such file (give a JSONL file or the id of an uploaded file, file-...)", 2)
            try:
                uploaded = portal.files_create(path)
            except OSError as exc:
                raise Failure(f"{source}: cannot read it: {exc.strerror}", 2) from None
            file_id = uploaded["id"]
        try:
            created = portal.batch_create(file_id, endpoint, completion_window, tier=tier, time=time_limit,
                                          partition=partition, shard_size=shard_size, concurrency=concurrency,
                                          engine_args=shlex.join(engine_args) if engine_args else None)
        except PortalClientError as exc:
            if uploaded is not None and exc.status in BAD_INPUT:  # refused: leave nothing behind
                try:
                    portal.file_delete(uploaded["id"])
                except PortalClientError:
                    pass
            raise
    finish_create(portal, created, wait, timeout, as_json)


def finish_create(portal, created: dict, wait: bool, timeout, as_json: bool) -> None:
    """Print a started batch (its id, or JSON), and with `wait` follow it to its end (exit 1 unless completed)."""
    if as_json and not wait:
        emit_json(created)
        return
    if not as_json:
        click.echo(created["id"])
        sys.stdout.flush()
    if not wait:
        return
    ended = wait_for_end(portal, created["id"], timeout)
    if as_json:
        emit_json(ended)
    if ended["status"] != "completed":
        why = (ended.get("pilotfish") or {}).get("reason") or "no reason given"
        raise Failure(f"batch {ended['id']} {ended['status']}: {why} ({counts(ended)})")


def wait_for_end(portal, batch_id: str, timeout=None) -> dict:
    """Poll the batch until it ends, one stderr line whenever its status, counts or shards change."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last = None
    while True:
        current = portal.batch(batch_id)
        line = f"{batch_id} {current['status']}: {counts(current)}; {shard_words(current)}"
        if line != last:
            note(line)
            last = line
        if current["status"] in ENDED:
            return current
        if deadline is not None and time.monotonic() >= deadline:
            raise Failure(f"batch {batch_id} is still {current['status']} after {timeout:g} s ({counts(current)}); "
                          f"it goes on: `pilotfish batch show {batch_id}`, or `pilotfish batch cancel {batch_id}`")
        time.sleep(POLL_SECONDS)


@batch.command()
@click.argument("folder", metavar="DIR")
@click.option("--model", required=True, help="A speech-recognition (Whisper) model of the inventory "
                                             "(`pilotfish models ls`).")
@click.option("--out", "out", required=True, metavar="DIR",
              help="Where the transcripts go (made if missing; not inside DIR): the same relative path as each audio "
                   "file, with the format's extension.")
@click.option("--format", "response_format", type=click.Choice(["srt", "vtt", "json", "txt"]), default="txt",
              show_default=True, help="Subtitles with timestamps (srt, vtt), Whisper's JSON, or plain text.")
@click.option("--translate", is_flag=True, help="Translate into English instead of transcribing.")
@click.option("--language", help="The audio's language code, e.g. en (default: detected per file).")
@click.option("--tier", help="Resource tier of the task (default: the model's recommendation).")
@click.option("--time", "time_limit", metavar="MIN",
              help="Time limit of the task: minutes or HH:MM:SS. A task killed by it is submitted again and carries "
                   "on with the files not done.")
@click.option("--partition", help="Override the tier's partition.")
@click.option("--wait", is_flag=True, help="Show progress on stderr until it ends; exit 1 unless it completed.")
@click.option("--timeout", type=float, metavar="SECONDS", help="With --wait: stop waiting after this long (it goes "
                                                              "on).")
@click.option("--json", "as_json", is_flag=True, help="Print the batch as JSON (after --wait: as it ended).")
@click.pass_context
def transcribe(ctx, folder, model, out, response_format, translate, language, tier, time_limit, partition, wait,
               timeout, as_json):
    """Transcribe every audio file under DIR (wav, mp3, m4a, flac, ogg, opus, webm, ...; subfolders included) into a
    mirror tree under --out, as one Slurm job running the Whisper model; prints the batch's id. A file whose
    transcript already exists is skipped (run it again to finish or extend a folder), and files added to DIR while
    it runs are picked up: it looks at DIR again after each pass until a pass finds nothing new.

    It is a batch: `pilotfish batch ls|show|cancel` follow it (progress counts files), and `pilotfish batch download`
    writes which files were transcribed (output) and which failed with the reason (errors). DIR and --out are paths
    on the cluster's file system as the portal sees them.

    \b
    Examples:
      pilotfish batch transcribe interviews/ --model Systran/faster-whisper-small --out transcripts/ --format srt
      pilotfish batch transcribe /data/talks --model org/whisper --out /data/talks-text --wait
    """
    if timeout is not None and not wait:
        raise click.UsageError("--timeout needs --wait", ctx)
    portal = portal_of(ctx)
    with BadInput():
        created = portal.batch_transcribe(folder, model, out, response_format,
                                          task="translate" if translate else "transcribe", language=language,
                                          tier=tier, time=time_limit, partition=partition)
    finish_create(portal, created, wait, timeout, as_json)


@batch.command(name="ls")
@click.option("--limit", type=click.IntRange(1, 10000), default=20, show_default=True, help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (OpenAI's batch objects) for scripts.")
@click.pass_context
def list_batches(ctx, limit, as_json):
    """List batches, newest first: status, endpoint, model, lines done/failed/total, when created and how many shards
    (tasks of the job array). An API key sees only its own.

    Example: pilotfish batch ls --limit 5
    """
    found = portal_of(ctx).batches(limit=limit)
    if as_json:
        emit_json(found)
        return
    if not found:
        click.echo("no batches")
        return
    table([[b["id"], b["status"], b["endpoint"], b.get("model") or "",
            "{completed}/{failed}/{total}".format(**b["request_counts"]), moment(b["created_at"]),
            (b.get("pilotfish") or {}).get("shards", "")] for b in found],
          ["ID", "STATUS", "ENDPOINT", "MODEL", "DONE/FAILED/TOTAL", "CREATED", "SHARDS"])


@batch.command()
@click.argument("batch_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the batch object, its shards and events under "
                                                      "`pilotfish`).")
@click.pass_context
def show(ctx, batch_id, as_json):
    """A batch: its status and reason, lines done and failed, files, resources, then its shards (each a task of the
    job array: job id, state, node, attempts, lines answered) and its events.

    Example: pilotfish batch show batch_0123abcd
    """
    with BadInput():
        found = portal_of(ctx).batch(batch_id)
    if as_json:
        emit_json(found)
        return
    extra = found.get("pilotfish") or {}
    resources = extra.get("resources") or {}
    fields = [
        ("id", found["id"]), ("status", found["status"]), ("reason", extra.get("reason") or ""),
        ("lines", counts(found)), ("endpoint", found["endpoint"]), ("model", found.get("model") or ""),
        *([("folder", f"{extra['folder']['source']} -> {extra['folder']['output']} ({extra['folder']['format']})")]
          if extra.get("folder") else [("input", found["input_file_id"])]),
        ("output", found.get("output_file_id") or "-"),
        ("errors", found.get("error_file_id") or "-"),
        ("tier", extra.get("tier") or "-"),
        ("resources", ", ".join(f"{key} {value}" for key, value in sorted(resources.items()) if value not in (None, ""))
         or "-"),
        ("each task", f"{extra.get('time_limit')} min, {extra.get('shard_size')} lines per shard, "
                      f"{extra.get('concurrency')} requests in flight"),
        ("scheduler", f"{extra.get('scheduler')}, engine {extra.get('engine')}"),
        ("created", moment(found["created_at"])), ("expires", moment(found.get("expires_at"))),
    ]
    for name in ("completed", "failed", "expired", "cancelled"):
        if found.get(f"{name}_at"):
            fields.append((name, moment(found[f"{name}_at"])))
    if found.get("errors"):
        fields.append(("problems", "; ".join(error.get("message", "") for error in found["errors"]["data"])))
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        click.echo(f"{name.ljust(width)}  {value}")
    shards = extra.get("shards") or []
    click.echo(f"\nshards ({shard_words(found)}):")
    table([[shard["index"], shard.get("job_id") or "-", shard["state"], shard.get("node") or "-", shard["attempts"],
            f"{shard['completed']}/{shard['failed']}/{shard['lines']}", shard.get("reason") or ""] for shard in shards],
          ["SHARD", "JOB", "STATE", "NODE", "ATTEMPTS", "DONE/FAILED/LINES", "REASON"])
    click.echo("\nevents:")
    for event in extra.get("events") or []:
        change = f"{event['from']} -> {event['to']}" if event.get("from") and event["from"] != event["to"] \
            else event["to"]
        click.echo(f"  {moment(event['at'])}  {change}: {event.get('reason') or ''}".rstrip(": "))


@batch.command()
@click.argument("batch_id", metavar="ID")
@click.pass_context
def cancel(ctx, batch_id):
    """Cancel a batch: its Slurm tasks are cancelled, and what was answered is kept: once it is `cancelled`,
    `pilotfish batch download` fetches the partial output and errors. Cancelling an ended batch fails (exit 1).

    Example: pilotfish batch cancel batch_0123abcd
    """
    with BadInput():
        found = portal_of(ctx).batch_cancel(batch_id)
    click.echo(f"{found['id']} {found['status']}: {counts(found)} so far; `pilotfish batch download {found['id']}` "
               f"once it is cancelled")


@batch.command()
@click.argument("batch_id", metavar="ID")
@click.option("-o", "--output", "folder", default=".", show_default=True, metavar="DIR",
              help="The folder to write into (made if missing).")
@click.pass_context
def download(ctx, batch_id, folder):
    """Write a batch's output and errors: DIR/<id>.output.jsonl (one answer per line, in input order) and
    DIR/<id>.errors.jsonl (the lines that failed, each with its reason), whichever it has. A cancelled or expired
    batch has what was answered before it ended. Prints the paths written.

    Example: pilotfish batch download batch_0123abcd -o results/
    """
    portal = portal_of(ctx)
    with BadInput():
        found = portal.batch(batch_id)
    files = [(found.get("output_file_id"), "output"), (found.get("error_file_id"), "errors")]
    files = [(file_id, name) for file_id, name in files if file_id]
    if not files:
        if found["status"] not in ENDED:
            raise Failure(f"batch {found['id']} is {found['status']} ({counts(found)}): its files are written when "
                          f"it ends (`pilotfish batch create ... --wait` waits for that)")
        raise Failure(f"batch {found['id']} {found['status']} without output or errors ({counts(found)})")
    target = Path(folder)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Failure(f"{folder}: cannot make it: {exc.strerror}", 2) from None
    for file_id, name in files:
        data = portal.file_content(file_id)
        path = target / f"{found['id']}.{name}.jsonl"
        try:
            path.write_bytes(data)
        except OSError as exc:
            raise Failure(f"{path}: cannot write it: {exc.strerror}") from None
        lines = data.count(b"\n")
        click.echo(f"{path}  ({lines} line{'s' if lines != 1 else ''})")
