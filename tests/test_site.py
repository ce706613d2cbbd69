"""The resolved site: a bad entry stops the portal at start with one line naming the setting (create_app and a real
`pilotfish start`); every engine of every kind has its runtime; the settings, the site, the kinds and monitoring
import in any order; a portal on the local scheduler never loads the Slurm adapter."""
import os
import subprocess
import sys

import pytest
import yaml

from portal.app import create_app
from portal.catalog.kinds import ENGINES, KINDS
from portal.config import ConfigError, load_config
from portal.site import SiteError, build_site
from tests.conftest import REPO, free_port, write_site_config

DOCKER = "runtimes.llama-cpp.runtime: expected one of native, apptainer, got 'docker'"


def site_config(tmp_path, **settings):
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def build(tmp_path, **settings):
    return build_site(load_config({"home": tmp_path / "home", "site_config_path": site_config(tmp_path, **settings)}))


@pytest.mark.parametrize("settings, message", [
    ({"runtimes": {"llama-cpp": {"runtime": "docker"}}}, DOCKER),
    ({"runtimes": {"vllm": {"env": [1, 2]}}}, "runtimes.vllm.env: expected a mapping of variable to value"),
    ({"runtimes": {"vllm": {"env": {"A B": "1"}}}}, "runtimes.vllm.env: 'A B' is not a variable name"),
    ({"runtimes": {"vllm": {"env": {"A": {"b": 1}}}}}, "runtimes.vllm.env.A: expected a value such as 1 or /scratch"),
    ({"runtimes": {"ollama": {"command": "ollama serve"}}},
     "runtimes.ollama: not an engine or a service kind (known: vllm, llama-cpp, whisper, text-generation, "
     "text-embedding, speech-recognition)"),
    ({"runtimes": {"whisper": {"comand": "x"}}}, "runtimes.whisper: unknown setting(s) comand (known: runtime,"),
    ({"runtimes": {"whisper": "python -m whisper"}}, "runtimes.whisper: expected a mapping with `runtime`"),
    ({"runtimes": {"text-generation": {"allowed_args": ["-x"]}}},
     "runtimes.text-generation.allowed_args: expected a list of flags such as --max-model-len"),
    ({"runtimes": {"vllm": {"runtime": "apptainer", "image": "Not An Image!"}}},
     "runtimes.vllm.image: expected an image such as vllm/vllm-openai:v0.8.4, got 'Not An Image!'"),
    ({"runtimes": {"vllm": {"command": "python\nrm -rf ~"}}}, "runtimes.vllm.command: expected one command line"),
    ({"runtimes": {"vllm": {"health_path": "health"}}}, "runtimes.vllm.health_path: expected a path such as /health"),
    ({"runtimes": {"vllm": {"setup": ["module load cuda"]}}}, "runtimes.vllm.setup: expected shell lines as text"),
    ({"engines": {"gguf": "ollama"}}, "engines.gguf: unknown engine 'ollama' (known: vllm, llama-cpp, whisper)"),
    ({"exporters": {"node": {"command": "x", "when": "sometimes"}}}, "exporters.node.when: expected one of always"),
])
def test_a_bad_entry_is_one_error_naming_the_setting(tmp_path, settings, message):
    with pytest.raises(SiteError) as err:
        build(tmp_path, **settings)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value) and isinstance(err.value, ConfigError)


def test_every_engine_of_every_kind_has_its_runtime(tmp_path):
    site = build(tmp_path, runtimes={"speech-recognition": {"runtime": "apptainer", "image": "org/speech:1"},
                                     "vllm": {"command": "/opt/vllm/bin/python -m vllm.entrypoints.openai.api_server",
                                              "env": {"VLLM_CPU_KVCACHE_SPACE": 1}, "setup": "module load x"}},
                 exporters={"node": {"command": "node_exporter"}, "dcgm": {"command": "dcgm", "when": "gpus"}})
    assert set(site.runtimes) == {(kind, engine) for kind in KINDS for engine in KINDS[kind].engines}
    speech = KINDS["speech-recognition"]
    vllm = site.runtime(speech, ENGINES["vllm"])  # the engine's own entry wins over the kind's
    assert (vllm.runtime, vllm.env, vllm.setup, vllm.config_key) == ("native", {"VLLM_CPU_KVCACHE_SPACE": "1"},
                                                                     "module load x", "vllm")
    whisper = site.runtime(speech)
    assert (whisper.engine.name, whisper.runtime, whisper.command, whisper.image) == (
        "whisper", "apptainer", "python3 -m portal.engines.whisper_server", "org/speech:1")
    assert site.image_pins == {"speech-recognition": "org/speech:1"}
    assert [spec["name"] for spec in site.exporters_for(0)] == ["node"]
    assert sorted(spec["name"] for spec in site.exporters_for(1)) == ["dcgm", "node"]
    assert site.runtime(KINDS["text-generation"]).check_args(["--max-model-len", "256"]) == ["--max-model-len", "256"]


def test_create_app_refuses_a_bad_site_before_it_creates_anything(tmp_path):
    path = site_config(tmp_path, scheduler="local", runtimes={"llama-cpp": {"runtime": "docker"}})
    with pytest.raises(SiteError, match=f"^{DOCKER}$"):
        create_app({"home": tmp_path / "home", "site_config_path": path, "testing": True})
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("runtimes, message", [
    ({"llama-cpp": {"runtime": "docker"}}, DOCKER),
    ({"vllm": {"env": [1, 2]}}, "runtimes.vllm.env: expected a mapping of variable to value"),
])
def test_pilotfish_start_refuses_a_bad_runtime_in_one_line(tmp_path, runtimes, message):
    path = site_config(tmp_path, scheduler="local", runtimes=runtimes)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PILOTFISH_")}
    env.update(PILOTFISH_SITE_CONFIG=str(path), PILOTFISH_HOME=str(tmp_path / "home"))
    result = subprocess.run([sys.executable, "-m", "portal.cli", "start", "--port", str(free_port())], env=env,
                            cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == f"pilotfish: {message}\n" and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "home").exists()  # refused before anything was made


@pytest.mark.parametrize("order", [
    ["portal.config", "portal.site", "portal.catalog.kinds", "portal.monitoring"],
    ["portal.monitoring", "portal.catalog.kinds", "portal.site", "portal.config"],
    ["portal.catalog.kinds", "portal.config"],
    ["portal.engines.installer", "portal.site"],
])
def test_settings_site_kinds_and_monitoring_import_in_any_order(order):
    code = f"import importlib\nfor name in {order!r}:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


LOCAL_PORTAL = """
import json, sys
from portal.app import create_app
app = create_app({"home": sys.argv[1] + "/home", "site_config_path": sys.argv[2], "testing": True})
client = app.test_client()
auth = {"Authorization": "Bearer " + app.config["PILOTFISH_TOKEN"]}
tiers = client.get("/api/tiers", headers=auth).get_json()["tiers"]
plan = client.post("/api/services?dry_run=1", headers=auth, json={"kind": "text-generation", "model": "test/tiny",
                                                                   "tier": "gpu.Small"}).get_json()
print(json.dumps({"slurm": "portal.scheduler.slurm" in sys.modules, "tier": tiers[2]["sbatch"],
                  "plan": plan["sbatch"]}))
"""


def test_a_local_portal_shows_sbatch_words_without_the_slurm_adapter(tmp_path):
    path = write_site_config(tmp_path / "site.yaml", scheduler="local")
    result = subprocess.run([sys.executable, "-c", LOCAL_PORTAL, str(tmp_path), str(path)], cwd=str(REPO),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    answer = yaml.safe_load(result.stdout.strip().splitlines()[-1])
    assert answer["slurm"] is False
    assert answer["tier"] == ["--time=10", "--partition=gpu", "--cpus-per-task=1", "--mem=256M", "--gres=gpu:a100:1"]
    assert answer["plan"] == ["--parsable", "--no-requeue", "--job-name=<job name>", "--chdir=<job dir>",
                              "--output=<job dir>/job.log"] + answer["tier"]
