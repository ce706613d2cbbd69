"""What a model is, from its local files: the service kind its config says (text generation, text embedding, speech
recognition), the kinds it can be launched as, and why; read by catalog/models.py for every snapshot.

- speech-recognition: Whisper (transformers, or a CTranslate2 folder).
- text-embedding: a sentence-transformers folder (`modules.json`, whatever its architecture: BERT, XLM-RoBERTa, or a
  decoder such as Qwen3-Embedding), or a bare encoder or decoder backbone (`BertModel`, `XLMRobertaModel`,
  `MistralModel`: an architecture without a head).
- text-generation: a causal language model (`*ForCausalLM`, `*LMHeadModel`) or a GGUF file. A causal model in
  safetensors can also be launched as text-embedding: vLLM pools its hidden states (`--convert embed`). A
  vision-language model (a config with a vision tower: `vision_config`, LLaVA's `mm_vision_tower`, Qwen-VL's `visual`)
  generates text from text and images, and is launched only as text-generation.

What a model takes as input (`modalities`): text; and images for a vision-language model; audio for Whisper.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

TEXT_GENERATION, TEXT_EMBEDDING, SPEECH_RECOGNITION = "text-generation", "text-embedding", "speech-recognition"
GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel")
VISION_LANGUAGE_SUFFIXES = ("ForConditionalGeneration", *GENERATIVE_SUFFIXES)  # heads generating text after a tower
POOLED_FORMATS = ("safetensors", "pytorch")  # what vLLM loads: a GGUF or CTranslate2 model is not pooled by it
VISION_TOWER_FIELDS = ("vision_config", "mm_vision_tower", "visual")  # where configs describe their vision tower
TEXT, IMAGE, AUDIO = "text", "image", "audio"


def is_generative(architectures: List[str]) -> bool:
    """A causal language model's head: its hidden states can be pooled, but it was trained to generate."""
    return any(arch.endswith(GENERATIVE_SUFFIXES) for arch in architectures)


def is_backbone(architecture: str) -> bool:
    """A transformer without a head (BertModel, XLMRobertaModel, MistralModel): what embedding models ship."""
    return architecture.endswith("Model") and not architecture.endswith(GENERATIVE_SUFFIXES) \
        and "For" not in architecture


def is_vision_language(config: dict) -> bool:
    """A vision-language model's config: a head generating text, and its vision tower described (as a mapping, or
    LLaVA's tower name). CLIP and SigLIP have a vision tower but no such head."""
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    return any(arch.endswith(VISION_LANGUAGE_SUFFIXES) for arch in archs) and any(
        isinstance(config.get(name), (dict, str)) and config.get(name) for name in VISION_TOWER_FIELDS)


def modalities(config: dict, kind: Optional[str]) -> List[str]:
    """What a model of this config and kind takes as input: ["text"], ["text", "image"], ["audio"]; [] unknown."""
    if kind == SPEECH_RECOGNITION:
        return [AUDIO]
    if kind == TEXT_GENERATION and is_vision_language(config):
        return [TEXT, IMAGE]
    return [TEXT] if kind else []


def recognise(config: dict, snapshot: Optional[Path],
              model_format: Optional[str]) -> Tuple[Optional[str], List[str], str]:
    """(kind, the kinds it can be launched as (its kind first), why) for a model's config.json and folder.

    `snapshot` is the model's folder (for `modules.json`), `model_format` what describe_snapshot found (safetensors,
    gguf, ctranslate2, pytorch, or None). An unknown model has kind None and no kinds: it may be launched as any.
    """
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    if "WhisperForConditionalGeneration" in archs or model_type == "whisper" or model_format == "ctranslate2":
        return SPEECH_RECOGNITION, [SPEECH_RECOGNITION], "a Whisper model"
    if snapshot is not None and (snapshot / "modules.json").is_file() and model_format != "gguf":
        return TEXT_EMBEDDING, [TEXT_EMBEDDING], "a sentence-transformers model (modules.json)"
    if model_format == "gguf":
        return TEXT_GENERATION, [TEXT_GENERATION], "a GGUF model"
    if is_vision_language(config) and model_format in POOLED_FORMATS:
        return TEXT_GENERATION, [TEXT_GENERATION], f"a vision-language model ({archs[0]}): text from text and images"
    if is_generative(archs):
        also = [TEXT_EMBEDDING] if model_format in POOLED_FORMATS else []
        return TEXT_GENERATION, [TEXT_GENERATION, *also], f"a causal language model ({archs[0]})"
    backbones = [a for a in archs if is_backbone(a)]
    if backbones:
        return TEXT_EMBEDDING, [TEXT_EMBEDDING], f"a transformer without a head ({backbones[0]})"
    return None, [], "its config names no architecture Pilotfish knows"
