"""The `pilotfish` command line."""
from __future__ import annotations

import os
import sys

import click

from ood_app.connection import write_connection

from .config import ConfigError, ensure_token, load_config, prepare_home


def fail(message: str, code: int = 1) -> None:
    click.echo(f"pilotfish: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Pilotfish: run AI model services on your cluster behind one authenticated, OpenAI-compatible URL."""


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


if __name__ == "__main__":
    main()
