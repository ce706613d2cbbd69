"""`pilotfish bench` (load benchmark of a running service) and `pilotfish benchmarks` (the stored runs)."""
from __future__ import annotations

import time

import click

from .command import Failure, age, emit_json, main, note, portal_of, table


def _client_counts(text):
    if text is None:
        return None
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or any(count < 1 for count in counts):
        raise click.BadParameter(f"expected client counts such as 1,2,4,8, got {text!r}", param_hint="--sweep")
    return counts


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _figures_line(name: str, figures: dict) -> str:
    if not figures or not figures.get("count"):
        return f"{name:<13} not measured"
    return f"{name:<13} " + "   ".join(f"{q} {_seconds(figures.get(q))}" for q in ("p50", "p95", "p99"))


def _errors(figures: dict) -> str:
    examples = figures.get("error_examples") or {}
    return ", ".join(f"{kind}: {count}" + (f" ({examples[kind]})" if kind in examples else "")
                     for kind, count in sorted((figures.get("errors") or {}).items())) or "none"


def show_load(figures: dict) -> None:
    click.echo(f"clients       {figures['clients']} ({figures['max_in_flight']} in flight at most)")
    click.echo(f"requests      {figures['completed']} done, {figures['failed']} failed")
    click.echo(f"wall time     {figures['wall_seconds']:.2f} s")
    source = {"usage": "counted from usage", "chunks": "counted as content events", "mixed": "from usage where "
              "reported, else content events", "none": "not counted"}.get(figures["token_source"], "")
    click.echo(f"throughput    {figures['requests_per_second']:.2f} requests/s, "
               f"{figures['output_tokens_per_second']:.1f} output tokens/s ({figures['output_tokens']} tokens, {source})")
    click.echo(_figures_line("TTFT", figures.get("ttft_seconds")))
    click.echo(_figures_line("inter-token", figures.get("itl_seconds")))
    click.echo(_figures_line("latency", figures.get("latency_seconds")))
    click.echo(f"errors        {_errors(figures)}")


def show_sweep(result: dict) -> None:
    rows = [[point["clients"], point["max_in_flight"], f"{point['requests_per_second']:.2f}",
             f"{point['output_tokens_per_second']:.1f}", _seconds(point["ttft_seconds"].get("p50")),
             _seconds(point["ttft_seconds"].get("p95")), point["failed"], "yes" if point["meets_target"] else "no"]
            for point in result["points"]]
    table(rows, ["CLIENTS", "IN FLIGHT", "REQ/S", "TOKENS/S", "TTFT P50", "TTFT P95", "FAILED", "MEETS TARGET"])
    target = f"TTFT p{result['ttft_percentile']} <= {result['ttft_target_seconds']:g} s"
    if result.get("best_clients"):
        click.echo(f"highest load meeting {target}: {result['best_clients']} clients")
    else:
        click.echo(f"no load met {target}")


def show_run(run: dict) -> None:
    where = "through the portal" if run["target"] == "portal" else "directly to the engine"
    click.echo(f"benchmark {run['id']}: service {run['service_id']} ({run['model']}, tier {run['tier'] or '-'}) "
               f"{where}")
    if run["state"] != "DONE":
        click.echo(f"state         {run['state']}" + (f": {run['error']}" if run.get("error") else ""))
    summary = run.get("summary")
    if summary:
        show_sweep(summary) if summary.get("mode") == "sweep" else show_load(summary)


@main.command()
@click.argument("service", metavar="ID|MODEL")
@click.option("--clients", type=click.IntRange(1, 1024), help="Requests in flight at once: each client sends its "
              "next request as soon as its last one ended.")
@click.option("--requests", "request_count", type=click.IntRange(1, 20000), required=True,
              help="Requests in all (with --sweep: per point, and at least as many as that point's clients).")
@click.option("--prompt-len", type=click.IntRange(1, 32768), default=128, show_default=True,
              help="Words per prompt (about one token each).")
@click.option("--max-tokens", type=click.IntRange(1, 32768), default=64, show_default=True,
              help="Tokens to generate per request (the end-of-text token is ignored, so each run generates them all).")
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="Stream the answers (time to first token and inter-token latency need it).")
@click.option("--api", type=click.Choice(["completions", "chat"]), default="completions", show_default=True,
              help="/v1/completions or /v1/chat/completions.")
@click.option("--sweep", help="Client counts to try in turn, such as 1,2,4,8,16 (stops at the first that misses "
              "--ttft-target).")
@click.option("--ttft-target", type=click.FloatRange(min=0, min_open=True),
              help="With --sweep: the highest TTFT p95 in seconds a load may have.")
@click.option("--direct", is_flag=True, help="Call the engine on its node, not through the portal's proxy.")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=300, show_default=True,
              help="Seconds to wait for each answer's next byte.")
@click.option("--no-wait", is_flag=True, help="Print the run id and return (`pilotfish benchmarks ID` shows it).")
@click.option("--json", "as_json", is_flag=True, help="Print the run, with per-request figures, as JSON.")
@click.pass_context
def bench(ctx, service, clients, request_count, prompt_len, max_tokens, stream, api, sweep, ttft_target, direct,
          timeout, no_wait, as_json):
    """Load-benchmark a RUNNING text-generation service: time to first token, inter-token latency, latency
    percentiles, output tokens/s, requests/s and errors, at exactly --clients requests in flight.

    The load runs in the portal (in a process of its own) and is stored with the service, model and tier:
    `pilotfish benchmarks` compares runs. Ctrl-C cancels it.

    \b
    Examples:
      pilotfish bench 3fa2 --clients 8 --requests 64 --max-tokens 128
      pilotfish bench Qwen/Qwen2.5-0.5B-Instruct --sweep 1,2,4,8,16 --ttft-target 1.5 --requests 32
    """
    counts = _client_counts(sweep)
    if counts is None and clients is None:
        raise click.UsageError("--clients is required (or --sweep with client counts)")
    if counts is not None and ttft_target is None:
        raise click.UsageError("--sweep needs --ttft-target (seconds)")
    if counts is None and ttft_target is not None:
        raise click.UsageError("--ttft-target is only used with --sweep")
    body = {"service": service, "requests": request_count, "prompt_len": prompt_len, "max_tokens": max_tokens,
            "stream": stream, "api": api, "timeout": timeout, "target": "direct" if direct else "portal"}
    if clients is not None:
        body["clients"] = clients
    if counts is not None:
        body.update(sweep=counts, ttft_target=ttft_target)
    portal = portal_of(ctx)
    run = portal.request("POST", "/api/benchmarks", json=body).json()
    if no_wait:
        emit_json(run) if as_json else click.echo(run["id"])
        return
    note(f"benchmark {run['id']} of service {run['service_id']} ({run['model']}) started")
    shown = None
    try:
        while run["state"] == "RUNNING":
            time.sleep(1.0)
            run = portal.request("GET", f"/api/benchmarks/{run['id']}").json()
            done = (run.get("progress") or {}).get("done")
            if done is not None and done != shown:
                shown = done
                note(f"{done}/{(run.get('progress') or {}).get('total') or '?'} requests")
    except KeyboardInterrupt:
        portal.request("DELETE", f"/api/benchmarks/{run['id']}")
        note(f"benchmark {run['id']} cancelled")
        raise
    if as_json:
        emit_json(run)
    else:
        show_run(run)
    if run["state"] != "DONE":
        raise Failure(f"benchmark {run['id']} {run['state']}: {run.get('error') or 'no reason given'}")
    summary = run.get("summary") or {}
    points = summary.get("points") if summary.get("mode") == "sweep" else [summary]
    if points and not any(point.get("completed") for point in points):
        raise Failure(f"benchmark {run['id']}: every request failed ({_errors(points[0])})")


@main.command()
@click.argument("run_id", required=False, metavar="[RUN]")
@click.option("--service", help="Only runs of this service (id or prefix).")
@click.option("--model", help="Only runs of this model.")
@click.option("--delete", is_flag=True, help="Cancel RUN if it is running, else delete it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts (one run: with per-request figures).")
@click.pass_context
def benchmarks(ctx, run_id, service, model, delete, as_json):
    """Stored benchmark runs, newest first; with RUN, that run's figures.

    \b
    Examples:
      pilotfish benchmarks --model Qwen/Qwen2.5-0.5B-Instruct
      pilotfish benchmarks 9c1e
    """
    portal = portal_of(ctx)
    if delete:
        if not run_id:
            raise click.UsageError("--delete needs a RUN")
        outcome = portal.request("DELETE", f"/api/benchmarks/{run_id}").json()
        click.echo(" ".join(f"{what} {which}" for what, which in outcome.items()))
        return
    if run_id:
        run = portal.request("GET", f"/api/benchmarks/{run_id}").json()
        emit_json(run) if as_json else show_run(run)
        return
    params = {key: value for key, value in (("service", service), ("model", model)) if value}
    runs = portal.request("GET", "/api/benchmarks", params=params or None).json()["benchmarks"]
    if as_json:
        emit_json(runs)
        return
    rows = []
    for run in runs:
        summary = run.get("summary") or {}
        if summary.get("mode") == "sweep":
            best = summary.get("best_clients")
            figures = next((p for p in summary.get("points", []) if p["clients"] == best), {})
            clients = f"sweep best {best or '-'}"
        else:
            figures, clients = summary, summary.get("clients") or run["params"].get("clients")
        rows.append([run["id"], run["service_id"], run["model"], run["tier"] or "-", clients,
                     f"{figures['requests_per_second']:.2f}" if figures else "-",
                     f"{figures['output_tokens_per_second']:.1f}" if figures else "-",
                     _seconds((figures.get("ttft_seconds") or {}).get("p95")) if figures else "-",
                     run["state"], age(run["created_at"])])
    table(rows, ["ID", "SERVICE", "MODEL", "TIER", "CLIENTS", "REQ/S", "TOKENS/S", "TTFT P95", "STATE", "AGE"])
