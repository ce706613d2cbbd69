"""llama.cpp (llama-cpp-python's server): text generation from one GGUF file, on CPUs or GPUs.

What it is given (the model file, the name it answers to, threads = the job's CPUs, every layer on the GPU when there
is one), the chat format a GGUF file without a chat template needs, and how it is built: from source, ggml's CPU back
end as loadable modules, one per x86-64 level, of which the server loads the best one the node's CPU runs.
"""
from __future__ import annotations

import os
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..catalog.gguf import GGUFError, read_metadata
from .base import Engine, EngineInstall, InstallError, Progress, run_step

FLAGS = frozenset({
    "--n_ctx", "--n_batch", "--n_threads", "--n_gpu_layers", "--chat_format", "--rope_freq_base", "--flash_attn",
    "--cache", "--cache_type", "--verbose", "--seed", "--n_ubatch", "--use_mlock", "--type_k", "--type_v",
})

# llama-cpp-python's chat formats for architectures whose GGUF files often carry no chat template.
CHAT_FORMATS = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "qwen2": "chatml", "qwen3": "chatml"}

LLAMA_CPP_VERSION = "0.3.36"
# ggml's CPU back ends for x86-64, one per instruction-set level (llama.cpp's CMakeLists.txt names them); the server
# loads the best one this CPU runs, at start. Built by default: the baseline and the levels up to AVX2, which every
# x86-64 CPU of a cluster runs correctly. PILOTFISH_LLAMA_CPU_VARIANTS (comma-separated names) builds others too.
X86_CPU_VARIANTS = ("x64", "sse42", "sandybridge", "ivybridge", "piledriver", "haswell", "skylakex", "cannonlake",
                    "cascadelake", "icelake", "cooperlake", "zen4", "alderlake", "sapphirerapids")
PORTABLE_CPU_VARIANTS = ("x64", "sse42", "sandybridge", "haswell")


def chat_format_for(path: Path) -> Optional[str]:
    """The --chat_format llama.cpp needs for this file: None when it carries its own chat template (or is unknown)."""
    try:
        metadata = read_metadata(path)
    except (OSError, GGUFError):
        return None
    if isinstance(metadata.get("tokenizer.chat_template"), str):
        return None
    return CHAT_FORMATS.get(str(metadata.get("general.architecture", "")))


# --- building it -------------------------------------------------------------------------------------------

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


def backends_in(base: Path) -> Path:
    """Where the CPU back ends of the install in `base` go (compiled into it: the engines folder must not move)."""
    return base / "ggml-cpu"


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


def build(python: Path, base: Path, progress: Progress, log: Path) -> None:
    """llama-cpp-python from source with ggml's CPU back ends as loadable modules, one per x86-64 level
    (GGML_BACKEND_DL, GGML_CPU_ALL_VARIANTS, as llama.cpp's release builds), never tuned to this machine's CPU
    (GGML_NATIVE=OFF), and never a wheel pip cached from an earlier build."""
    variants = cpu_variants()
    source = base / "src"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    run_step(pip + ["download", "--no-deps", "--no-binary", ":all:", "-d", str(source),
                    f"llama-cpp-python=={LLAMA_CPP_VERSION}"], "downloading llama-cpp-python's source", progress, log)
    tarball = next(source.glob("llama_cpp_python-*.tar.gz"), None)
    if tarball is None:
        raise InstallError(f"pip download gave no llama-cpp-python source archive in {source} (log: {log})")
    with tarfile.open(tarball) as archive:
        archive.extractall(source, filter="data")
    tree = source / f"llama_cpp_python-{LLAMA_CPP_VERSION}"
    restrict_cpu_variants(tree / "vendor" / "llama.cpp" / "ggml" / "src" / "CMakeLists.txt", variants)
    backends = backends_in(base)
    shutil.rmtree(backends, ignore_errors=True)
    backends.mkdir(parents=True)
    flags = ["-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON",
             f"-DGGML_BACKEND_DIR={backends}"]
    env = dict(os.environ, CMAKE_ARGS=" ".join(flags + [os.environ.get("CMAKE_ARGS", "")]).strip(),
               CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1)))
    progress(f"  llama.cpp: CPU back ends {', '.join(variants)}, chosen at run time; installed into {backends}")
    run_step(pip + ["install", "--no-cache-dir", f"{tree}[server]"],
             f"compiling llama.cpp ({len(variants)} CPU back ends)", progress, log, env=env)
    built = sorted(path.name for path in backends.glob("libggml-cpu-*.so"))
    wanted = [f"libggml-cpu-{name}.so" for name in variants]
    if not set(wanted) <= set(built):
        raise InstallError(f"the llama.cpp build left {', '.join(built) or 'no CPU back ends'} in {backends}, "
                           f"expected {', '.join(wanted)} (log: {log})")
    shutil.rmtree(source, ignore_errors=True)


INSTALL = EngineInstall(
    name="llama-cpp", title="llama.cpp server (llama-cpp-python)",
    packages=[f"llama-cpp-python[server]=={LLAMA_CPP_VERSION}"],
    size_note="compiles llama.cpp from source, one CPU back end per x86-64 level: about 9 minutes on 2 cores",
    module="llama_cpp.server",
    build="portable-cpu-variants",
    recipe_extra=lambda: {"cpu_variants": list(cpu_variants())},
    builder=build,
)


# --- serving -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LlamaCpp(Engine):
    """llama-cpp-python's server: one model file, answering under the repo id, requests queued, not interrupted."""

    def server_arguments(self, model_path: str, served_name: str, gpus: int, cpus: int = 1,
                         model_file: Optional[str] = None) -> List[str]:
        # One model file; requests queue instead of interrupting each other; threads = the job's CPUs.
        return ["--model", model_file or model_path, "--model_alias", served_name, "--interrupt_requests", "false",
                "--n_threads", str(max(1, cpus))] + (["--n_gpu_layers", "-1"] if gpus else [])

    def model_arguments(self, model_file: Optional[Path], engine_args: Sequence[str]) -> List[str]:
        """--chat_format for a GGUF file without a chat template of its own (chats would come back empty)."""
        if model_file is None or "--chat_format" in engine_args:
            return []
        chat_format = chat_format_for(model_file)
        return ["--chat_format", chat_format] if chat_format else []


ENGINE = LlamaCpp(
    name="llama-cpp", title="llama.cpp", kinds=("text-generation",), formats=("gguf",),
    health_path="/v1/models",  # the server has no /health; the probe sends the service key
    native_command="python -m llama_cpp.server",
    container_command="python3 -m llama_cpp.server",
    allowed_flags=FLAGS, install=INSTALL, key_env=("API_KEY",),
    # Its api_key covers its API routes but not /docs, /openapi.json, /redoc: the key guard's launcher runs it.
    guarded_module="llama_cpp.server",
    tls_flags=("--ssl_keyfile", "--ssl_certfile"),  # the server's settings, spelt as its command line takes them
)
