"""/metrics after real traffic through a real portal (gunicorn, two workers) to an OpenAI-shaped stand-in service:
counters move by exactly the traffic sent, token usage equals what the service reported, streams get their usage
without the caller seeing an event it did not ask for, and the proxy's bookkeeping costs microseconds."""
import json
import os
import subprocess
import sys

import psutil
import pytest
import requests

from portal.client import connect
from tests.conftest import REPO, wait_for
from tests.support.prometheus_scrape import delta, scrape

UPSTREAM = f"{sys.executable} {REPO / 'tests' / 'support' / 'openai_upstream.py'}"
MODEL = "test/tiny"
PROMPT_TOKENS = 5  # what the stand-in reports for every request


@pytest.fixture(scope="module")
def portal(start_module_portal):
    return start_module_portal("local", workers=2, runtimes={
        "text-generation": {"command": UPSTREAM + " --token-delay 0.01"},
        "speech-recognition": {"command": UPSTREAM},
    }, proxy_read_timeout=2)


@pytest.fixture(scope="module")
def service(portal):
    launched = portal.launch(model=MODEL).json()
    return portal.wait_state(launched["id"], "RUNNING", timeout=30)


def sse_events(response) -> list:
    """The data lines of an event stream, as the caller receives them."""
    return [line[len(b"data: "):] for line in response.iter_lines() if line.startswith(b"data: ")]


def chat(portal, path, max_tokens, stream=False, **extra):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "stream": stream, **extra}
    return portal.request("POST", path, json=body, stream=stream)


def test_metrics_needs_a_credential_and_is_prometheus_text(portal, service):
    assert requests.get(portal.url + "/metrics", timeout=10).status_code == 401
    scraped = scrape(portal)
    # Labelled families show once they have a sample (the 401 above is one); the proxy's come with traffic.
    for family in ("pilotfish_requests", "pilotfish_services", "pilotfish_reconcile_cycle_seconds",
                   "pilotfish_scheduler_calls", "pilotfish_scheduler_failures"):
        assert family in scraped.families, sorted(scraped.families)
    assert scraped.value("pilotfish_requests_total", route="metrics", status="401") >= 1


def test_counters_move_by_exactly_the_traffic_sent(portal, service):
    gateway, direct = "/v1/chat/completions", f"/services/{service['id']}/v1/completions"
    before = scrape(portal)
    for i in range(7):
        response = chat(portal, gateway, max_tokens=i + 1)
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == i + 1
    for _ in range(3):
        response = portal.request("POST", direct, json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert response.status_code == 200
    assert portal.request("GET", "/v1/models").status_code == 200
    after = scrape(portal)

    # Seven gateway calls plus the model list, three per-service calls; the first scrape shows in the second.
    assert delta(before, after, "pilotfish_requests_total", route="gateway", status="200") == 8
    assert delta(before, after, "pilotfish_requests_total", route="service", status="200") == 3
    assert delta(before, after, "pilotfish_requests_total", route="metrics", status="200") == 1
    assert delta(before, after, "pilotfish_prompt_tokens_total", model=MODEL) == 10 * PROMPT_TOKENS
    assert delta(before, after, "pilotfish_completion_tokens_total", model=MODEL) == sum(range(1, 8)) + 3 * 2
    sid = service["id"]
    assert delta(before, after, "pilotfish_proxy_request_seconds_count", service=sid, model=MODEL) == 10
    assert delta(before, after, "pilotfish_proxy_time_to_first_byte_seconds_count", service=sid) == 10
    # Latency covers at least the time to first byte, and every request fits the largest bucket.
    assert delta(before, after, "pilotfish_proxy_request_seconds_sum", service=sid) >= \
        delta(before, after, "pilotfish_proxy_time_to_first_byte_seconds_sum", service=sid)
    assert delta(before, after, "pilotfish_proxy_request_seconds_bucket", service=sid, le="600.0") == 10


def test_stream_usage_is_requested_for_the_count_and_kept_from_callers_who_did_not_ask(portal, service):
    before = scrape(portal)
    # The caller did not ask for usage: the portal asks, counts it, and the caller never sees that event.
    unasked = chat(portal, "/v1/chat/completions", max_tokens=4, stream=True)
    events = sse_events(unasked)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert [chunk["choices"][0]["delta"]["content"] for chunk in chunks] == [f"tok{i} " for i in range(4)]
    assert not any("usage" in chunk for chunk in chunks)
    # The caller asked: it gets the usage event, counted once.
    asked = chat(portal, f"/services/{service['id']}/v1/chat/completions", max_tokens=3, stream=True,
                 stream_options={"include_usage": True})
    events = sse_events(asked)
    usage_events = [json.loads(event) for event in events[:-1] if b'"usage"' in event]
    assert [event["usage"]["completion_tokens"] for event in usage_events] == [3]
    # The official client, streaming through the gateway without asking: no usage chunk reaches it.
    client = connect(home=str(portal.home)).openai(max_retries=0)
    stream = client.completions.create(model=MODEL, prompt="hi", max_tokens=5, stream=True)
    received = list(stream)
    assert "".join(chunk.choices[0].text for chunk in received) == "tok0 tok1 tok2 tok3 tok4 "
    assert all(chunk.usage is None for chunk in received)
    after = scrape(portal)
    assert delta(before, after, "pilotfish_completion_tokens_total", model=MODEL) == 4 + 3 + 5
    assert delta(before, after, "pilotfish_prompt_tokens_total", model=MODEL) == 3 * PROMPT_TOKENS
    assert after.value("pilotfish_proxy_streams_in_flight", service=service["id"]) == 0


def test_streams_in_flight_while_a_stream_is_open(portal, service):
    response = chat(portal, "/v1/chat/completions", max_tokens=300, stream=True)
    lines = response.iter_lines()
    assert next(lines).startswith(b"data: ")
    during = scrape(portal)
    assert during.value("pilotfish_proxy_streams_in_flight", service=service["id"], model=MODEL) == 1
    response.close()
    wait_for(lambda: scrape(portal).value("pilotfish_proxy_streams_in_flight", service=service["id"]) == 0,
             timeout=10, what="the stream to be counted out")


def test_upstream_errors_by_kind(portal, service):
    before = scrape(portal)
    assert portal.request("GET", f"/services/{service['id']}/status/503").status_code == 503
    assert portal.request("GET", f"/services/{service['id']}/slow?seconds=3").status_code == 504
    # A stream the service cuts short reaches the caller cut short (no clean end it could take for a whole answer).
    cut = portal.request("GET", f"/services/{service['id']}/cut?events=3", stream=True)
    events = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for line in cut.iter_lines():
            if line:
                events.append(line)
    assert events == [b'data: {"n": 0}', b'data: {"n": 1}', b'data: {"n": 2}']
    after = scrape(portal)
    sid = service["id"]
    assert delta(before, after, "pilotfish_proxy_upstream_errors_total", service=sid, kind="interrupted") == 1
    assert delta(before, after, "pilotfish_proxy_upstream_errors_total", service=sid, kind="http_5xx") == 1
    assert delta(before, after, "pilotfish_proxy_upstream_errors_total", service=sid, kind="timeout") == 1
    assert delta(before, after, "pilotfish_requests_total", route="service", status="503") == 1
    assert delta(before, after, "pilotfish_requests_total", route="service", status="504") == 1


def test_engine_metrics_pass_through_the_service_url(portal, service):
    first = scrape(portal, f"/services/{service['id']}/metrics")
    assert first.value("vllm:num_requests_running", model_name=MODEL) == 0
    second = scrape(portal, f"/services/{service['id']}/metrics")
    assert second.value("upstream_requests_total") > first.value("upstream_requests_total") > 0
    assert requests.get(f"{portal.url}/services/{service['id']}/metrics", timeout=10).status_code == 401


def test_the_metrics_folder_stays_the_portals(portal, service):
    """Workers share a metrics folder through PROMETHEUS_MULTIPROC_DIR; a service's job must not inherit it (vLLM
    uses prometheus-client too, and would write its own metrics there)."""
    workers = {worker.pid for worker in psutil.Process(portal.proc.pid).children()}
    writers = {int(path.stem.rsplit("_", 1)[1]) for path in (portal.home / "metrics").glob("*.db")}
    assert len(workers) == 2 and writers == workers  # both workers write there, and nothing else
    job = json.loads((portal.home / "jobs" / service["id"] / "local_job.json").read_text())
    job_processes = [psutil.Process(job["pid"])] + psutil.Process(job["pid"]).children(recursive=True)
    assert len(job_processes) >= 2  # the job script and the server
    assert not any("PROMETHEUS_MULTIPROC_DIR" in process.environ() for process in job_processes)


def test_reconciler_metrics(portal, service):
    before = scrape(portal)
    assert before.value("pilotfish_services", state="RUNNING") == 1
    assert before.value("pilotfish_services", state="FAILED") == 0
    cycles = before.value("pilotfish_reconcile_cycle_seconds_count")
    assert cycles > 0
    assert before.value("pilotfish_scheduler_calls_total") > 0  # the local scheduler's queries
    wait_for(lambda: scrape(portal).value("pilotfish_reconcile_cycle_seconds_count") > cycles, timeout=15,
             what="another reconcile cycle")


# --- what the bookkeeping costs ----------------------------------------------------------------------------

HOOK_COST_SCRIPT = r"""
import json, time
from portal import metrics
from portal.proxy import recording
from portal.proxy.usage import usage_reader

ROUNDS = 1000
answer = json.dumps({"id": "x", "choices": [{"message": {"content": "tok " * 50}}],
                     "usage": {"prompt_tokens": 12, "completion_tokens": 50, "total_tokens": 62}}).encode()
events = [b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"tok%d "},"finish_reason":null}]}\n\n' % i
          for i in range(20)]
usage_event = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":20}}\n\n'
done = b"data: [DONE]\n\n"
plain_body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
stream_body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
json_headers = ("application/json", False, "", str(len(answer)))  # content type, event stream?, encoding, length
sse_headers = ("text/event-stream", True, "", None)

def relay(body, headers, chunks):  # the hooks of portal/proxy/relay.py's Relay.forward, in its order
    record = recording.start("abc123", "m")
    usage = usage_reader("POST", "/v1/chat/completions", record.count_tokens)
    body = usage.ask(body)
    record.answered("proxy.gateway", 200, headers[1])
    if not usage.expect(200, *headers):
        usage = None
    first = True
    for chunk in chunks:
        if first:
            first = False
            record.first_byte()
        if usage is not None:
            chunk = usage.pass_on(chunk)
    if usage is not None:
        usage.remainder()
        usage.finish()
    record.finish()

def plain():
    relay(plain_body, json_headers, [answer])

def streamed():
    relay(stream_body, sse_headers, events + [usage_event, done])

def parse_stream(chunks):  # the reference: decoding every event of the stream once, as the proxy does not
    for chunk in chunks:
        if chunk.startswith(b"data: {"):
            json.loads(chunk[6:])

stream_chunks = events + [usage_event, done]
timed = {"plain_us": (plain,), "stream_us": (streamed,), "parse_stream_us": (parse_stream, stream_chunks)}
best = {}
for _ in range(5):  # interleaved, so a busy moment of the machine weighs on the hooks and the reference alike
    for name, (function, *args) in timed.items():
        function(*args)
        started = time.perf_counter()
        for _ in range(ROUNDS):
            function(*args)
        elapsed = (time.perf_counter() - started) / ROUNDS * 1e6
        best[name] = min(best.get(name, elapsed), elapsed)
print(json.dumps(dict(best, multiprocess=metrics.os.environ.get(metrics.MULTIPROCESS_ENV) is not None)))
"""


def test_proxy_bookkeeping_costs_microseconds(tmp_path):
    """The hooks a proxied request runs, timed as the portal's workers run them (multiprocess mode)."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(folder))
    out = subprocess.run([sys.executable, "-c", HOOK_COST_SCRIPT], env=env, cwd=str(REPO), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    costs = json.loads(out.stdout)
    print(f"proxy bookkeeping per request: JSON answer {costs['plain_us']:.1f} us, "
          f"stream of 20 events + usage {costs['stream_us']:.1f} us; "
          f"json.loads of that stream's events: {costs['parse_stream_us']:.1f} us")
    assert costs["multiprocess"]
    # Against a reference timed in the same process, so the bounds hold on a slower or faster machine: measured
    # on the shared 2-core machine, the JSON answer's hooks cost ~0.25 and the stream's ~0.65 of decoding the
    # stream's events once (10 and 26 us against 40 us). The bounds allow 2.5 times that for other CPUs and
    # Python builds; hooks 5 times costlier fail. The proxy itself adds about 0.3 ms per request.
    assert costs["plain_us"] < 0.6 * costs["parse_stream_us"]
    assert costs["stream_us"] < 1.6 * costs["parse_stream_us"]
