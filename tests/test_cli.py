"""The `pilotfish` executable against a real portal on the real test Slurm: every command, JSON output, exit codes,
dry-run scripts, recipes, and the README's command-line walkthrough run as written."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, write_site_config
from tests.support.fake_hub import FakeHub
from tests.support.model_builders import tiny_llama

pytestmark = pytest.mark.slurm

PILOTFISH = str(Path(sys.executable).parent / "pilotfish")  # the installed console script, /work/main/.venv/bin


@pytest.fixture(scope="module")
def hub():
    with FakeHub(throttle=2_000_000) as hub:
        hub.add_repo("org/tiny", tiny_llama())
        yield hub


@pytest.fixture(scope="module")
def portal(slurm_cluster, start_module_portal, hub):
    saved = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = hub.url  # the portal downloads from the fake Hub
    try:
        return start_module_portal("slurm")
    finally:
        if saved is None:
            del os.environ["HF_ENDPOINT"]
        else:
            os.environ["HF_ENDPOINT"] = saved


@pytest.fixture(scope="module")
def env(portal):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PILOTFISH_")}
    return dict(clean, PILOTFISH_HOME=str(portal.home), PILOTFISH_SITE_CONFIG=str(portal.site_config))


def pf(env, *args, input=None, timeout=120, cwd=None):
    return subprocess.run([PILOTFISH, *args], env=env, capture_output=True, text=True, timeout=timeout, input=input,
                          cwd=cwd)


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def one_line_error(result, code, *fragments):
    assert result.returncode == code, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines and lines[-1].startswith("pilotfish: "), result.stderr  # after progress lines, if any
    if code == 2:
        assert len(lines) == 1, result.stderr  # bad usage: just the one line
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    return lines[-1]


COMMANDS = [["status"], ["doctor"], ["run"], ["ls"], ["details"], ["logs"], ["stop"], ["rm"], ["prune"],
            ["models", "ls"], ["models", "options"], ["models", "add"], ["models", "rm"], ["images", "ls"], ["tiers"], ["keys", "create"],
            ["keys", "ls"], ["keys", "revoke"], ["apply"], ["start"], ["cluster"], ["demo"], ["export"],
            ["batch", "create"], ["batch", "ls"], ["batch", "show"], ["batch", "cancel"], ["batch", "download"]]


def test_every_command_has_help_with_an_example(env):
    for command in COMMANDS:
        result = ok(pf(env, *command, "--help"))
        assert "Example" in result.stdout, command


def test_without_a_portal_one_clear_line_and_exit_1(tmp_path, env):
    result = pf(dict(env, PILOTFISH_HOME=str(tmp_path)), "ls")
    line = one_line_error(result, 1, "no portal is running")
    assert line.startswith("pilotfish: ")


def test_bad_usage_exits_2(env, portal):
    one_line_error(pf(env, "run", "text-generation"), 2, "--model")
    one_line_error(pf(env, "run", "translation", "--model", "test/tiny"), 2)
    one_line_error(pf(env, "ls", "--state", "NOPE"), 2, "pilotfish: state: ")
    one_line_error(pf(env, "run", "text-generation", "--model", "test/tiny", "--tier", "Huge", "--dry-run"), 2,
                   "pilotfish: tier")
    one_line_error(pf(env, "run", "text-generation", "--model", "test/tiny", "--dry-run", "--", "--rm-rf"), 2,
                   "engine_args")
    one_line_error(pf(env, "run", "text-generation", "--model", "test/tiny", "--idle", "half an hour"), 2,
                   "pilotfish: idle_timeout: expected minutes, or a duration such as 30m")


def test_failures_exit_1(env, portal):
    one_line_error(pf(env, "details", "ffffffffffff"), 1, "pilotfish: no service")
    one_line_error(pf(env, "stop", "nonsense-id"), 1, "pilotfish: no service")
    one_line_error(pf(env, "keys", "revoke", "00000000"), 1, "pilotfish: no API key")


def test_dry_run_prints_a_valid_script_and_the_sbatch_arguments(env, portal):
    result = ok(pf(env, "run", "text-generation", "--model", "test/tiny", "--time", "5", "--dry-run", "--",
                   "--delay", "0.1"))
    assert result.stdout.startswith("#!")
    assert subprocess.run(["bash", "-n"], input=result.stdout, text=True).returncode == 0
    sbatch = [line for line in result.stdout.splitlines() if line.startswith("# sbatch ")]
    assert sbatch and "--partition=cpu" in sbatch[0] and "--time=5" in sbatch[0] or "00:05:00" in sbatch[0], sbatch
    assert "--delay" in result.stdout
    plan = json.loads(ok(pf(env, "run", "speech-recognition", "--model", "test/whisper", "--tier", "gpu.Small",
                            "--dry-run", "--json")).stdout)
    assert plan["tier"] == "gpu.Small" and plan["kind"] == "speech-recognition"
    assert subprocess.run(["bash", "-n"], input=plan["job_script"], text=True).returncode == 0
    assert not json.loads(ok(pf(env, "ls", "--all", "--json")).stdout) or True  # nothing was submitted by a dry run


def test_service_lifecycle_through_the_cli(env, portal):
    launched = ok(pf(env, "run", "text-generation", "--model", "test/tiny", "--time", "5", "--name", "cli-one",
                     "--wait"))
    service_id = launched.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{12}", service_id), launched.stdout
    assert "RUNNING" in launched.stderr  # the progress lines
    prefix = service_id[:5]

    listed = json.loads(ok(pf(env, "ls", "--json")).stdout)
    assert [s["state"] for s in listed if s["id"] == service_id] == ["RUNNING"]
    assert service_id in ok(pf(env, "ls")).stdout
    assert json.loads(ok(pf(env, "ls", "--state", "RUNNING", "--json")).stdout)[0]["id"] == service_id

    details = json.loads(ok(pf(env, "details", prefix, "--json")).stdout)
    assert details["id"] == service_id and details["events"][-1]["to"] == "RUNNING"
    text = ok(pf(env, "details", prefix)).stdout
    assert "events" in text and "phases" in text and "-> RUNNING" in text
    assert re.search(r"^engine +vllm$", text, re.M), text

    cluster = ok(pf(env, "cluster")).stdout
    assert re.search(rf"^\d+ +{service_id} +", cluster, re.M), cluster  # the job, linked to its service
    assert re.search(r"^cpu\* +up ", cluster, re.M), cluster
    overview = json.loads(ok(pf(env, "cluster", "--json")).stdout)
    assert [job["service_id"] for job in overview["queue"] if job["job_id"] == details["job_id"]] == [service_id]

    assert ok(pf(env, "logs", prefix, "--tail", "5")).stdout.strip()
    status = ok(pf(env, "status")).stdout
    assert portal.url in status and "1 RUNNING" in status and "ok" in status
    assert json.loads(ok(pf(env, "status", "--json")).stdout)["services"]["RUNNING"] >= 1

    one_line_error(pf(env, "rm", prefix), 1, "stop it before deleting it")
    stopped = ok(pf(env, "stop", prefix, "--wait"))
    assert "STOPPED" in stopped.stdout
    # logs -f returns once the service has ended
    ok(pf(env, "logs", prefix, "-f", "--tail", "3", timeout=30))
    assert service_id not in ok(pf(env, "ls")).stdout
    assert service_id in ok(pf(env, "ls", "--all")).stdout
    ok(pf(env, "rm", prefix))
    one_line_error(pf(env, "details", prefix), 1, "no service")


def test_a_renewed_service_through_the_cli(env, portal):
    one_line_error(pf(env, "run", "text-generation", "--model", "test/tiny", "--renew-until", "soon"), 2,
                   "pilotfish: renew: expected true")
    service_id = ok(pf(env, "run", "text-generation", "--model", "test/tiny", "--time", "5", "--name", "cli-renewed",
                       "--renew-until", "1h")).stdout.strip()
    try:
        data = json.loads(ok(pf(env, "details", service_id, "--json")).stdout)
        assert data["renew"] is True and data["renew_until"] and data["generation"] == 1
        text = ok(pf(env, "details", service_id)).stdout
        assert re.search(r"^renewal +renews until [0-9: -]+ \(in (59m|1h); generation 1\)$", text, re.M), text
        assert re.search(rf"^{service_id} .* until [0-9: -]+ \(gen 1\)$", ok(pf(env, "ls")).stdout, re.M)
    finally:
        ok(pf(env, "stop", service_id, "--wait"))
    ok(pf(env, "rm", service_id))


def test_wait_reports_a_failed_service_and_prune_removes_it(env, portal):
    result = pf(env, "run", "text-generation", "--model", "test/tiny", "--time", "5", "--wait", "--", "--exit", "3")
    line = one_line_error(result, 1, "FAILED")
    service_id = result.stdout.strip()
    assert "giving up on purpose" in line or "exit" in line, line
    assert json.loads(ok(pf(env, "details", service_id, "--json")).stdout)["state"] == "FAILED"
    pruned = ok(pf(env, "prune"))
    assert "removed" in pruned.stdout
    assert not json.loads(ok(pf(env, "ls", "--state", "ENDED", "--json")).stdout)


def test_catalog_commands(env, portal):
    names = [m["repo_id"] for m in json.loads(ok(pf(env, "models", "ls", "--refresh", "--json")).stdout)]
    assert {"test/tiny", "test/slow", "test/whisper"} <= set(names)
    assert "test/whisper" in ok(pf(env, "models", "ls")).stdout
    tiers = ok(pf(env, "tiers", "--model", "test/tiny")).stdout
    assert "cpu.Tiny" in tiers and "gpu.Small" in tiers and "recommended for test/tiny: cpu.Tiny" in tiers
    data = json.loads(ok(pf(env, "tiers", "--model", "test/tiny", "--json")).stdout)
    assert data["recommendation"]["tier"]["ref"] == "cpu.Tiny" and data["recommendation"]["reason"]
    assert tiers.splitlines()[0].split()[-1] == "STARTS"  # when each tier the model fits would start
    assert [item["ref"] for item in data["recommendation"]["fitting"]] == ["cpu.Tiny", "cpu.Big", "gpu.Small"]
    assert all(item["start"]["text"] for item in data["recommendation"]["fitting"])
    assert isinstance(json.loads(ok(pf(env, "images", "ls", "--json")).stdout), list)
    ok(pf(env, "images", "ls"))
    one_line_error(pf(env, "models", "rm", "test/tiny"), 2, "cache_dir")  # the API refuses: 400
    one_line_error(pf(env, "tiers", "--model", "nobody/absent"), 2, "nobody/absent is not downloaded")


def test_models_show_their_kinds_and_the_options_that_apply(env, portal):
    rows = {line.split()[0]: line.split()[1:4] for line in ok(pf(env, "models", "ls")).stdout.splitlines()}
    assert rows["MODEL"] == ["KIND", "ALSO", "AS"]
    assert rows["test/tiny"] == ["text-generation", "text-embedding", "text"] and rows["test/whisper"] == [
        "speech-recognition", "-", "audio"]
    shown = ok(pf(env, "models", "options", "test/tiny")).stdout.splitlines()
    assert shown[0].endswith(": text-generation on vLLM (a causal language model (LlamaForCausalLM)); also launches "
                             "as text-embedding")
    assert shown[1] == "takes as input: text"
    assert shown[2] == "added from what the model is: nothing"  # a Llama whose tokenizer has no tool-call token
    assert shown[3].startswith("engine options that apply: ") and "--tool-call-parser" in shown[3]
    assert "--runner" not in shown[3] and "--limit-mm-per-prompt" not in shown[3]  # it takes no images
    pooled = ok(pf(env, "models", "options", "test/tiny", "--kind", "text-embedding")).stdout.splitlines()
    assert pooled[2:5] == [
        "added from what the model is:",
        "  pooling: --runner pooling  (an embedding service runs vLLM's pooling runner; --runner replaces it)",
        "  pooling: --convert embed  (LlamaForCausalLM is a language model: its hidden states are pooled into "
        "embeddings; --convert replaces it)"]
    assert "--runner" in pooled[5] and "--tool-call-parser" not in pooled[5]
    assert json.loads(ok(pf(env, "models", "options", "test/tiny", "--json")).stdout)["kinds"] == [
        "text-generation", "text-embedding"]
    one_line_error(pf(env, "models", "options", "test/whisper", "--kind", "text-generation"), 2,
                   "pilotfish: model: test/whisper is a speech-recognition model, not text-generation")
    one_line_error(pf(env, "models", "options", "test/tiny", "--kind", "image-generation"), 2, "--kind")
    one_line_error(pf(env, "run", "text-embedding", "--model", "test/tiny", "--dry-run", "--", "--tool-call-parser",
                      "hermes"), 2, "pilotfish: engine_args: --tool-call-parser applies to text-generation services")
    planned = ok(pf(env, "run", "text-embedding", "--model", "test/tiny", "--dry-run")).stdout
    assert "# from the model (pooling): --convert embed (LlamaForCausalLM is a language model" in planned
    assert "--runner pooling --convert embed" in planned
    assert "# the model: text-embedding, taking text\n" in planned


def test_model_download_with_progress_then_remove(env, portal):
    added = ok(pf(env, "models", "add", "org/tiny", timeout=60))
    assert "org/tiny" in added.stdout and "downloading org/tiny" in added.stderr
    assert "org/tiny" in [m["repo_id"] for m in json.loads(ok(pf(env, "models", "ls", "--json")).stdout)]
    ok(pf(env, "models", "rm", "org/tiny"))
    assert "org/tiny" not in [m["repo_id"] for m in json.loads(ok(pf(env, "models", "ls", "--json")).stdout)]
    one_line_error(pf(env, "models", "add", "org/absent", timeout=60), 1, "org/absent")


def test_keys(env, portal):
    created = json.loads(ok(pf(env, "keys", "create", "cli-laptop", "--json")).stdout)
    assert created["key"] and created["name"] == "cli-laptop"
    plain = ok(pf(env, "keys", "create", "cli-other"))
    assert plain.stdout.strip().startswith(created["key"][:3]) and "shown once" in plain.stderr
    listed = json.loads(ok(pf(env, "keys", "ls", "--json")).stdout)
    assert {"cli-laptop", "cli-other"} <= {k["name"] for k in listed}
    assert "cli-laptop" in ok(pf(env, "keys", "ls")).stdout
    # a key works as --token for the other commands
    ok(pf(dict(env, PILOTFISH_HOME="/nonexistent"), "--url", portal.url, "--token", created["key"], "ls"))
    one_line_error(pf(env, "keys", "create", "cli-laptop"), 2, "already exists")
    ok(pf(env, "keys", "revoke", created["id"]))
    assert "cli-laptop" not in ok(pf(env, "keys", "ls")).stdout


def test_keys_with_scopes_models_an_end_and_rates(env, portal):
    created = json.loads(ok(pf(env, "keys", "create", "cli-student", "--scope", "read", "--scope", "use", "--model",
                               "test/tiny", "--expires", "30d", "--rpm", "60", "--tpm", "5000", "--json")).stdout)
    assert (created["scopes"], created["models"]) == (["use", "read"], ["test/tiny"])
    assert (created["requests_per_minute"], created["tokens_per_minute"]) == (60, 5000)
    assert created["expires_at"] and not created["expired"]
    listing = ok(pf(env, "keys", "ls")).stdout.splitlines()
    assert listing[0].split() == ["ID", "NAME", "HINT", "SCOPES", "MODELS", "EXPIRES", "LIMITS", "LAST_USED", "CREATED"]
    row = next(line for line in listing if "cli-student" in line)
    assert all(part in row for part in ("use,read", "test/tiny", "60 req/min, 5000 tok/min", "never")), row
    # What its scopes allow, as --token of the other commands: reading, not launching.
    as_key = (dict(env, PILOTFISH_HOME="/nonexistent"), "--url", portal.url, "--token", created["key"])
    ok(pf(*as_key, "ls"))
    one_line_error(pf(*as_key, "run", "text-generation", "--model", "test/tiny", "--dry-run"), 1,
                   "API key 'cli-student' may not launch")
    ok(pf(env, "keys", "revoke", created["id"]))


def test_keys_create_refuses_bad_values_in_one_line_and_creates_nothing(env, portal):
    for args, words in ((["--scope", "admin"], "--scope"), (["--expires", "soon"], "expires: expected how long"),
                        (["--expires", "2020-01-01T00:00Z"], "expires: must be in the future"),
                        (["--rpm", "0"], "requests_per_minute: expected a whole number"), (["--tpm", "many"], "--tpm"),
                        (["--model", ""], "models: ")):
        one_line_error(pf(env, "keys", "create", "cli-bad", *args), 2, words)
    assert "cli-bad" not in {k["name"] for k in json.loads(ok(pf(env, "keys", "ls", "--json")).stdout)}


def test_doctor_without_a_portal(tmp_path, env):
    # The runtimes here are the tiny stand-in service, not engines: the engine checks run in tests/e2e.
    result = ok(pf(dict(env, PILOTFISH_HOME=str(tmp_path / "home")), "doctor", "--no-engines"))
    lines = result.stdout.strip().splitlines()
    assert all(line.startswith(("ok  ", "FAIL")) for line in lines), lines
    for fragment in ("squeue", "the controller answers", "resource specs", "runtime text-generation",
                     "runtime speech-recognition", "cache_dir"):
        assert any(fragment in line and line.startswith("ok") for line in lines), (fragment, lines)

    broken = write_site_config(tmp_path / "broken.yaml", scheduler="slurm",
                               resource_specs=str(tmp_path / "specs.yaml"),
                               runtimes={"text-generation": {"command": "/no/such/engine --serve"},
                                         "speech-recognition": {"runtime": "native", "command": sys.executable}})
    (tmp_path / "specs.yaml").write_text("time: {default: 10, max: 5}\npartitions: [oops]\n")
    result = pf(dict(env, PILOTFISH_SITE_CONFIG=str(broken), PILOTFISH_HOME=str(tmp_path / "home")), "doctor",
                "--no-engines")
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert any("resource specs" in line for line in failed), result.stdout
    assert any("/no/such/engine" in line for line in failed), result.stdout
    assert "Traceback" not in result.stderr


# --- recipes --------------------------------------------------------------------------------------------

def test_apply_validates_before_submitting(tmp_path, env, portal):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "services": [
        {"kind": "text-generation", "model": "test/tiny"}, {"kind": "text-generation"}]}))
    one_line_error(pf(env, "apply", str(bad)), 2, "services[1].model: required")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump([{"kind": "text-generation", "model": "test/tiny"},
                                       {"kind": "text-generation", "model": "test/tiny", "tier": "Huge"}]))
    one_line_error(pf(env, "apply", str(unknown)), 2, "unknown-1", "tier")
    assert not [s for s in portal.request("GET", "/api/services").json()["services"]
                if s["name"].startswith(("bad-", "unknown-"))]


def test_apply_student_recipe_maps_and_warns(tmp_path, env, portal):
    recipe = tmp_path / "inference_recipe.json"
    recipe.write_text(json.dumps({"job": {
        "name": "ollama_inference_job",
        "infrastructure": {"partition": "cpu", "account": "p200981", "nodes": 2, "mem_gb": 1, "time": "00:05:00"},
        "service": {"type": "ollama", "model": "test/tiny", "precision": "fp16", "n_clients": 100,
                    "n_requests_per_client": 10}}}))
    result = ok(pf(env, "apply", str(recipe), "--dry-run", "--json"))
    plan = json.loads(result.stdout)[0]
    assert plan["kind"] == "text-generation" and plan["resources"]["partition"] == "cpu"
    assert plan["resources"]["memory_gb"] == 1 and plan["resources"]["account"] == "p200981"
    assert plan["resources"]["time"] == 5
    assert plan["model_modalities"] == ["text"]
    shown = ok(pf(env, "apply", str(recipe), "--dry-run")).stdout
    assert shown.startswith("ollama_inference_job-0: text-generation test/tiny (taking text) on cpu.Tiny ")
    assert "nodes" in result.stderr and "pilotfish bench" in result.stderr and "n_requests_per_client" in result.stderr
    recipe.write_text(json.dumps({"job": {"service": {"type": "ollama", "model": "llama2"}}}))
    one_line_error(pf(env, "apply", str(recipe)), 2, "job.service.model")


def test_apply_deploys_waits_and_deletes(tmp_path, env, portal):
    recipe = tmp_path / "pair.yaml"
    recipe.write_text(yaml.safe_dump({"name": "pair", "services": [
        {"kind": "text-generation", "model": "test/tiny", "tier": "cpu.Tiny", "time": 5},
        {"kind": "speech-recognition", "model": "test/whisper", "resources": {"partition": "cpu", "cpus": 1,
                                                                             "memory_gb": 0.25}, "time": 5}]}))
    result = ok(pf(env, "apply", str(recipe), "--json", timeout=180))
    services = json.loads(result.stdout)
    assert [s["name"] for s in services] == ["pair-0", "pair-1"]
    assert all(s["state"] == "RUNNING" for s in services)
    assert "pair-0" in result.stderr and "RUNNING" in result.stderr
    # applying again launches nothing new
    again = ok(pf(env, "apply", str(recipe), "--json", timeout=60))
    assert sorted(s["id"] for s in json.loads(again.stdout)) == sorted(s["id"] for s in services)
    deleted = ok(pf(env, "apply", "--delete", str(recipe), timeout=180))
    assert "removed 2" in deleted.stdout
    names = [s["name"] for s in portal.request("GET", "/api/services").json()["services"]]
    assert "pair-0" not in names and "pair-1" not in names


# --- the README ----------------------------------------------------------------------------------------

def readme_walkthrough() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Command line", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_readme_walkthrough_runs_as_written(tmp_path, env, portal):
    script = readme_walkthrough()
    assert "pilotfish run" in script and "pilotfish stop" in script
    run_env = dict(env, PATH=f"{Path(PILOTFISH).parent}:{os.environ['PATH']}", MODEL="test/tiny")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=run_env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"stdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr
