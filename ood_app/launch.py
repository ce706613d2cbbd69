"""Run the portal as an Open OnDemand session: gunicorn in the foreground, and when the job ends (stop,
scancel, walltime: Slurm sends SIGTERM, then SIGKILL after KillWait) every service it started is cancelled.

    python -m ood_app.launch --host HOST --port PORT --token-file FILE --placement separate_jobs|this_allocation
        [--idle-timeout MINUTES]

`separate_jobs`: services are Slurm jobs of their own, with time limits that end by the time this job does.
`this_allocation`: services are processes inside this job's allocation (the portal's local scheduler).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

import requests

from portal.connection import connection_path, portal_url, remove_connection, write_connection  # standard library only

PLACEMENTS = {"separate_jobs": "slurm", "this_allocation": "local"}
GUNICORN_STOP_SECONDS = 4  # within Slurm's KillWait (30 s by default): the portal's own cleanup comes first


class SessionEnded(Exception):
    """The job is ending: Slurm (or a person) sent a signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def say(message: str) -> None:
    print(f"pilotfish: {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ood_app.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", required=True, help="this node's name, as Open OnDemand proxies to it")
    parser.add_argument("--port", required=True, type=int, help="the port to listen on (from before.sh)")
    parser.add_argument("--token-file", required=True, type=Path, help="the portal token (0600, from before.sh)")
    parser.add_argument("--placement", required=True, choices=sorted(PLACEMENTS), help="where services run")
    parser.add_argument("--workers", type=int, default=None, help="gunicorn workers (default: portal.gunicorn_conf)")
    parser.add_argument("--idle-timeout", default="", help="the default idle timeout of the services this session "
                                                           "starts (minutes, 0: never; empty: the site's)")
    return parser.parse_args(argv)


def job_deadline(job_id: Optional[str], env: dict) -> Optional[float]:
    """When this Slurm job reaches its time limit (epoch seconds), from squeue; None outside a job or unlimited."""
    if not job_id:
        return None
    try:
        result = subprocess.run(["squeue", "--noheader", f"--jobs={job_id}", "--format=%e"], capture_output=True,
                                text=True, timeout=30, env=env, stdin=subprocess.DEVNULL)
        return datetime.fromisoformat(result.stdout.strip()).timestamp()
    except (OSError, subprocess.SubprocessError, ValueError):
        return None  # "N/A", "Unknown", no squeue: services keep their own limits


def other_portal(home: Path) -> Optional[str]:
    """The URL of another live portal of this user (its connection.json answers /health), if there is one."""
    url = portal_url(home)
    if url is None:
        return None
    try:
        answered = requests.get(f"{url}/health", timeout=3).status_code == 200
    except requests.RequestException:
        return None
    return url if answered else None


def cancel_services(app) -> None:
    """Cancel the job of every live service in the portal's database (the API's own stop), once each."""
    from portal import services

    with app.app_context():
        try:
            live = [service for service in services.list_services("LIVE") if not service.stop_requested]
        except Exception as exc:  # the database is gone or locked: say so, the job is ending anyway
            say(f"could not list the services to cancel: {exc}")
            return
        for service in live:
            try:
                services.stop(service)
                say(f"cancelled service {service.id} ({service.name}, job {service.job_id or 'not submitted'})")
            except Exception as exc:
                say(f"could not cancel service {service.id} (job {service.job_id}): {exc}")
        services.db.session.remove()


def main(argv=None) -> int:
    args = parse_args(argv)
    from portal.scheduler import scrubbed_environment

    job_id = os.environ.get("SLURM_JOB_ID")
    env = scrubbed_environment()  # inherited SLURM_*/SBATCH_* would make every child sbatch part of this job
    prefix = f"/node/{args.host}/{args.port}"
    try:
        token = args.token_file.read_text().strip()
    except OSError as exc:
        say(f"cannot read the portal token {args.token_file}: {exc.strerror}")
        return 1
    if not token:
        say(f"the portal token file {args.token_file} is empty")
        return 1
    env.update(PILOTFISH_URL_PREFIX=prefix, PILOTFISH_SCHEDULER=PLACEMENTS[args.placement], PILOTFISH_TOKEN=token)
    deadline = job_deadline(job_id, env)
    if deadline is not None:
        # Services end by then, and so do the browser's login sessions (a cookie outliving the job is worth nothing).
        env["PILOTFISH_JOB_DEADLINE"] = env["PILOTFISH_SESSION_END"] = f"{deadline:.0f}"
    if args.workers:
        env["PILOTFISH_WORKERS"] = str(args.workers)
    if args.idle_timeout:  # the form's choice; load_config checks it as it checks the site's
        env["PILOTFISH_IDLE_TIMEOUT"] = args.idle_timeout
    os.environ.clear()
    os.environ.update(env)  # the settings of this process (cleanup) and of gunicorn are the same

    from portal.app import create_app
    from portal.config import ConfigError, load_config

    try:
        config = load_config()
        env["PILOTFISH_HOME"] = os.environ["PILOTFISH_HOME"] = str(config.home)
        already = other_portal(config.home)
        if already:
            say(f"a Pilotfish portal of yours already runs at {already} (see {connection_path(config.home)}): "
                f"stop that session first; two portals would share, and cancel, the same services")
            return 1
        app = create_app()  # for the cleanup at the end, ready before anything can end
    except ConfigError as exc:
        say(str(exc))
        return 1

    ended: list = []

    def on_signal(signum, frame):
        if not ended:
            ended.append(signum)
            raise SessionEnded(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)

    gunicorn = None
    code = 0
    try:
        write_connection(config.home, args.host, args.port, token, prefix)
        ends = f", services end by {datetime.fromtimestamp(deadline):%Y-%m-%d %H:%M}" if deadline else ""
        say(f"portal at http://{args.host}:{args.port}{prefix}/ (services: {args.placement.replace('_', ' ')}"
            f"{ends}); notebooks read {connection_path(config.home)}")
        gunicorn = subprocess.Popen([sys.executable, "-m", "gunicorn", "--config", "python:portal.gunicorn_conf",
                                     "--bind", f"0.0.0.0:{args.port}"], env=env, stdin=subprocess.DEVNULL)
        code = gunicorn.wait()
        say(f"the portal (gunicorn) exited with code {code}")
    except SessionEnded as exc:
        say(f"the session is ending ({exc}): cancelling every service it started")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        cancel_services(app)
        if gunicorn is not None and gunicorn.poll() is None:
            gunicorn.terminate()
            try:
                gunicorn.wait(timeout=GUNICORN_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                gunicorn.kill()
                gunicorn.wait()
        cancel_services(app)  # anything a worker submitted while the first pass ran
        remove_connection(config.home, os.getpid())
        say("the portal has stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
