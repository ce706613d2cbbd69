"""What a model is, from its files: the kind its config says, the kinds it can be launched as, and why."""
from __future__ import annotations

import json

import pytest

from portal.catalog import models
from portal.catalog.kinds import KINDS, kind_of_path
from tests.support.model_builders import (config_json, ct2_whisper, gguf_model, safetensors_bytes, tiny_llama,
                                          tiny_whisper, write_cache_repo)

WEIGHTS = {"model.safetensors": safetensors_bytes({"w": ("F32", [4, 4])})}
MODULES = json.dumps([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                      {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}])
POOLING = json.dumps({"word_embedding_dimension": 4, "pooling_mode_mean_tokens": True})


def sentence_transformers(architecture: str, model_type: str) -> dict:
    return {**WEIGHTS, "config.json": config_json(architectures=[architecture], model_type=model_type),
            "modules.json": MODULES.encode(), "1_Pooling/config.json": POOLING.encode()}


def with_config(**fields) -> dict:
    return {**WEIGHTS, "config.json": config_json(**fields)}


CASES = [
    # (name, files, kind, kinds, words of the reason)
    ("bge", sentence_transformers("BertModel", "bert"), "text-embedding", ["text-embedding"], "sentence-transformers"),
    ("e5-multilingual", sentence_transformers("XLMRobertaModel", "xlm-roberta"), "text-embedding", ["text-embedding"],
     "modules.json"),
    # A decoder trained for embeddings ships a causal LM's config and a sentence-transformers folder: embeddings only.
    ("qwen3-embedding", sentence_transformers("Qwen3ForCausalLM", "qwen3"), "text-embedding", ["text-embedding"],
     "sentence-transformers"),
    ("bare-bert", with_config(architectures=["BertModel"], model_type="bert"), "text-embedding", ["text-embedding"],
     "without a head (BertModel)"),
    ("e5-mistral", with_config(architectures=["MistralModel"], model_type="mistral"), "text-embedding",
     ["text-embedding"], "without a head (MistralModel)"),
    # A causal language model generates, and its hidden states can be pooled (vLLM's --convert embed).
    ("llama", tiny_llama(), "text-generation", ["text-generation", "text-embedding"], "causal language model"),
    ("gpt2", with_config(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "text-generation",
     ["text-generation", "text-embedding"], "GPT2LMHeadModel"),
    # llama.cpp serves GGUF for generation only; Whisper is Whisper in either format.
    ("gguf", gguf_model(), "text-generation", ["text-generation"], "GGUF"),
    ("whisper", tiny_whisper(), "speech-recognition", ["speech-recognition"], "Whisper"),
    ("ct2-whisper", ct2_whisper(), "speech-recognition", ["speech-recognition"], "Whisper"),
    # Heads Pilotfish does not serve: nothing is claimed, any kind may be tried.
    ("cross-encoder", with_config(architectures=["BertForSequenceClassification"], model_type="bert", num_labels=1),
     None, [], "no architecture"),
    ("t5", with_config(architectures=["T5ForConditionalGeneration"], model_type="t5"), None, [], "no architecture"),
    ("no-config", WEIGHTS, None, [], "no architecture"),
]


@pytest.mark.parametrize("name, files, kind, kinds, reason", CASES, ids=[case[0] for case in CASES])
def test_each_model_is_recognised_from_its_files(dirs, name, files, kind, kinds, reason):
    cache, home = dirs
    write_cache_repo(home / "models", f"org/{name}", files)
    entry = models.scan_models(cache, home)[0]
    revision = entry.revisions[0]
    assert (revision.kind, revision.kinds) == (kind, kinds)
    assert reason in revision.meta["kind_reason"]
    assert (entry.to_dict()["kind"], entry.to_dict()["kinds"]) == (kind, kinds)
    assert set(kinds) <= set(KINDS)


def test_a_modules_json_in_a_gguf_folder_does_not_make_it_an_embedding_model(dirs):
    cache, home = dirs
    write_cache_repo(home / "models", "org/gguf", {**gguf_model(), "modules.json": MODULES.encode()})
    assert models.scan_models(cache, home)[0].revisions[0].kinds == ["text-generation"]


@pytest.mark.parametrize("path, kind", [
    ("embeddings", "text-embedding"), ("rerank", "text-embedding"), ("score", "text-embedding"),
    ("chat/completions", "text-generation"), ("completions", "text-generation"),
    ("audio/transcriptions", "speech-recognition"), ("models", None), ("embeddings/extra", None), ("", None),
])
def test_the_kind_answering_each_gateway_path(path, kind):
    assert kind_of_path(path) == kind


TOWER = {"model_type": "siglip_vision_model", "hidden_size": 64, "image_size": 32, "patch_size": 8}
VISION_CASES = [
    # (name, config fields, kind, kinds, modalities): a head generating text after a vision tower takes images.
    ("idefics3", {"architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3",
                  "vision_config": TOWER}, "text-generation", ["text-generation"], ["text", "image"]),
    ("llava-hf", {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
                  "vision_config": {**TOWER, "model_type": "clip_vision_model"}}, "text-generation",
     ["text-generation"], ["text", "image"]),
    ("qwen2-vl", {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
                  "vision_config": {"depth": 2}}, "text-generation", ["text-generation"], ["text", "image"]),
    # The original LLaVA names its tower in the config and its head is a causal LM's: not pooled as embeddings.
    ("llava-original", {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
                        "mm_vision_tower": "openai/clip-vit-large-patch14"}, "text-generation", ["text-generation"],
     ["text", "image"]),
    # CLIP has a vision tower and no head generating text; T5 generates without a tower; an empty tower is none.
    ("clip", {"architectures": ["CLIPModel"], "model_type": "clip", "vision_config": TOWER}, "text-embedding",
     ["text-embedding"], ["text"]),
    ("t5", {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"}, None, [], []),
    ("empty-tower", {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vision_config": {}},
     "text-generation", ["text-generation", "text-embedding"], ["text"]),
]


@pytest.mark.parametrize("name, fields, kind, kinds, modalities", VISION_CASES, ids=[c[0] for c in VISION_CASES])
def test_a_vision_language_model_is_text_generation_taking_images(dirs, name, fields, kind, kinds, modalities):
    cache, home = dirs
    write_cache_repo(home / "models", f"org/{name}", with_config(**fields))
    entry = models.scan_models(cache, home)[0]
    assert (entry.revisions[0].kind, entry.revisions[0].kinds) == (kind, kinds)
    assert entry.revisions[0].meta["modalities"] == modalities
    assert entry.to_dict()["modalities"] == modalities
    if "image" in modalities:
        assert entry.revisions[0].meta["kind_reason"] == (f"a vision-language model ({fields['architectures'][0]}): "
                                                          "text from text and images")


@pytest.mark.parametrize("files, modalities", [(tiny_whisper(), ["audio"]), (tiny_llama(), ["text"]),
                                               (gguf_model(), ["text"]), (WEIGHTS, [])])
def test_what_each_other_model_takes_as_input(dirs, files, modalities):
    cache, home = dirs
    write_cache_repo(home / "models", "org/model", files)
    assert models.scan_models(cache, home)[0].to_dict()["modalities"] == modalities
