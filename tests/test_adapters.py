"""LoRA adapters in the inventory and at launch: a PEFT folder is recognised as an adapter of the base its
adapter_config.json names (a repo id, or a cache folder path as peft writes it), listed with its base, never launched
alone; a launch of the base serves the adapters named in `adapters` (vLLM's --lora-modules, rank room, the job script),
and every other request is refused with a 400 naming `adapters` (a key limited to models: 403). The gateway's side
(routes by adapter name, /v1/models with `parent`) is checked here on the directory's routes, and on real vLLM in
tests/e2e/test_adapters.py."""
from __future__ import annotations

import json

import pytest

from portal.catalog.adapters import base_repo_id, describe_adapter
from portal.models import State
from portal.proxy.answers import running_models
from portal.proxy.directory import Route, adapter_names
from tests.conftest import vllm_dry_run_api
from portal import provenance
from portal.recipes import parse_recipe
from tests.support.model_builders import commit_for, config_json, safetensors_bytes, tiny_llama

LORA_WEIGHTS = safetensors_bytes({"base_model.model.layers.0.q_proj.lora_A.weight": ("F32", [8, 16]),
                                  "base_model.model.layers.0.q_proj.lora_B.weight": ("F32", [16, 8])})


def adapter_files(base: str, rank: int = 8, task_type: str = "CAUSAL_LM") -> dict:
    return {"adapter_config.json": json.dumps({"base_model_name_or_path": base, "peft_type": "LORA", "r": rank,
                                               "lora_alpha": 16, "task_type": task_type,
                                               "target_modules": ["q_proj", "v_proj"]}).encode(),
            "adapter_model.safetensors": LORA_WEIGHTS}


MODELS = {
    "org/llama": tiny_llama(),
    "org/other-llama": tiny_llama(),
    "org/llama-lora": adapter_files("org/llama"),
    "org/llama-lora-wide": adapter_files("/data/hf/models--org--llama/snapshots/" + "a" * 40, rank=40),
    "org/other-lora": adapter_files("org/other-llama"),
    "org/bge": {"model.safetensors": safetensors_bytes({"w": ("F32", [4, 4])}), "modules.json": b"[]",
                "config.json": config_json(architectures=["BertModel"], model_type="bert")},
    "org/llama-gguf": {"model-Q4_K_M.gguf": b"GGUF" + b"\0" * 60},
}


@pytest.fixture
def api(tmp_path, monkeypatch):
    """A portal app whose site serves every kind with vLLM (dry runs only: nothing is submitted)."""
    return vllm_dry_run_api(tmp_path, monkeypatch, MODELS)


def dry_run(api, **body):
    return api("POST", "/api/services?dry_run=1", json={"kind": "text-generation", "model": "org/llama", **body})


@pytest.mark.parametrize("value, repo_id", [
    ("org/llama", "org/llama"),
    ("/data/hf/models--org--llama/snapshots/abc", "org/llama"),
    ("/root/.cache/huggingface/hub/models--meta-llama--Llama-3.1-8B", "meta-llama/Llama-3.1-8B"),
    ("./checkpoints/base", "./checkpoints/base"),
    ("", None), (None, None), (7, None),
])
def test_the_base_is_a_repo_id_or_the_repo_of_a_cache_folder(value, repo_id):
    assert base_repo_id(value) == repo_id


def test_a_folder_is_an_adapter_only_with_its_config_and_weights(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/llama", "r": 4}))
    assert describe_adapter(tmp_path) is None  # no weights beside it
    (tmp_path / "adapter_model.safetensors").write_bytes(LORA_WEIGHTS)
    assert describe_adapter(tmp_path)["base"] == "org/llama" and describe_adapter(tmp_path)["rank"] == 4
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    assert describe_adapter(tmp_path) is None  # not a config


def test_the_inventory_lists_adapters_with_their_base(api):
    listed = {m["repo_id"]: m for m in api("GET", "/api/models").get_json()["models"]}
    assert listed["org/llama"]["adapters"] == ["org/llama-lora", "org/llama-lora-wide"]
    assert listed["org/other-llama"]["adapters"] == ["org/other-lora"]
    assert listed["org/bge"]["adapters"] == [] and listed["org/llama"]["base"] is None
    lora = listed["org/llama-lora"]
    assert (lora["base"], lora["kind"], lora["kinds"]) == ("org/llama", "text-generation", ["text-generation"])
    assert lora["revisions"][0]["adapter"]["rank"] == 8
    assert lora["revisions"][0]["kind_reason"] == ("a LoRA adapter of org/llama: launch its base with it among the "
                                                   "adapters")
    options = api("GET", "/api/launch-options", query_string={"model": "org/llama"}).get_json()
    assert options["serves_adapters"] and options["adapters"] == ["org/llama-lora", "org/llama-lora-wide"]
    pooled = api("GET", "/api/launch-options", query_string={"model": "org/llama", "kind": "text-embedding"})
    assert pooled.get_json()["serves_adapters"] is False and pooled.get_json()["adapters"] == []


def test_a_launch_serves_its_adapters_from_their_snapshots(api):
    answer = dry_run(api, adapters=["org/llama-lora", "org/llama-lora-wide"])
    assert answer.status_code == 200, answer.get_json()
    plan = answer.get_json()
    folders = {item["name"]: item["path"] for item in plan["adapters"]}
    assert sorted(folders) == ["org/llama-lora", "org/llama-lora-wide"]
    arguments = plan["arguments"]
    at = arguments.index("--lora-modules")
    assert arguments[at + 1:at + 3] == [f"org/llama-lora={folders['org/llama-lora']}",
                                        f"org/llama-lora-wide={folders['org/llama-lora-wide']}"]
    rank = arguments.index("--max-lora-rank")
    assert arguments[rank + 1] == "64"  # room for rank 40: the next value vLLM takes
    assert arguments[arguments.index("--max-loras") + 1] == "2" and "--enable-lora" in arguments
    assert "--lora-modules org/llama-lora=" in plan["job_script"]
    assert [preset["purpose"] for preset in plan["presets"]][-1] == "adapters"


def test_an_adapter_revision_can_be_pinned_and_the_exported_recipe_pins_it(api):
    commit = commit_for("org/llama-lora", MODELS["org/llama-lora"])
    pinned = dry_run(api, adapters=[f"org/llama-lora@{commit}"])
    assert pinned.status_code == 200, pinned.get_json()
    assert [(item["name"], item["revision"]) for item in pinned.get_json()["adapters"]] == [("org/llama-lora", commit)]
    assert "--lora-modules org/llama-lora=" in pinned.get_json()["job_script"]  # served under its repo id
    missing = dry_run(api, adapters=["org/llama-lora@" + "0" * 40])
    assert missing.status_code == 400 and missing.get_json()["field"] == "adapters", missing.get_json()
    exported = provenance.recipe({"kind": "text-generation", "model": {"repo_id": "org/llama", "revision": "r"},
                                  "adapters": [{"repo_id": "org/llama-lora", "revision": commit}]}, "again")
    assert exported["services"][0]["adapters"] == [f"org/llama-lora@{commit}"]
    assert parse_recipe(exported, "again").launches[0]["adapters"] == [f"org/llama-lora@{commit}"]


@pytest.mark.parametrize("body, status, words", [
    ({"adapters": ["org/other-lora"]}, 400, "org/other-lora is an adapter of org/other-llama, not of org/llama"),
    ({"adapters": ["org/bge"]}, 400, "org/bge is not a LoRA adapter"),
    ({"adapters": ["org/missing-lora"]}, 400, "org/missing-lora is not downloaded"),
    ({"adapters": ["org/llama-lora", "org/llama-lora"]}, 400, "org/llama-lora is named twice"),
    ({"adapters": ["org/llama"]}, 400, "org/llama is named twice"),
    ({"adapters": ["not a repo"]}, 400, "adapters"),
    ({"adapters": "org/llama-lora"}, 400, "adapters"),
    ({"adapters": [f"org/lora-{n}" for n in range(17)]}, 400, "adapters"),
    ({"kind": "text-embedding", "adapters": ["org/llama-lora"]}, 400,
     "adapters apply to text-generation services, not text-embedding"),
    ({"model": "org/llama-gguf", "adapters": ["org/llama-lora"]}, 400, "llama.cpp serves no adapters"),
])
def test_a_launch_refuses_adapters_it_cannot_serve_naming_the_field(api, body, status, words):
    answer = dry_run(api, **body)
    assert answer.status_code == status, answer.get_json()
    assert answer.get_json()["field"].startswith("adapters"), answer.get_json()
    assert words in answer.get_json()["error"]


def test_an_adapter_is_not_launched_alone(api):
    answer = dry_run(api, model="org/llama-lora")
    assert answer.status_code == 400 and answer.get_json()["field"] == "model"
    assert answer.get_json()["error"] == ("model: org/llama-lora is a LoRA adapter of org/llama, not a model to launch "
                                          "alone: launch org/llama with adapters [org/llama-lora]")
    options = api("GET", "/api/launch-options", query_string={"model": "org/llama-lora"})
    assert options.status_code == 400 and options.get_json()["field"] == "model"


def test_a_key_limited_to_the_base_may_not_launch_its_adapters(api):
    made = api("POST", "/api/keys", json={"name": "base-only", "models": ["org/llama"],
                                          "scopes": ["use", "read", "launch"]}).get_json()
    answer = api("POST", "/api/services?dry_run=1", token=made["key"],
                 json={"kind": "text-generation", "model": "org/llama", "adapters": ["org/llama-lora"]})
    assert answer.status_code == 403 and answer.get_json()["field"] == "adapters"
    assert "may not launch 'org/llama-lora'" in answer.get_json()["error"]
    assert dry_run(api, adapters=["org/llama-lora"]).status_code == 200  # the owner may
    both = api("POST", "/api/keys", json={"name": "both", "models": ["org/llama", "org/llama-lora"],
                                          "scopes": ["launch"]}).get_json()
    assert api("POST", "/api/services?dry_run=1", token=both["key"],
               json={"kind": "text-generation", "model": "org/llama", "adapters": ["org/llama-lora"]}).status_code \
        == 200


def test_the_gateway_routes_and_lists_each_adapter_of_a_running_service():
    running = Route("s1", State.RUNNING, "org/llama", "text-generation", "node1", 8000, "key",
                    adapters=adapter_names('["org/llama-lora"]'))
    starting = Route("s2", State.STARTING, "org/other", "text-generation", None, None, "key",
                     adapters=("org/other-lora",))
    assert running.serves("org/llama-lora") and running.serves("org/llama") and not running.serves("org/other-lora")
    assert running_models({"s1": running, "s2": starting}) == [
        {"id": "org/llama", "object": "model", "created": 0, "owned_by": "pilotfish", "parent": None},
        {"id": "org/llama-lora", "object": "model", "created": 0, "owned_by": "pilotfish", "parent": "org/llama"}]
    assert adapter_names("not json") == () and adapter_names('{"a": 1}') == () and adapter_names(None) == ()


def test_a_recipe_names_adapters_only_for_text_generation():
    from portal.recipes import RecipeError, parse_recipe
    recipe = parse_recipe({"name": "r", "services": [{"kind": "text-generation", "model": "org/llama",
                                                      "adapters": ["org/llama-lora"]}]}, "r")
    assert recipe.launches[0]["adapters"] == ["org/llama-lora"]
    for entry, words in (({"kind": "text-embedding", "adapters": ["org/llama-lora"]}, "apply to text-generation"),
                         ({"kind": "text-generation", "adapters": "org/llama-lora"}, "expected a list")):
        with pytest.raises(RecipeError) as refused:
            parse_recipe({"services": [{"model": "org/llama", **entry}]}, "r")
        assert refused.value.field == "services[0].adapters" and words in str(refused.value)


def test_a_request_for_an_adapter_nothing_serves_says_how_to_serve_it(api):
    """The gateway's 404 for a model nothing serves (routing.py) adds not_served_detail: for an adapter, the base to
    launch with it, or the ended service that last served it beside its base."""
    from portal.db import db
    from portal.models import Service, utcnow
    from portal.proxy.directory import not_served_detail

    with api.app.app_context():
        assert not_served_detail("org/llama-lora") == (
            " (a LoRA adapter of org/llama: launch org/llama with adapters [org/llama-lora])")
        assert not_served_detail("org/llama") == not_served_detail("org/nothing") == ""
        db.session.add(Service(id="3fa2c0ffee000001", name="lora", kind="text-generation", model="org/llama",
                               state=State.STOPPED, reason="stopped by the owner", scheduler="local", job_dir="/x",
                               time_limit=30, api_key="k", adapters_json=json.dumps(["org/llama-lora"]),
                               ended_at=utcnow()))
        db.session.commit()
        assert not_served_detail("org/llama-lora") == (
            ": its last service 3fa2c0ffee000001, which served it beside org/llama, STOPPED (stopped by the owner)")
        assert not_served_detail("org/llama") == ": its last service 3fa2c0ffee000001 STOPPED (stopped by the owner)"
