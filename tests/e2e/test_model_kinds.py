"""More kinds of model on real vLLM (CPU build), each a job on the real test Slurm, called through the portal with the
official openai client: embeddings and rerank from a tiny sentence-transformers BERT and from the tiny Llama's pooled
states, and JSON-schema answers and required tool calls from the tiny Llama with its family's tool-call parser.

The models are random (written on the spot), so what holds is what the engine guarantees: the same text embeds to the
same vector, a text is its own nearest document, and guided decoding makes an answer fit its schema; each check is
paired with the same request without its constraint, which does not fit. The JSON grammars allow any whitespace
between tokens, and a random model then writes tabs until max_tokens: every generation request here biases the
tokenizer's whitespace-only tokens away (`logit_bias`), the constrained ones and their unconstrained twins alike."""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import threading
import time
from pathlib import Path

import jsonschema_rs
import openai
import psutil
import pytest
import requests

from portal.engines import installer
from tests.conftest import PortalProcess
from tests.e2e.conftest import TINY_LLAMA, pilotfish_cli, vllm_portal

pytestmark = pytest.mark.slurm
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
EMBEDDING = installer.TINY_EMBEDDING_REPO_ID
LAUNCHES = {
    "embedding": {"kind": "text-embedding", "model": EMBEDDING, "engine_args": ["--max-model-len", "128"]},
    "tools": {"kind": "text-generation", "model": TINY_LLAMA, "engine_args": ["--max-model-len", "256"]},
    # The same model as the tools service, launched for its pooled states: the gateway sends each path to its kind.
    "llama-embedding": {"kind": "text-embedding", "model": TINY_LLAMA, "engine_args": ["--max-model-len", "256"]},
}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                            "sunny": {"type": "boolean"}},
           "required": ["city", "sunny"], "additionalProperties": False}
# `strict`: vLLM holds a tool call's arguments to the function's schema when the tool says so (as OpenAI's API), or
# for every tool when launched with --tool-strict-level parameter; otherwise only the call's envelope is constrained.
GET_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris? Answer in JSON."}]
BYTE_LEVEL_WHITESPACE = set("ĠĊĉč")  # space, newline, tab, carriage return in a byte-level BPE vocabulary


def no_whitespace_tokens() -> dict:
    """logit_bias pushing away every token of the tiny Llama's vocabulary made only of whitespace."""
    folder = installer.snapshot_of(installer.models_dir(), TINY_LLAMA)
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    return {str(index): -100 for token, index in vocab.items() if token and set(token) <= BYTE_LEVEL_WHITESPACE}


GREEDY = {"temperature": 0, "seed": 7, "max_tokens": 60}
DOCUMENTS = ["Pilotfish runs models on the cluster.", "Hello, how are you today?", "The quick brown fox jumps.",
             "Researchers launch services from a notebook.", "A reranker orders documents for a query."]


class Kinds:
    def __init__(self, portal: PortalProcess, services: dict):
        self.portal, self.services = portal, services

    def api(self, name=None) -> openai.OpenAI:
        """The openai client for the gateway (no name) or one service's own URL."""
        base = f"{self.portal.url}/services/{self.services[name]['id']}/v1" if name else f"{self.portal.url}/v1"
        return openai.OpenAI(base_url=base, api_key=self.portal.token, max_retries=0, timeout=120)

    def direct(self, name):
        """(base URL, session with the service's key) of a service's own port, TLS unverified (its own certificate)."""
        job_dir = self.portal.home / "jobs" / self.services[name]["id"]
        endpoint = json.loads((job_dir / "endpoint.json").read_text())
        session = requests.Session()
        session.trust_env, session.verify = False, False
        session.headers["Authorization"] = f"Bearer {(job_dir / 'service.key').read_text().strip()}"
        return f"https://{endpoint['host']}:{endpoint['port']}", session


@pytest.fixture(scope="module")
def kinds(tmp_path_factory, slurm_cluster):
    with vllm_portal(tmp_path_factory, "kinds", LAUNCHES,
                     stage=(installer.stage_tiny_llama, installer.stage_tiny_embedding)) as (portal, services):
        yield Kinds(portal, services)


def staged_config(repo_id: str) -> dict:
    return json.loads((installer.snapshot_of(installer.models_dir(), repo_id) / "config.json").read_text())


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_the_inventory_knows_each_model_and_each_service_got_its_presets(kinds):
    listed = {m["repo_id"]: m for m in kinds.portal.request("GET", "/api/models").json()["models"]}
    assert (listed[EMBEDDING]["kind"], listed[EMBEDDING]["kinds"]) == ("text-embedding", ["text-embedding"])
    assert (listed[TINY_LLAMA]["kind"], listed[TINY_LLAMA]["kinds"]) == ("text-generation",
                                                                         ["text-generation", "text-embedding"])
    expected = {"embedding": ["--runner", "pooling"], "llama-embedding": ["--runner", "pooling", "--convert", "embed"],
                "tools": ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]}
    phases = {}
    for name, added in expected.items():
        service = kinds.services[name]
        arguments = kinds.portal.request("GET", f"/api/services/{service['id']}/provenance").json()["server_arguments"]
        at = arguments.index("--served-model-name") + 2
        assert arguments[at:] == added + LAUNCHES[name]["engine_args"], arguments
        phases[name] = kinds.portal.service(service["id"])["phases"]
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "e2e-kinds-phases.json").write_text(json.dumps(phases, indent=2))
    print("start-up phases:", json.dumps(phases))


@pytest.mark.parametrize("name, model", [("embedding", EMBEDDING), ("llama-embedding", TINY_LLAMA)])
@pytest.mark.parametrize("route", ["gateway", "service"])
def test_embeddings(kinds, name, model, route):
    api = kinds.api(None if route == "gateway" else name)
    texts = ["The quick brown fox jumps.", "The quick brown fox jumps.", "Pilotfish runs models on the cluster."]
    result = api.embeddings.create(model=model, input=texts)
    vectors = [item.embedding for item in sorted(result.data, key=lambda item: item.index)]
    assert [len(vector) for vector in vectors] == [staged_config(model)["hidden_size"]] * 3  # 192 and 128
    assert vectors[0] == vectors[1]
    assert vectors[0] != vectors[2] and cosine(vectors[0], vectors[2]) < 0.9999
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vectors)  # normalised, as pooled
    assert result.usage.prompt_tokens > 0
    alone = api.embeddings.create(model=model, input=texts[2]).data[0].embedding  # one text, one vector
    assert cosine(alone, vectors[2]) > 0.999


@pytest.mark.parametrize("path", ["/v1/rerank", "/v1/score"])
def test_rerank_and_score_through_the_gateway_put_the_text_itself_first(kinds, path):
    """A text is its own nearest document (cosine 1); any other document of a random model scores below it. The text
    sits in the middle of the list, so an answer in the documents' order, or reversed, fails."""
    query = DOCUMENTS[2]
    headers = {"Authorization": f"Bearer {kinds.portal.token}"}
    if path == "/v1/rerank":
        body = {"model": EMBEDDING, "query": query, "documents": DOCUMENTS}
    else:
        body = {"model": EMBEDDING, "text_1": query, "text_2": DOCUMENTS}
    response = requests.post(kinds.portal.url + path, json=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    assert response.headers["X-Pilotfish-Service"] == kinds.services["embedding"]["id"]
    if path == "/v1/rerank":
        results = response.json()["results"]
        assert results[0]["index"] == 2 and abs(results[0]["relevance_score"] - 1) < 1e-3
        scores = [item["relevance_score"] for item in results]
        assert scores == sorted(scores, reverse=True) and scores[1] < results[0]["relevance_score"]
        assert sorted(item["index"] for item in results) == list(range(len(DOCUMENTS)))
    else:
        scores = [item["score"] for item in sorted(response.json()["data"], key=lambda item: item["index"])]
        assert max(range(len(scores)), key=scores.__getitem__) == 2 and abs(scores[2] - 1) < 1e-3


def test_the_service_snippet_reranks_on_the_services_own_path(kinds):
    """As the service page's notebook snippet does: vLLM's bare /rerank on the service's URL."""
    api = kinds.api("embedding")
    ranked = api.post("/rerank", cast_to=object, body={"model": EMBEDDING, "query": "first text",
                                                       "documents": ["second text", "first text"]})
    assert [item["index"] for item in ranked["results"]] == [1, 0]


def test_a_model_served_as_two_kinds_gets_each_request_at_the_service_of_its_kind(kinds):
    api = kinds.api()
    for _ in range(6):
        assert len(api.embeddings.create(model=TINY_LLAMA, input="hello").data[0].embedding) == 128
        chat = api.chat.completions.with_raw_response.create(model=TINY_LLAMA, messages=QUESTION, max_tokens=4)
        assert chat.headers["X-Pilotfish-Service"] == kinds.services["tools"]["id"]
        assert chat.parse().choices[0].message.content is not None


def schema_answer(api, **constraint):
    return api.chat.completions.create(model=TINY_LLAMA, messages=QUESTION, logit_bias=no_whitespace_tokens(),
                                       **GREEDY, **constraint)


def fits(schema, text) -> bool:
    try:
        jsonschema_rs.validate(schema, json.loads(text))
        return True
    except (ValueError, jsonschema_rs.ValidationError):
        return False


@pytest.mark.parametrize("route", ["gateway", "service"])
def test_a_json_schema_answer_fits_its_schema_and_the_same_request_without_it_does_not(kinds, route):
    api = kinds.api(None if route == "gateway" else "tools")
    constrained = schema_answer(api, response_format={"type": "json_schema", "json_schema": {
        "name": "weather", "schema": WEATHER, "strict": True}})
    text = constrained.choices[0].message.content
    assert fits(WEATHER, text), text
    assert constrained.choices[0].finish_reason == "stop"
    free = schema_answer(api).choices[0].message.content  # same seed, greedy: the random model's own words
    assert not fits(WEATHER, free), free
    # Streamed through the gateway (which asks for usage on streams), the pieces make the same answer.
    stream = api.chat.completions.create(
        model=TINY_LLAMA, messages=QUESTION, stream=True, logit_bias=no_whitespace_tokens(), **GREEDY,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}})
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == text


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_a_required_tool_call_parses_with_arguments_that_fit_the_function(kinds, tool_choice):
    api = kinds.api()
    bias = no_whitespace_tokens()
    assert len(bias) >= 3, bias  # the tokenizer has whitespace tokens to push away
    answer = api.chat.completions.create(model=TINY_LLAMA, messages=QUESTION, tools=[GET_WEATHER],
                                         tool_choice=tool_choice, logit_bias=bias, **GREEDY)
    calls = answer.choices[0].message.tool_calls
    assert calls and calls[0].type == "function" and calls[0].function.name == "get_weather", answer
    assert fits(GET_WEATHER["function"]["parameters"], calls[0].function.arguments), calls[0].function.arguments
    free = api.chat.completions.create(model=TINY_LLAMA, messages=QUESTION, logit_bias=bias, **GREEDY)
    free = free.choices[0].message
    assert not free.tool_calls and not fits(GET_WEATHER["function"]["parameters"], free.content or ""), free


def test_the_parser_table_matches_the_installed_vllm():
    """Every parser a preset names is one the installed vLLM has, and it accepts a tokenizer holding the preset's
    tokens (the tiny Llama's, with them added), as vLLM checks at start-up."""
    from portal.engines.vllm_parsers import REASONING_PARSERS, TOOL_PARSERS
    rules = {"tool": sorted({rule for rules in TOOL_PARSERS.values() for rule in rules}),
             "reasoning": sorted({rule for rules in REASONING_PARSERS.values() for rule in rules})}
    script = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
from transformers import AutoTokenizer
from vllm.reasoning import ReasoningParserManager
from vllm.tool_parsers import ToolParserManager
rules, folder = json.loads(sys.argv[1]), sys.argv[2]
failed = []
for what, manager in (("tool", ToolParserManager), ("reasoning", ReasoningParserManager)):
    for name, tokens in rules[what]:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)})
        try:
            parser = (manager.get_tool_parser if what == "tool" else manager.get_reasoning_parser)(name)
            parser(tokenizer)
        except Exception as exc:
            failed.append(f"{what} {name}: {type(exc).__name__}: {exc}")
print(json.dumps(failed))
"""
    folder = installer.snapshot_of(installer.models_dir(), TINY_LLAMA)
    result = subprocess.run([str(installer.venv_python("vllm")), "-c", script, json.dumps(rules), str(folder)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_the_launch_page_and_the_cli_show_each_kind_and_its_options(kinds):
    from tests.support.browser import open_browser
    from tests.ui.conftest import choose_launch, open_launch_page

    portal = kinds.portal
    with open_browser() as browser:
        page = open_launch_page(browser, portal, "text-embedding", EMBEDDING)
        presets = page.locator("#options-presets")
        expect_text(presets, "--runner pooling")
        assert "--tool-call-parser" not in page.locator("#options-flags").inner_text()
        assert "--pooler-config" in page.locator("#options-flags").inner_text()
        assert page.locator('[data-info="kind"]').inner_text().startswith("text-embedding: a sentence-transformers")
        choose_launch(page, "text-generation", TINY_LLAMA)
        expect_text(presets, "--tool-call-parser llama3_json")
        assert page.locator('[data-info="kinds"]').inner_text() == "text-generation, text-embedding"
        page.get_by_text("Advanced options").click()
        page.get_by_label("Engine options").fill("--tool-call-parser pythonic")
        expect_text(presets, "replaced by your engine options")
        page.get_by_role("button", name="Check and show the job script").click()
        expect_text(page.locator("#plan-presets"), "replaced by your engine options")
        assert "--tool-call-parser pythonic" in page.locator("#plan-script").inner_text()
        assert "llama3_json" not in page.locator("#plan-script").inner_text()
        browser.screenshot(page, "launch-options")

    listed = pilotfish_cli(portal, "models", "ls")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split()[1:3] for line in listed.stdout.splitlines()[1:]}
    assert rows[EMBEDDING] == ["text-embedding", "-"] and rows[TINY_LLAMA] == ["text-generation", "text-embedding"]
    shown = pilotfish_cli(portal, "models", "options", TINY_LLAMA, "--kind", "text-embedding")
    assert shown.returncode == 0, shown.stderr
    assert "text-embedding on vLLM" in shown.stdout and "pooling: --convert embed" in shown.stdout
    refused = pilotfish_cli(portal, "run", "text-generation", "--model", EMBEDDING, "--dry-run")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [
        f"pilotfish: model: {EMBEDDING} is a text-embedding model, not text-generation (a sentence-transformers model "
        "(modules.json)): launch it as text-embedding"]
    planned = pilotfish_cli(portal, "run", "text-generation", "--model", TINY_LLAMA, "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert "# from the model (tool calls): --enable-auto-tool-choice --tool-call-parser llama3_json" in planned.stdout


def expect_text(locator, text):
    from playwright.sync_api import expect
    expect(locator).to_contain_text(text, timeout=15_000)


def test_the_playground_compares_two_texts(kinds):
    from tests.support.browser import open_browser
    from tests.ui.conftest import sign_in

    portal = kinds.portal
    first, second = "The quick brown fox jumps.", "Pilotfish runs models on the cluster."
    vectors = [item.embedding for item in kinds.api().embeddings.create(model=EMBEDDING, input=[first, second]).data]
    with open_browser() as browser:
        page = browser.new_page()
        sign_in(page, portal)
        page.goto(f"{portal.url}/ui/services/{kinds.services['embedding']['id']}/playground")
        page.get_by_label("First text").fill(first)
        page.get_by_label("Second text").fill(second)
        page.get_by_role("button", name="Compare").click()
        expect_text(page.locator("#similarity"), f"{cosine(*vectors):.4f}")
        assert page.locator("#dimensions").inner_text() == str(staged_config(EMBEDDING)["hidden_size"])
        assert int(page.locator("#embedding-tokens").inner_text()) > 0
        browser.screenshot(page, "playground-embeddings")
        page.get_by_label("Second text").fill(first)
        page.get_by_role("button", name="Compare").click()
        expect_text(page.locator("#similarity"), "1.0000")


def _load(url: str, session: requests.Session, seconds: float, counts: list, errors: list) -> None:
    deadline = time.monotonic() + seconds
    index = 0
    while time.monotonic() < deadline:
        response = session.post(url, json={"model": EMBEDDING, "input": f"sentence number {index} of the load"},
                                timeout=120)
        index += 1
        if response.status_code == 200 and len(response.json()["data"][0]["embedding"]) == 192:
            counts.append(1)
        else:
            errors.append(response.status_code)


def embeddings_per_second(url: str, make_session, clients: int = 32, seconds: float = 10.0) -> tuple:
    """(answers, seconds taken, errors) of `clients` threads asking one embedding after another for `seconds`."""
    counts, errors = [], []
    sessions = [make_session() for _ in range(clients)]
    threads = [threading.Thread(target=_load, args=(url, session, seconds, counts, errors)) for session in sessions]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(counts), time.monotonic() - started, errors


def test_embeddings_per_second_through_the_gateway_and_direct(kinds):
    """32 concurrent clients, each one request after another, through the gateway and straight to the service's
    port, interleaved over rounds (the CPU is shared with everything else): medians, and their ratio."""
    base, direct = kinds.direct("embedding")

    def gateway_session():
        session = requests.Session()
        session.trust_env = False
        session.headers["Authorization"] = f"Bearer {kinds.portal.token}"
        return session

    def direct_session():
        session = requests.Session()
        session.trust_env, session.verify = False, False
        session.headers.update(direct.headers)
        return session

    def portal_cpu_seconds() -> float:  # the portal's process tree (gunicorn master and workers)
        root = psutil.Process(kinds.portal.proc.pid)
        return sum(sum(p.cpu_times()[:4]) for p in [root, *root.children(recursive=True)])

    rates, portal_ms = {"gateway": [], "direct": []}, []
    for _round in range(3):
        for name, url, make in (("direct", base + "/v1/embeddings", direct_session),
                                ("gateway", kinds.portal.url + "/v1/embeddings", gateway_session)):
            cpu = portal_cpu_seconds()
            count, seconds, errors = embeddings_per_second(url, make)
            assert not errors and count, f"{name}: {errors[:10]}"
            rates[name].append(round(count / seconds, 1))
            if name == "gateway":  # the portal's CPU time per relayed request
                portal_ms.append(round(1000 * (portal_cpu_seconds() - cpu) / count, 3))
    figures = {name: {"rounds": values, "median": statistics.median(values)} for name, values in rates.items()}
    figures["ratio_gateway_to_direct"] = round(figures["gateway"]["median"] / figures["direct"]["median"], 3)
    figures["portal_cpu_ms_per_request"] = {"rounds": portal_ms, "median": statistics.median(portal_ms)}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "e2e-embeddings-throughput.json").write_text(json.dumps(figures, indent=2))
    print("embeddings per second:", json.dumps(figures))
