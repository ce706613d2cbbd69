"""What every engine module (vllm.py, llama_cpp.py, whisper.py) defines: an Engine (what it serves, how its server
starts, which flags a user may add, how its key reaches it) and how it is installed, with the install steps' error
and runner shared by the installer and the model staging."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence

Progress = Callable[[str], None]

# The key guard (portal/engines/guard/pilotfish_guard.py): one rule for every engine's port, every path needs the
# service key. Its folder holds only that file; jobs put it on PYTHONPATH (engines' venvs have no Pilotfish).
GUARD_DIR = Path(__file__).resolve().parent / "guard"
GUARD_MODULE = "pilotfish_guard"


def with_guard_path(env: Dict[str, str]) -> Dict[str, str]:
    """`env` with the key guard's folder first on PYTHONPATH (as a job script puts it)."""
    return dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(GUARD_DIR), env.get("PYTHONPATH")])))


class InstallError(Exception):
    """An engine or model could not be installed; the message says which step failed and how to see why."""


@dataclass(frozen=True)
class EngineInstall:
    """How the installer puts an engine into its own virtualenv (portal/engines/installer.py)."""
    name: str
    title: str
    packages: List[str]
    size_note: str
    module: str  # what `python -m` runs (and what the install checks imports)
    remove: List[str] = field(default_factory=list)  # packages to uninstall afterwards (they break imports)
    script: Optional[str] = None  # the server is a file of this checkout (run by path: the venv has no Pilotfish)
    env: Dict[str, str] = field(default_factory=dict)  # environment the server needs
    build: str = ""  # how it is built (stamped: an install made another way is replaced)
    recipe_extra: Optional[Callable[[], dict]] = None  # more of what the install is made of, read when it is stamped
    builder: Optional[Callable[[Path, Path, Progress, Path], None]] = None  # (python, folder, progress, log): installs
    # the packages itself (from source) instead of `pip install packages`


@dataclass(frozen=True)
class Preset:
    """Engine flags a launch gets from what its model is (a pooling runner, a tool-call or reasoning parser), unless
    the user's own engine arguments give one of `yields_to`: then theirs are used instead."""
    purpose: str  # what it is for, in words: "pooling", "tool calls", "reasoning"
    flags: tuple  # ("--tool-call-parser", "hermes", ...)
    reason: str  # why this model gets it: "model_type qwen2, and its tokenizer has <tool_call>"
    yields_to: tuple  # the user's flags that replace it

    def applies(self, engine_args: Sequence[str]) -> bool:
        """True unless the user's arguments give one of the flags it yields to."""
        given = {arg.split("=", 1)[0] for arg in engine_args if arg.startswith("-")}
        return not given & set(self.yields_to)

    def to_dict(self, engine_args: Sequence[str] = ()) -> dict:
        return {"purpose": self.purpose, "flags": list(self.flags), "reason": self.reason,
                "yields_to": list(self.yields_to), "applied": self.applies(engine_args)}


@dataclass(frozen=True)
class Engine:
    """A model server: what it serves, how it is started, which flags a user may add, how its key reaches it."""
    name: str  # vllm, llama-cpp, whisper: also the key of its entry in the site config's `runtimes`
    title: str
    kinds: tuple  # the service kinds it serves; the first is the one its check asks (a chat or a transcription)
    formats: tuple  # the model formats it serves unless the site's `engines` says otherwise
    health_path: str
    native_command: str  # the program a native runtime runs when the site names none
    container_command: str  # the program inside the engine's container image
    allowed_flags: FrozenSet[str]
    install: EngineInstall
    key_env: tuple = ()  # variables the server reads its API key from (never a command-line flag)
    check_arguments: tuple = ()  # added when the installer or the doctor checks that it answers
    guarded_module: str = ""  # a server without a middleware option: `-m <it>` in its command runs as
    # `-m pilotfish_guard <it>`, the key guard's launcher (see guarded_command)
    tls_flags: tuple = ("--ssl-keyfile", "--ssl-certfile")  # how its server is given a TLS key and certificate
    flag_kinds: Dict[str, tuple] = field(default_factory=dict)  # flags that apply only to some kinds: flag -> kinds
    # flags that apply only to models taking some inputs: flag -> modalities (catalog/model_kinds.py: image, audio)
    flag_modalities: Dict[str, tuple] = field(default_factory=dict)
    server_env: Dict[str, str] = field(default_factory=dict)  # exported in its every job (before the site's env)
    # empty folders its every job makes in its own folder (read-only) before the server starts, for arguments naming
    # them by a relative path; a container sees each at /<name>, its working folder being /
    job_folders: tuple = ()
    batch_concurrency: int = 2  # a batch shard's requests in flight at once, unless the batch says (portal/batches/)
    serves_adapters: bool = False  # LoRA adapters beside the model, each under its own name (adapter_preset)

    def flags_for(self, kind: str, allowed: FrozenSet[str], modalities: Sequence[str] = ()) -> List[str]:
        """The flags of `allowed` (the site's allow-list for this engine) that apply to a `kind` service of a model
        taking `modalities` (none known: every modality), sorted."""
        return sorted(flag for flag in allowed if kind in self.flag_kinds.get(flag, (kind,))
                      and self.modality_refusal(flag, modalities) is None)

    def modality_refusal(self, flag: str, modalities: Sequence[str]) -> Optional[str]:
        """Why `flag` means nothing to a model taking `modalities` (None: it may, or nothing is known)."""
        needs = self.flag_modalities.get(flag)
        if not needs or not modalities or set(needs) & set(modalities):
            return None
        return f"{flag} applies to models taking {' or '.join(needs)} input; this one takes {', '.join(modalities)}"

    def presets(self, kind: str, model_dir: Optional[Path], meta: dict,
                media_domains: Sequence[str] = ()) -> List[Preset]:
        """The flags a `kind` launch of this model gets unless the user gives their own (none for most engines).
        `meta` is what catalog/models.py's describe_snapshot read (architectures, model_type, format, modalities);
        `media_domains` the site's hosts image URLs may come from."""
        return []

    def adapter_preset(self, adapters: Sequence) -> Preset:
        """The flags serving LoRA `adapters` (catalog/adapters.py's) beside the model, for engines that serve them."""
        raise NotImplementedError(f"{self.title} serves no adapters")

    def tls_arguments(self, key_file: str, cert_file: str) -> List[str]:
        """The server's arguments to serve TLS with the service's key and certificate (portal/service_tls.py)."""
        key_flag, cert_flag = self.tls_flags
        return [key_flag, key_file, cert_flag, cert_file]

    def guarded_command(self, command: str) -> str:
        """The site's `command` with the key guard in front: `-m <guarded_module>` becomes `-m pilotfish_guard
        <guarded_module>` (the rest of the admin's shell words untouched); engines that install the guard another
        way (vLLM's --middleware, our Whisper server itself) run `command` as it is."""
        if not self.guarded_module:
            return command
        pattern = rf"(^|\s)-m\s+{re.escape(self.guarded_module)}(?=\s|$)"
        return re.sub(pattern, lambda match: f"{match.group(1)}-m {GUARD_MODULE} {self.guarded_module}", command,
                      count=1)

    def server_arguments(self, model_path: str, served_name: str, gpus: int, cpus: int = 1,
                         model_file: Optional[str] = None) -> List[str]:
        """The arguments every server of this engine gets: the model and the name it answers to.

        The job script adds `--host 0.0.0.0 --port "$PILOTFISH_PORT"` itself, once the port is chosen.
        """
        return ["--model", model_path, "--served-model-name", served_name]

    def model_arguments(self, model_file: Optional[Path], engine_args: Sequence[str]) -> List[str]:
        """Arguments this model file needs that the user did not give (none for most engines)."""
        return []

    def launch_arguments(self, model_path: str, served_name: str, gpus: int, cpus: int,
                         model_file: Optional[str], engine_args: Sequence[str],
                         presets: Sequence[Preset] = ()) -> List[str]:
        """Everything after the program in a job script: the server's arguments, the model's, the presets the user's
        arguments do not replace, then the user's."""
        preset_args = [flag for preset in presets if preset.applies(engine_args) for flag in preset.flags]
        return (self.server_arguments(model_path, served_name, gpus, cpus=cpus, model_file=model_file)
                + self.model_arguments(Path(model_file) if model_file else None, engine_args) + preset_args
                + list(engine_args))


def say(line: str) -> None:
    """The default progress: a line on stderr."""
    print(line, file=sys.stderr, flush=True)


def run_step(command: List[str], step: str, progress: Progress, log: Path, env: Optional[dict] = None) -> None:
    """Run one install step, its output appended to `log`; a heartbeat line every 30 s while it is quiet."""
    started = time.monotonic()
    with open(log, "ab") as out:
        out.write(f"\n$ {shlex.join(command)}\n".encode())
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        last = started
        while process.poll() is None:
            time.sleep(0.5)
            if time.monotonic() - last >= 30:
                last = time.monotonic()
                progress(f"  … {step}: {int(last - started)} s so far (log: {log})")
    if process.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise InstallError(f"{step} failed (exit {process.returncode}); the end of {log}:\n" + "\n".join(tail))
