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
from dataclasses import dataclass
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


# In the page: every text the playground's next answer shows while it streams, from the DOM changes themselves (the
# playground sets the answer's textContent per token: a childList change holding the whole text so far). `moment`
# counts the observer's callbacks: changes made in one task (one read of the stream) share a moment.
RECORD_ANSWER_JS = """() => {
    const log = document.getElementById("chat-log");
    const recorded = window.pilotfishStreamedAnswer = {changes: [], started: null, ended: null, state: null};
    let moment = 0;
    const isAnswer = (node) => node.nodeType === 1 && node.matches(".chat-message.from-assistant");
    new MutationObserver((records) => {
        const now = performance.now();
        moment += 1;
        for (const record of records) {
            if (record.type === "attributes" && isAnswer(record.target)) {
                if (record.oldValue === null && recorded.started === null) recorded.started = now;
                if (record.oldValue === "streaming") {
                    recorded.ended = now;
                    recorded.state = record.target.getAttribute("data-state");
                }
            } else if (record.type === "childList" && record.target.matches(".chat-text")
                       && isAnswer(record.target.parentElement) && recorded.started !== null
                       && recorded.ended === null) {
                const text = Array.from(record.addedNodes, (node) => node.textContent).join("");
                if (text) recorded.changes.push({moment, at: now, text});
            }
        }
    }).observe(log, {subtree: true, childList: true, attributes: true, attributeFilter: ["data-state"],
                     attributeOldValue: true});
}"""


@dataclass
class StreamedAnswer:
    """What the playground's answer showed while it streamed: `texts` in order, `moments` (the page task each was
    made in), `times` (ms) and `started`/`ended` (ms, the answer set streaming and then ended); its final text and
    state."""
    texts: List[str]
    moments: List[int]
    times: List[float]
    started: float
    ended: float
    final: str
    state: str


def record_streamed_answer(page: Page) -> None:
    """Record, in the page, every text change of the playground's next answer while it streams. Call it before
    sending the message; read the record with `recorded_streamed_answer`. Nothing is sampled, so a fast engine
    (fewer, quicker tokens) loses no text."""
    page.evaluate(RECORD_ANSWER_JS)


def recorded_streamed_answer(page: Page, timeout: float = 60) -> StreamedAnswer:
    """Wait until the answer recorded by `record_streamed_answer` ends, and return what it showed."""
    page.wait_for_function("() => window.pilotfishStreamedAnswer.ended !== null", timeout=timeout * 1000)
    recorded = page.evaluate("() => window.pilotfishStreamedAnswer")
    changes = recorded["changes"]
    return StreamedAnswer(texts=[change["text"] for change in changes], moments=[change["moment"] for change in changes],
                          times=[change["at"] for change in changes], started=recorded["started"],
                          ended=recorded["ended"], final=page.locator(".chat-message.from-assistant .chat-text").last
                          .text_content(), state=recorded["state"])
