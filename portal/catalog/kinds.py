"""Service kinds (text-generation, speech-recognition), their server arguments, and the runtime each uses on this site."""
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
WHISPER_FLAGS = frozenset({"--compute-type", "--beam-size", "--language", "--device", "--cpu-threads",
                           "--max-model-len", "--dtype", "--gpu-memory-utilization", "--enforce-eager", "--task"})


@dataclass(frozen=True)
class ServiceKind:
    name: str
    description: str
    health_path: str
    native_command: str  # the program a native runtime runs when the site names none
    container_command: str  # the program inside the kind's container image
    allowed_flags: FrozenSet[str]
    key_env: tuple = ()  # variables the server reads its API key from (never a command-line flag)
    tensor_parallel: bool = False  # pass --tensor-parallel-size for more than one GPU

    def server_arguments(self, model_path: str, served_name: str, gpus: int) -> List[str]:
        """The arguments every server of this kind gets: the model and the name it answers to.

        The job script adds `--host 0.0.0.0 --port "$PILOTFISH_PORT"` itself, once the port is chosen.
        """
        args = ["--model", model_path, "--served-model-name", served_name]
        if self.tensor_parallel and gpus > 1:
            args += ["--tensor-parallel-size", str(gpus)]
        return args


KINDS: Dict[str, ServiceKind] = {
    kind.name: kind
    for kind in (
        ServiceKind(
            name="text-generation",
            description="Text generation with vLLM: OpenAI-compatible chat, completions and embeddings",
            health_path="/health",
            native_command="python -m vllm.entrypoints.openai.api_server",
            container_command="python3 -m vllm.entrypoints.openai.api_server",
            allowed_flags=VLLM_FLAGS,
            key_env=("VLLM_API_KEY",),
            tensor_parallel=True,
        ),
        ServiceKind(
            name="speech-recognition",
            description="Speech recognition with Whisper: OpenAI-compatible /v1/audio/transcriptions",
            health_path="/health",
            native_command="python -m portal.engines.whisper_server",
            container_command="python3 -m vllm.entrypoints.openai.api_server",
            allowed_flags=WHISPER_FLAGS,
            key_env=("VLLM_API_KEY",),
        ),
    )
}


@dataclass(frozen=True)
class Runtime:
    """How a kind's server starts on this site: natively (a command) or in an Apptainer image."""
    kind: ServiceKind
    runtime: str
    command: str  # native: the program (admin's shell words); apptainer: the program inside the image
    health_path: str
    setup: str = ""  # admin's shell lines run first (module load, source a venv, ...)
    env: Dict[str, str] = field(default_factory=dict)
    allowed_flags: FrozenSet[str] = frozenset()
    image: Optional[str] = None  # apptainer: the pinned image reference (see catalog.images)


def get_kind(name: str) -> Optional[ServiceKind]:
    return KINDS.get(name)


def runtime_for(config: Config, kind: ServiceKind) -> Runtime:
    """The runtime of `kind` from the site config's `runtimes` section (default: native, the kind's command)."""
    spec = config.runtimes.get(kind.name) or {}
    where = f"runtimes.{kind.name}"
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
    default_command = kind.native_command if runtime == "native" else kind.container_command
    return Runtime(
        kind=kind,
        runtime=runtime,
        command=str(spec.get("command") or default_command),
        health_path=str(spec.get("health_path") or kind.health_path),
        setup=str(spec.get("setup") or ""),
        env={str(key): str(value) for key, value in env.items()},
        allowed_flags=kind.allowed_flags | frozenset(extra),
        image=spec.get("image"),
    )


def check_engine_args(runtime: Runtime, args: List[str]) -> List[str]:
    """Refuse any flag outside the allow-list; values (words not starting with --) pass, quoted later."""
    for arg in args:
        if arg.startswith("-"):
            flag = arg.split("=", 1)[0]
            if flag not in runtime.allowed_flags:
                raise ValidationError("engine_args", f"{flag} is not an allowed {runtime.kind.name} option; allowed: "
                                                     f"{', '.join(sorted(runtime.allowed_flags))}")
    return args
