"""The service pages in a real browser against a real portal on the test Slurm: sign in, launch, watch the service
come up without reloading, chat with streamed tokens, read the log, stop and delete; the launch form's errors;
the dashboard's banners."""
from __future__ import annotations

import re
import sqlite3
import wave

import pytest
from playwright.sync_api import expect

from tests.conftest import squeue_ids, wait_for
from tests.support.browser import watch_streamed_answer
from tests.ui.conftest import TOKEN_DELAY, prefix, sign_in, watch_navigations

pytestmark = pytest.mark.slurm


def test_launch_watch_chat_read_the_log_stop_and_delete(ui_portal, browser):
    portal = ui_portal
    base = prefix(portal)
    page = browser.new_page()
    page.goto(f"{portal.url}{base}/")
    browser.screenshot(page, "login")
    sign_in(page, portal, base)
    browser.screenshot(page, "dashboard-empty")

    # Launch: the model's tier is preselected by the recommendation, with its reason.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Launch").click()
    expect(page).to_have_title("Launch a service · Pilotfish")
    page.get_by_label("Service kind").select_option("text-generation")
    page.get_by_label("Model", exact=True).select_option("test/tiny")
    expect(page.locator("#tier-reason")).to_contain_text("Recommended: cpu.Tiny, because")
    expect(page.get_by_label("Tier", exact=True)).to_have_value("cpu.Tiny")
    expect(page.locator("#tier-reason")).to_contain_text("fits Tiny (up to 1 GB)")
    expect(page.locator('[data-info="location"]')).to_contain_text("site cache")
    page.get_by_label("Time limit").fill("10")
    page.get_by_label("Stop when unused for").fill("30m")
    browser.screenshot(page, "launch")
    page.get_by_role("button", name="Launch", exact=True).click()
    page.wait_for_url(re.compile(re.escape(f"{portal.url}{base}/ui/services/") + r"[0-9a-f]{12}$"))
    service_id = page.url.rsplit("/", 1)[1]
    expect(page).to_have_title(re.compile(r"· Pilotfish$"))

    # The state moves to RUNNING on this page by itself: no reload, no navigation.
    navigations = watch_navigations(page)
    page.evaluate("window.stillTheSamePage = true")
    expect(page.locator("#state-badge")).to_have_text("RUNNING", timeout=60_000)
    assert navigations == [] and page.evaluate("window.stillTheSamePage") is True
    timeline = page.locator("#timeline li")
    expect(timeline.last).to_contain_text("STARTING → RUNNING")
    expect(timeline.first).to_contain_text("submitted to slurm as job")
    expect(page.locator('[data-phase="total"]')).to_have_text(re.compile(r"^\d+\.\d s$"))
    expect(page.locator('[data-field="node"]')).not_to_have_text("—")
    expect(page.locator('[data-field="stops"]')).to_have_text(re.compile(
        r"^stops in (29|30) min if unused \(idle for 30 min\)$"))
    expect(page.locator("#url-notebook")).to_have_value(re.compile(rf"/services/{service_id}/v1$"))
    expect(page.locator("#snippet")).to_contain_text(f'connect().service("{service_id}")')
    job_id = portal.service(service_id)["job_id"]
    assert job_id in squeue_ids()

    # The job log follows the job; the submitted job script is there.
    log = page.locator("#job-log")
    expect(log).to_contain_text("openai_upstream: listening", timeout=15_000)
    page.get_by_text("Job script", exact=True).click()
    expect(page.locator("#job-script")).to_contain_text(f"Pilotfish service {service_id}")
    browser.screenshot(page, "service")

    # Chat: the answer grows token by token while the service is still sending.
    page.get_by_role("link", name="Open the playground").click()
    expect(page).to_have_title(re.compile(r"^Playground · "))
    expect(page.get_by_label("Image (optional)")).to_have_count(0)  # a text-only model: nothing to attach
    tokens = 10
    page.get_by_label("Max tokens").fill(str(tokens))
    page.get_by_label("Message").fill("Hello there")
    page.get_by_label("Message").press("Enter")
    seen, final, state = watch_streamed_answer(page, timeout=30, interval=TOKEN_DELAY / 3)
    assert state == "done"
    expected = "".join(f"tok{i} " for i in range(tokens))
    assert final == expected
    # Observed while streaming: several partial answers, each extending the one before.
    assert len(seen) >= 4, seen
    assert all(later.startswith(earlier) and len(later) > len(earlier) for earlier, later in zip(seen, seen[1:])), seen
    # The last token and the answer's end may arrive in one read, so only the earlier texts must be partial.
    assert sum(len(partial) < len(expected) for partial in seen) >= 4, seen
    expect(page.locator("#chat-stats")).to_contain_text(f"{tokens} chunks")
    browser.screenshot(page, "playground-chat")

    # Stop and delete from the dashboard; the row follows without a reload.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Dashboard").click()
    row = page.locator(f'tr[data-service-id="{service_id}"]')
    expect(row.locator(".badge")).to_have_text("RUNNING")
    navigations = watch_navigations(page)
    row.get_by_role("button", name=re.compile(r"^Stop ")).click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(f"This cancels Slurm job {job_id}")
    dialog.get_by_role("button", name="Stop service").click()
    expect(row.locator(".badge")).to_have_text("STOPPED", timeout=30_000)
    expect(row).to_contain_text("stopped by user")
    assert job_id not in squeue_ids()
    browser.screenshot(page, "dashboard-stopped")
    row.get_by_role("button", name=re.compile(r"^Delete ")).click()
    page.get_by_role("dialog").get_by_role("button", name="Delete service").click()
    expect(row).to_have_count(0)
    assert navigations == []
    assert portal.request("GET", f"/api/services/{service_id}").status_code == 404


def test_launch_form_shows_each_refusal_next_to_its_field(ui_portal, browser):
    portal = ui_portal
    before = portal.request("GET", "/api/services").json()["services"]
    page = browser.new_page()
    sign_in(page, portal)  # at the bare path this time
    page.goto(f"{portal.url}/ui/launch?kind=text-generation&model=test/tiny")
    expect(page.locator("#tier-reason")).to_contain_text("Recommended: cpu.Tiny")
    # when each tier would start (Slurm's estimate); Nano takes no model, so it is too small for this one
    expect(page.locator('[data-start="cpu.Tiny"]')).to_have_text(re.compile(r"^(now|in about \d+ min \(\d\d:\d\d\))$"))
    expect(page.locator('[data-start="cpu.Nano"]')).to_have_text("too small for this model")

    def problem_of(field):
        control = page.locator(f"#{field}")
        expect(control).to_have_attribute("aria-invalid", "true")
        expect(control).to_have_class(re.compile(r"\bis-invalid\b"))
        assert f"{field}-error" in control.get_attribute("aria-describedby")
        return page.locator(f"#{field}-error")

    # A time above the site's maximum is refused, not clamped.
    page.get_by_label("Time limit").fill("999")
    page.get_by_role("button", name="Launch", exact=True).click()
    expect(problem_of("time")).to_have_text("999 minutes exceeds the site maximum of 60 minutes")
    expect(page.locator("#launch-alert")).to_contain_text("Not launched")
    expect(page.get_by_label("Time limit")).to_have_value("999")
    browser.screenshot(page, "launch-error-time")

    # An idle timeout that is not a duration.
    page.get_by_label("Time limit").fill("5")
    page.get_by_label("Stop when unused for").fill("half an hour")
    page.get_by_role("button", name="Launch", exact=True).click()
    expect(problem_of("idle_timeout")).to_contain_text("expected minutes, or a duration such as 30m, 1h or 1h30m")
    expect(page.get_by_label("Stop when unused for")).to_have_value("half an hour")
    page.get_by_label("Stop when unused for").fill("")

    # A tier too small for the model: the chosen tier stays selected after the refusal.
    page.get_by_label("Time limit").fill("5")
    page.get_by_label("Tier", exact=True).select_option("cpu.Nano")
    page.get_by_role("button", name="Launch", exact=True).click()
    expect(problem_of("tier")).to_contain_text("cpu.Nano takes models up to 0 GB and test/tiny is")
    expect(page.get_by_label("Tier", exact=True)).to_have_value("cpu.Nano")
    browser.screenshot(page, "launch-error-tier")

    # A model that is not in the inventory.
    page.goto(f"{portal.url}/ui/launch?kind=text-generation&model=nobody/nothing")
    expect(page.get_by_label("Model", exact=True)).to_have_value("nobody/nothing")
    expect(page.locator("#tier-reason")).to_contain_text("not in the inventory")
    page.get_by_role("button", name="Launch", exact=True).click()
    expect(problem_of("model")).to_contain_text("nobody/nothing is not downloaded")
    expect(page.locator("#model-error")).to_contain_text("available: ")
    browser.screenshot(page, "launch-error-model")

    # Engine options outside the allow-list (the advanced section opens to show the problem).
    page.goto(f"{portal.url}/ui/launch?kind=text-generation&model=test/tiny")
    page.get_by_text("Advanced options").click()
    page.get_by_label("Engine options").fill("--token-delay 0 --rm-everything")
    page.get_by_role("button", name="Launch", exact=True).click()
    expect(problem_of("engine_args")).to_contain_text("--rm-everything is not an allowed")
    expect(page.get_by_label("Engine options")).to_be_visible()

    # The check shows the plan and the job script, and submits nothing.
    page.get_by_label("Engine options").fill("--token-delay 0")
    page.get_by_role("button", name="Check and show the job script").click()
    expect(page.locator("#plan")).to_contain_text("--partition=cpu")
    expect(page.locator("#plan-script")).to_contain_text("--token-delay 0")
    assert portal.request("GET", "/api/services").json()["services"] == before


def test_speech_playground_uploads_audio_and_shows_the_transcript(ui_portal, browser, tmp_path):
    portal = ui_portal
    created = portal.launch(kind="speech-recognition", model="test/whisper", time=5)
    assert created.status_code == 201, created.text
    service_id = created.json()["id"]
    audio = tmp_path / "speech.wav"
    with wave.open(str(audio), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(16000)
        handle.writeframes(b"\x00\x01" * 16000)
    page = browser.new_page()
    sign_in(page, portal)
    page.goto(f"{portal.url}/ui/services/{service_id}/playground")
    expect(page.locator("#not-running")).to_be_hidden(timeout=60_000)
    page.get_by_label("Audio file").set_input_files(str(audio))
    page.get_by_role("button", name="Transcribe").click()
    expect(page.locator("#transcript")).to_have_text(f"received {audio.stat().st_size} bytes")
    browser.screenshot(page, "playground-speech")
    portal.request("POST", f"/api/services/{service_id}/stop")


def test_dashboard_banners_for_an_unreachable_scheduler_and_a_broken_specs_file(start_portal, browser, tmp_path):
    broken = tmp_path / "broken_specs.yaml"
    broken.write_text("time: {default: 10, max: 60}\npartitions:\n  cpu:\n    tiers: [{name: Tiny}]\n")
    portal = start_portal("local", resource_specs=str(broken))
    page = browser.new_page()
    sign_in(page, portal)
    specs_banner = page.locator("#specs-banner")
    expect(specs_banner).to_contain_text(f"{broken}: partitions.cpu.tiers[0]: missing required field")
    scheduler_banner = page.locator("#scheduler-banner")
    expect(scheduler_banner).to_be_hidden()

    # The scheduler condition as the reconciler records it when squeue fails (see tests/test_resilience.py):
    # the open page shows it, and drops it, on its own.
    database = portal.home / "pilotfish.db"
    navigations = watch_navigations(page)

    def set_scheduler(ok: bool, message):
        with sqlite3.connect(database) as connection:
            connection.execute("INSERT OR REPLACE INTO conditions (name, ok, message, since, checked_at) "
                               "VALUES ('scheduler', ?, ?, datetime('now'), datetime('now'))", (ok, message))

    set_scheduler(False, "Slurm controller unreachable (squeue: Unable to contact slurm controller (connect failure))")
    expect(scheduler_banner).to_be_visible(timeout=15_000)
    expect(scheduler_banner).to_contain_text("Unable to contact slurm controller")
    browser.screenshot(page, "dashboard-banners")
    set_scheduler(True, None)
    expect(scheduler_banner).to_be_hidden(timeout=15_000)
    assert navigations == []

    # The launch page says why launching is unavailable.
    page.goto(f"{portal.url}/ui/launch")
    expect(page.locator(".alert-warning")).to_contain_text("Launching is unavailable")
    wait_for(lambda: portal.request("GET", "/api/tiers").status_code == 503, timeout=5, what="the API to agree")


def test_the_service_page_shows_renewal_and_a_renewed_services_jobs(ui_portal, browser):
    portal = ui_portal
    created = portal.launch(name="renewed", time=10, renew=True)
    assert created.status_code == 201, created.text
    service_id = created.json()["id"]
    page = browser.new_page()
    sign_in(page, portal)
    try:
        page.goto(f"{portal.url}/ui/services/{service_id}")
        expect(page.locator('[data-field="renewal"]')).to_have_text("renews until stopped (generation 1)")
        expect(page.locator("#jobs-section")).to_be_hidden()
        # The same service after two handovers (what the API says once the reconciler renewed it): its other jobs
        # appear by generation, with the current one among them, without a reload.
        others = [{"generation": 1, "phase": "ended", "job_id": "901", "node": "n1", "reason": "drained"},
                  {"generation": 2, "phase": "draining", "job_id": "902", "node": "n2", "reason": None}]

        def renewed(route):
            answer = route.fetch()
            route.fulfill(response=answer, json={**answer.json(), "generation": 3, "jobs": others})

        page.route(f"**/api/services/{service_id}", renewed)
        expect(page.locator('[data-field="renewal"]')).to_have_text("renews until stopped (generation 3)",
                                                                    timeout=15_000)
        rows = page.locator("#jobs tr")
        expect(rows).to_have_count(3)
        expect(rows.nth(0)).to_contain_text("901")
        expect(rows.nth(0).locator('[data-field="phase"]')).to_have_text("ended")
        expect(rows.nth(1).locator('[data-field="phase"]')).to_have_text("draining")
        expect(rows.nth(2).locator('[data-field="phase"]')).to_have_text("current")
        expect(page.locator("#jobs-section")).to_be_visible()
        browser.screenshot(page, "service-renewed")
    finally:
        portal.request("POST", f"/api/services/{service_id}/stop")
