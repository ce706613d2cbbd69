"""A vision-language model on real vLLM (CPU build), a job on the real test Slurm, called through the portal with the
official openai client: chat with an image part (a base64 data URL) through the gateway and the service's own URL,
remote and local image URLs refused by the engine (400) before anything is fetched or opened, the same in a batch of
image lines, the playground's image attach driven in Chromium, and what the inventory, the launch page and the CLI say
the model is.

The model is a tiny random Idefics3 (portal/engines/tiny_vision.py), so its words mean nothing; what holds is what the
engine guarantees: the image goes through the vision tower (it adds its image tokens to the prompt, and a different
picture changes the first token's log-probabilities while the same picture gives the same ones)."""
from __future__ import annotations

import base64
import errno
import http.server
import json
import os
import random
import struct
import threading
import zlib
from pathlib import Path

import openai
import pytest
import requests

from portal.engines import installer
from portal.engines.vllm import NO_LOCAL_MEDIA, NO_REMOTE_MEDIA
from tests.conftest import PortalProcess, wait_for
from tests.e2e.conftest import pilotfish_cli, vllm_portal

pytestmark = pytest.mark.slurm
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
VISION = installer.TINY_VISION_REPO_ID
MAX_UPLOAD_MB = 4  # this portal's body limit, so a body above it is cheap to send
LAUNCH = {"kind": "text-generation", "model": VISION,
          "engine_args": ["--max-model-len", "256", "--limit-mm-per-prompt", '{"image": 2}']}
QUESTION = "What is in this picture?"


def png(width: int, height: int, pixel=None, seed: int = 0) -> bytes:
    """A PNG of one colour (`pixel`: r, g, b), or of random noise (which does not compress) when `pixel` is None."""
    noise = random.Random(seed)
    rows = b"".join(b"\x00" + (bytes(pixel) * width if pixel else noise.randbytes(3 * width)) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def with_image(url: str, text: str = QUESTION) -> list:
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


RED, BLUE = data_url(png(40, 30, (200, 30, 30))), data_url(png(64, 64, (20, 40, 220)))


class Vision:
    def __init__(self, portal: PortalProcess, service: dict):
        self.portal, self.service = portal, service

    def api(self, route: str = "gateway") -> openai.OpenAI:
        base = f"{self.portal.url}/v1" if route == "gateway" else f"{self.portal.url}/services/{self.service['id']}/v1"
        return openai.OpenAI(base_url=base, api_key=self.portal.token, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def vision(tmp_path_factory, slurm_cluster):
    with vllm_portal(tmp_path_factory, "vision", {"vision": LAUNCH}, {"max_upload_mb": MAX_UPLOAD_MB},
                     stage=(installer.stage_tiny_vision,)) as (portal, services):
        yield Vision(portal, services["vision"])


def test_the_inventory_knows_the_model_takes_images_and_the_service_refuses_remote_ones(vision):
    listed = {m["repo_id"]: m for m in vision.portal.request("GET", "/api/models").json()["models"]}
    assert (listed[VISION]["kind"], listed[VISION]["kinds"], listed[VISION]["modalities"]) == (
        "text-generation", ["text-generation"], ["text", "image"])
    service_id = vision.service["id"]
    arguments = vision.portal.request("GET", f"/api/services/{service_id}/provenance").json()["server_arguments"]
    at = arguments.index("--served-model-name") + 2
    assert arguments[at:] == ["--allowed-media-domains", NO_REMOTE_MEDIA, "--allowed-local-media-path", NO_LOCAL_MEDIA
                              ] + LAUNCH["engine_args"], arguments
    phases = vision.portal.service(service_id)["phases"]
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "e2e-vision-phases.json").write_text(json.dumps({"vision": phases}, indent=2))
    print("start-up phases:", json.dumps(phases))


def first_token_logprobs(api: openai.OpenAI, messages: list) -> list:
    answer = api.chat.completions.create(model=VISION, messages=messages, max_tokens=1, temperature=0, logprobs=True,
                                         top_logprobs=5)
    return [(top.token, top.logprob) for top in answer.choices[0].logprobs.content[0].top_logprobs]


@pytest.mark.parametrize("route", ["gateway", "service"])
def test_chat_with_an_image_part_goes_through_the_vision_tower(vision, route):
    api = vision.api(route)
    text_only = api.chat.completions.create(model=VISION, messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=4, temperature=0)
    answer = api.chat.completions.with_raw_response.create(model=VISION, messages=with_image(RED), max_tokens=4,
                                                           temperature=0)
    assert answer.headers["X-Pilotfish-Service"] == vision.service["id"]
    parsed = answer.parse()
    assert parsed.choices[0].message.content and parsed.usage.completion_tokens > 0
    # 32x32 after resizing, 16 patches shuffled into 4 image tokens, between the image's marker tokens.
    assert parsed.usage.prompt_tokens - text_only.usage.prompt_tokens >= 4 + 2
    red = first_token_logprobs(api, with_image(RED))
    assert first_token_logprobs(api, with_image(RED)) == red
    assert first_token_logprobs(api, with_image(BLUE)) != red


def test_an_image_part_streams_through_the_gateway_and_a_large_one_passes_the_helper_process(vision):
    api = vision.api()
    stream = api.chat.completions.create(model=VISION, messages=with_image(BLUE), max_tokens=6, temperature=0,
                                         stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    whole = api.chat.completions.create(model=VISION, messages=with_image(BLUE), max_tokens=6, temperature=0)
    assert "".join(pieces) == whole.choices[0].message.content
    noise = data_url(png(800, 600, seed=1))  # random pixels: about 1.9 MB of base64, over the 256 KiB the loop reads
    assert 1_500_000 < len(noise) < MAX_UPLOAD_MB * 1024 * 1024
    big = api.chat.completions.create(model=VISION, messages=with_image(noise), max_tokens=2, temperature=0)
    assert big.usage.prompt_tokens > 0 and big.choices[0].message.content is not None


def test_a_body_above_the_portals_limit_is_refused_with_the_limit_named(vision):
    huge = data_url(png(1400, 1100, seed=2))  # about 6 MB of base64
    assert len(huge) > MAX_UPLOAD_MB * 1024 * 1024
    with pytest.raises(openai.APIStatusError) as refused:
        vision.api().chat.completions.create(model=VISION, messages=with_image(huge), max_tokens=2)
    assert refused.value.status_code == 413
    assert refused.value.body["message"] == f"request body too large: at most {MAX_UPLOAD_MB} MB (max_upload_mb)"


class Recorder(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_GET(self):  # noqa: N802 (the standard library's name)
        Recorder.seen.append(self.path)
        body = png(8, 8, (0, 255, 0))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def bait():
    """An HTTP server on this machine (the test Slurm's node: the engine could reach it) serving a real PNG to anyone,
    recording every request it gets."""
    Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def local_bait(tmp_path):
    """Local files the engine's job could read (the test Slurm's node is this machine): a real PNG, and a named pipe
    that an open for reading would wait on (so a reader would show)."""
    picture, pipe = tmp_path / "red.png", tmp_path / "pipe.png"
    picture.write_bytes(png(40, 30, (200, 30, 30)))
    os.mkfifo(pipe)
    return picture, pipe


def reader_waits_on(pipe: Path) -> bool:
    try:
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))  # succeeds only while someone has it open for reading
        return True
    except OSError as error:
        assert error.errno == errno.ENXIO, error
        return False


@pytest.mark.parametrize("route", ["gateway", "service"])
def test_image_urls_are_refused_by_the_engine_and_nothing_is_fetched(vision, bait, local_bait, route):
    api = vision.api(route)
    assert requests.get(f"http://127.0.0.1:{bait}/probe.png", timeout=10).status_code == 200  # the bait answers
    Recorder.seen.clear()
    host = os.uname().nodename
    for url in (f"http://127.0.0.1:{bait}/cat.png", f"http://{host}:{bait}/cat.png",
                f"http://localhost:{bait}/redirect?to=/cat.png"):
        with pytest.raises(openai.BadRequestError) as refused:
            api.chat.completions.create(model=VISION, messages=with_image(url), max_tokens=2)
        assert refused.value.status_code == 400
        assert NO_REMOTE_MEDIA in str(refused.value) and "Input URL domain" in str(refused.value)
    # file:// is refused too: vLLM reads local files only below --allowed-local-media-path, the job's empty folder; a
    # path outside it is refused after a stat, before any open (the pipe would hold an open for reading).
    picture, pipe = local_bait
    for url in ("file:///etc/passwd", picture.as_uri(), pipe.as_uri(), f"file:///{NO_LOCAL_MEDIA}/../etc/passwd",
                f"file://{picture.parent}/{NO_LOCAL_MEDIA}/../{picture.name}"):
        with pytest.raises(openai.BadRequestError) as refused:
            api.chat.completions.create(model=VISION, messages=with_image(url), max_tokens=2)
        assert refused.value.status_code == 400
        assert "must be a subpath of `--allowed-local-media-path" in str(refused.value), url
        assert "root:" not in str(refused.value)
    assert not reader_waits_on(pipe)
    assert Recorder.seen == []


def test_a_batch_of_image_lines_runs_them_through_the_vision_tower_and_refuses_image_urls(vision, bait, local_bait,
                                                                                          tmp_path):
    """A chat batch whose lines carry images: its task launches the model as a service would (the same image-URL
    refusals), one line at a time so the answers are deterministic; an image URL is an error line with the engine's
    reason, and nothing is fetched or opened."""
    api = vision.api()
    picture, pipe = local_bait
    greedy = {"model": VISION, "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 5}
    lines = {"text": [{"role": "user", "content": QUESTION}], "red": with_image(RED), "red-again": with_image(RED),
             "blue": with_image(BLUE), "remote": with_image(f"http://127.0.0.1:{bait}/cat.png"),
             "local": with_image(picture.as_uri()), "pipe": with_image(pipe.as_uri())}
    source = tmp_path / "images.jsonl"
    source.write_text("".join(json.dumps({"custom_id": name, "method": "POST", "url": "/v1/chat/completions",
                                          "body": dict(greedy, messages=messages)}) + "\n"
                              for name, messages in lines.items()))
    uploaded = api.files.create(file=open(source, "rb"), purpose="batch")
    batch = api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                               metadata={"engine_args": "--max-model-len 256", "time": "15", "concurrency": "1"})

    def ended():
        found = api.batches.retrieve(batch.id)
        return found if found.status in ("completed", "failed", "expired", "cancelled") else None
    done = wait_for(ended, timeout=600, interval=2, what="the image batch")
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 4, 3), done
    answers = {line["custom_id"]: line["response"]["body"]
               for line in map(json.loads, api.files.content(done.output_file_id).text.splitlines())}
    errors = {line["custom_id"]: line for line in map(json.loads, api.files.content(done.error_file_id).text.splitlines())}
    assert set(answers) == {"text", "red", "red-again", "blue"} and set(errors) == {"remote", "local", "pipe"}

    def first_token(name):
        return [(top["token"], top["logprob"]) for top in answers[name]["choices"][0]["logprobs"]["content"][0]["top_logprobs"]]
    assert answers["red"]["usage"]["prompt_tokens"] - answers["text"]["usage"]["prompt_tokens"] >= 4 + 2
    assert first_token("red") == first_token("red-again") != first_token("blue")
    assert NO_REMOTE_MEDIA in json.dumps(errors["remote"]) and errors["remote"]["response"]["status_code"] == 400
    for name in ("local", "pipe"):
        assert "allowed-local-media-path" in json.dumps(errors[name]), errors[name]
    assert Recorder.seen == [] and not reader_waits_on(pipe)


def test_the_playground_attaches_an_image_and_the_answer_arrives(vision, tmp_path):
    from playwright.sync_api import expect

    from tests.support.browser import open_browser
    from tests.ui.conftest import sign_in

    picture = tmp_path / "red.png"
    picture.write_bytes(png(40, 30, (200, 30, 30)))
    portal = vision.portal
    sent = []
    with open_browser() as browser:
        page = browser.new_page()
        sign_in(page, portal)
        page.on("request", lambda request: sent.append(request.post_data or "")
                if request.url.endswith("/chat/completions") else None)
        page.goto(f"{portal.url}/ui/services/{vision.service['id']}/playground")
        page.get_by_label("Image (optional)").set_input_files(str(picture))
        expect(page.get_by_alt_text("The attached image")).to_be_visible()
        page.get_by_label("Max tokens").fill("6")
        page.get_by_label("Message").fill(QUESTION)
        page.get_by_role("button", name="Send").click()
        answer = page.locator(".chat-message.from-assistant")
        expect(answer).to_have_attribute("data-state", "done", timeout=120_000)
        assert answer.locator(".chat-text").inner_text().strip()
        expect(page.get_by_alt_text("Your image")).to_be_visible()
        expect(page.get_by_alt_text("The attached image")).to_be_hidden()  # taken by the message
        browser.screenshot(page, "playground-vision")
    body = json.loads(sent[-1])
    parts = body["messages"][-1]["content"]
    assert parts[0] == {"type": "text", "text": QUESTION}
    assert parts[1]["type"] == "image_url"
    assert base64.b64decode(parts[1]["image_url"]["url"].split(",", 1)[1]) == picture.read_bytes()


def test_the_launch_page_and_the_cli_show_what_the_model_takes(vision):
    from playwright.sync_api import expect

    from tests.support.browser import open_browser
    from tests.ui.conftest import open_launch_page

    portal = vision.portal
    with open_browser() as browser:
        page = open_launch_page(browser, portal, "text-generation", VISION)
        expect(page.locator('[data-info="modalities"]')).to_have_text("text, image")
        expect(page.locator("#options-presets")).to_contain_text(f"--allowed-media-domains {NO_REMOTE_MEDIA}")
        assert "--limit-mm-per-prompt" in page.locator("#options-flags").inner_text()
        assert page.locator('[data-info="kind"]').inner_text().startswith("text-generation: a vision-language model")
        browser.screenshot(page, "launch-vision")

    listed = pilotfish_cli(portal, "models", "ls")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split()[1:4] for line in listed.stdout.splitlines()[1:]}
    assert rows[VISION] == ["text-generation", "-", "text,image"]
    shown = pilotfish_cli(portal, "models", "options", VISION)
    assert shown.returncode == 0, shown.stderr
    assert "takes as input: text, image" in shown.stdout
    assert f"images: --allowed-media-domains {NO_REMOTE_MEDIA}" in shown.stdout
    planned = pilotfish_cli(portal, "run", "text-generation", "--model", VISION, "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert "# the model: text-generation, taking text, image\n" in planned.stdout
    assert (f"# from the model (images): --allowed-media-domains {NO_REMOTE_MEDIA} --allowed-local-media-path "
            f"{NO_LOCAL_MEDIA} (remote image URLs are refused") in planned.stdout
    refused = pilotfish_cli(portal, "run", "text-embedding", "--model", VISION, "--dry-run")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [
        f"pilotfish: model: {VISION} is a text-generation model, not text-embedding (a vision-language model "
        "(Idefics3ForConditionalGeneration): text from text and images): launch it as text-generation"]
