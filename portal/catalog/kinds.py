"""Service kinds (text-generation, speech-recognition) and the runtime each uses on this site."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

from ..config import Config, ConfigError


@dataclass(frozen=True)
class ServiceKind:
    name: str
    description: str
    health_path: str
    default_command: str  # native command used when the site config names none
    key_env: tuple = ()  # extra variables the server reads its API key from


@dataclass(frozen=True)
class Runtime:
    """How a kind's server starts on this site: a shell command run by the job script."""
    kind: ServiceKind
    command: str
    health_path: str
    setup: str = ""  # admin's shell lines run first (module load, source a venv, ...)
    env: Dict[str, str] = field(default_factory=dict)


KINDS: Dict[str, ServiceKind] = {
    kind.name: kind
    for kind in (
        ServiceKind(
            "text-generation",
            "Text generation with vLLM: OpenAI-compatible chat, completions and embeddings",
            "/health",
            'python -m vllm.entrypoints.openai.api_server --model "$PILOTFISH_MODEL" '
            '--served-model-name "$PILOTFISH_MODEL" --host 0.0.0.0 --port "$PILOTFISH_PORT"',
            key_env=("VLLM_API_KEY",),
        ),
        ServiceKind(
            "speech-recognition",
            "Speech recognition with Whisper: OpenAI-compatible audio transcriptions",
            "/health",
            'python -m portal.engines.whisper_server --model "$PILOTFISH_MODEL" --host 0.0.0.0 --port "$PILOTFISH_PORT"',
        ),
    )
}


def get_kind(name: str) -> Optional[ServiceKind]:
    return KINDS.get(name)


def runtime_for(config: Config, kind: ServiceKind) -> Runtime:
    """The runtime of `kind` from the site config's `runtimes` section, or the kind's default command."""
    spec = config.runtimes.get(kind.name) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"runtimes.{kind.name}: expected a mapping with `command`")
    env = spec.get("env") or {}
    if not isinstance(env, dict):
        raise ConfigError(f"runtimes.{kind.name}.env: expected a mapping of variable to value")
    return Runtime(
        kind=kind,
        command=str(spec.get("command") or kind.default_command),
        health_path=str(spec.get("health_path") or kind.health_path),
        setup=str(spec.get("setup") or ""),
        env={str(key): str(value) for key, value in env.items()},
    )
