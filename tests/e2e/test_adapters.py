"""LoRA adapters on real vLLM (CPU build), a job on the real test Slurm, called through the portal with the official
openai client: adapters of the tiny Llama written with peft (seeded, non-zero weights) are listed with their base,
served by one job beside it, listed in /v1/models with the base as parent, and answered under their own names; under
greedy decoding each answers otherwise than the base. The launch page's adapter choice is driven in Chromium. The
extra start-up time of loading adapters is measured by benchmarks/adapters.py."""
from __future__ import annotations

import json
import subprocess

import openai
import pytest

from portal.engines import installer
from tests.conftest import PortalProcess, wait_for
from tests.e2e.conftest import READY_TIMEOUT, TINY_LLAMA, pilotfish_cli, vllm_portal

pytestmark = pytest.mark.slurm
ADAPTERS = list(installer.TINY_LORA_REPO_IDS)
FIRST, SECOND = ADAPTERS[0], ADAPTERS[1]
ENGINE_ARGS = ["--max-model-len", "256"]
LAUNCHES = {"four": {"kind": "text-generation", "model": TINY_LLAMA, "adapters": ADAPTERS, "engine_args": ENGINE_ARGS}}
GREEDY = {"temperature": 0, "seed": 7, "max_tokens": 24}
QUESTION = [{"role": "user", "content": "Hello, how are you today?"}]


class Adapters:
    def __init__(self, portal: PortalProcess, services: dict):
        self.portal, self.services = portal, services

    def api(self, token=None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.portal.url}/v1", api_key=token or self.portal.token, max_retries=0,
                             timeout=120)

    def cli(self, *arguments) -> subprocess.CompletedProcess:
        return pilotfish_cli(self.portal, *arguments)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, slurm_cluster):
    def stage_loras(models, python):
        installer.stage_tiny_loras(models, python, installer.engines_dir() / "peft")
    with vllm_portal(tmp_path_factory, "adapters", LAUNCHES, stage=(stage_loras,)) as (portal, services):
        yield Adapters(portal, services)


def answer(api, model) -> tuple:
    raw = api.chat.completions.with_raw_response.create(model=model, messages=QUESTION, **GREEDY)
    return raw.parse().choices[0].message.content, raw.headers["X-Pilotfish-Service"]


def test_the_inventory_lists_each_adapter_with_its_base(adapters):
    listed = {m["repo_id"]: m for m in adapters.portal.request("GET", "/api/models").json()["models"]}
    assert listed[TINY_LLAMA]["adapters"] == ADAPTERS and listed[TINY_LLAMA]["base"] is None
    for name in ADAPTERS:
        assert listed[name]["base"] == TINY_LLAMA and listed[name]["kinds"] == ["text-generation"]
        assert listed[name]["revisions"][0]["adapter"]["rank"] == 8
    rows = {line.split()[0]: line.split() for line in adapters.cli("models", "ls").stdout.splitlines()[1:]}
    assert rows[TINY_LLAMA][-2:] == ["-", ",".join(ADAPTERS)]
    assert rows[FIRST][-2:] == [TINY_LLAMA, "-"]
    shown = adapters.cli("models", "options", TINY_LLAMA)
    assert shown.returncode == 0 and f"adapters it may serve (pilotfish run --adapter): {', '.join(ADAPTERS)}" \
        in shown.stdout, shown.stdout + shown.stderr
    alone = adapters.cli("run", "text-generation", "--model", FIRST, "--dry-run")
    assert alone.returncode == 2 and alone.stdout == ""
    assert alone.stderr.strip().splitlines() == [
        f"pilotfish: model: {FIRST} is a LoRA adapter of {TINY_LLAMA}, not a model to launch alone: launch "
        f"{TINY_LLAMA} with adapters [{FIRST}]"]
    pooled = adapters.cli("run", "text-embedding", "--model", TINY_LLAMA, "--adapter", FIRST, "--dry-run")
    assert pooled.returncode == 2
    assert pooled.stderr.strip() == "pilotfish: adapters: adapters apply to text-generation services, not text-embedding"
    planned = adapters.cli("run", "text-generation", "--model", TINY_LLAMA, "--adapter", SECOND, "--dry-run")
    assert planned.returncode == 0, planned.stderr
    folder = listed[SECOND]["revisions"][0]["path"]  # the site's cache, as the inventory lists it
    assert f"--lora-modules {SECOND}={folder}" in planned.stdout and "--max-lora-rank 8" in planned.stdout


def test_one_job_serves_the_base_and_each_adapter_and_greedy_answers_differ(adapters):
    api = adapters.api()
    listed = {model.id: model for model in api.models.list()}
    assert listed[TINY_LLAMA].parent is None
    assert all(listed[name].parent == TINY_LLAMA for name in ADAPTERS)
    service = adapters.services["four"]["id"]
    base, served_by = answer(api, TINY_LLAMA)
    assert served_by == service
    texts = {}
    for name in (FIRST, SECOND):
        texts[name], served_by = answer(api, name)
        assert served_by == service  # the same job: one service serves all
        assert texts[name] != base, (name, base)
    assert texts[FIRST] != texts[SECOND]
    assert answer(api, FIRST)[0] == texts[FIRST]  # greedy: the same answer again
    # The service's own URL answers for its adapters too.
    own = openai.OpenAI(base_url=f"{adapters.portal.url}/services/{service}/v1", api_key=adapters.portal.token,
                        max_retries=0, timeout=120)
    assert own.chat.completions.create(model=FIRST, messages=QUESTION, **GREEDY).choices[0].message.content \
        == texts[FIRST]
    with pytest.raises(openai.NotFoundError) as missing:
        api.chat.completions.create(model=TINY_LLAMA + "-lora-9", messages=QUESTION, max_tokens=2)
    assert FIRST in str(missing.value)  # the answer lists what is served, adapters included


def test_usage_and_key_limits_treat_an_adapter_as_a_model_of_its_own(adapters):
    """A key limited to the base may not call its adapters, and one limited to an adapter may not call the base:
    each name is a model of its own. An adapter's requests are counted under its name, the base's under its own."""
    from portal.usage_ledger import FLUSH_SECONDS
    portal = adapters.portal

    def key(name, models, scopes=("use", "read")):
        made = portal.request("POST", "/api/keys", json={"name": name, "models": models, "scopes": list(scopes)})
        assert made.status_code == 201, made.text
        return made.json()["key"]

    base_only, adapter_only = key("base-only", [TINY_LLAMA]), key("adapter-only", [FIRST])
    with pytest.raises(openai.PermissionDeniedError) as refused:
        adapters.api(base_only).chat.completions.create(model=FIRST, messages=QUESTION, max_tokens=2)
    assert refused.value.code == "model_not_allowed"
    assert [model.id for model in adapters.api(base_only).models.list()] == [TINY_LLAMA]
    assert adapters.api(base_only).chat.completions.create(model=TINY_LLAMA, messages=QUESTION, max_tokens=2,
                                                           extra_body={"ignore_eos": True}).usage.completion_tokens == 2
    assert [model.id for model in adapters.api(adapter_only).models.list()] == [FIRST]
    with pytest.raises(openai.PermissionDeniedError):
        adapters.api(adapter_only).chat.completions.create(model=TINY_LLAMA, messages=QUESTION, max_tokens=2)
    used = adapters.api(adapter_only).chat.completions.create(model=FIRST, messages=QUESTION, max_tokens=3,
                                                              extra_body={"ignore_eos": True})
    assert used.usage.completion_tokens == 3
    launcher = key("launcher", [TINY_LLAMA], ("use", "read", "launch"))
    launched = portal.request("POST", "/api/services", token=False, params={"dry_run": "true"},
                              json={"kind": "text-generation", "model": TINY_LLAMA, "adapters": [FIRST]},
                              headers={"Authorization": f"Bearer {launcher}"})
    assert launched.status_code == 403, launched.text
    assert launched.json()["field"] == "adapters" and FIRST in launched.json()["error"]

    def usage_by_model(**params):
        rows = portal.request("GET", "/api/usage", params={"by": "model", **params}).json()["rows"]
        return {row["model"]: row for row in rows}

    def counted():
        adapter_rows = usage_by_model(principal="key:adapter-only")
        base_rows = usage_by_model(principal="key:base-only")
        return (adapter_rows[FIRST], base_rows[TINY_LLAMA]) if FIRST in adapter_rows and TINY_LLAMA in base_rows \
            else None

    adapter_calls, base_calls = wait_for(counted, timeout=FLUSH_SECONDS + 30, interval=0.5,
                                         what="the adapter's and the base's calls to be counted")
    assert (adapter_calls["requests"], adapter_calls["completion_tokens"]) == (1, 3), adapter_calls
    assert (base_calls["requests"], base_calls["completion_tokens"]) == (1, 2), base_calls
    by_model = usage_by_model()
    assert by_model[FIRST]["requests"] >= 1 and by_model[FIRST]["completion_tokens"] >= 3
    assert TINY_LLAMA in by_model


def test_the_launch_page_offers_the_models_adapters_and_launches_one(adapters):
    """The adapters of the chosen model are offered (none for a kind that serves none); the one ticked reaches the
    plan and the service launched from the page."""
    from playwright.sync_api import expect

    from tests.support.browser import open_browser
    from tests.ui.conftest import choose_launch, open_launch_page

    portal = adapters.portal
    with open_browser() as browser:
        page = open_launch_page(browser, portal, "text-generation", TINY_LLAMA)
        assert FIRST not in page.get_by_label("Model", exact=True).inner_text()  # an adapter is no model to launch
        expect(page.get_by_label(FIRST)).to_be_visible(timeout=15_000)
        assert page.locator("#adapters input").count() == len(ADAPTERS)
        assert page.locator('[data-info="adapters"]').inner_text() == ", ".join(ADAPTERS)
        page.get_by_label(FIRST).check()
        choose_launch(page, "text-embedding", TINY_LLAMA)
        expect(page.locator("#adapters-field")).to_be_hidden(timeout=15_000)  # pooled states: no adapters
        choose_launch(page, "text-generation", TINY_LLAMA)
        expect(page.get_by_label(FIRST)).to_be_checked(timeout=15_000)  # still ticked
        page.get_by_label("Time limit").fill("30")
        page.get_by_text("Advanced options").click()
        page.get_by_label("Name", exact=True).fill("adapters-one")
        page.get_by_label("Engine options").fill(" ".join(ENGINE_ARGS))
        page.get_by_role("button", name="Check and show the job script").click()
        expect(page.locator("#plan-presets")).to_contain_text(f"serves {FIRST}", timeout=15_000)
        script = page.locator("#plan-script").inner_text()
        assert f"{FIRST}=" in script and SECOND not in script
        browser.screenshot(page, "launch-adapters")
        page.get_by_role("button", name="Launch", exact=True).click()
        page.wait_for_url("**/ui/services/*", timeout=30_000)
        service_id = page.url.rstrip("/").rsplit("/", 1)[-1]
    try:
        one = portal.wait_state(service_id, {"RUNNING", "FAILED", "TIMEOUT"}, timeout=READY_TIMEOUT)
        assert one["state"] == "RUNNING", one["reason"]
        assert one["adapters"] == [FIRST]
    finally:
        stop(portal, service_id)


def stop(portal: PortalProcess, service_id: str) -> None:
    portal.request("POST", f"/api/services/{service_id}/stop", timeout=30)
    wait_for(lambda: portal.service(service_id)["state"] in ("STOPPED", "FAILED", "TIMEOUT"), timeout=120,
             what=f"service {service_id} to stop")


def test_a_batch_on_an_adapter_runs_its_base_serving_it(adapters, tmp_path):
    """A batch whose lines name an adapter: its task launches the base serving that adapter, and vLLM answers each
    line as the adapter (a model name it did not serve would be an error line)."""
    source = tmp_path / "adapter-batch.jsonl"
    source.write_text("".join(json.dumps({"custom_id": f"lora-{number}", "method": "POST", "url": "/v1/chat/completions",
                                          "body": {"model": FIRST, "messages": QUESTION, **GREEDY}}) + "\n"
                              for number in range(12)))
    api = adapters.api()
    uploaded = api.files.create(file=open(source, "rb"), purpose="batch")
    batch = api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                               metadata={"engine_args": " ".join(ENGINE_ARGS), "time": "15"})
    done = wait_for(lambda: (lambda b: b if b.status in ("completed", "failed", "cancelled", "expired") else None)(
        api.batches.retrieve(batch.id)), timeout=600, interval=2, what="the adapter's batch")
    assert done.status == "completed" and (done.request_counts.completed, done.request_counts.failed) == (12, 0), done
    lines = [json.loads(line) for line in api.files.content(done.output_file_id).text.splitlines()]
    assert {line["response"]["body"]["model"] for line in lines} == {FIRST}
    script = (adapters.portal.home / "batches" / batch.id / "batch.sh").read_text()
    assert "--lora-modules" in script and FIRST in script


def test_once_its_service_ends_a_request_for_an_adapter_names_the_service_that_served_it(adapters):
    """Last in this module: the job serving the adapters is stopped; a request for one of them is a 404 that names
    the service that served it beside its base."""
    service = adapters.services["four"]["id"]
    stop(adapters.portal, service)
    with pytest.raises(openai.NotFoundError) as missing:
        adapters.api().chat.completions.create(model=SECOND, messages=QUESTION, **GREEDY)
    assert f"its last service {service}, which served it beside {TINY_LLAMA}, STOPPED" in str(missing.value)
