"""The benchmark pages in a real browser against a real portal on the test Slurm: a load started from the form on a
RUNNING stand-in service runs to its figures without a reload, with its latency histograms; a sweep with throughput
and TTFT against clients and the highest load meeting the target marked; refusals next to their field, worded as
the API words them; cancel and delete; both pages under Open OnDemand's prefix and at the bare path."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from tests.ui.conftest import prefix, sign_in, watch_navigations

pytestmark = pytest.mark.slurm

TOKEN_DELAY = 0.05  # seconds between streamed tokens: a request of 8 tokens takes about 0.35 s


@pytest.fixture(scope="module")
def bench_service(ui_portal):
    created = ui_portal.launch(name="bench", time=10, engine_args=["--token-delay", str(TOKEN_DELAY)])
    assert created.status_code == 201, created.text
    service = ui_portal.wait_state(created.json()["id"], "RUNNING", timeout=60)
    yield service
    ui_portal.request("POST", f"/api/services/{service['id']}/stop")


def check_page(page: Page, base: str, title: str, heading: str) -> None:
    """The page's title and heading; every link and asset under the path it was reached by; every control labelled."""
    expect(page).to_have_title(f"{title} · Pilotfish")
    expect(page.get_by_role("heading", level=1)).to_contain_text(heading)
    urls = page.eval_on_selector_all("a[href], script[src], link[href]",
                                     "nodes => nodes.map(n => n.getAttribute('href') || n.getAttribute('src'))")
    local = [url for url in urls if not url.startswith(("#", "data:", "http"))]
    assert local and all(url.startswith(f"{base}/") for url in local), local
    assert page.evaluate("document.body.dataset.baseUrl") == base
    unlabelled = page.eval_on_selector_all(
        "input:not([type=hidden]), select, textarea",
        "nodes => nodes.filter(n => !(n.labels && n.labels.length) && !n.getAttribute('aria-label')"
        " && !n.getAttribute('aria-labelledby')).map(n => n.id || n.name)")
    assert unlabelled == [], unlabelled
    expect(page.get_by_role("navigation", name="Main").get_by_role("link", name="Benchmarks")).to_be_visible()


def problem_of(page: Page, field: str):
    """The problem shown next to a form control (which is marked invalid and described by it)."""
    control = page.locator(f"#{field}")
    expect(control).to_have_attribute("aria-invalid", "true")
    expect(control).to_have_class(re.compile(r"\bis-invalid\b"))
    assert f"{field}-error" in control.get_attribute("aria-describedby")
    return page.locator(f"#{field}-error")


def api_problem(portal, body: dict) -> str:
    """The API's refusal of the same request, without the field name it starts with."""
    response = portal.request("POST", "/api/benchmarks", json=body)
    assert response.status_code == 400, response.text
    field = response.json()["field"]
    return response.json()["error"][len(field) + 2:]


def bars_of(page: Page, figure: str) -> list:
    """(count per bar) of a histogram, and the counts its table of bins shows, in order."""
    bars = page.locator(f"#{figure} svg rect.bar")
    counts = [int(bar.get_attribute("data-count")) for bar in bars.all()]
    table = [int(row.locator("td").last.text_content()) for row in page.locator(f"#{figure}-bins tbody tr").all()]
    return counts, table


def figure_text(page: Page, name: str) -> str:
    return page.locator(f'#figures-table tr[data-figure="{name}"] td').text_content()


# In every document of a page, from its start: each time one of a run page's parts is shown or hidden, with the
# state its badge said then. Nothing is sampled, so a run that ends before the test looks is still seen running.
RECORD_SHOWN_JS = """(() => {
    const changes = window.pilotfishShown = [];
    new MutationObserver((records) => {
        for (const record of records) {
            const wasHidden = record.oldValue !== null, hidden = record.target.hidden;
            if (!record.target.id || wasHidden === hidden) continue;
            const badge = document.getElementById("state-badge");
            changes.push([record.target.id, hidden ? "hidden" : "shown", badge ? badge.textContent.trim() : null]);
        }
    }).observe(document, {subtree: true, attributes: true, attributeFilter: ["hidden"], attributeOldValue: true});
})()"""


def shown_and_hidden(page: Page, element_id: str) -> list:
    """The times `element_id` was shown or hidden in this document, each with the run's state then."""
    return [[change, state] for element, change, state in page.evaluate("window.pilotfishShown") if element == element_id]


def test_a_load_from_the_form_runs_to_its_figures_and_histograms(ui_portal, bench_service, browser):
    portal, service = ui_portal, bench_service
    base = prefix(portal)
    page = browser.new_page()
    sign_in(page, portal, base)

    # From the service page to the form, with the service chosen and the runs of its model shown.
    page.goto(f"{portal.url}{base}/ui/services/{service['id']}")
    page.get_by_role("link", name="Benchmark", exact=True).click()
    page.wait_for_url(f"{portal.url}{base}/ui/benchmarks?service={service['id']}")
    check_page(page, base, "Benchmarks", "Benchmarks")
    expect(page.get_by_label("Service")).to_have_value(service["id"])
    expect(page.get_by_label("Model", exact=True)).to_have_value(service["model"])
    expect(page.get_by_label("Client counts", exact=True)).to_be_hidden()  # one load is the default

    # Refusals next to their field, in the API's words, with what was typed kept.
    page.get_by_label("Clients", exact=True).fill("4")
    page.get_by_label("Requests", exact=True).fill("2")
    page.get_by_role("button", name="Start the benchmark").click()
    expect(problem_of(page, "requests")).to_have_text(
        api_problem(portal, {"service": service["id"], "clients": 4, "requests": 2}))
    expect(page.locator("#requests-error")).to_contain_text("at least as many requests as clients (4)")
    expect(page.locator("#benchmark-alert")).to_contain_text("Not started: requests needs attention")
    expect(page.get_by_label("Requests", exact=True)).to_have_value("2")
    browser.screenshot(page, "benchmarks-error-requests")
    page.get_by_label("Requests", exact=True).fill("32")
    page.get_by_label("Max tokens").fill("lots")
    page.get_by_role("button", name="Start the benchmark").click()
    expect(problem_of(page, "max_tokens")).to_have_text("expected a whole number from 1 to 32768, got 'lots'")
    assert portal.request("GET", "/api/benchmarks").json()["benchmarks"] == []

    # A load of 4 clients (about 3 s): the page follows it to the end by itself.
    page.add_init_script(RECORD_SHOWN_JS)
    page.get_by_label("Max tokens").fill("8")
    page.get_by_label("Prompt length").fill("8")
    page.get_by_role("button", name="Start the benchmark").click()
    page.wait_for_url(re.compile(re.escape(f"{portal.url}{base}/ui/benchmarks/") + r"[0-9a-f]{12}$"))
    run_id = page.url.rsplit("/", 1)[1]
    navigations = watch_navigations(page)
    page.evaluate("window.stillTheSamePage = true")
    check_page(page, base, f"Benchmark {run_id}", f"Benchmark {run_id}")
    assert page.evaluate("JSON.parse(document.getElementById('initial-run').textContent).state") == "RUNNING"
    expect(page.locator("#state-badge")).to_have_text("DONE", timeout=60_000)
    assert navigations == [] and page.evaluate("window.stillTheSamePage") is True
    expect(page.locator("#progress-section")).to_be_hidden()
    expect(page.get_by_role("button", name="Cancel")).to_be_hidden()
    expect(page.get_by_role("button", name="Delete")).to_be_visible()
    # As recorded by the page itself, however soon the run ended: progress and Cancel were shown while it ran, and
    # hidden when it was done, when Delete came.
    assert shown_and_hidden(page, "progress-section") == [["shown", "RUNNING"], ["hidden", "DONE"]]
    assert shown_and_hidden(page, "cancel-button") == [["shown", "RUNNING"], ["hidden", "DONE"]]
    assert shown_and_hidden(page, "delete-button") == [["shown", "DONE"]]

    run = portal.request("GET", f"/api/benchmarks/{run_id}").json()
    result = run["result"]
    assert run["state"] == "DONE" and result["completed"] == 32 and result["max_in_flight"] == 4
    expect(page.locator('#figures-table tr[data-figure="clients"] td')).to_have_text("4 (4 in flight at most)")
    assert figure_text(page, "requests") == "32 done, 0 failed"
    assert figure_text(page, "tokens_per_second") == (
        f"{float(figure_text(page, 'tokens_per_second').split()[0]):.1f} (256 tokens, counted from usage)")
    assert float(figure_text(page, "tokens_per_second").split()[0]) == pytest.approx(
        result["output_tokens_per_second"], abs=0.051)
    assert figure_text(page, "errors") == "none"
    counts = page.locator('#distributions-table td[data-column="count"]').all_text_contents()
    assert counts == ["32", str(result["itl_seconds"]["count"]), "32"]

    # The histograms: one bar per bin of their table, every request that succeeded in one bar, labelled axes.
    for figure, quantity, key in (("ttft-histogram", "time to first token", "ttft"),
                                  ("latency-histogram", "end-to-end latency", "latency")):
        bars, table = bars_of(page, figure)
        assert bars == table and len(bars) >= 1 and sum(bars) == 32, (figure, bars, table)
        svg = page.locator(f"#{figure} svg")
        expect(svg).to_have_attribute("role", "img")
        expect(svg.locator('text[data-axis="x"]')).to_have_text(re.compile(rf"^{quantity} \((ms|s)\)$"))
        expect(svg.locator('text[data-axis="y"]')).to_have_text("requests")
        # Each value lies in the bar that counts it.
        edges = [(float(bar.get_attribute("data-from")), float(bar.get_attribute("data-to")))
                 for bar in svg.locator("rect.bar").all()]
        values = [value for value in result["per_request"][key] if value is not None]
        assert all(edges[0][0] <= value <= edges[-1][1] + 1e-9 for value in values)
    latency_bars = page.locator("#latency-histogram svg rect.bar").all()
    slowest = max(result["per_request"]["latency"])
    assert float(latency_bars[-1].get_attribute("data-from")) <= slowest
    browser.screenshot(page, "benchmark-load")

    # The list: the run with its figures, in the group of its model and tier.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Benchmarks").click()
    check_page(page, base, "Benchmarks", "Benchmarks")
    group = page.locator(f'#runs-table tbody[data-model="{service["model"]}"][data-tier="{service["tier"]}"]')
    row = group.locator(f'tr[data-run-id="{run_id}"]')
    expect(row.locator(".badge")).to_have_text("DONE")
    expect(row.locator('[data-field="clients"]')).to_have_text("4")
    expect(row.locator('[data-field="requests"]')).to_have_text("32")
    expect(row.locator('[data-field="errors"]')).to_have_text("none")
    expect(row.locator('[data-field="ttft95"]')).to_have_text(re.compile(r"^\d+(\.\d+)? (ms|s)$"))
    browser.screenshot(page, "benchmarks-list")


def test_a_sweep_plots_throughput_and_ttft_against_clients(ui_portal, bench_service, browser):
    portal, service = ui_portal, bench_service
    page = browser.new_page()
    sign_in(page, portal)  # at the bare path this time
    page.goto(f"{portal.url}/ui/benchmarks?service={service['id'][:6]}")
    check_page(page, "", "Benchmarks", "Benchmarks")
    expect(page.get_by_label("Service")).to_have_value(service["id"])
    page.get_by_label("Sweep over client counts").check()
    expect(page.get_by_label("Clients", exact=True)).to_be_hidden()
    page.get_by_label("Client counts", exact=True).fill("1, 2, 4")
    page.get_by_label("TTFT target").fill("")
    page.get_by_label("Requests", exact=True).fill("4")
    page.get_by_label("Max tokens").fill("4")
    page.get_by_role("button", name="Start the benchmark").click()
    expect(problem_of(page, "ttft_target")).to_have_text(
        api_problem(portal, {"service": service["id"], "requests": 4, "sweep": [1, 2, 4]}))
    expect(page.get_by_label("Sweep over client counts")).to_be_checked()
    expect(page.get_by_label("Client counts", exact=True)).to_have_value("1, 2, 4")
    browser.screenshot(page, "benchmarks-error-sweep")

    page.get_by_label("TTFT target").fill("5")
    page.get_by_role("button", name="Start the benchmark").click()
    page.wait_for_url(re.compile(re.escape(f"{portal.url}/ui/benchmarks/") + r"[0-9a-f]{12}$"))
    run_id = page.url.rsplit("/", 1)[1]
    check_page(page, "", f"Benchmark {run_id}", f"Benchmark {run_id}")
    expect(page.locator("#state-badge")).to_have_text("DONE", timeout=60_000)
    result = portal.request("GET", f"/api/benchmarks/{run_id}").json()["result"]
    points = result["points"]
    assert [point["clients"] for point in points] == [1, 2, 4] and result["best_clients"] == 4

    expect(page.locator("#sweep-verdict")).to_contain_text("4 clients is the highest load that met the target")
    # One point per client count and series, at the measured values; the best load ringed.
    throughput = page.locator("#throughput-plot svg")
    expect(throughput.locator("circle.point")).to_have_count(len(points))
    assert [float(y) for y in throughput.locator("circle.point").evaluate_all(
        "nodes => nodes.map(n => n.getAttribute('data-y'))")] == [point["output_tokens_per_second"] for point in points]
    expect(throughput.locator('text[data-axis="x"]')).to_have_text("clients")
    expect(throughput.locator('text[data-axis="y"]')).to_have_text("output tokens/s")
    ttft = page.locator("#ttft-plot svg")
    expect(ttft.locator("circle.point")).to_have_count(2 * len(points))
    p95 = ttft.locator('circle.point[data-series="TTFT p95"]').evaluate_all(
        "nodes => nodes.map(n => [Number(n.getAttribute('data-x')), Number(n.getAttribute('data-y'))])")
    assert p95 == [[point["clients"], point["ttft_seconds"]["p95"]] for point in points]
    expect(ttft.locator("circle.best")).to_have_count(2)
    expect(ttft.locator("line.target")).to_have_count(1)
    expect(ttft.locator(".marked-label")).to_have_text("highest meeting the target: 4 clients")
    expect(ttft.locator('text[data-axis="y"]')).to_have_text(re.compile(r"^time to first token \((ms|s)\)$"))
    # The same numbers as a table.
    rows = page.locator("#sweep-table tbody tr")
    expect(rows).to_have_count(len(points))
    expect(page.locator('#sweep-table tr[data-clients="4"]')).to_contain_text("yes (highest)")

    # The details of one client count: its figures and its latency distribution.
    expect(page.get_by_label("Details at")).to_have_value("4")
    bars, table = bars_of(page, "ttft-histogram")
    assert bars == table and sum(bars) == points[-1]["completed"] == 4
    page.get_by_label("Details at").select_option("1")
    expect(page.locator('#figures-table tr[data-figure="clients"] td')).to_have_text("1 (1 in flight at most)")
    bars, table = bars_of(page, "latency-histogram")
    assert bars == table and sum(bars) == points[0]["completed"]
    browser.screenshot(page, "benchmark-sweep")

    page.goto(f"{portal.url}/ui/benchmarks")
    row = page.locator(f'tr[data-run-id="{run_id}"]')
    expect(row.locator('[data-field="clients"]')).to_have_text("sweep 1, 2, 4: best 4")


def test_cancel_a_running_benchmark_then_delete_it(ui_portal, bench_service, browser):
    portal, service = ui_portal, bench_service
    started = portal.request("POST", "/api/benchmarks", json={"service": service["id"], "clients": 1,
                                                              "requests": 400, "max_tokens": 8})
    assert started.status_code == 202, started.text
    run_id = started.json()["id"]
    page = browser.new_page()
    sign_in(page, portal)
    page.goto(f"{portal.url}/ui/benchmarks/{run_id}")
    expect(page.locator("#state-badge")).to_have_text("RUNNING")
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^[1-9]\d* of 400 requests done"), timeout=15_000)
    assert int(page.get_by_role("progressbar").get_attribute("aria-valuenow")) < 100
    browser.screenshot(page, "benchmark-running")

    # The list shows it running too, with its progress.
    other = browser.new_page()
    other.goto(f"{portal.url}/ui/benchmarks")
    row = other.locator(f'tr[data-run-id="{run_id}"]')
    expect(row.locator('[data-field="requests"]')).to_have_text(re.compile(r"^\d+ of 400$"))

    page.get_by_role("button", name="Cancel").click()
    page.get_by_role("dialog").get_by_role("button", name="Cancel benchmark").click()
    expect(page.locator("#state-badge")).to_have_text("CANCELLED", timeout=15_000)
    expect(page.locator("#run-alert")).to_contain_text("cancelled")
    assert portal.request("GET", f"/api/benchmarks/{run_id}").json()["state"] == "CANCELLED"

    # The open list follows by itself; deleting there forgets the run.
    expect(row.locator(".badge")).to_have_text("CANCELLED", timeout=15_000)
    row.get_by_role("button", name=f"Delete benchmark {run_id}").click()
    other.get_by_role("dialog").get_by_role("button", name="Delete benchmark").click()
    expect(row).to_have_count(0)
    assert portal.request("GET", f"/api/benchmarks/{run_id}").status_code == 404


def test_an_unknown_run_answers_with_a_page(ui_portal, browser):
    browser.allow(r"status of 404")
    page = browser.new_page()
    sign_in(page, ui_portal)
    response = page.goto(f"{ui_portal.url}/ui/benchmarks/abcdef")
    assert response.status == 404
    expect(page.get_by_role("alert")).to_contain_text("no benchmark 'abcdef'")
