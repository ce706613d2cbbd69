"""Does an engine answer? Start its server as a job would (same command, same arguments, key in the environment) on
this machine with a small real model, send it one real request, stop it.

Used by the installer (an engine is stamped installed only when this passes) and by `pilotfish doctor` (for the
engines a site config names). A failure says what happened in words (a crash names its signal) and where the
server's log is.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import shlex
import socket
import subprocess
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import requests

from ..catalog.kinds import ENGINES
from ..exit_codes import describe_exit
from ..scheduler.job_files import read_tail
from ..scheduler import job_environment
from ..scheduler.processes import end_group
from .base import with_guard_path

CHECK_QUESTION = "What is 2 + 2?"


class EngineCheckFailed(Exception):
    """The engine did not answer; the message names the engine, what went wrong and the log."""


@dataclass
class CheckModel:
    """The small real model an engine is checked with."""
    repo_id: str
    path: Path  # the snapshot folder
    model_file: Optional[str] = None  # a GGUF file inside it


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def silent_wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """A second of silence as 16-bit mono WAV: the speech engine decodes it, runs the model and answers (with no
    words, in about a second; a tone makes Whisper write "beep" for a minute)."""
    frames = bytes(2 * int(seconds * rate))
    out = io.BytesIO()
    with wave.open(out, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(frames)
    return out.getvalue()


def _tail(log: Path, lines: int = 12) -> str:
    """The last non-empty lines of the server's log (read from its end: an engine's log can be long)."""
    kept = [line for line in read_tail(log, 8192).splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def check_engine(engine_name: str, command: str, model: CheckModel, log: Path, setup: str = "",
                 env: Optional[Dict[str, str]] = None, timeout: float = 600) -> str:
    """Run `command` (shell words, as in a site config's `runtimes`) as `engine_name`'s server on `model`, ask it one
    question (or one transcription) and return a one-line summary; raise EngineCheckFailed otherwise."""
    engine = ENGINES[engine_name]
    port = _free_port()
    key = secrets.token_urlsafe(24)
    arguments = engine.server_arguments(str(model.path), model.repo_id, gpus=0, cpus=os.cpu_count() or 1,
                                        model_file=str(model.path / model.model_file) if model.model_file else None)
    arguments += list(engine.check_arguments) + ["--host", "127.0.0.1", "--port", str(port)]
    script = (setup + "\n" if setup else "") + f"exec {engine.guarded_command(command)} {shlex.join(arguments)}\n"
    # As a job's: nothing of the portal's (its token, ...), the key guard importable, the key in the environment.
    server_env = dict(with_guard_path(job_environment()), **(env or {}), HF_HUB_OFFLINE="1", PILOTFISH_API_KEY=key,
                      PILOTFISH_PORT=str(port))
    for name in engine.key_env:
        server_env[name] = key
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log, "ab") as out:
        out.write(f"\n$ {script}".encode())
        out.flush()
        process = subprocess.Popen(["bash", "-c", script], stdout=out, stderr=subprocess.STDOUT, env=server_env,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    session = requests.Session()
    session.trust_env = False
    try:
        deadline = started + timeout
        while True:
            if process.poll() is not None:
                raise EngineCheckFailed(f"{engine.title} ended before it answered: {describe_exit(process.returncode)}"
                                        f"; log: {log}\n{_tail(log)}")
            try:
                if session.get(base + engine.health_path, headers=headers, timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise EngineCheckFailed(f"{engine.title} did not answer within {timeout:.0f} s; log: {log}\n{_tail(log)}")
            time.sleep(0.5)
        ready = time.monotonic() - started
        try:
            if engine.kinds[0] == "speech-recognition":  # its check model is a Whisper model: a transcription
                response = session.post(base + "/v1/audio/transcriptions", headers=headers, timeout=timeout,
                                        files={"file": ("silence.wav", silent_wav(), "audio/wav")},
                                        data={"model": model.repo_id})
                answer = response.json().get("text") if response.status_code == 200 else None
                ok = response.status_code == 200 and isinstance(answer, str)
            else:
                response = session.post(base + "/v1/chat/completions", headers=headers, timeout=timeout, json={
                    "model": model.repo_id, "messages": [{"role": "user", "content": CHECK_QUESTION}],
                    "max_tokens": 16, "temperature": 0})
                choices = response.json().get("choices") if response.status_code == 200 else None
                answer = (choices[0].get("message") or {}).get("content") if choices else None
                ok = isinstance(answer, str)
        except (requests.RequestException, ValueError) as exc:
            code = process.poll()
            what = f"ended while answering: {describe_exit(code)}" if code is not None else \
                f"failed while answering ({type(exc).__name__})"
            raise EngineCheckFailed(f"{engine.title} {what}; log: {log}\n{_tail(log)}") from None
        if not ok:
            raise EngineCheckFailed(f"{engine.title} answered HTTP {response.status_code}: {response.text[:300]}; "
                                    f"log: {log}")
        shown = json.dumps(answer.strip()[:60])
        return f"{engine.title} answered in {time.monotonic() - started - ready:.1f} s (ready after {ready:.0f} s): {shown}"
    finally:
        session.close()
        end_group(process)
