"""What applies to a launch of a model as a kind: the kinds it may be launched as, the flags it gets from what it is
(vLLM's pooling runner, the family's tool-call and reasoning parsers, each replaced by a flag of the user's), the
flags that apply to its kind; through GET /api/launch-options and the dry run (the plan and job script a launch
uses)."""
from __future__ import annotations

import json
import os
import shlex

import pytest

from portal.app import create_app
from portal.catalog.inventory import refresh_inventory
from portal.catalog import inventory
from portal.engines import vllm_parsers
from tests.conftest import vllm_dry_run_api, write_site_config
from tests.support.model_builders import config_json, safetensors_bytes, tiny_llama, write_cache_repo

WEIGHTS = {"model.safetensors": safetensors_bytes({"w": ("BF16", [8, 4])})}


def tokenizer_config(*tokens: str, ascii_only: bool = True) -> bytes:
    """A tokenizer_config.json holding `tokens` as added tokens (as transformers writes it)."""
    added = {str(100 + index): {"content": token, "special": True} for index, token in enumerate(tokens)}
    return json.dumps({"added_tokens_decoder": added}, ensure_ascii=ascii_only).encode()


MODELS = {
    "org/llama-3": {**tiny_llama(), "tokenizer_config.json": tokenizer_config("<|python_tag|>", "<|eom_id|>")},
    "org/llama-2": {**tiny_llama(), "tokenizer_config.json": tokenizer_config("<s>", "</s>")},
    "org/hermes-llama": {**tiny_llama(), "tokenizer_config.json": tokenizer_config("<|python_tag|>", "<tool_call>",
                                                                                  "</tool_call>")},
    "org/qwen3": {**WEIGHTS, "config.json": config_json(architectures=["Qwen3ForCausalLM"], model_type="qwen3"),
                  "tokenizer.json": json.dumps({"added_tokens": [{"content": t} for t in (
                      "<tool_call>", "</tool_call>", "<think>", "</think>")]}).encode()},
    "org/deepseek": {**WEIGHTS, "config.json": config_json(architectures=["DeepseekV3ForCausalLM"],
                                                           model_type="deepseek_v3"),
                     "tokenizer_config.json": tokenizer_config(
                         "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<think>", "</think>", ascii_only=True)},
    "org/bge": {**WEIGHTS, "config.json": config_json(architectures=["BertModel"], model_type="bert"),
                "modules.json": b"[]"},
    "org/smolvlm": {**WEIGHTS, "config.json": config_json(architectures=["Idefics3ForConditionalGeneration"],
                                                          model_type="idefics3", vision_config={"patch_size": 8})},
}


@pytest.fixture
def api(tmp_path, monkeypatch):
    """A portal app whose site serves every kind with vLLM (dry runs only: nothing is submitted)."""
    return vllm_dry_run_api(tmp_path, monkeypatch, MODELS)


def options(api, model, kind=None):
    response = api("GET", "/api/launch-options", query_string={"model": model, **({"kind": kind} if kind else {})})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def dry_run(api, model, kind, engine_args=()):
    response = api("POST", "/api/services?dry_run=1", json={"kind": kind, "model": model,
                                                            "engine_args": list(engine_args)})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def preset_flags(answer):
    return [(preset["purpose"], " ".join(preset["flags"]), preset["applied"]) for preset in answer["presets"]]


@pytest.mark.parametrize("model, kind, presets", [
    ("org/llama-3", None, [("tool calls", "--enable-auto-tool-choice --tool-call-parser llama3_json", True)]),
    ("org/llama-2", None, []),  # a Llama without <|python_tag|>: vLLM would refuse llama3_json on its tokenizer
    ("org/hermes-llama", None, [("tool calls", "--enable-auto-tool-choice --tool-call-parser hermes", True)]),
    ("org/qwen3", None, [("tool calls", "--enable-auto-tool-choice --tool-call-parser hermes", True),
                         ("reasoning", "--reasoning-parser qwen3", True)]),
    ("org/deepseek", None, [("tool calls", "--enable-auto-tool-choice --tool-call-parser deepseek_v3", True),
                            ("reasoning", "--reasoning-parser deepseek_v3", True)]),
    ("org/bge", None, [("pooling", "--runner pooling", True)]),
    ("org/smolvlm", None, [("images", "--allowed-media-domains remote-image-urls-are-refused.invalid "
                                      "--allowed-local-media-path no-local-media", True)]),
    ("org/llama-3", "text-embedding", [("pooling", "--runner pooling", True), ("pooling", "--convert embed", True)]),
])
def test_presets_follow_the_family_and_the_tokenizer(api, model, kind, presets):
    answer = options(api, model, kind)
    assert preset_flags(answer) == presets
    assert answer["engine"] == "vllm"
    plan = dry_run(api, model, answer["kind"])
    assert preset_flags(plan) == presets
    added = [flag for _purpose, flags, _applied in presets for flag in flags.split()]
    arguments = plan["arguments"]
    at = arguments.index("--served-model-name") + 2
    assert arguments[at:at + len(added)] == added  # after the portal's own arguments, before the user's
    assert shlex.join(added) in plan["job_script"]


def test_the_reason_names_the_family_and_the_tokens(api):
    tool, reasoning = options(api, "org/qwen3")["presets"]
    assert tool["reason"] == "model_type qwen3, and its tokenizer has <tool_call> </tool_call>"
    assert reasoning["reason"] == "model_type qwen3, and its tokenizer has <think> </think>"
    assert tool["yields_to"] == ["--no-enable-auto-tool-choice", "--tool-call-parser"]


def test_the_kinds_each_model_launches_as_and_the_flags_that_apply(api):
    llama = options(api, "org/llama-3")
    assert (llama["kind"], llama["kinds"], llama["model_kind"]) == (
        "text-generation", ["text-generation", "text-embedding"], "text-generation")
    assert {"--tool-call-parser", "--reasoning-parser", "--structured-outputs-config", "--max-model-len"} \
        <= set(llama["flags"])
    assert not {"--runner", "--convert", "--pooler-config"} & set(llama["flags"])
    bge = options(api, "org/bge")
    assert (bge["kind"], bge["kinds"], bge["kind_reason"]) == (
        "text-embedding", ["text-embedding"], "a sentence-transformers model (modules.json)")
    assert {"--runner", "--convert", "--pooler-config", "--max-model-len"} <= set(bge["flags"])
    assert not {"--tool-call-parser", "--reasoning-parser", "--enable-auto-tool-choice"} & set(bge["flags"])
    assert bge["flags"] == sorted(bge["flags"])


@pytest.mark.parametrize("engine_args, added, kept", [
    # Another parser of the user's replaces the tool preset; the reasoning preset stays.
    (["--tool-call-parser", "pythonic"], ["--reasoning-parser", "qwen3"], [False, True]),
    (["--tool-call-parser=pythonic"], ["--reasoning-parser", "qwen3"], [False, True]),
    # None at all: no auto tool choice, and an empty reasoning parser (vLLM's own default, none).
    (["--no-enable-auto-tool-choice", "--reasoning-parser", ""], [], [False, False]),
    # Auto tool choice asked for without a parser: the preset's parser still comes with it.
    (["--enable-auto-tool-choice"], ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser",
                                     "qwen3"], [True, True]),
])
def test_a_flag_of_the_users_replaces_the_preset_it_concerns(api, engine_args, added, kept):
    plan = dry_run(api, "org/qwen3", "text-generation", engine_args)
    assert [preset["applied"] for preset in plan["presets"]] == kept
    arguments = plan["arguments"]
    at = arguments.index("--served-model-name") + 2
    assert arguments[at:] == added + engine_args
    assert arguments.count("--tool-call-parser") <= 1


@pytest.mark.parametrize("model, kind, engine_args, words", [
    ("org/bge", "text-embedding", ["--tool-call-parser", "hermes"],
     "--tool-call-parser applies to text-generation services, not text-embedding"),
    ("org/bge", "text-embedding", ["--reasoning-parser=qwen3"], "--reasoning-parser applies to text-generation"),
    ("org/llama-3", "text-generation", ["--runner", "pooling"], "--runner applies to text-embedding services"),
    ("org/llama-3", "text-generation", ["--pooler-config", "{}"], "--pooler-config applies to text-embedding"),
])
def test_flags_that_mean_nothing_to_the_kind_are_refused(api, model, kind, engine_args, words):
    response = api("POST", "/api/services?dry_run=1", json={"kind": kind, "model": model, "engine_args": engine_args})
    assert response.status_code == 400
    assert response.get_json()["field"] == "engine_args" and words in response.get_json()["error"]


def test_a_kind_the_model_cannot_be_launched_as_is_refused_naming_its_kinds(api):
    for path, kwargs in (("/api/services?dry_run=1", {"json": {"kind": "text-generation", "model": "org/bge"}}),
                         ("/api/launch-options", {"query_string": {"model": "org/bge", "kind": "text-generation"}})):
        response = api("POST" if "services" in path else "GET", path, **kwargs)
        assert response.status_code == 400
        assert response.get_json()["field"] == "model"
        assert response.get_json()["error"] == (
            "model: org/bge is a text-embedding model, not text-generation (a sentence-transformers model "
            "(modules.json)): launch it as text-embedding")
    response = api("GET", "/api/launch-options", query_string={"model": "org/llama-3", "kind": "speech-recognition"})
    assert response.status_code == 400
    assert "launch it as text-generation (or text-embedding)" in response.get_json()["error"]


@pytest.mark.parametrize("query, field", [
    ({"model": "org/llama-3", "kind": "image-generation"}, "kind"),
    ({"model": "not a repo"}, "model"),
    ({}, "model"),
    ({"model": "org/absent"}, "model"),
])
def test_bad_option_queries_are_refused_naming_the_field(api, query, field):
    response = api("GET", "/api/launch-options", query_string=query)
    assert response.status_code == 400
    assert response.get_json()["field"] == field, response.get_json()


def test_tokens_are_found_escaped_or_not_and_hostile_files_are_not_opened(tmp_path):
    marker = ("<｜tool▁calls▁begin｜>",)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"content": marker[0]}]}, ensure_ascii=False))
    assert vllm_parsers.has_tokens(vllm_parsers.tokenizer_text(tmp_path), marker)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"content": marker[0]}]}))
    assert vllm_parsers.has_tokens(vllm_parsers.tokenizer_text(tmp_path), marker)
    # A token inside another string is no token of the vocabulary.
    (tmp_path / "tokenizer.json").write_text(json.dumps({"chat_template": "use <tool_call> here"}))
    assert not vllm_parsers.has_tokens(vllm_parsers.tokenizer_text(tmp_path), ("<tool_call>",))
    # A FIFO where a tokenizer should be (a hostile link) is not read, and does not block.
    (tmp_path / "tokenizer.json").unlink()
    os.mkfifo(tmp_path / "tokenizer.json")
    assert vllm_parsers.tokenizer_text(tmp_path) == b"\n\n\n"
    assert vllm_parsers.parser_presets(tmp_path, {"model_type": "qwen3"}) == []


def test_a_vision_language_model_takes_images_from_data_urls_only_and_gets_the_image_flags(api):
    vision = options(api, "org/smolvlm")
    assert (vision["kind"], vision["kinds"], vision["modalities"]) == ("text-generation", ["text-generation"],
                                                                       ["text", "image"])
    assert vision["presets"][0]["reason"].startswith("remote image URLs are refused")
    assert vision["presets"][0]["yields_to"] == []  # the user's flags never replace it
    assert "--limit-mm-per-prompt" in vision["flags"]
    llama = options(api, "org/llama-3")
    assert llama["modalities"] == ["text"] and "--limit-mm-per-prompt" not in llama["flags"]
    with api.app.app_context():  # what the playground reads to offer an image: the inventory, not the files again
        assert inventory.model_modalities("org/smolvlm") == ["text", "image"]
        assert inventory.model_modalities("org/llama-3") == ["text"]
        assert inventory.model_modalities("org/smolvlm", "0" * 40) == [] and inventory.model_modalities("no/such") == []
    assert "images" not in [preset["purpose"] for preset in llama["presets"]]
    plan = dry_run(api, "org/smolvlm", "text-generation", ["--limit-mm-per-prompt", '{"image": 2}'])
    script = plan["job_script"]
    assert ("--allowed-media-domains remote-image-urls-are-refused.invalid --allowed-local-media-path no-local-media"
            in script)
    assert "export VLLM_MEDIA_URL_ALLOW_REDIRECTS=0" in script
    # the folder file:// URLs would be read from is made empty and read-only before the server starts
    assert script.index("mkdir -p -m 0500 no-local-media || exit 1") < script.index("--allowed-local-media-path")
    refused = api("POST", "/api/services?dry_run=1", json={"kind": "text-generation", "model": "org/llama-3",
                                                          "engine_args": ["--limit-mm-per-prompt", '{"image": 2}']})
    assert refused.status_code == 400
    assert (refused.get_json()["field"], refused.get_json()["error"]) == (
        "engine_args", "engine_args: --limit-mm-per-prompt applies to models taking image input; this one takes text")
    sneaked = api("POST", "/api/services?dry_run=1", json={"kind": "text-generation", "model": "org/smolvlm",
                                                          "engine_args": ["--allowed-media-domains", "evil.example"]})
    assert sneaked.status_code == 400 and sneaked.get_json()["field"] == "engine_args"
    assert sneaked.get_json()["error"].startswith("engine_args: --allowed-media-domains is not an allowed vLLM option")


def test_the_sites_media_domains_are_the_hosts_image_urls_may_come_from(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    site = write_site_config(tmp_path / "site.yaml", scheduler="local", media_domains=["Images.Example.org"],
                             runtimes={"vllm": {"command": "python -m vllm.entrypoints.openai.api_server"}})
    write_cache_repo(tmp_path / "cache" / "models", "org/smolvlm", MODELS["org/smolvlm"])
    app = create_app({"home": tmp_path / "home", "site_config_path": site, "testing": True})
    refresh_inventory(app)
    answer = app.test_client().get("/api/launch-options", query_string={"model": "org/smolvlm"},
                                   headers={"Authorization": f"Bearer {app.config['PILOTFISH_TOKEN']}"}).get_json()
    assert preset_flags(answer) == [("images", "--allowed-media-domains images.example.org --allowed-local-media-path "
                                               "no-local-media", True)]
    assert "images.example.org" in answer["presets"][0]["reason"]
