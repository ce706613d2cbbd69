"""The real model servers through the portal with the official openai client: vLLM (CPU) on a tiny Llama,
llama.cpp (the portable build) on SmolLM2 135M Instruct and on Gemma 3 270M, faster-whisper on Whisper tiny.en,
each a job on the real test Slurm."""
from __future__ import annotations

import hashlib
import json
import os
import re
import runpy
import signal
import ssl
import time
from pathlib import Path

import openai
import psutil
import pytest
import requests

from tests.conftest import squeue_ids, wait_for
from portal.catalog.kinds import ENGINES
from portal.engines import installer
from tests.e2e.conftest import GEMMA, READY_TIMEOUT, SMOLLM, TINY_LLAMA, WHISPER, pilotfish_cli
from tests.support.benchmark_checks import check_load_figures, run_benchmark
from tests.support.prometheus_scrape import delta, scrape

pytestmark = pytest.mark.slurm
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def client(running, name=None, token=None, **kwargs):
    base = running.base_url(name) if name else f"{running.portal.url}/v1"
    return openai.OpenAI(base_url=base, api_key=token or running.portal.token, max_retries=0, timeout=120, **kwargs)


def stream_chat(api, model, max_tokens=40):
    """(chunks with their arrival times, the text) of a streamed chat."""
    arrivals, text = [], []
    stream = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me about the sea."}],
                                         max_tokens=max_tokens, stream=True)
    started = time.monotonic()
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
            text.append(chunk.choices[0].delta.content)
    return arrivals, "".join(text)


def test_each_engine_was_chosen_from_the_model_format_and_its_phases_were_timed(running):
    assert {name: s["engine"] for name, s in running.services.items()} == {
        "vllm": "vllm", "llama-cpp": "llama-cpp", "gemma": "llama-cpp", "whisper": "whisper"}
    phases = {}
    for name, service in running.services.items():
        fresh = running.portal.service(service["id"])
        assert all(fresh["phases"][key] is not None and fresh["phases"][key] >= 0
                   for key in ("queued", "job_to_endpoint", "endpoint_to_healthy", "total")), fresh["phases"]
        assert abs(sum(fresh["phases"][key] for key in ("queued", "job_to_endpoint", "endpoint_to_healthy"))
                   - fresh["phases"]["total"]) < 0.01
        phases[name] = fresh["phases"]
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "e2e-phases.json").write_text(json.dumps(phases, indent=2))


@pytest.mark.parametrize("name, model", [("vllm", TINY_LLAMA), ("llama-cpp", SMOLLM), ("gemma", GEMMA)])
@pytest.mark.parametrize("route", ["service", "gateway"])
def test_text_generation(running, name, model, route):
    api = client(running, name if route == "service" else None)
    assert model in [m.id for m in api.models.list().data]
    chat = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       max_tokens=16)
    assert chat.choices[0].message.content and chat.usage.completion_tokens > 0
    completion = api.completions.create(model=model, prompt="The quick brown fox", max_tokens=8)
    assert completion.choices[0].text and completion.usage.completion_tokens > 0
    arrivals, text = stream_chat(api, model)
    assert text and len(arrivals) >= 5, (len(arrivals), text)
    assert arrivals[-1] > arrivals[0]  # chunks came over time, not all in one read at the end


@pytest.mark.parametrize("question, expected", [
    ("What is 2 + 2?", r"\b4\b|\bfour\b"),
    ("Write one sentence about the sea.", r"\b(sea|ocean|waves?)\b"),
])
def test_smollm_answers_sensibly(running, question, expected):
    """The demo's model, greedy: a right answer to a sum, a sentence on the subject asked."""
    chat = client(running).chat.completions.create(
        model=SMOLLM, messages=[{"role": "user", "content": question}], max_tokens=60, temperature=0)
    answer = chat.choices[0].message.content
    assert re.search(expected, answer, re.I), answer
    assert question.lower() not in answer.lower(), answer  # not the prompt echoed back


def test_llama_cpp_runs_the_portable_build_it_chose_for_this_cpu(running):
    """The server loaded one of the installed CPU back ends (chosen at run time), not a build for one CPU."""
    log = running.portal.request("GET", f"/api/services/{running.services['llama-cpp']['id']}/logs",
                                 params={"tail": 5000}).json()["log"]
    loaded = re.findall(r"loaded CPU backend from (\S+)", log)
    assert loaded, log[-2000:]
    backend = Path(loaded[0])
    assert backend.parent == installer.backends_dir()
    assert backend.name in {f"libggml-cpu-{name}.so" for name in installer.cpu_variants()}


def test_gemma_answers_in_real_words(running):
    chat = client(running).chat.completions.create(
        model=GEMMA, messages=[{"role": "user", "content": "Name three colours."}], max_tokens=40, temperature=0)
    words = [word for word in chat.choices[0].message.content.split() if word.strip(".,!?*:-").isalpha()]
    assert len(words) >= 3, chat.choices[0].message.content


def test_engine_errors_pass_through_unchanged(running):
    with pytest.raises(openai.BadRequestError) as vllm_error:  # vLLM's own validation
        client(running, "vllm").chat.completions.create(model=TINY_LLAMA, messages=[{"role": "user", "content": "Hi"}],
                                                        max_tokens=100000)
    assert "max_model_len" in str(vllm_error.value)
    with pytest.raises(openai.BadRequestError) as llama_error:  # llama.cpp's context check
        client(running).chat.completions.create(model=GEMMA, max_tokens=10,
                                                messages=[{"role": "user", "content": "word " * 3000}])
    assert "context length" in str(llama_error.value)
    with pytest.raises(openai.BadRequestError) as whisper_error:  # the Whisper server's own check
        client(running, "whisper").audio.transcriptions.create(model=WHISPER, file=("notes.txt", b"not audio"))
    assert "could not decode" in str(whisper_error.value)


def test_transcription_of_real_speech(running, speech):
    for api in (client(running, "whisper"), client(running)):
        with open(speech, "rb") as audio:
            result = api.audio.transcriptions.create(model=WHISPER, file=audio)
        heard = result.text.lower()
        assert sum(word in heard for word in ("quick", "brown", "fox", "lazy", "dog")) >= 4, result.text
    with open(speech, "rb") as audio:
        srt = client(running).audio.transcriptions.create(model=WHISPER, file=audio, response_format="srt")
    assert "-->" in srt and "fox" in srt.lower()


@pytest.mark.parametrize("name", ["vllm", "llama-cpp", "whisper"])
def test_every_service_needs_a_key(running, name):
    with pytest.raises(openai.AuthenticationError):
        client(running, name, token="wrong").models.list()
    service = running.portal.service(running.services[name]["id"])
    host, port = service["endpoint"]["host"], service["endpoint"]["port"]
    # The server speaks TLS with the certificate the portal made for it (and pins), and nothing in clear text.
    served = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((host, port), timeout=30))
    made = ssl.PEM_cert_to_DER_cert((running.portal.home / "jobs" / service["id"] / "service.crt").read_text())
    assert served == made
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://{host}:{port}/v1/models", timeout=30)
    direct = f"https://{host}:{port}/v1/models"
    assert requests.get(direct, timeout=30, verify=False).status_code == 401
    assert requests.get(direct, headers={"Authorization": "Bearer wrong"}, timeout=30, verify=False).status_code == 401
    # The key reaches the server through its environment, never on a command line `ps` shows to other users.
    key = (running.portal.home / "jobs" / service["id"] / "service.key").read_text().strip()
    port = str(service["endpoint"]["port"])
    servers = [p for p in psutil.process_iter(["cmdline"]) if port in (p.info["cmdline"] or [])]
    assert servers, f"no process has --port {port} on its command line"
    assert not any(key in " ".join(p.info["cmdline"]) for p in servers)
    assert all(key in p.environ().values() for p in servers)


# Paths the guard must close whether or not a server has them: it answers 401 before any routing (never a 404 that
# tells what exists). vLLM's own key check covers only /v1, /v2, /inference and /cohere; llama.cpp's, its API routes.
PROBED_PATHS = ["/", "/health", "/ping", "/metrics", "/version", "/docs", "/redoc", "/docs/oauth2-redirect",
                "/openapi.json", "/invocations", "/tokenize", "/detokenize", "/pooling", "/score", "/rerank",
                "/server_info", "/load", "/no-such-path", "/v1/no-such-path", "/extras/tokenize", "/v1/models"]
WHISPER_ROUTES = {"/health": ["get"], "/v1/models": ["get"], "/v1/audio/transcriptions": ["post"],
                  "/v1/audio/translations": ["post"]}  # our server publishes no OpenAPI document


def direct(running, name):
    """(base URL, key, session) of a service's own port, from its job folder (endpoint.json, service.key)."""
    job_dir = running.portal.home / "jobs" / running.services[name]["id"]
    endpoint = json.loads((job_dir / "endpoint.json").read_text())
    session = requests.Session()
    session.trust_env = False
    session.verify = False  # a service serving TLS has its own self-signed certificate
    base = f"https://{endpoint['host']}:{endpoint['port']}"
    try:
        session.get(base + "/health", timeout=30)
    except requests.exceptions.SSLError:  # it serves plain HTTP
        base = f"http://{endpoint['host']}:{endpoint['port']}"
    return base, (job_dir / "service.key").read_text().strip(), session


@pytest.mark.parametrize("name", ["vllm", "llama-cpp", "whisper"])
def test_every_route_of_every_engine_refuses_a_caller_without_the_key(running, name):
    """Each server's real route list (its /openapi.json, fetched with the key), every path and method, then a
    handful of paths it may not have: no key and a wrong key both get 401 from the port itself."""
    base, key, session = direct(running, name)
    if name == "whisper":
        routes = WHISPER_ROUTES
    else:
        document = session.get(base + "/openapi.json", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert document.status_code == 200, document.text[:300]
        routes = {path: [method for method in operations if method in ("get", "post", "put", "delete", "patch")]
                  for path, operations in document.json()["paths"].items()}
        assert len(routes) >= (20 if name == "vllm" else 7), sorted(routes)
    probes = [(method.upper(), re.sub(r"\{[^}]+\}", "dummy", path)) for path, methods in routes.items()
              for method in methods]
    probes += [(method, path) for path in PROBED_PATHS for method in ("GET", "POST")]
    probes += [("OPTIONS", "/health"), ("HEAD", "/health"), ("DELETE", "/v1/models")]
    answered = {}
    for method, path in probes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {key}"}):
            response = session.request(method, base + path, headers=headers, json={} if method == "POST" else None,
                                       timeout=30)
            if response.status_code != 401:
                answered[f"{method} {path} {sorted(headers)}"] = response.status_code
    assert not answered, f"{name} answered without the key: {answered}"
    engine_health = ENGINES[running.services[name]["engine"]].health_path  # what the portal's probe asks, with the key
    assert session.get(base + engine_health, headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code == 200
    print(f"{name}: {len(probes)} requests x 3 credentials refused, {len(routes)} published routes")


def test_metrics_count_exactly_the_real_vllm_traffic(running):
    portal = running.portal
    api = client(running)
    before = scrape(portal)
    answers = [api.chat.completions.create(model=TINY_LLAMA, messages=[{"role": "user", "content": f"Hi {i}"}],
                                           max_tokens=i + 2, extra_body={"ignore_eos": True}) for i in range(5)]
    streamed = api.chat.completions.create(model=TINY_LLAMA, messages=[{"role": "user", "content": "Go"}],
                                           max_tokens=6, stream=True, extra_body={"ignore_eos": True})
    chunks = list(streamed)
    after = scrape(portal)
    assert not any(getattr(chunk, "usage", None) for chunk in chunks)  # the portal asked for usage, not the caller
    assert [a.usage.completion_tokens for a in answers] == [2, 3, 4, 5, 6]
    assert delta(before, after, "pilotfish_requests_total", route="gateway", status="200") == 6
    assert delta(before, after, "pilotfish_completion_tokens_total", model=TINY_LLAMA) == 2 + 3 + 4 + 5 + 6 + 6
    assert delta(before, after, "pilotfish_prompt_tokens_total", model=TINY_LLAMA) > sum(a.usage.prompt_tokens
                                                                                          for a in answers)
    engine = scrape(portal, f"/services/{running.services['vllm']['id']}/metrics")  # vLLM's own metrics
    assert engine.value("vllm:request_success_total") >= 6


def test_usage_per_principal_and_key_limits_on_real_vllm(running):
    """The owner and two named keys call real vLLM through the gateway with known traffic (ignore_eos): /api/usage
    counts each one's requests and tokens exactly as vLLM reported them; a key limited to the tiny Llama gets 403
    on another model; a key past its end 401; a key over its rate 429 with Retry-After, and is answered after it.
    Every answer names the service and the model's revision."""
    portal, vllm = running.portal, running.services["vllm"]

    def key(name, **limits):
        made = portal.request("POST", "/api/keys", json={"name": name, **limits})
        assert made.status_code == 201, made.text
        return made.json()["key"]

    alice = key("usage-alice", models=[TINY_LLAMA])
    bob = key("usage-bob", requests_per_minute=4)  # 4 at once, then one every 15 s
    brief_end = int(time.time()) + 3
    brief = key("usage-brief", expires=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(brief_end)))
    mark = key("usage-mark")

    def usage():
        return {row["principal"]: row for row in portal.request("GET", "/api/usage").json()["rows"]}

    chat = {"model": TINY_LLAMA, "messages": [{"role": "user", "content": "Count the waves."}],
            "extra_body": {"ignore_eos": True}}
    # The usage of earlier tests is written before the owner's baseline is read: the portal's one worker writes
    # everything it counted in one go, so once a request made after them is counted, they are too.
    assert portal.workers == 1
    client(running, token=mark).chat.completions.create(**chat, max_tokens=1)
    wait_for(lambda: "key:usage-mark" in usage(), timeout=20, what="the marking request's count")
    owner_before = usage().get("owner", {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "errors": 0})
    sent = {"owner": [], "key:usage-alice": [], "key:usage-bob": []}  # the usage vLLM reported for each call
    owner = client(running)
    for tokens in (3, 5, 7):
        raw = owner.chat.completions.with_raw_response.create(**chat, max_tokens=tokens)
        assert raw.headers["x-pilotfish-service"] == vllm["id"]
        assert raw.headers["x-pilotfish-model-revision"] == installer.snapshot_of(installer.models_dir(),
                                                                                  TINY_LLAMA).name
        sent["owner"].append(raw.parse().usage)
    streamed = list(owner.chat.completions.create(**chat, max_tokens=6, stream=True))
    assert streamed  # its usage: the same prompt as above, 6 tokens (the portal asked vLLM for it)
    as_alice = client(running, token=alice)
    for tokens in (2, 4):
        sent["key:usage-alice"].append(as_alice.completions.create(model=TINY_LLAMA, prompt="The sea", max_tokens=tokens,
                                                                   extra_body={"ignore_eos": True}).usage)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        as_alice.chat.completions.create(**dict(chat, model=SMOLLM), max_tokens=2)
    assert refused.value.code == "model_not_allowed"
    as_bob = client(running, token=bob)
    for _ in range(4):
        sent["key:usage-bob"].append(as_bob.chat.completions.create(**chat, max_tokens=1).usage)
    with pytest.raises(openai.RateLimitError) as over:
        as_bob.chat.completions.create(**chat, max_tokens=1)
    wait = int(over.value.response.headers["Retry-After"])
    assert 1 <= wait <= 15, wait
    time.sleep(wait + 0.5)
    sent["key:usage-bob"].append(as_bob.chat.completions.create(**chat, max_tokens=1).usage)
    time.sleep(max(0.0, brief_end + 0.5 - time.time()))
    with pytest.raises(openai.AuthenticationError) as expired:
        client(running, token=brief).chat.completions.create(**chat, max_tokens=1)
    assert expired.value.code == "expired_api_key"

    prompt = sent["owner"][0].prompt_tokens
    expected = {principal: {"requests": len(calls), "errors": 0,
                            "prompt_tokens": sum(u.prompt_tokens for u in calls),
                            "completion_tokens": sum(u.completion_tokens for u in calls)}
                for principal, calls in sent.items()}
    expected["owner"]["requests"] += 1  # the stream
    expected["owner"]["prompt_tokens"] += prompt
    expected["owner"]["completion_tokens"] += 6
    assert [u.completion_tokens for u in sent["owner"]] == [3, 5, 7]  # ignore_eos: exactly max_tokens
    assert [u.completion_tokens for u in sent["key:usage-alice"]] == [2, 4]

    def counted():
        rows = usage()
        found = {principal: {field: rows.get(principal, {}).get(field, 0) for field in expected[principal]}
                 for principal in expected}
        found["owner"] = {field: value - owner_before[field] for field, value in found["owner"].items()}
        return found

    wait_for(lambda: counted() == expected, timeout=20, what="the usage to be counted exactly")
    assert counted() == expected


def test_benchmark_against_real_vllm(running):
    run = run_benchmark(running.portal, running.services["vllm"]["id"], clients=4, requests=12, max_tokens=8,
                        prompt_len=16, timeout=300)
    assert run["state"] == "DONE", run
    figures = run["result"]
    check_load_figures(figures, clients=4, requests=12, max_tokens=8)
    assert figures["token_source"] == "usage" and figures["output_tokens"] == 96
    (ARTIFACTS / "e2e-benchmark-vllm.json").write_text(json.dumps(
        {key: value for key, value in figures.items() if key != "per_request"}, indent=2))


def test_playground_streams_smollm_in_the_browser(running):
    from tests.support.browser import open_browser, record_streamed_answer, recorded_streamed_answer
    from tests.ui.conftest import sign_in

    portal = running.portal
    service_id = running.services["llama-cpp"]["id"]
    with open_browser(ARTIFACTS / "e2e") as browser:
        # Chromium reports a fetch whose body was read to its end through a reader as ERR_ABORTED when the stream
        # comes from llama-cpp-python's server (uvicorn), directly as through the portal; the answer is complete.
        browser.allow(r"^request failed: POST .*/v1/chat/completions: net::ERR_ABORTED$")
        page = browser.new_page()
        sign_in(page, portal)
        page.goto(f"{portal.url}/ui/services/{service_id}/playground")
        page.get_by_label("Max tokens").fill("60")
        page.get_by_label("Message").fill("Write a story about a fish.")
        record_streamed_answer(page)  # every text the answer shows, however fast the tokens come
        page.get_by_label("Message").press("Enter")
        answer = recorded_streamed_answer(page, timeout=120)
        browser.screenshot(page, "playground-smollm")
    seen = answer.texts
    print(f"{len(seen)} texts in {len(set(answer.moments))} reads; first text after "
          f"{answer.times[0] - answer.started if seen else 0:.0f} ms of {answer.ended - answer.started:.0f} ms")
    # The answer was seen growing (each text extending the last) into real words, in several reads of the stream,
    # and its first words showed well before it ended (measured: after 0.45 s of 1.4 s, the prompt's processing
    # included): streamed, not delivered whole at the end.
    assert answer.state == "done"
    assert len(set(answer.moments)) >= 3, (answer.moments, seen)
    assert all(later.startswith(earlier) and len(later) > len(earlier) for earlier, later in zip(seen, seen[1:])), seen
    assert answer.times[0] - answer.started < 0.75 * (answer.ended - answer.started), answer
    assert answer.final.startswith(seen[-1])
    assert len([word for word in answer.final.split() if word.strip(".,!?*:;-'\"").isalpha()]) >= 5, answer.final


def test_playground_records_the_microphone_and_transcribes_it(running, speech):
    """Chromium's microphone plays the spoken sentence; Record, Stop, Transcribe: Whisper hears it."""
    from playwright.sync_api import expect

    from tests.support.browser import fake_microphone, open_browser
    from tests.ui.conftest import sign_in

    portal = running.portal
    with open_browser(ARTIFACTS / "e2e", args=fake_microphone(speech)) as browser:
        # The recording's <audio> player loads its blob: URL the way media elements do (a first request aborted).
        browser.allow(r"^request failed: GET blob:http://[^ ]+: net::ERR_ABORTED$")
        page = browser.new_page()
        sign_in(page, portal)
        page.goto(f"{portal.url}/ui/services/{running.services['whisper']['id']}/playground")
        record = page.locator("#record-button")
        record.click()
        expect(record).to_have_text("Stop recording")
        page.wait_for_timeout(7000)  # the sentence (about 3 s) plays in a loop: at least once whole
        record.click()
        expect(page.locator("#record-status")).to_contain_text("Recorded")
        page.locator("#transcribe-button").click()
        transcript = page.locator("#transcript")
        expect(transcript).not_to_have_text("Nothing transcribed yet.", timeout=60000)
        expect(transcript).to_contain_text("fox", ignore_case=True, timeout=60000)
        heard = transcript.inner_text().lower()
        browser.screenshot(page, "playground-microphone")
    print(f"heard through the fake microphone: {heard!r}")
    assert sum(word in heard for word in ("quick", "brown", "fox", "lazy", "dog")) >= 4, heard


def test_a_crashed_llama_cpp_server_fails_in_words(running):
    """A real llama.cpp server killed with SIGSEGV: the service FAILED naming the signal; the client reads why."""
    portal = running.portal
    response = portal.request("POST", "/api/services", json={"kind": "text-generation", "model": SMOLLM,
                                                             "name": "e2e-crash", "time": 10,
                                                             "resources": {"memory_gb": 1}})  # beside the others
    assert response.status_code == 201, response.text
    service = portal.wait_state(response.json()["id"], {"RUNNING", "FAILED"}, timeout=300)
    assert service["state"] == "RUNNING", service["reason"]
    api = openai.OpenAI(base_url=f"{portal.url}/services/{service['id']}/v1", api_key=portal.token, max_retries=0,
                        timeout=60)
    assert api.chat.completions.create(model=SMOLLM, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    os.kill(int((portal.home / "jobs" / service["id"] / "server.pid").read_text()), signal.SIGSEGV)
    failed = portal.wait_state(service["id"], {"FAILED", "STOPPED"}, timeout=30)
    assert failed["state"] == "FAILED"
    assert "the server crashed: segmentation fault (signal 11, SIGSEGV; exit code 139)" in failed["reason"]
    wait_for(lambda: failed["job_id"] not in squeue_ids(), timeout=30, what="the crashed server's job to end")
    with pytest.raises(openai.APIStatusError) as error:
        api.chat.completions.create(model=SMOLLM, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert error.value.status_code == 503
    assert "segmentation fault" in error.value.message and "FAILED" in error.value.message


def test_stop_ends_jobs_and_processes(running):
    """Runs after the others but the relaunch: stops every service and checks the jobs and server processes are
    gone."""
    portal = running.portal
    ports = {}
    for name, service in running.services.items():
        fresh = portal.service(service["id"])
        ports[name] = str(fresh["endpoint"]["port"])
        assert portal.request("POST", f"/api/services/{service['id']}/stop").status_code == 202
    for name, service in running.services.items():
        ended = portal.wait_state(service["id"], {"STOPPED"}, timeout=120)
        assert ended["job_id"] not in squeue_ids()
    wait_for(lambda: not [p for p in psutil.process_iter(["cmdline"]) if set(ports.values()) & set(p.info["cmdline"] or [])],
             timeout=60, what="the server processes to exit")


def comparable(provenance: dict) -> dict:
    """What must be the same for the same service launched again (its id, name and times aside)."""
    model, engine = provenance["model"], provenance["engine"]
    return {"model": [model["repo_id"], model["revision"], {entry["name"]: entry["sha256"] for entry in model["files"]}],
            "engine": [engine["name"], engine["runtime"], engine["command"], engine["version"]],
            "image": provenance["image"], "server_arguments": provenance["server_arguments"],
            "engine_args": provenance["engine_args"], "tier": provenance["tier"], "resources": provenance["resources"],
            "scheduler_arguments": [arg.replace(provenance["service"], "<id>")
                                    for arg in provenance["scheduler_arguments"]],
            "idle_timeout": provenance["idle_timeout"]}


def test_provenance_of_real_vllm_and_its_relaunch_from_the_exported_recipe(running, tmp_path):
    """The tiny Llama's revision and file sha256s (checked against the files), vLLM's version (checked against its
    own version file and its log); `pilotfish export` then `pilotfish apply` launch it again with the same
    provenance. Runs after the services stopped, so that the relaunch has the resources they held."""
    portal, original = running.portal, running.services["vllm"]
    answer = portal.request("GET", f"/api/services/{original['id']}/provenance")
    assert answer.status_code == 200, answer.text
    data = answer.json()
    snapshot = installer.snapshot_of(installer.models_dir(), TINY_LLAMA)
    assert data["model"]["repo_id"] == TINY_LLAMA and data["model"]["revision"] == snapshot.name
    assert Path(data["model"]["path"]).resolve() == snapshot.resolve()  # the site's cache links the staged models
    on_disk = {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
               for path in snapshot.iterdir() if path.is_file()}
    assert {entry["name"]: entry["sha256"] for entry in data["model"]["files"]} == on_disk
    assert [entry["name"] for entry in data["model"]["files"] if entry["weights"]] == ["model.safetensors"]
    version_file = next(installer.venv_python("vllm").parent.parent.glob("lib/python*/site-packages/vllm/_version.py"))
    version = runpy.run_path(str(version_file))["__version__"]
    assert data["engine"]["name"] == "vllm" and data["engine"]["version"] == version
    log = portal.request("GET", f"/api/services/{original['id']}/logs", params={"tail": 5000}).json()["log"]
    said = re.findall(r"vLLM API server version ([0-9][^\s,]*)", log)
    assert not said or said[0] == version, said
    assert data["engine_args"] == data["server_arguments"][-2:] == ["--max-model-len", "256"]
    assert version in data["methods"] and data["model"]["revision"] in data["methods"]
    assert on_disk["model.safetensors"] in data["methods"]

    recipe = tmp_path / "again.yaml"
    exported = pilotfish_cli(portal, "export", original["id"], "-o", str(recipe), "--name", "e2e-vllm-again")
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.strip() == data["methods"]
    try:
        applied = pilotfish_cli(portal, "apply", str(recipe), "--json", "--timeout", str(READY_TIMEOUT),
                                timeout=READY_TIMEOUT + 60)
        assert applied.returncode == 0, f"{applied.stdout}\n{applied.stderr}"
        again = json.loads(applied.stdout)[0]
        assert again["id"] != original["id"] and again["state"] == "RUNNING" and again["name"] == "e2e-vllm-again"
        relaunched = portal.request("GET", f"/api/services/{again['id']}/provenance").json()
        assert comparable(relaunched) == comparable(data)
        chat = client(running).chat.completions.create(model=TINY_LLAMA, messages=[{"role": "user", "content": "Hi"}],
                                                       max_tokens=4)
        assert chat.choices[0].message.content is not None
    finally:
        deleted = pilotfish_cli(portal, "apply", "--delete", str(recipe), timeout=300)
        assert deleted.returncode == 0, deleted.stderr
