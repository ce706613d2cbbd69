"""Every page under Open OnDemand's prefix and at the bare path, and the catalog pages at work in a real browser:
API keys, the cluster from sinfo/squeue, model downloads with progress and cancel."""
from __future__ import annotations

import re

import pytest
import requests
from playwright.sync_api import expect

from tests.conftest import wait_for
from tests.support.fake_hub import FakeHub
from tests.support.model_builders import config_json, safetensors_bytes, tiny_llama
from tests.ui.conftest import prefix, sign_in

pytestmark = pytest.mark.slurm

PAGES = {  # name: (path, title, main heading)
    "dashboard": ("/", "Dashboard", "Your services"),
    "launch": ("/ui/launch", "Launch a service", "Launch a service"),
    "models": ("/ui/models", "Models", "Models"),
    "images": ("/ui/images", "Container images", "Container images"),
    "cluster": ("/ui/cluster", "Cluster", "Cluster"),
    "keys": ("/ui/keys", "API keys", "API keys"),
    "usage": ("/ui/usage", "Usage", "Usage"),
    "batches": ("/ui/batches", "Batches", "Batches"),
    "service": ("/ui/services/{id}", "{name}", "{name}"),
    "playground": ("/ui/services/{id}/playground", "Playground · {name}", "Playground"),
}


def uneven_shards(*megabytes) -> dict:
    """A causal LM whose weight files differ in size, so a throttled parallel download finishes them one by one
    (progress counts whole files)."""
    files = {"config.json": config_json(architectures=["GPT2LMHeadModel"], model_type="gpt2")}
    for index, size in enumerate(megabytes):
        files[f"model-{index + 1:05d}-of-{len(megabytes):05d}.safetensors"] = safetensors_bytes(
            {f"h.{index}.weight": ("F16", [int(size * 1e6) // 2])})
    return files


@pytest.fixture(scope="module")
def running_service(ui_portal):
    created = ui_portal.launch(name="pages", time=10)
    assert created.status_code == 201, created.text
    service = ui_portal.wait_state(created.json()["id"], "RUNNING", timeout=60)
    yield service
    ui_portal.request("POST", f"/api/services/{service['id']}/stop")


@pytest.mark.parametrize("where", ["prefix", "bare"])
def test_every_page_renders_with_links_under_the_path_it_was_reached_by(ui_portal, running_service, browser, where):
    portal = ui_portal
    base = prefix(portal) if where == "prefix" else ""
    page = browser.new_page()
    sign_in(page, portal, base)
    for name, (path, title, heading) in PAGES.items():
        path, title, heading = (text.format(**running_service) for text in (path, title, heading))
        response = page.goto(f"{portal.url}{base}{path}")
        assert response.status == 200, (name, response.status)
        expect(page).to_have_title(f"{title} · Pilotfish")
        expect(page.get_by_role("heading", level=1)).to_contain_text(heading)
        page.wait_for_load_state("networkidle")
        # Every link, script and stylesheet stays under the path the page was reached by.
        urls = page.eval_on_selector_all("a[href], script[src], link[href]",
                                         "nodes => nodes.map(n => n.getAttribute('href') || n.getAttribute('src'))")
        local = [url for url in urls if not url.startswith(("#", "data:", "http"))]
        assert local and all(url.startswith(f"{base}/") for url in local), (name, local)
        assert page.evaluate("document.body.dataset.baseUrl") == base
        # Every form control has a label (its own, aria-label or aria-labelledby).
        unlabelled = page.eval_on_selector_all(
            "input:not([type=hidden]), select, textarea",
            "nodes => nodes.filter(n => !(n.labels && n.labels.length) && !n.getAttribute('aria-label')"
            " && !n.getAttribute('aria-labelledby')).map(n => n.id || n.name)")
        assert unlabelled == [], (name, unlabelled)
        browser.screenshot(page, f"{name}-{where}")
    # The navigation works from the keyboard: Tab from the top reaches the skip link, then the menu.
    page.goto(f"{portal.url}{base}/ui/models")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent.trim()") == "Skip to content"
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent.trim()") == "Dashboard"
    page.keyboard.press("Enter")
    page.wait_for_url(f"{portal.url}{base}/")


def test_unknown_services_answer_with_a_page_and_signing_out_ends_the_session(ui_portal, browser):
    browser.allow(r"status of 404")
    page = browser.new_page()
    base = prefix(ui_portal)
    sign_in(page, ui_portal, base)
    response = page.goto(f"{ui_portal.url}{base}/ui/services/abcdef")
    assert response.status == 404
    expect(page.get_by_role("alert")).to_contain_text("no service 'abcdef'")
    # Scripts keep getting JSON: the API's index at the root, a 401 without credentials.
    assert requests.get(f"{ui_portal.url}/", timeout=10).status_code == 401
    assert ui_portal.request("GET", "/").json()["portal"] == "pilotfish"
    # Sign out: back to the login form, and pages send there again (to come back to the page asked for).
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(f"{ui_portal.url}{base}/login")
    page.goto(f"{ui_portal.url}{base}/ui/cluster?x=1")
    asked = f"%2Fnode%2F127.0.0.1%2F{ui_portal.port}%2Fui%2Fcluster%3Fx%3D1"
    expect(page).to_have_url(f"{ui_portal.url}{base}/login?next={asked}")
    page.get_by_label("Portal token").fill(ui_portal.token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{ui_portal.url}{base}/ui/cluster?x=1")
    expect(page).to_have_title("Cluster · Pilotfish")


def test_keys_are_created_shown_once_and_revoked(ui_portal, browser):
    portal = ui_portal
    page = browser.new_page()
    sign_in(page, portal, prefix(portal))
    page.get_by_role("link", name="API keys").click()
    page.get_by_label("Name").fill("ui-laptop")
    page.get_by_role("button", name="Create key").click()
    key = page.get_by_label("The new key")
    expect(key).to_have_value(re.compile(r"^pf_"))
    secret = key.input_value()
    row = page.locator("#keys-table tbody tr", has_text="ui-laptop")
    expect(row).to_contain_text(secret[:7])
    assert secret not in page.locator("#keys-table").inner_text()
    assert requests.get(f"{portal.url}/v1/models", headers={"Authorization": f"Bearer {secret}"},
                        timeout=10).status_code == 200
    browser.screenshot(page, "keys-created")
    row.get_by_role("button", name="Revoke ui-laptop").click()
    page.get_by_role("dialog").get_by_role("button", name="Revoke key").click()
    expect(row).to_have_count(0)
    wait_for(lambda: requests.get(f"{portal.url}/v1/models", headers={"Authorization": f"Bearer {secret}"},
                                  timeout=10).status_code == 401, timeout=10, what="the revoked key to be refused")


def test_a_scoped_key_is_created_with_its_models_end_and_rates(start_portal, browser):
    browser.allow(r"status of 400")  # the refused form below
    portal = start_portal("local")
    wait_for(lambda: "test/tiny" in {m["repo_id"] for m in portal.request("GET", "/api/models").json()["models"]},
             timeout=30, what="the inventory")
    page = browser.new_page()
    sign_in(page, portal)
    page.goto(f"{portal.url}/ui/keys")
    # A bad end: refused under its field, and nothing is created.
    page.get_by_label("Name").fill("ui-bad")
    page.get_by_label("Expires").fill("soon")
    page.get_by_role("button", name="Create key").click()
    expires = page.get_by_label("Expires")
    expect(expires).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#key-expires-error")).to_contain_text("expires: expected how long it lasts")
    expect(page.locator("#key-name")).not_to_have_attribute("aria-invalid", "true")
    # No scope at all: refused on the scopes.
    page.get_by_label("Expires").fill("")
    for scope in ("use: call models", "read: see services, models and metrics", "launch: launch, stop and change"):
        page.get_by_label(scope).uncheck()
    page.get_by_role("button", name="Create key").click()
    expect(page.locator("#key-scopes-error")).to_contain_text("scopes:")
    assert "ui-bad" not in {k["name"] for k in portal.request("GET", "/api/keys").json()["keys"]}

    # A key that may only call test/tiny, for a week, at 30 requests and 20000 tokens a minute.
    page.get_by_label("Name").fill("ui-student")
    page.get_by_label("use: call models").check()
    page.get_by_label("Models", exact=True).select_option(["test/tiny"])
    page.get_by_label("Expires").fill("7d")
    page.get_by_label("Requests per minute").fill("30")
    page.get_by_label("Tokens per minute").fill("20000")
    page.get_by_role("button", name="Create key").click()
    key = page.get_by_label("The new key")
    expect(key).to_have_value(re.compile(r"^pf_"))
    expect(page.locator("#key-scopes-error")).to_be_empty()
    row = page.locator("#keys-table tbody tr", has_text="ui-student")
    expect(row.locator('[data-field="scopes"]')).to_have_text("use")
    expect(row.locator('[data-field="models"]')).to_have_text("test/tiny")
    expect(row.locator('[data-field="limits"]')).to_have_text("30 requests/min, 20000 tokens/min")
    expect(row.locator('[data-field="last-used"]')).to_have_text("never")
    expect(row.locator('[data-field="expires"]')).not_to_have_text("never")
    browser.screenshot(page, "keys-scoped")
    listed = next(k for k in portal.request("GET", "/api/keys").json()["keys"] if k["name"] == "ui-student")
    assert (listed["scopes"], listed["models"], listed["requests_per_minute"], listed["tokens_per_minute"]) == \
        (["use"], ["test/tiny"], 30, 20000) and listed["expires_at"]
    secret = {"Authorization": f"Bearer {key.input_value()}"}
    assert requests.get(f"{portal.url}/v1/models", headers=secret, timeout=10).status_code == 200
    assert requests.get(f"{portal.url}/api/services", headers=secret, timeout=10).status_code == 403


def test_cluster_page_shows_partitions_free_gpus_and_the_users_jobs(ui_portal, running_service, browser):
    page = browser.new_page()
    sign_in(page, ui_portal)
    page.goto(f"{ui_portal.url}/ui/cluster")
    for partition in ("cpu", "gpu"):
        expect(page.locator(f'tr[data-partition="{partition}"] [data-field="gpus"]')).to_have_text(
            re.compile(r"^\d of 4 \(a100\)$"))
    expect(page.locator('tr[data-partition="cpu"]')).to_contain_text("default")
    job = page.locator(f'tr[data-job-id="{running_service["job_id"]}"]')
    expect(job).to_contain_text("RUNNING")
    page.get_by_role("button", name="Refresh").click()  # the same overview again, from GET /api/cluster
    expect(page.locator("#refresh-status")).to_contain_text("Updated")
    expect(job).to_contain_text("RUNNING")
    job.get_by_role("link", name=f"pilotfish-{running_service['id']}").click()
    page.wait_for_url(f"{ui_portal.url}/ui/services/{running_service['id']}")
    page.go_back()
    browser.screenshot(page, "cluster-queue")


def test_cluster_numbers_count_free_resources_only_on_nodes_that_take_jobs():
    """What the cluster page shows for nodes the test cluster cannot produce: drained, down, typed and untyped GPUs."""
    from portal.scheduler.slurm import parse_sinfo_nodes, parse_user_queue

    partitions, nodes = parse_sinfo_nodes(
        "a1|gpu*|mixed|8/24/0/32|gpu:a100:4(S:0-1)|gpu:a100:1(IDX:0)|256000|64000|2-00:00:00|up|\n"
        "a2|gpu*|drained|0/32/0/32|gpu:a100:4|gpu:a100:0(IDX:N/A)|256000|0|2-00:00:00|up|\n"
        "c1|cpu|idle~|0/16/0/16|(null)|gpu:0|64000|0|1-00:00:00|up|\n"
        "a1|debug|mixed|8/24/0/32|gpu:a100:4(S:0-1)|gpu:a100:1(IDX:0)|256000|64000|1:00:00|up|\n")
    gpu = next(p for p in partitions if p["name"] == "gpu")
    assert gpu["default"] and (gpu["nodes"], gpu["nodes_usable"], gpu["nodes_idle"]) == (2, 1, 0)
    assert (gpu["gpus_free"], gpu["gpus_total"], gpu["cpus_idle"], gpu["gpu_types"]) == (3, 8, 24, ["a100"])
    cpu = next(p for p in partitions if p["name"] == "cpu")
    assert (cpu["nodes_idle"], cpu["gpus_total"], cpu["cpus_idle"]) == (1, 0, 16)  # "idle~": powered down, idle
    assert [n["name"] for n in nodes] == ["a1", "a2", "c1"] and nodes[0]["partitions"] == ["gpu", "debug"]
    jobs = parse_user_queue("42|gpu|PENDING|0:00|1:00:00|1|gres/gpu:2|(Resources)|my|odd|name\n")
    assert jobs[0]["name"] == "my|odd|name" and jobs[0]["where"] == "(Resources)" and jobs[0]["gres"] == "gres/gpu:2"


def test_model_downloads_show_progress_can_be_cancelled_and_land_in_the_inventory(start_portal, browser,
                                                                                   monkeypatch):
    with FakeHub(throttle=1_000_000) as hub:
        hub.add_repo("org/big", uneven_shards(0.5, 2, 10))  # done after about 0.5, 2 and 10 seconds
        hub.add_repo("org/small", tiny_llama())
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        portal = start_portal("local")
        local = portal.request("GET", "/api/cluster").json()  # the local scheduler's overview: this host
        assert local["scheduler"] == "local" and [p["name"] for p in local["partitions"]] == ["local"]
        page = browser.new_page()
        sign_in(page, portal)
        page.goto(f"{portal.url}/ui/models")
        expect(page.locator('table[data-location="cache"] tr[data-repo="test/tiny"]')).to_be_visible()
        expect(page.locator('table[data-location="cache"] [data-delete-model]')).to_have_count(0)

        # A slow download: the bar moves, then Cancel stops it.
        page.get_by_label("Hugging Face repo id").fill("org/big")
        page.get_by_role("button", name="Download").click()
        item = page.locator("#downloads li", has_text="org/big")
        bar = item.get_by_role("progressbar")
        expect(item.locator(".badge")).to_have_text("running")
        wait_for(lambda: int(bar.get_attribute("aria-valuenow") or 0) > 0, timeout=20, what="progress")
        first = int(bar.get_attribute("aria-valuenow"))
        wait_for(lambda: int(bar.get_attribute("aria-valuenow")) > first, timeout=20, what="more progress")
        assert int(bar.get_attribute("aria-valuenow")) < 100
        browser.screenshot(page, "models-downloading")
        item.get_by_role("button", name="Cancel the download of org/big").click()
        page.get_by_role("dialog").get_by_role("button", name="Cancel download").click()
        expect(item.locator(".badge")).to_have_text("cancelled", timeout=15_000)
        expect(item).to_contain_text("cancelled by the user")

        # A download that completes shows up under your models, which can be deleted.
        hub.throttle = None
        page.get_by_label("Hugging Face repo id").fill("org/small")
        page.get_by_role("button", name="Download").click()
        small = page.locator("#downloads li", has_text="org/small")
        expect(small.locator(".badge")).to_have_text("done", timeout=30_000)
        page.get_by_role("button", name="Show it in the inventory").click()
        row = page.locator('table[data-location="home"] tr[data-repo="org/small"]')
        expect(row).to_contain_text("text-generation")
        browser.screenshot(page, "models")
        row.get_by_role("button", name="Delete org/small from your models").click()
        page.get_by_role("dialog").get_by_role("button", name="Delete model").click()
        expect(row).to_have_count(0)
        expect(page.locator("#models-alert")).to_contain_text("Deleted org/small")
        assert "org/small" not in {m["repo_id"] for m in portal.request("GET", "/api/models").json()["models"]}
