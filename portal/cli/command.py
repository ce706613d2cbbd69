"""The `pilotfish` command group and what every command shares: errors as one `pilotfish: ...` line with an exit code,
finding the portal, JSON and table output."""
from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Optional

import click

from ..client import PortalClientError, connect

KINDS = ("text-generation", "text-embedding", "speech-recognition")


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
    """How long ago an ISO time was, shortly: "45s", "12m", "3h", "2d"."""
    return _span(iso_time, since=True)


def until(iso_time) -> str:
    """How long until an ISO time, shortly ("12m"; "0s" once it has passed); "" for none."""
    return _span(iso_time, since=False)


def local_time(iso_time) -> str:
    """An ISO time in this machine's local time: "18:00" today, else "2026-12-01 18:00"; "" for none."""
    if not iso_time:
        return ""
    moment = _moment(iso_time)
    if moment is None:
        return str(iso_time)
    moment = moment.astimezone()
    return f"{moment:%H:%M}" if moment.date() == datetime.now().astimezone().date() else f"{moment:%Y-%m-%d %H:%M}"


def renewal(service: dict, short: bool = False) -> str:
    """A service's renewal in words: "renews until stopped (generation 3)", "renews until 18:00 (in 5h; generation
    1)"; "" when it is not renewed. `short`, for tables: "until 18:00 (gen 1)"."""
    if not service.get("renew"):
        return ""
    ends = service.get("renew_until")
    generation = f"gen {service.get('generation') or 1}" if short else f"generation {service.get('generation') or 1}"
    left = until(ends) if ends else ""
    when = f"until {local_time(ends)}" if ends else "until stopped"
    notes = "; ".join(part for part in (f"in {left}" if left and left != "0s" and not short else "", generation)
                      if part)
    return f"{when} ({notes})" if short else f"renews {when} ({notes})"


def replicas(service: dict, short: bool = False) -> str:
    """A service's replicas in words: "2 of 1:3 jobs serving (one added above 4 requests in flight per job)" (the
    answer's count of serving jobs: the current one while RUNNING and the replicas that answered); "" for a service
    of one job. `short`, for tables: "2 of 1:3"."""
    counts = service.get("replicas")
    if not counts:
        return ""
    low, high = counts.get("min"), counts.get("max")
    span = f"{low}" if low == high else f"{low}:{high}"
    if "serving" not in counts:  # a plan: nothing serves yet
        return span if short else f"{span} jobs"
    serving = counts["serving"]
    if short:
        return f"{serving} of {span}"
    scaling = (f" (one added above {counts.get('target_in_flight')} requests in flight per job)"
               if low != high and counts.get("target_in_flight") else "")
    return f"{serving} of {span} jobs serving{scaling}"


def _moment(iso_time) -> Optional[datetime]:
    """An ISO time from the API as an aware datetime (UTC when it names no zone); None when it is not one."""
    try:
        moment = datetime.fromisoformat(str(iso_time).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _span(iso_time, since: bool) -> str:
    if not iso_time:
        return ""
    then = _moment(iso_time)
    if then is None:
        return str(iso_time)
    seconds = int((datetime.now(timezone.utc) - then).total_seconds()) * (1 if since else -1)
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
