"""Rendered job scripts: every kind x runtime passes bash -n and shellcheck, and hostile values never execute."""
import json
import subprocess
from pathlib import Path

import pytest

from portal.catalog.images import pinned_images, sif_name
from portal.config import load_config
from portal.launching import parse_launch_request, plan_launch, render_job_script
from portal.models import Service
from portal.site import build_site
from tests.conftest import write_site_config

HOSTILE = ["--tokenizer-mode", "$(touch /tmp/pilotfish-pwned-1)", "--seed", "; touch /tmp/pilotfish-pwned-2 #",
           "--tool-call-parser", "it's \"quoted\" `touch /tmp/pilotfish-pwned-3`",
           "--reasoning-parser", "line one\nline two; touch /tmp/pilotfish-pwned-4"]
PWNED = [Path(f"/tmp/pilotfish-pwned-{n}") for n in range(1, 5)]


def render(tmp_path, kind, model, runtime, gpus, engine_args=()):
    runtimes = {kind: {"runtime": runtime}}
    site = write_site_config(tmp_path / f"site-{runtime}.yaml", scheduler="local", runtimes=runtimes)
    config = load_config({"home": tmp_path / "home", "site_config_path": site})
    if runtime == "apptainer":  # an admin staged the pinned image
        images = config.cache_dir / "images"
        images.mkdir(exist_ok=True)
        (images / sif_name(pinned_images(None)[kind])).write_bytes(b"SIF")
    body = {"kind": kind, "model": model, "engine_args": list(engine_args)}
    if gpus:
        body.update(tier="gpu.Small", resources={"gpus": gpus})
    plan = plan_launch(parse_launch_request(body), build_site(config))
    service = Service(id="0123456789ab", kind=kind, model=model, revision=plan.model.revision,
                      job_dir=str(tmp_path / "job"))
    path = tmp_path / f"{kind}-{runtime}-{gpus}.sh"
    path.write_text(render_job_script(service, plan))
    return path, path.read_text()


@pytest.mark.parametrize("kind, model", [("text-generation", "test/tiny"), ("speech-recognition", "test/whisper")])
@pytest.mark.parametrize("runtime", ["native", "apptainer"])
@pytest.mark.parametrize("gpus", [0, 2])
def test_every_kind_and_runtime_passes_bash_and_shellcheck(tmp_path, kind, model, runtime, gpus):
    engine_args = HOSTILE if kind == "text-generation" else ["--language", "$(reboot)"]
    path, text = render(tmp_path, kind, model, runtime, gpus, engine_args)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    check = subprocess.run(["shellcheck", "--severity=warning", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    assert "export HF_HUB_OFFLINE=1" in text
    assert "--served-model-name " + model in text
    assert ("--tensor-parallel-size 2" in text) == (kind == "text-generation" and gpus == 2)
    assert "PILOTFISH_API_KEY" in text and "--api-key" not in text  # the key travels in the environment only
    vllm = kind == "text-generation"  # vLLM's job folder: --allowed-local-media-path's empty folder
    assert ("\nmkdir -p -m 0500 no-local-media || exit 1" in text) == vllm
    if runtime == "apptainer":
        assert "apptainer exec --contain --pwd / " in text and ("--nv " in text) == bool(gpus)
        assert ":ro" in text and ".sif" in text
        assert ('--bind "$PWD"/no-local-media:/no-local-media:ro ' in text) == vllm
    else:
        assert "apptainer" not in text


def test_hostile_values_arrive_verbatim_and_never_run(start_portal):
    for path in PWNED:
        path.unlink(missing_ok=True)
    portal = start_portal("local", runtimes={"text-generation": {
        "command": f"python3 {Path(__file__).parent / 'support' / 'tiny_service.py'}",
        "allowed_args": ["--tokenizer-mode", "--seed", "--tool-call-parser", "--reasoning-parser"]}})
    service = portal.launch(engine_args=HOSTILE).json()
    portal.wait_state(service["id"], "RUNNING", timeout=30)
    argv = json.loads((portal.home / "jobs" / service["id"] / "argv.json").read_text())
    assert argv[-(len(HOSTILE) + 8):-8] == HOSTILE  # before the TLS files and the --host/--port the script adds
    assert not any(path.exists() for path in PWNED)
    portal.request("POST", f"/api/services/{service['id']}/stop")
