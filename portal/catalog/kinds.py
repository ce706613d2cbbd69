"""Service kinds (text-generation, text-embedding, speech-recognition) and the engines that serve them (vLLM,
llama.cpp, faster-whisper: one module each under portal/engines/), with the engine each model format gets unless the
site says otherwise. What a site makes of them (runtimes, its own format mapping) is portal/site.py's; which kind a
model is, catalog/model_kinds.py's."""
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
    paths: tuple = ()  # the gateway paths (below /v1/) its services answer: where a model served as several kinds goes

    @property
    def engines(self) -> List[str]:
        return [name for name, engine in ENGINES.items() if self.name in engine.kinds]


KINDS: Dict[str, ServiceKind] = {
    kind.name: kind
    for kind in (
        ServiceKind(name="text-generation", default_engine="vllm",
                    description="Text generation (vLLM for safetensors, llama.cpp for GGUF): OpenAI-compatible chat "
                                "and completions, with JSON-schema answers and tool calls on vLLM",
                    paths=("chat/completions", "completions", "responses")),
        ServiceKind(name="text-embedding", default_engine="vllm",
                    description="Text embeddings with vLLM (encoders such as BERT, sentence-transformers models, or a "
                                "language model's pooled states): /v1/embeddings, and /v1/rerank and /v1/score by "
                                "cosine similarity",
                    paths=("embeddings", "rerank", "score")),
        ServiceKind(name="speech-recognition", default_engine="whisper",
                    description="Speech recognition with Whisper: OpenAI-compatible /v1/audio/transcriptions",
                    paths=("audio/transcriptions", "audio/translations")),
    )
}


def get_kind(name: str) -> Optional[ServiceKind]:
    return KINDS.get(name)


def kind_of_path(path: str) -> Optional[str]:
    """The kind whose services answer a gateway path (below /v1/, e.g. "embeddings"), or None for any other path."""
    path = path.split("?", 1)[0].strip("/")
    return next((kind.name for kind in KINDS.values() if path in kind.paths), None)
