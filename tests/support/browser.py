"""Headless Debian Chromium driven by Playwright, set up for this closed network, failing on page errors.

    with open_browser(artifacts_dir) as browser:
        page = browser.new_page()
        page.goto(url)
        browser.screenshot(page, "dashboard")
    # leaving the block raises if any page logged a console error or an asset request failed
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from playwright.sync_api import Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium's own connections are refused by the closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


class Browser:
    """One browser context; every page it opens is watched for console errors and failed requests."""

    def __init__(self, context, artifacts: Path):
        self.context = context
        self.artifacts = artifacts
        self.problems: List[str] = []
        self.allowed: List[re.Pattern] = []
        context.on("page", self._watch)

    def _watch(self, page: Page) -> None:
        page.on("console", lambda msg: msg.type == "error" and self._problem(f"console error on {page.url}: {msg.text}"))
        page.on("pageerror", lambda exc: self._problem(f"uncaught exception on {page.url}: {exc}"))
        page.on("requestfailed", lambda req: self._problem(f"request failed: {req.method} {req.url}: {req.failure}"))
        page.on("response", lambda resp: resp.status >= 400 and resp.request.resource_type in
                ("stylesheet", "script", "image", "font") and self._problem(f"asset {resp.url} answered {resp.status}"))

    def _problem(self, text: str) -> None:
        if not any(pattern.search(text) for pattern in self.allowed):
            self.problems.append(text)

    def allow(self, pattern: str) -> None:
        """Accept problems matching `pattern` (e.g. a 4xx a test provokes on purpose, logged by the browser)."""
        self.allowed.append(re.compile(pattern))

    def new_page(self) -> Page:
        return self.context.new_page()

    def screenshot(self, page: Page, name: str) -> Path:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        path = self.artifacts / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path


@contextlib.contextmanager
def open_browser(artifacts: Optional[Path] = None, check: bool = True, args: Sequence[str] = ()) -> Iterator[Browser]:
    """`args`: more Chromium flags (e.g. a fake microphone playing a file: fake_microphone(wav))."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + list(args))
        try:
            context = chromium.new_context(viewport={"width": 1280, "height": 900})
            browser = Browser(context, artifacts or ARTIFACTS)
            yield browser
            if check and browser.problems:
                raise AssertionError("the browser saw problems:\n" + "\n".join(browser.problems))
        finally:
            chromium.close()


def fake_microphone(wav: Path) -> List[str]:
    """Chromium flags: the microphone plays `wav` (16-bit PCM) in a loop, and pages may use it without asking."""
    return ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}"]


def watch_streamed_answer(page: Page, timeout: float = 60, interval: float = 0.02):
    """Follow the playground's last answer while it streams: (texts seen mid-stream, final text, final state).

    A text is recorded each time it changed while the answer's bubble said `data-state="streaming"`.
    """
    import time

    answer = page.locator(".chat-message.from-assistant .chat-text").last
    bubble = page.locator(".chat-message.from-assistant").last
    # State and text are read in one step, so a text is never paired with a state from before it.
    read_both = """() => {
        const bubbles = document.querySelectorAll(".chat-message.from-assistant");
        const bubble = bubbles[bubbles.length - 1];
        if (!bubble) return [null, null];
        const text = bubble.querySelector(".chat-text");
        return [bubble.getAttribute("data-state"), text ? text.textContent : null];
    }"""
    seen: List[str] = []
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state, text = page.evaluate(read_both)
        if state == "streaming" and text and (not seen or seen[-1] != text):
            seen.append(text)
        if state not in ("streaming", None):
            break
        time.sleep(interval)
    return seen, answer.text_content(), bubble.get_attribute("data-state")
