"""Small real model files for the catalog tests: safetensors written by hand, config.json, Hugging Face cache folders."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from tests.support.fake_hub import etag_of

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}
PATTERN = bytes(range(256))


def safetensors_bytes(tensors: Dict[str, Tuple[str, List[int]]], metadata: Optional[dict] = None) -> bytes:
    """A valid .safetensors file: 8-byte little-endian header length, JSON header (padded to 8), tensor data."""
    header, chunks, offset = {}, [], 0
    for name, (dtype, shape) in tensors.items():
        count = 1
        for dim in shape:
            count *= dim
        size = count * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        chunks.append((PATTERN * (size // 256 + 1))[:size])
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)


# A tiny Llama: 2832 parameters, 2816 of them bfloat16 (5632 bytes) and 16 float32 (64 bytes): 5696 tensor bytes.
LLAMA_TENSORS = {
    "model.embed_tokens.weight": ("BF16", [64, 16]),
    "model.layers.0.self_attn.q_proj.weight": ("BF16", [16, 16]),
    "model.layers.0.mlp.up_proj.weight": ("BF16", [32, 16]),
    "model.norm.weight": ("F32", [16]),
    "lm_head.weight": ("BF16", [64, 16]),
}
LLAMA_PARAMS, LLAMA_TENSOR_BYTES = 2832, 5696


def config_json(**fields) -> bytes:
    return json.dumps(fields, indent=1).encode()


def tiny_llama(sharded: bool = False, padding: int = 0) -> Dict[str, bytes]:
    """config.json + weights (one file, or two shards with an index); `padding` adds a big unrelated tensor file."""
    files = {"config.json": config_json(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=16,
                                        torch_dtype="float32"),
             "tokenizer.json": b'{"version": "1.0"}'}
    if not sharded:
        files["model.safetensors"] = safetensors_bytes(LLAMA_TENSORS, {"format": "pt"})
    else:
        names = list(LLAMA_TENSORS)
        first, second = names[:2], names[2:]
        files["model-00001-of-00002.safetensors"] = safetensors_bytes({n: LLAMA_TENSORS[n] for n in first})
        files["model-00002-of-00002.safetensors"] = safetensors_bytes({n: LLAMA_TENSORS[n] for n in second})
        weight_map = {**{n: "model-00001-of-00002.safetensors" for n in first},
                      **{n: "model-00002-of-00002.safetensors" for n in second}}
        files["model.safetensors.index.json"] = json.dumps({"metadata": {"total_size": LLAMA_TENSOR_BYTES},
                                                            "weight_map": weight_map}).encode()
        # Not in the index (as consolidated.safetensors is in some repos): must not be counted.
        files["consolidated.safetensors"] = safetensors_bytes({"x": ("F32", [1000])})
    if padding:
        files["pytorch_model.bin"] = (PATTERN * (padding // 256 + 1))[:padding]
    return files


def sharded_big(shards: int = 3, shard_bytes: int = 512 * 1024) -> Dict[str, bytes]:
    """A causal LM of several float16 shards of about `shard_bytes` each (for progress and cancel tests)."""
    files = {"config.json": config_json(architectures=["GPT2LMHeadModel"], model_type="gpt2")}
    weight_map = {}
    for index in range(shards):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        files[name] = safetensors_bytes({f"h.{index}.weight": ("F16", [shard_bytes // 2])})
        weight_map[f"h.{index}.weight"] = name
    files["model.safetensors.index.json"] = json.dumps({"weight_map": weight_map}).encode()
    return files


def tiny_whisper() -> Dict[str, bytes]:
    """A transformers Whisper: 768 float16 parameters."""
    return {"config.json": config_json(architectures=["WhisperForConditionalGeneration"], model_type="whisper"),
            "model.safetensors": safetensors_bytes({"model.encoder.conv1.weight": ("F16", [8, 4, 3]),
                                                    "model.decoder.embed_tokens.weight": ("F16", [42, 16])})}


def ct2_whisper() -> Dict[str, bytes]:
    """A CTranslate2 Whisper folder as faster-whisper loads it (model.bin is opaque: 4000 bytes here)."""
    return {"model.bin": (PATTERN * 16)[:4000], "vocabulary.txt": b"a\nb\n",
            "config.json": config_json(alignment_heads=[[1, 0]], lang_ids=[50259], suppress_ids=[1],
                                       suppress_ids_begin=[220, 50257])}


def gguf_model() -> Dict[str, bytes]:
    return {"gemma-Q4_K_M.gguf": b"GGUF" + (PATTERN * 12)[:3000], "gemma-Q8_0.gguf": b"GGUF" + (PATTERN * 20)[:5000]}


def commit_for(repo_id: str, files: Dict[str, bytes], salt: str = "") -> str:
    return hashlib.sha1(json.dumps([repo_id, salt, sorted(files)]).encode()).hexdigest()


def write_cache_repo(models_root: Path, repo_id: str, files: Dict[str, bytes], commit: Optional[str] = None,
                     refs: Iterable[str] = ("main",)) -> Path:
    """Lay `files` out as huggingface_hub does: blobs/<etag>, snapshots/<commit>/<file> -> ../../blobs/<etag>."""
    repo_dir = Path(models_root) / ("models--" + repo_id.replace("/", "--"))
    commit = commit or commit_for(repo_id, files)
    snapshot = repo_dir / "snapshots" / commit
    for name, data in files.items():
        blob = repo_dir / "blobs" / etag_of(name, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    for ref in refs:
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot
