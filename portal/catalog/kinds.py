"""Service kinds (text-generation, speech-recognition) and the engines that serve them (vLLM, llama.cpp,
faster-whisper: one module each under portal/engines/), with the engine each model format gets unless the site says
otherwise. What a site makes of them (runtimes, its own format mapping) is portal/site.py's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from ..engines import llama_cpp, vllm, whisper
from ..engines.base import Engine

ENGINES: Dict[str, Engine] = {engine.name: engine for engine in (vllm.ENGINE, llama_cpp.ENGINE, whisper.ENGINE)}

# The engine for a model's format; a site changes it with `engines:` in its config (format: engine).
FORMAT_ENGINES: Dict[str, str] = {model_format: engine.name for engine in ENGINES.values()
                                  for model_format in engine.formats}


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


def get_kind(name: str) -> Optional[ServiceKind]:
    return KINDS.get(name)
