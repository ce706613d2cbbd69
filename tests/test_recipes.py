"""Recipe parsing (pure): Pilotfish's own format, the student orchestrator's JSON, and field-named errors."""
import json

import pytest

from portal.recipes import RecipeError, load_recipe, parse_recipe


def error_of(data, **kwargs) -> str:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(data, **kwargs)
    return str(caught.value)


def test_services_expand_with_names_and_checked_fields():
    recipe = parse_recipe({"name": "demo", "services": [
        {"kind": "text-generation", "model": "org/chat", "tier": "Small", "time": "01:30:00", "count": 2,
         "engine_args": ["--max-model-len", 4096]},
        {"kind": "speech-recognition", "model": "org/whisper", "resources": {"partition": "gpu", "memory_gb": 16}},
        {"kind": "text-generation", "model": "org/chat", "name": "special"},
    ]})
    assert recipe.names == ["demo-0", "demo-1", "demo-2", "special"]
    first = recipe.launches[0]
    assert first == {"kind": "text-generation", "model": "org/chat", "tier": "Small", "time": 90,
                     "engine_args": ["--max-model-len", "4096"], "name": "demo-0"}
    assert recipe.launches[2]["resources"] == {"partition": "gpu", "memory_gb": 16.0}
    assert recipe.warnings == []


def test_a_bare_list_takes_its_name_from_the_file(tmp_path):
    path = tmp_path / "team.yaml"
    path.write_text("- {kind: text-generation, model: org/chat}\n")
    assert load_recipe(path).names == ["team-0"]
    path = tmp_path / "team.json"
    path.write_text(json.dumps([{"kind": "text-generation", "model": "org/chat", "count": 2, "name": "x"}]))
    assert load_recipe(path).names == ["x-0", "x-1"]


@pytest.mark.parametrize("data, message", [
    ({"services": [{"kind": "text-generation", "model": "a/b"}, {"kind": "text-generation"}]},
     "services[1].model: required"),
    ({"services": [{"model": "a/b"}]}, "services[0].kind: required"),
    ({"services": [{"kind": "translation", "model": "a/b"}]}, "services[0].kind: expected one of"),
    ({"services": [{"kind": "text-generation", "model": "llama2"}]}, "services[0].model: expected a repo id"),
    ({"services": [{"kind": "text-generation", "model": "a/b", "count": 0}]}, "services[0].count:"),
    ({"services": [{"kind": "text-generation", "model": "a/b", "time": "soon"}]}, "services[0].time: expected"),
    ({"services": [{"kind": "text-generation", "model": "a/b", "resources": {"cpus": 0}}]},
     "services[0].resources.cpus: expected an integer"),
    ({"services": [{"kind": "text-generation", "model": "a/b", "resources": {"nodes": 2}}]},
     "services[0].resources: unknown field"),
    ({"services": [{"kind": "text-generation", "model": "a/b", "gpu": 1}]}, "services[0].gpu: unknown field"),
    ({"services": [{"kind": "text-generation", "model": "a/b", "engine_args": "--x"}]}, "services[0].engine_args"),
    ({"services": [{"kind": "text-generation", "model": "a/b", "name": "x; rm"}]}, "services[0].name"),
    ({"services": [{"kind": "text-generation", "model": "a/b", "name": "x"},
                   {"kind": "text-generation", "model": "a/b", "name": "x"}]}, "two services would be named 'x'"),
    ({"services": []}, "services: expected a non-empty list"),
    ({"name": "a b", "services": [{"kind": "text-generation", "model": "a/b"}]}, "name: expected"),
    ({"servces": []}, "servces: unknown field"),
    ("just text", "recipe: expected"),
])
def test_errors_name_the_field(data, message):
    assert message in error_of(data)


def test_unreadable_files_are_errors_naming_the_file(tmp_path):
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe(tmp_path / "absent.yaml")
    (tmp_path / "broken.json").write_text("{nope")
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_recipe(tmp_path / "broken.json")


STUDENT = {"job": {"name": "ollama_inference_job",
                   "infrastructure": {"partition": "cpu", "account": "p200981", "nodes": 1, "mem_gb": 64,
                                      "time": "01:00:00"},
                   "service": {"type": "inference", "model": "meta-llama/Llama-2-7b-chat-hf", "precision": "fp16",
                               "n_clients": 100, "n_requests_per_client": 10}}}


def test_student_recipe_maps_what_has_a_meaning():
    recipe = parse_recipe(STUDENT)
    assert recipe.launches == [{"kind": "text-generation", "model": "meta-llama/Llama-2-7b-chat-hf",
                                "resources": {"partition": "cpu", "account": "p200981", "memory_gb": 64.0},
                                "time": 60, "name": "ollama_inference_job-0"}]
    warnings = "\n".join(recipe.warnings)
    assert "n_clients" in warnings and "n_requests_per_client" in warnings and "pilotfish bench" in warnings
    assert "precision" in warnings and "nodes" not in warnings  # one node is what a service gets anyway


def test_student_recipe_warns_and_refuses_with_field_names():
    data = json.loads(json.dumps(STUDENT))
    data["job"]["infrastructure"]["nodes"] = 4
    data["job"]["service"]["type"] = "ollama"
    data["job"]["monitoring"] = True
    recipe = parse_recipe(data)
    assert recipe.launches[0]["kind"] == "text-generation"
    assert any(w.startswith("job.infrastructure.nodes: 4 ignored") for w in recipe.warnings)
    assert any(w.startswith("job.monitoring") for w in recipe.warnings)
    data["job"]["service"]["model"] = "llama2"
    assert error_of(data).startswith("job.service.model: ")
    data["job"]["service"].update(model="a/b", type="qdrant")
    assert error_of(data).startswith("job.service.type: ")
    data["job"]["service"]["type"] = "ollama"
    data["job"]["infrastructure"]["mem_gb"] = -1
    assert error_of(data).startswith("job.infrastructure.mem_gb: ")
    data["job"]["infrastructure"]["mem_gb"] = 8
    data["job"]["infrastructure"]["time"] = "forever"
    assert error_of(data).startswith("job.infrastructure.time: ")
