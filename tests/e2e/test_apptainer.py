"""The Apptainer runtime for real: Debian's Apptainer 1.4 (tests/apptainer/, run as root, CPU only) runs the Whisper
server from a SIF image (Python, faster-whisper, the portal's Whisper server and key guard) as a job on the real test
Slurm; the model is bound read-only whether it lives in cache_dir or in a home_dir under the home folder."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import psutil
import pytest
import yaml

from portal.engines import installer
from portal.engines.demo_site import CPU_TIER, slurm_default_partition
from tests.conftest import PortalProcess, squeue_ids, wait_for

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tests" / "apptainer"
ARTIFACTS = REPO / "tests" / "artifacts"
CACHE = Path(os.environ.get("PILOTFISH_APPTAINER_CACHE", Path.home() / ".cache" / "pilotfish" / "apptainer"))
WHISPER = installer.WHISPER_REPO_ID
HOME_MODEL = "pilotfish-test/whisper-in-home"
PROBE = "written-from-the-container"
# Before the server starts, the command tries to write into the model folder and says what it sees.
COMMAND = ("sh -c 'echo \"probe: HF_HUB_OFFLINE=$HF_HUB_OFFLINE key set: ${PILOTFISH_API_KEY:+yes}\"; "
           f"touch \"$PILOTFISH_MODEL_PATH/{PROBE}\" || echo \"probe: the model folder is read-only\"; "
           "exec \"$@\"' sh python3 -m portal.engines.whisper_server")
LIVE = {"SUBMITTED", "PENDING", "STARTING", "RUNNING", "UNHEALTHY", "STOPPING"}


def versions() -> dict:
    lines = (TOOLS / "versions.sh").read_text().splitlines()
    return {k: v.split("#")[0].strip().strip('"') for k, _, v in (line.partition("=") for line in lines) if v}


@pytest.fixture(scope="module")
def image(slurm_cluster):
    """The SIF (tests/run.sh builds it with the Apptainer root; a no-op here when both are cached)."""
    build = subprocess.run([str(TOOLS / "build.sh")], capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stderr[-3000:]
    installer.install_engines(["whisper"], progress=lambda line: None)
    installer.stage_whisper(installer.models_dir())
    return CACHE / "images" / versions()["WHISPER_SIF"]


def _copy_model(source_repo: str, target: Path) -> Path:
    """The staged Whisper model's Hugging Face folder, hard-linked under `target` (models--org--name)."""
    source = installer.models_dir() / ("models--" + source_repo.replace("/", "--"))
    shutil.copytree(source, target, symlinks=True, copy_function=os.link)
    return next((target / "snapshots").iterdir())


@pytest.fixture(scope="module")
def site(tmp_path_factory, image):
    """cache_dir under /tmp with the image and tiny.en; a home_dir under the home folder with the same model as
    another repo id; Whisper in Apptainer; a CPU tier and GPUs on the `gpu` partition."""
    root = tmp_path_factory.mktemp("apptainer-site")
    cache = root / "cache"
    (cache / "images").mkdir(parents=True)
    os.symlink(image, cache / "images" / image.name)
    cache_model = _copy_model(WHISPER, cache / "models" / ("models--" + WHISPER.replace("/", "--")))
    home_dir = Path(tempfile.mkdtemp(prefix="apptainer-test-home-", dir=installer.models_dir().parent))
    home_model = _copy_model(WHISPER, home_dir / "models" / ("models--" + HOME_MODEL.replace("/", "--")))
    partition = slurm_default_partition()
    specs = {"time": {"default": 60, "max": 480},
             "partitions": {partition: {"default": True, "tiers": [dict(CPU_TIER)]},
                            "gpu": {"tiers": [dict(CPU_TIER, name="Gpu", gpu_count=1)]}}}
    (cache / "resource_specs.yaml").write_text(yaml.safe_dump(specs, sort_keys=False))
    apptainer = {"runtime": "apptainer", "image": image.name, "command": COMMAND,
                 "setup": f"export PATH={TOOLS / 'bin'}:\"$PATH\""}
    path = root / "site.yaml"
    path.write_text(yaml.safe_dump({"cache_dir": str(cache), "home_dir": str(home_dir), "scheduler": "slurm",
                                    "runtimes": {"whisper": apptainer}}, sort_keys=False))
    yield path, {"cache": cache_model, "home": home_model}
    shutil.rmtree(home_dir, ignore_errors=True)


def transcribe(portal, model, speech) -> str:
    api = openai.OpenAI(base_url=f"{portal.url}/v1", api_key=portal.token, max_retries=0, timeout=120)
    with open(speech, "rb") as audio:
        return api.audio.transcriptions.create(model=model, file=audio).text


def heard(text: str) -> bool:
    return sum(word in text.lower() for word in ("quick", "brown", "fox", "lazy", "dog")) >= 4


def latency(portal, model, speech, n=5) -> float:
    transcribe(portal, model, speech)  # warm
    times = []
    for _ in range(n):
        started = time.monotonic()
        transcribe(portal, model, speech)
        times.append(time.monotonic() - started)
    return statistics.median(times)


def log_of(portal, service_id) -> str:
    return portal.request("GET", f"/api/services/{service_id}/logs").json().get("log", "")


def processes_of(service_id):
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("PILOTFISH_SERVICE_ID") == service_id:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.fixture(scope="module")
def running(tmp_path_factory, site):
    """Two Apptainer services: tiny.en from cache_dir on a GPU of the `gpu` partition (--nv on a machine without
    one), the same model from home_dir on the CPU tier."""
    portal = PortalProcess(tmp_path_factory.mktemp("apptainer") / "home", site[0]).start()
    launches = {"cache": {"model": WHISPER, "tier": "gpu.Gpu"}, "home": {"model": HOME_MODEL}}
    ids = {}
    try:
        for layout, body in launches.items():
            response = portal.request("POST", "/api/services", json=dict(body, kind="speech-recognition", time=20,
                                                                          name=f"apptainer-{layout}"))
            assert response.status_code == 201, response.text
            ids[layout] = response.json()["id"]
        services = {}
        for layout, service_id in ids.items():
            services[layout] = portal.wait_state(service_id, {"RUNNING", "FAILED", "TIMEOUT"}, timeout=300)
            assert services[layout]["state"] == "RUNNING", (services[layout]["reason"], log_of(portal, service_id))
        yield portal, services
    finally:
        for service_id in ids.values():
            portal.request("POST", f"/api/services/{service_id}/stop", timeout=30)
        wait_for(lambda: all(portal.service(i)["state"] not in LIVE for i in ids.values()), timeout=120,
                 what="the Apptainer services to stop")
        portal.stop()


def test_the_tests_run_the_pinned_apptainer_release(image):
    result = subprocess.run([str(TOOLS / "bin" / "apptainer"), "--version"], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == f"apptainer version {versions()['APPTAINER_VERSION']}", result
    assert image.is_file() and image.read_bytes()[:10].startswith(b"#!/usr/bin") or image.stat().st_size > 10 ** 7


def test_the_job_script_binds_the_model_read_only_and_the_home_and_cwd_not_at_all(running, site):
    portal, services = running
    for layout in ("cache", "home"):
        script = (portal.home / "jobs" / services[layout]["id"] / "job.sh").read_text()
        root = site[1][layout].parent.parent
        assert f"--bind {root}:{root}:ro " in script
        assert "apptainer exec --contain --pwd / " in script and ".sif " in script
        assert ("--nv " in script) == (layout == "cache")
        assert "export HF_HUB_OFFLINE=1" in script and "--api-key" not in script


@pytest.mark.parametrize("layout", ["cache", "home"])
def test_the_model_is_read_only_inside_the_container(running, site, layout):
    portal, services = running
    log = log_of(portal, services[layout]["id"])
    assert "probe: HF_HUB_OFFLINE=1 key set: yes" in log, log[-3000:]
    assert "Read-only file system" in log and "probe: the model folder is read-only" in log, log[-3000:]
    assert not (site[1][layout] / PROBE).exists()


def test_provenance_names_the_image_by_its_sha256(running, image):
    """The SIF file's sha256 (hashed once, at the first read), the engine's version unknown (it is inside the image),
    and the exported recipe runs the same image."""
    portal, services = running
    answer = portal.request("GET", f"/api/services/{services['cache']['id']}/provenance")
    assert answer.status_code == 200, answer.text
    data = answer.json()
    digest = hashlib.sha256()
    with open(image, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    assert data["image"]["file"] == image.name and data["image"]["sha256"] == digest.hexdigest()
    assert data["engine"]["runtime"] == "apptainer" and data["engine"]["version"] == "unknown"
    assert data["recipe"]["services"][0]["image"] == image.name
    assert f"SIF file SHA-256 {digest.hexdigest()}" in data["methods"]


def test_speech_from_both_layouts_is_transcribed_through_the_gateway(running, speech):
    portal, _ = running
    for model in (WHISPER, HOME_MODEL):
        text = transcribe(portal, model, speech)
        assert heard(text), text


def test_the_server_in_the_container_needs_the_key(running):
    portal, services = running
    import requests
    endpoint = json.loads((portal.home / "jobs" / services["home"]["id"] / "endpoint.json").read_text())
    answer = requests.get(f"https://{endpoint['host']}:{endpoint['port']}/v1/models", verify=False, timeout=10)
    assert answer.status_code == 401


def test_a_gpu_launch_starts_with_nv_on_a_machine_without_a_gpu(running, speech):
    # Apptainer 1.4.5 finds no NVIDIA library or device here and says so only with --verbose; the server runs on CPU.
    portal, services = running
    log = log_of(portal, services["cache"]["id"])
    assert "FATAL" not in log and "Listening at: https://0.0.0.0:" in log, log[-3000:]
    assert heard(transcribe(portal, WHISPER, speech))


def test_native_and_apptainer_start_up_and_latency_are_recorded(running, site, speech, tmp_path):
    """The same model natively (the installed engine's virtualenv) and in Apptainer: start-up phases and the median
    transcription latency through the gateway, written to tests/artifacts/apptainer-whisper.json."""
    portal, services = running
    contained = latency(portal, HOME_MODEL, speech)
    native_site = tmp_path / "native.yaml"
    config = yaml.safe_load(site[0].read_text())
    config["runtimes"] = {"whisper": installer.runtime_config("whisper")}
    native_site.write_text(yaml.safe_dump(config))
    native_portal = PortalProcess(tmp_path / "home", native_site).start()
    try:
        response = native_portal.request("POST", "/api/services", json={"kind": "speech-recognition",
                                                                         "model": HOME_MODEL, "time": 10})
        assert response.status_code == 201, response.text
        native = native_portal.wait_state(response.json()["id"], {"RUNNING", "FAILED"}, timeout=300)
        assert native["state"] == "RUNNING", native["reason"]
        native_latency = latency(native_portal, HOME_MODEL, speech)
        native_portal.request("POST", f"/api/services/{native['id']}/stop")
        wait_for(lambda: native_portal.service(native["id"])["state"] not in LIVE, timeout=120, what="native stop")
    finally:
        native_portal.stop()
    figures = {"native": {"phases": native["phases"], "median_latency_s": round(native_latency, 3)},
               "apptainer": {"phases": portal.service(services["home"]["id"])["phases"],
                             "median_latency_s": round(contained, 3)},
               "latency_ratio": round(contained / native_latency, 3)}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "apptainer-whisper.json").write_text(json.dumps(figures, indent=2))
    assert figures["latency_ratio"] < 3, figures


def test_doctor_finds_apptainer_and_the_image(site, tmp_path):
    env = dict(os.environ, PILOTFISH_HOME=str(tmp_path / "home"), PILOTFISH_SITE_CONFIG=str(site[0]),
               PATH=f"{TOOLS / 'bin'}:{os.environ['PATH']}")
    result = subprocess.run([sys.executable, "-m", "portal.cli", "doctor"], capture_output=True, text=True,
                            timeout=300, env=env, cwd=str(REPO))
    line = next((line for line in result.stdout.splitlines() if "runtime speech-recognition" in line), "")
    assert "apptainer" in line and versions()["WHISPER_SIF"] in line, result.stdout


def test_a_missing_image_is_refused_by_name(running):
    portal, _ = running
    response = portal.request("POST", "/api/services", json={"kind": "speech-recognition", "model": WHISPER,
                                                              "image": "0.0.1"})
    assert response.status_code == 400
    assert "pilotfish-whisper_0.0.1.sif for whisper is not in" in response.text, response.text
    assert "available: " + versions()["WHISPER_SIF"] + " (cache)" in response.text


def test_stop_sends_sigterm_into_the_container_and_leaves_nothing(running):
    portal, services = running
    service_id = services["home"]["id"]
    assert processes_of(service_id)
    portal.request("POST", f"/api/services/{service_id}/stop")
    wait_for(lambda: portal.service(service_id)["state"] not in LIVE, timeout=120, what="the service to stop")
    assert portal.service(service_id)["state"] == "STOPPED"
    log = log_of(portal, service_id)
    assert "Handling signal: term" in log, log[-3000:]
    wait_for(lambda: not processes_of(service_id), timeout=60, what="the service's processes to end")
    assert services["home"]["job_id"] not in squeue_ids()
