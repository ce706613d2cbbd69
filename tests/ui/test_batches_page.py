"""The Batches page in Chromium, on a portal with the local scheduler whose engine answers each request after a pause:
upload a JSONL file and start a batch, watch its progress bar move to completion, download its output and errors
(each line checked), follow its shards, jobs and events on its page; a bad file is refused next to the file field
and leaves nothing behind; a folder transcription shows its folders in the list and on its page."""
from __future__ import annotations

import json
import sys

import pytest
from playwright.sync_api import expect

from tests.conftest import REPO, wait_for
from tests.ui.conftest import sign_in

UPSTREAM = f"{sys.executable} {REPO / 'tests' / 'support' / 'openai_upstream.py'}"
MODEL = "test/tiny"
LINES = 24


def chat_line(number: int, **body) -> dict:
    return {"custom_id": f"request-{number}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Say {number}"}], "max_tokens": 2,
                     **body}}


def jsonl(lines) -> str:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)


@pytest.fixture(scope="module")
def portal(start_module_portal):
    # Each answer takes 0.5 s: three shards of eight lines, one request at a time, take four seconds or more.
    return start_module_portal("local", runtimes={"text-generation": {"command": f"{UPSTREAM} --answer-delay 0.5"},
                                                  "speech-recognition": {"command": UPSTREAM}})


def listed(portal, what: str) -> set:
    return {entry["id"] for entry in portal.request("GET", f"/v1/{what}").json()["data"]}


def test_a_batch_is_uploaded_started_watched_and_downloaded(portal, browser, tmp_path):
    source = tmp_path / "prompts.jsonl"
    source.write_text(jsonl([chat_line(n) for n in range(LINES - 1)] + [chat_line(LINES - 1, max_tokens=0)]))
    page = browser.new_page()
    sign_in(page, portal)
    page.get_by_role("link", name="Batches").click()
    expect(page).to_have_title("Batches · Pilotfish")
    expect(page.locator("#batches-empty")).to_be_visible()

    page.get_by_label("JSONL file").set_input_files(str(source))
    page.get_by_label("Endpoint").select_option("/v1/chat/completions")
    page.get_by_label("Tier").select_option("cpu.Tiny")
    page.get_by_label("Time limit per task").fill("5")
    page.get_by_label("Lines per shard").fill("8")
    page.get_by_label("Requests in flight").fill("1")
    page.get_by_role("button", name="Start batch").click()
    expect(page.locator("#batches-alert")).to_contain_text("Started batch_")
    batch_id = page.locator("#batches-alert a").text_content()
    row = page.locator(f'#batches-table tr[data-batch-id="{batch_id}"]')
    bar = row.get_by_role("progressbar")
    created = portal.request("GET", f"/v1/batches/{batch_id}").json()
    assert created["metadata"] == {"tier": "cpu.Tiny", "time": "5", "shard_size": "8", "concurrency": "1"}
    assert created["pilotfish"]["tier"] == "cpu.Tiny" and len(created["pilotfish"]["shards"]) == 3

    # The bar moves while the shards run (part way at some point), and the row says which jobs run them.
    wait_for(lambda: 0 < int(bar.get_attribute("aria-valuenow")) < 100, timeout=60, interval=0.1,
             what="the progress bar part way")
    expect(row.locator('[data-field="shards"]')).to_contain_text(" of 3 running (job")
    browser.screenshot(page, "batches-running")
    expect(row.locator('[data-field="status"]')).to_have_text("completed", timeout=60_000)
    expect(bar).to_have_attribute("aria-valuenow", "100")
    expect(bar).to_have_attribute("aria-valuetext", f"{LINES - 1} done, 1 failed of {LINES}")
    expect(row.locator('[data-field="shards"]')).to_have_text("3 shards")
    browser.screenshot(page, "batches")

    with page.expect_download() as download:
        row.get_by_role("link", name=f"Output of {batch_id}").click()
    answers = [json.loads(line) for line in open(download.value.path()).read().splitlines()]
    assert [line["custom_id"] for line in answers] == [f"request-{n}" for n in range(LINES - 1)]
    assert all(line["response"]["status_code"] == 200 for line in answers)
    with page.expect_download() as download:
        row.get_by_role("link", name=f"Errors of {batch_id}").click()
    errors = [json.loads(line) for line in open(download.value.path()).read().splitlines()]
    assert [line["custom_id"] for line in errors] == [f"request-{LINES - 1}"]
    assert "max_tokens must be at least 1" in errors[0]["error"]["message"]

    # Its page: the shards with the jobs that ran them, and the events.
    row.get_by_role("link", name=batch_id, exact=True).click()
    page.wait_for_url(f"{portal.url}/ui/batches/{batch_id}")
    expect(page).to_have_title(f"Batch {batch_id} · Pilotfish")
    shards = page.locator("#shards-table tbody tr")
    expect(shards).to_have_count(3)
    shown = portal.request("GET", f"/v1/batches/{batch_id}").json()["pilotfish"]["shards"]
    for index, shard in enumerate(shown):
        line = shards.nth(index)
        expect(line.locator('[data-field="job"]')).to_have_text(shard["job_id"])
        expect(line.locator('[data-field="state"]')).to_have_text("done")
        expect(line.locator('[data-field="answered"]')).to_have_text(
            f"{shard['completed']} done, {shard['failed']} failed of 8")
    assert sum(shard["completed"] for shard in shown) == LINES - 1
    expect(page.locator("#batch-events")).to_contain_text("finalizing → completed")
    expect(page.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#cancel-button")).to_be_hidden()
    browser.screenshot(page, "batch")


def test_a_running_batch_is_cancelled_from_its_page(portal, browser, tmp_path):
    source = tmp_path / "long.jsonl"
    source.write_text(jsonl([chat_line(n) for n in range(200)]))
    page = browser.new_page()
    sign_in(page, portal)
    page.goto(f"{portal.url}/ui/batches")
    page.get_by_label("JSONL file").set_input_files(str(source))
    page.get_by_label("Requests in flight").fill("1")
    page.get_by_role("button", name="Start batch").click()
    page.locator("#batches-alert a").click()
    badge = page.locator("#status-badge [data-status]")
    expect(badge).to_have_attribute("data-status", "in_progress")
    wait_for(lambda: int(page.get_by_role("progressbar").get_attribute("aria-valuenow")) > 0, timeout=60,
             what="the first answers")
    page.get_by_role("button", name="Cancel batch").click()
    page.get_by_role("dialog").get_by_role("button", name="Cancel batch").click()
    expect(badge).to_have_attribute("data-status", "cancelled", timeout=30_000)
    expect(page.locator("#shards-table [data-field='state']").first).to_have_text("stopped")
    batch_id = page.url.rsplit("/", 1)[1]
    with page.expect_download() as download:
        page.get_by_role("link", name=f"Output of {batch_id}").click()
    kept = open(download.value.path()).read().splitlines()
    assert 0 < len(kept) < 200


def test_a_bad_file_is_refused_next_to_the_file_field_and_leaves_nothing(portal, browser, tmp_path):
    browser.allow(r"status of 400")  # the refusals below
    files_before, batches_before = listed(portal, "files"), listed(portal, "batches")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(jsonl([chat_line(1), '{"custom_id": "x", "method": ']))
    page = browser.new_page()
    sign_in(page, portal)
    page.goto(f"{portal.url}/ui/batches")
    file_field = page.get_by_label("JSONL file")
    page.get_by_role("button", name="Start batch").click()  # no file chosen
    expect(file_field).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#batch-file-error")).to_have_text("choose a JSONL file of requests")
    file_field.set_input_files(str(bad))
    page.get_by_role("button", name="Start batch").click()
    expect(page.locator("#batch-file-error")).to_contain_text("input_file_id: line 2: ")
    expect(page.locator("#batch-file-error")).to_contain_text("not valid JSON")
    expect(file_field).to_have_attribute("aria-describedby", "batch-file-help batch-file-error")
    # A bad option is shown next to its own field, and the file field is clear again.
    good = tmp_path / "good.jsonl"
    good.write_text(jsonl([chat_line(1)]))
    file_field.set_input_files(str(good))
    page.get_by_label("Lines per shard").fill("many")
    page.get_by_role("button", name="Start batch").click()
    expect(page.locator("#batch-shard-size-error")).to_contain_text("lines per shard")
    expect(page.get_by_label("Lines per shard")).to_have_attribute("aria-invalid", "true")
    expect(file_field).not_to_have_attribute("aria-invalid", "true")
    browser.screenshot(page, "batches-refused")
    wait_for(lambda: listed(portal, "files") == files_before, timeout=10, what="the refused uploads to be deleted")
    assert listed(portal, "batches") == batches_before


def test_a_folder_transcription_shows_its_folders_in_the_list_and_on_its_page(portal, browser, tmp_path):
    source, out = tmp_path / "talks", tmp_path / "text"
    (source / "day2").mkdir(parents=True)
    for relative in ("a.wav", "day2/b.wav"):
        (source / relative).write_bytes(b"RIFF" + relative.encode())
    created = portal.request("POST", "/api/batches/folders", json={"folder": str(source), "model": "test/whisper",
                                                                   "out": str(out), "format": "srt"})
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]
    wait_for(lambda: portal.request("GET", f"/v1/batches/{batch_id}").json()["status"] == "completed", timeout=60,
             what="the folder's batch to complete")
    page = browser.new_page()
    sign_in(page, portal)
    page.goto(f"{portal.url}/ui/batches")
    row = page.locator(f'#batches-table tr[data-batch-id="{batch_id}"]')
    expect(row.locator('[data-field="folder"]')).to_have_text(f"{source} → {out}")
    expect(row.locator('[data-field="counts"]')).to_contain_text("2 done")
    row.get_by_role("link", name=batch_id, exact=True).click()
    page.wait_for_url(f"{portal.url}/ui/batches/{batch_id}")
    expect(page.locator("#batch-details")).to_contain_text(f"{source} → {out} (srt)")
    expect(page.locator("#batch-details")).not_to_contain_text("Input file")
