"""Fixtures of the browser tests: one real portal on the test Slurm whose services are the OpenAI-shaped stand-in,
a watched Chromium per test, and signing in through the /login form."""
from __future__ import annotations

import re
import sys

import pytest
import yaml
from playwright.sync_api import Page, expect

from tests.conftest import REPO, TEST_SPECS, PortalFactory
from tests.support.browser import ARTIFACTS, open_browser

UPSTREAM = f"{sys.executable} {REPO / 'tests' / 'support' / 'openai_upstream.py'}"
TOKEN_DELAY = 0.3  # seconds between streamed tokens: slow enough to watch the answer grow
SCREENSHOTS = ARTIFACTS / "ui"


def ui_specs() -> str:
    """The test tiers, a 60-minute maximum, and Nano: a tier too small for any model (the launch form's size check)."""
    specs = yaml.safe_load(TEST_SPECS)
    specs["time"]["max"] = 60
    specs["partitions"]["cpu"]["tiers"].insert(0, {
        "name": "Nano", "description": "Takes no model (the size check)", "max_model_size_gb": 0, "gpu_count": 0,
        "cpu_cores": 1, "memory_gb": 0.25})
    return yaml.safe_dump(specs, sort_keys=False)


@pytest.fixture(scope="package")
def ui_portal(slurm_cluster, tmp_path_factory):
    """A portal on the real test Slurm; text generation streams a token every TOKEN_DELAY seconds."""
    base = tmp_path_factory.mktemp("ui")
    specs = base / "resource_specs.yaml"
    specs.write_text(ui_specs())
    factory = PortalFactory(base)
    portal = factory("slurm", resource_specs=str(specs), runtimes={
        "text-generation": {"command": f"{UPSTREAM} --token-delay {TOKEN_DELAY}"},
        "speech-recognition": {"command": UPSTREAM},
    })
    yield portal
    factory.close()


@pytest.fixture
def browser():
    """A Chromium context; the test fails if any page logged a console error or an asset failed to load."""
    with open_browser(SCREENSHOTS) as browser:
        # A page that polls the API has a call in flight now and then; leaving the page cancels it. Only that is
        # accepted: an asset that fails, or an API call that fails any other way, still fails the test.
        browser.allow(r"^request failed: GET \S+/(api|v1)/\S+: net::ERR_ABORTED$")
        yield browser


def prefix(portal) -> str:
    """The path Open OnDemand forwards to the portal: /node/<host>/<port>."""
    return f"/node/127.0.0.1/{portal.port}"


def sign_in(page: Page, portal, base: str = "") -> None:
    """Open the dashboard, get sent to the login form, sign in with the token and land on the dashboard."""
    page.goto(f"{portal.url}{base}/")
    expect(page).to_have_url(re.compile(re.escape(f"{portal.url}{base}/login?next=")))
    expect(page).to_have_title("Sign in · Pilotfish")
    page.get_by_label("Portal token").fill(portal.token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{portal.url}{base}/")
    expect(page).to_have_title("Dashboard · Pilotfish")


def choose_launch(page: Page, kind: str, model: str) -> None:
    """On the launch page: the service kind, then the model."""
    page.get_by_label("Service kind").select_option(kind)
    page.get_by_label("Model", exact=True).select_option(model)


def open_launch_page(browser, portal, kind: str, model: str) -> Page:
    """A new page of `browser`, signed in to `portal`, on the launch page with `kind` and `model` chosen."""
    page = browser.new_page()
    sign_in(page, portal)
    page.goto(f"{portal.url}/ui/launch")
    choose_launch(page, kind, model)
    return page


def watch_navigations(page: Page) -> list:
    """The URLs the page's main frame navigates to from now on (a live update must add none)."""
    seen = []
    page.on("framenavigated", lambda frame: frame == page.main_frame and seen.append(frame.url))
    return seen
