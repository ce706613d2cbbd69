"""The Usage page in Chromium: requests (or tokens) per day stacked by principal, drawn to scale, with a legend, and
the tables by key and by model, from a usage table written through the ledger's own flush; a bad span is shown next
to its field."""
from __future__ import annotations

import re
from datetime import datetime, time as day_time, timedelta, timezone

import pytest
from playwright.sync_api import expect

from portal.app import create_app
from portal.usage_ledger import UsageLedger
from tests.ui.conftest import prefix, sign_in

TODAY = datetime.now(timezone.utc).date()
# day offset -> principal -> (requests, prompt tokens each, completion tokens each, model)
TRAFFIC = {
    2: {"owner": (4, 10, 30, "org/alpha"), "key:alice": (2, 5, 5, "org/beta")},
    1: {"owner": (1, 10, 30, "org/alpha"), "key:alice": (6, 5, 5, "org/beta"), "key:bob": (3, 1, 1, "org/alpha")},
    0: {"key:bob": (8, 1, 1, "org/alpha")},
}


@pytest.fixture(scope="module")
def usage_portal(start_module_portal):
    """A portal of this module's own: the other pages' tests (benchmarks, their keys) count usage too."""
    return start_module_portal("local")


@pytest.fixture(scope="module")
def usage_written(usage_portal):
    app = create_app({"home": usage_portal.home, "site_config_path": usage_portal.site_config})
    for back, principals in TRAFFIC.items():
        noon = datetime.combine(TODAY - timedelta(days=back), day_time(12), tzinfo=timezone.utc).timestamp()
        ledger = UsageLedger(app, clock=lambda noon=noon: noon)
        for principal, (count, prompt, completion, model) in principals.items():
            for _ in range(count):
                ledger.count(principal, "ui0000000000usage", model, False, prompt, completion)
        ledger.flush()


def totals(metric: str) -> dict:
    """principal -> day -> value, as the chart should draw it."""
    found = {}
    for back, principals in TRAFFIC.items():
        for principal, (count, prompt, completion, _model) in principals.items():
            value = count if metric == "requests" else count * (prompt + completion)
            found.setdefault(principal, {})[(TODAY - timedelta(days=back)).isoformat()] = value
    return found


def bars(page) -> list:
    """(x, height, title) of each bar segment."""
    return page.eval_on_selector_all(
        "#usage-chart rect[data-principal-bar]",
        "rects => rects.map(r => [parseFloat(r.getAttribute('x')), parseFloat(r.getAttribute('height')),"
        " r.querySelector('title').textContent])")


def check_chart(page, metric: str) -> None:
    expected = totals(metric)
    drawn = bars(page)
    titles = sorted(title for _, _, title in drawn)
    assert titles == sorted(f"{day}, {who}: {value:,} {metric}" for who, days in expected.items()
                            for day, value in days.items())
    # Drawn to scale: each day's stack is as tall as its total says, against the largest day's.
    stacks = {}
    for x, height, title in drawn:
        day = title.split(",")[0]
        stacks[day] = stacks.get(day, 0) + height
    day_totals = {}
    for days in expected.values():
        for day, value in days.items():
            day_totals[day] = day_totals.get(day, 0) + value
    largest = max(day_totals, key=day_totals.get)
    for day, total in day_totals.items():
        assert stacks[day] / stacks[largest] == pytest.approx(total / day_totals[largest], abs=0.02), (day, stacks)
    legend = page.locator("#usage-legend li")
    expect(legend).to_have_count(len(expected))
    for who, days in expected.items():
        expect(page.locator("#usage-legend")).to_contain_text(f"{who} ({sum(days.values()):,})")


def test_the_usage_page_charts_and_tabulates_usage(usage_portal, usage_written, browser):
    page = browser.new_page()
    base = prefix(usage_portal)
    sign_in(page, usage_portal, base)
    page.get_by_role("link", name="Usage").click()
    expect(page).to_have_title("Usage · Pilotfish")
    expect(page.get_by_role("img", name=re.compile("Requests per day, by principal"))).to_be_visible()
    check_chart(page, "requests")
    by_key = page.locator("#usage-by-principal")
    requests_of = {who: sum(count for principals in TRAFFIC.values() for p, (count, *_rest) in principals.items()
                            if p == who) for who in ("owner", "key:alice", "key:bob")}
    for who, count in requests_of.items():
        expect(by_key.locator("tbody tr", has_text=who).locator("td").first).to_have_text(str(count))
    expect(by_key.locator("tfoot")).to_contain_text(str(sum(requests_of.values())))
    by_model = page.locator("#usage-by-model")
    expect(by_model.locator("tbody tr", has_text="org/beta").locator("td").nth(3)).to_have_text(str(8 * 5))
    browser.screenshot(page, "usage-requests")

    page.get_by_label("Chart").select_option("tokens")
    page.get_by_role("button", name="Show").click()
    page.wait_for_url(re.compile(r"metric=tokens"))
    check_chart(page, "tokens")
    browser.screenshot(page, "usage-tokens")

    page.get_by_label("Since").fill("3h")
    page.get_by_role("button", name="Show").click()
    expect(page.get_by_role("alert")).to_contain_text("since: expected a date")
    expect(page.get_by_label("Since")).to_have_attribute("aria-invalid", "true")
    check_chart(page, "tokens")  # the default span meanwhile

    page.get_by_label("Since").fill((TODAY - timedelta(days=1)).isoformat())
    page.get_by_label("Until").fill("1d")
    page.get_by_role("button", name="Show").click()
    expect(page.locator("#usage-span")).to_contain_text(f"through {(TODAY - timedelta(days=1)).isoformat()}")
    assert sorted(title.split(",")[0] for _, _, title in bars(page)) == [(TODAY - timedelta(days=1)).isoformat()] * 3
