"""Service kinds (text-generation, speech-recognition), the engines serving them (vLLM, llama.cpp, faster-whisper),
the engine chosen for a model's format, and the runtime each engine uses on this site."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional

from ..config import Config, ConfigError
from ..errors import ValidationError

RUNTIMES = ("native", "apptainer")

# Engine flags a user may add (vLLM's names); everything the portal sets itself (model, port, host, key,
# served name, tensor parallelism) is deliberately absent.
VLLM_FLAGS = frozenset({
    "--max-model-len", "--dtype", "--gpu-memory-utilization", "--max-num-seqs", "--max-num-batched-tokens",
    "--enforce-eager", "--quantization", "--kv-cache-dtype", "--enable-prefix-caching", "--no-enable-prefix-caching",
    "--seed", "--swap-space", "--chat-template", "--tokenizer-mode", "--enable-auto-tool-choice",
    "--tool-call-parser", "--trust-remote-code", "--generation-config", "--enable-chunked-prefill",
    "--max-logprobs", "--disable-log-requests", "--disable-log-stats", "--limit-mm-per-prompt", "--task",
    "--pipeline-parallel-size", "--cpu-offload-gb", "--enable-lora", "--max-lora-rank", "--reasoning-parser",
})
WHISPER_FLAGS = frozenset({"--compute-type", "--beam-size", "--language", "--device", "--cpu-threads"})
LLAMA_CPP_FLAGS = frozenset({
    "--n_ctx", "--n_batch", "--n_threads", "--n_gpu_layers", "--chat_format", "--rope_freq_base", "--flash_attn",
    "--cache", "--cache_type", "--verbose", "--seed", "--n_ubatch", "--use_mlock", "--type_k", "--type_v",
})


@dataclass(frozen=True)
class Engine:
    """A model server: what it serves, how it is started, which flags a user may add, how its key reaches it."""
    name: str  # vllm, llama-cpp, whisper: also the key of its entry in the site config's `runtimes`
    title: str
    kinds: tuple  # the service kinds it serves
    health_path: str
    native_command: str  # the program a native runtime runs when the site names none
    container_command: str  # the program inside the engine's container image
    allowed_flags: FrozenSet[str]
    key_env: tuple = ()  # variables the server reads its API key from (never a command-line flag)
    tensor_parallel: bool = False  # pass --tensor-parallel-size for more than one GPU

    def server_arguments(self, model_path: str, served_name: str, gpus: int, cpus: int = 1,
                         model_file: Optional[str] = None) -> List[str]:
        """The arguments every server of this engine gets: the model and the name it answers to.

        The job script adds `--host 0.0.0.0 --port "$PILOTFISH_PORT"` itself, once the port is chosen.
        """
        if self.name == "llama-cpp":
            # One model file; requests queue instead of interrupting each other; threads = the job's CPUs.
            return ["--model", model_file or model_path, "--model_alias", served_name, "--interrupt_requests", "false",
                    "--n_threads", str(max(1, cpus))] + (["--n_gpu_layers", "-1"] if gpus else [])
        args = ["--model", model_path, "--served-model-name", served_name]
        if self.tensor_parallel and gpus > 1:
            args += ["--tensor-parallel-size", str(gpus)]
        return args


ENGINES: Dict[str, Engine] = {
    engine.name: engine
    for engine in (
        Engine(
            name="vllm", title="vLLM", kinds=("text-generation", "speech-recognition"),
            health_path="/health",
            native_command="python -m vllm.entrypoints.openai.api_server",
            container_command="python3 -m vllm.entrypoints.openai.api_server",
            allowed_flags=VLLM_FLAGS, key_env=("VLLM_API_KEY",), tensor_parallel=True,
        ),
        Engine(
            name="llama-cpp", title="llama.cpp", kinds=("text-generation",),
            health_path="/v1/models",  # the server has no /health; the probe sends the service key
            native_command="python -m llama_cpp.server",
            container_command="python3 -m llama_cpp.server",
            allowed_flags=LLAMA_CPP_FLAGS, key_env=("API_KEY",),
        ),
        Engine(
            name="whisper", title="faster-whisper", kinds=("speech-recognition",),
            health_path="/health",
            native_command="python -m portal.engines.whisper_server",
            container_command="python3 -m portal.engines.whisper_server",
            allowed_flags=WHISPER_FLAGS,  # the server reads PILOTFISH_API_KEY, set for every job
        ),
    )
}

# The engine for a model's format; a site changes it with `engines:` in its config (format: engine).
FORMAT_ENGINES: Dict[str, str] = {"safetensors": "vllm", "gguf": "llama-cpp", "ctranslate2": "whisper"}


@dataclass(frozen=True)
class ServiceKind:
    name: str
    description: str
    default_engine: str  # for models whose format says nothing (or a format no engine is set for)

    @property
    def engines(self) -> List[str]:
        return [name for name, engine in ENGINES.items() if self.name in engine.kinds]


KINDS: Dict[str, ServiceKind] = {
    kind.name: kind
    for kind in (
        ServiceKind(name="text-generation", default_engine="vllm",
                    description="Text generation (vLLM for safetensors, llama.cpp for GGUF): OpenAI-compatible chat, "
                                "completions and embeddings"),
        ServiceKind(name="speech-recognition", default_engine="whisper",
                    description="Speech recognition with Whisper: OpenAI-compatible /v1/audio/transcriptions"),
    )
}


@dataclass(frozen=True)
class Runtime:
    """How an engine's server starts on this site: natively (a command) or in an Apptainer image."""
    kind: ServiceKind
    engine: Engine
    runtime: str
    command: str  # native: the program (admin's shell words); apptainer: the program inside the image
    health_path: str
    setup: str = ""  # admin's shell lines run first (module load, source a venv, ...)
    env: Dict[str, str] = field(default_factory=dict)
    allowed_flags: FrozenSet[str] = frozenset()
    image: Optional[str] = None  # apptainer: the pinned image reference (see catalog.images)
    config_key: str = ""  # the `runtimes` entry it came from (the engine's name or, as a fallback, the kind's)


def get_kind(name: str) -> Optional[ServiceKind]:
    return KINDS.get(name)


def engine_for(config: Config, kind: ServiceKind, model_format: Optional[str]) -> Engine:
    """The engine that serves a `kind` model of `model_format`: the site's `engines` mapping, else FORMAT_ENGINES."""
    site = getattr(config, "engines", None) or {}
    name = site.get(model_format) or FORMAT_ENGINES.get(model_format or "")
    if name is None or kind.name not in ENGINES[name].kinds:
        if model_format in site:  # the site asked for it: say so rather than silently picking another
            raise ValidationError("model", f"the site serves {model_format} models with {name}, which does not "
                                           f"serve {kind.name}")
        name = kind.default_engine
    return ENGINES[name]


def runtime_for(config: Config, kind: ServiceKind, engine: Optional[Engine] = None) -> Runtime:
    """The runtime of `engine` (default: the kind's) from the site config's `runtimes` section.

    The entry named after the engine wins; an entry named after the kind applies to every engine of that kind
    without its own entry; with neither, the engine's own command runs natively.
    """
    engine = engine or ENGINES[kind.default_engine]
    key = engine.name if engine.name in config.runtimes else kind.name
    spec = config.runtimes.get(key) or {}
    where = f"runtimes.{key}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping with `runtime` and `command` or `image`")
    runtime = spec.get("runtime", "native")
    if runtime not in RUNTIMES:
        raise ConfigError(f"{where}.runtime: expected one of {', '.join(RUNTIMES)}, got {runtime!r}")
    env = spec.get("env") or {}
    if not isinstance(env, dict):
        raise ConfigError(f"{where}.env: expected a mapping of variable to value")
    extra = spec.get("allowed_args") or []
    if not isinstance(extra, list) or not all(isinstance(flag, str) and flag.startswith("--") for flag in extra):
        raise ConfigError(f"{where}.allowed_args: expected a list of flags such as --max-model-len")
    default_command = engine.native_command if runtime == "native" else engine.container_command
    return Runtime(
        kind=kind,
        engine=engine,
        runtime=runtime,
        command=str(spec.get("command") or default_command),
        health_path=str(spec.get("health_path") or engine.health_path),
        setup=str(spec.get("setup") or ""),
        env={str(key): str(value) for key, value in env.items()},
        allowed_flags=engine.allowed_flags | frozenset(extra),
        image=spec.get("image"),
        config_key=key if key in config.runtimes else "",
    )


def check_engine_args(runtime: Runtime, args: List[str]) -> List[str]:
    """Refuse any flag outside the allow-list; values (words not starting with --) pass, quoted later."""
    for arg in args:
        if arg.startswith("-"):
            flag = arg.split("=", 1)[0]
            if flag not in runtime.allowed_flags:
                raise ValidationError("engine_args", f"{flag} is not an allowed {runtime.engine.title} option; allowed: "
                                                     f"{', '.join(sorted(runtime.allowed_flags))}")
    return args
