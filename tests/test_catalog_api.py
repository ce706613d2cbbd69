"""The catalog through the API: tiers and recommendations, inventory, launch-time refusals, dry runs, downloads."""
import time

import pytest

from portal.app import create_app
from portal.catalog.inventory import refresh_inventory
from tests.conftest import TEST_SPECS, write_site_config
from tests.support.fake_hub import FakeHub
from tests.support.model_builders import tiny_llama


@pytest.fixture
def api(tmp_path, monkeypatch):
    """A portal app (local scheduler) whose site cache is the tests' staged models and tiers."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    site = write_site_config(tmp_path / "site.yaml", scheduler="local")
    app = create_app({"home": tmp_path / "home", "site_config_path": site, "testing": True})
    refresh_inventory(app)
    client = app.test_client()
    token = app.config["PILOTFISH_TOKEN"]

    def call(method, path, **kwargs):
        return client.open(path, method=method, headers={"Authorization": f"Bearer {token}"}, **kwargs)
    call.app = app
    call.cache = tmp_path / "cache"
    return call


def test_tiers_and_their_sbatch_arguments(api):
    body = api("GET", "/api/tiers").get_json()
    assert [tier["ref"] for tier in body["tiers"]] == ["cpu.Tiny", "cpu.Big", "gpu.Small"]
    assert body["time"] == {"default": 10, "max": 120}
    small = body["tiers"][2]
    assert small["sbatch"] == ["--time=10", "--partition=gpu", "--cpus-per-task=1", "--mem=256M", "--gres=gpu:a100:1"]
    assert body["tiers"][0]["sbatch"] == ["--time=10", "--partition=cpu", "--cpus-per-task=1", "--mem=256M"]


def test_recommendation_with_reason(api):
    body = api("GET", "/api/tiers/recommend?model=test/tiny").get_json()
    assert body["tier"]["ref"] == "cpu.Tiny"
    assert body["reason"].endswith("fits Tiny (up to 1 GB)")
    assert body["kind"] == "text-generation"
    gpu = api("GET", "/api/tiers/recommend?model=test/tiny&partition=gpu").get_json()
    assert gpu["tier"]["ref"] == "gpu.Small"
    missing = api("GET", "/api/tiers/recommend?model=org/absent")
    assert missing.status_code == 400 and "available: test/slow, test/tiny, test/whisper" in missing.get_json()["error"]


def test_recommendation_says_when_each_fitting_tier_would_start(api):
    body = api("GET", "/api/tiers/recommend?model=test/tiny").get_json()
    assert [item["ref"] for item in body["fitting"]] == ["cpu.Tiny", "cpu.Big", "gpu.Small"]
    for item in body["fitting"]:  # the local scheduler starts a job at once
        assert item["start"]["now"] is True and item["start"]["text"] == "now" and item["start"]["problem"] is None
    assert body["tier"]["start"]["text"] == "now" and body["sooner"] is None


def test_a_scheduler_that_hangs_or_fails_leaves_the_recommendation_without_estimates(api):
    import threading
    import time

    from portal.catalog.start_times import StartEstimates
    from portal.scheduler import SchedulerUnreachable

    release = threading.Event()
    real = api.app.extensions["pilotfish.scheduler"]

    class Hanging(type(real)):
        def estimate_start(self, resources, timeout=5.0):
            if resources.partition == "gpu":
                raise SchedulerUnreachable("Slurm controller unreachable")
            release.wait(10)
            return None

    api.app.extensions["pilotfish.scheduler"] = Hanging()
    api.app.extensions["pilotfish.start_estimates"] = StartEstimates(timeout=0.5)
    try:
        began = time.monotonic()
        answer = api("GET", "/api/tiers/recommend?model=test/tiny")
        assert answer.status_code == 200 and time.monotonic() - began < 3
        body = answer.get_json()
        starts = {item["ref"]: item["start"] for item in body["fitting"]}
        assert starts["cpu.Tiny"]["text"] == "estimate unavailable: the scheduler did not answer within 0.5 s"
        assert starts["gpu.Small"]["text"] == "estimate unavailable: Slurm controller unreachable"
        assert body["tier"]["ref"] == "cpu.Tiny" and body["sooner"] is None
        page = api("GET", "/ui/launch")
        assert page.status_code == 200 and "estimate unavailable" in page.get_data(as_text=True)
    finally:
        release.set()
        api.app.extensions["pilotfish.scheduler"] = real


def test_inventory_lists_staged_models(api):
    models = {model["repo_id"]: model for model in api("GET", "/api/models").get_json()["models"]}
    assert set(models) == {"test/tiny", "test/slow", "test/whisper"}
    assert models["test/tiny"]["kind"] == "text-generation"
    assert models["test/whisper"]["kind"] == "speech-recognition"
    revision = models["test/tiny"]["revisions"][0]
    assert revision["location"] == "cache" and revision["refs"] == ["main"] and revision["parameters"] > 0


def test_broken_specs_file_is_a_clear_error_not_a_crash(api):
    (api.cache / "resource_specs.yaml").write_text(TEST_SPECS.replace("gpu_count: 1", 'gpu_count: "two"'))
    response = api("GET", "/api/tiers")
    assert response.status_code == 503
    assert 'resource_specs.yaml: partitions.gpu.tiers[0].gpu_count: expected an integer, got "two"' in \
        response.get_json()["error"]
    launch = api("POST", "/api/services", json={"kind": "text-generation", "model": "test/tiny"})
    assert launch.status_code == 503 and "gpu_count" in launch.get_json()["error"]
    assert api("GET", "/health").status_code == 200


@pytest.mark.parametrize("body, field, words", [
    ({"model": "test/whisper"}, "model", "is a speech-recognition model, not text-generation"),
    ({"model": "org/absent"}, "model", "available: test/slow, test/tiny, test/whisper"),
    ({"model": "test/tiny", "revision": "v9"}, "revision", "v9 is not downloaded"),
    ({"model": "test/tiny", "time": 121}, "time", "exceeds the site maximum of 120 minutes"),
    ({"model": "test/tiny", "tier": "Huge"}, "tier", "available"),
    ({"model": "test/tiny", "engine_args": ["--port", "80"]}, "engine_args", "--port is not an allowed"),
    ({"model": "test/tiny", "engine_args": ["--api-key=x"]}, "engine_args", "--api-key is not an allowed"),
    ({"model": "$(touch /tmp/pwned)"}, "model", ""),
    ({"model": "a/b; rm -rf ~"}, "model", ""),
])
def test_launch_refusals_name_the_field(api, body, field, words):
    response = api("POST", "/api/services", json={"kind": "text-generation", **body})
    assert response.status_code == 400, response.get_json()
    data = response.get_json()
    assert data["field"] == field and words in data["error"]
    assert api("GET", "/api/services").get_json()["services"] == []


def test_tier_too_small_is_refused_unless_forced(api):
    (api.cache / "resource_specs.yaml").write_text(TEST_SPECS.replace("max_model_size_gb: 1\n",
                                                                      "max_model_size_gb: 0.0000001\n"))
    refused = api("POST", "/api/services?dry_run=1", json={"kind": "text-generation", "model": "test/tiny",
                                                           "tier": "Tiny"})
    assert refused.status_code == 400 and refused.get_json()["field"] == "tier"
    forced = api("POST", "/api/services?dry_run=1", json={"kind": "text-generation", "model": "test/tiny",
                                                          "tier": "Tiny", "force": True})
    assert forced.status_code == 200 and forced.get_json()["tier"] == "cpu.Tiny"


def test_dry_run_shows_the_job_without_submitting(api):
    plan = api("POST", "/api/services?dry_run=1", json={"kind": "text-generation", "model": "test/tiny",
                                                        "tier": "gpu.Small", "time": 30}).get_json()
    assert plan["tier"] == "gpu.Small"
    assert {"--partition=gpu", "--gres=gpu:a100:1", "--cpus-per-task=1", "--mem=256M", "--time=30"} <= set(plan["sbatch"])
    assert "--served-model-name test/tiny" in plan["job_script"]
    assert plan["model_path"].endswith(plan["revision"])
    assert api("GET", "/api/services").get_json()["services"] == []


def test_models_in_the_cache_are_never_deleted(api):
    response = api("DELETE", "/api/models/test/tiny")
    assert response.status_code in (400, 404)
    assert (api.cache / "models" / "models--test--tiny").is_dir()


def test_download_through_the_api_then_delete(api, monkeypatch):
    with FakeHub() as hub:
        hub.add_repo("org/tiny", tiny_llama())
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        started = api("POST", "/api/models/downloads", json={"repo_id": "org/tiny"})
        assert started.status_code == 202, started.get_json()
        task_id = started.get_json()["id"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            task = api("GET", f"/api/models/downloads/{task_id}").get_json()
            if task["state"] not in ("queued", "running"):
                break
            time.sleep(0.2)
        assert task["state"] == "done", task
        assert task["bytes_done"] == task["bytes_total"] > 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            models = {m["repo_id"]: m for m in api("GET", "/api/models").get_json()["models"]}
            if "org/tiny" in models:
                break
            time.sleep(0.2)
        assert models["org/tiny"]["revisions"][0]["location"] == "home"
        missing = api("POST", "/api/models/downloads", json={"repo_id": "org/absent"}).get_json()
        for _ in range(100):
            task = api("GET", f"/api/models/downloads/{missing['id']}").get_json()
            if task["state"] not in ("queued", "running"):
                break
            time.sleep(0.2)
        assert task["state"] == "failed" and task["error_code"] == "not_found"
    removed = api("DELETE", "/api/models/org/tiny")
    assert removed.status_code == 200 and removed.get_json()["freed_bytes"] > 0
    assert "org/tiny" not in {m["repo_id"] for m in api("GET", "/api/models").get_json()["models"]}


def test_images_listing(api):
    images = api("GET", "/api/images").get_json()["images"]
    assert {image["kind"] for image in images} == {"text-generation", "speech-recognition"}
    assert all(image["available"] is False for image in images)
