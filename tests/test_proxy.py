"""The proxy and the /v1 gateway through a real portal (gunicorn), with the official openai client.

An OpenAI-shaped test server (tests/support/openai_upstream.py) runs as the services, launched by the portal
with the local scheduler; the end-to-end tests repeat this against real vLLM and Whisper.
"""
import concurrent.futures
import hashlib
import json
import os
import signal
import sqlite3
import stat
import sys
import time

import openai
import psutil
import pytest
import requests

from portal.client import PortalNotRunning, connect
from portal.proxy.directory import START_WAIT_FIRST
from tests.conftest import REPO, wait_for

UPSTREAM = f"{sys.executable} {REPO / 'tests' / 'support' / 'openai_upstream.py'}"
MODEL = "test/tiny"
AUDIO_MODEL = "test/whisper"


@pytest.fixture(scope="module")
def portal(start_module_portal):
    portal = start_module_portal("local", runtimes={
        "text-generation": {"command": UPSTREAM + " --token-delay 0.2"},
        "speech-recognition": {"command": UPSTREAM},
    }, proxy_read_timeout=5, max_upload_mb=200)  # the large upload test sends 120 MB
    return portal


@pytest.fixture(scope="module")
def chat_service(portal):
    service = portal.launch(model=MODEL).json()
    return portal.wait_state(service["id"], "RUNNING", timeout=30)


@pytest.fixture(scope="module")
def audio_service(portal):
    service = portal.launch(kind="speech-recognition", model=AUDIO_MODEL).json()
    return portal.wait_state(service["id"], "RUNNING", timeout=30)


@pytest.fixture(scope="module")
def client(portal, chat_service, audio_service):
    return connect(home=str(portal.home)).openai(max_retries=0)


def test_connection_file_is_private_and_points_at_the_portal(portal):
    path = portal.home / "connection.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    data = json.loads(path.read_text())
    assert data["token"] == portal.token
    assert data["url"].endswith(f":{portal.port}")


def test_models_lists_running_services(client):
    ids = {model.id for model in client.models.list()}
    assert ids == {MODEL, AUDIO_MODEL}


def test_chat_completion_and_embeddings_through_the_gateway(client, chat_service):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.choices[0].message.content == "tok0 tok1 tok2 "
    assert reply.usage.completion_tokens == 3
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                           max_tokens=1)
    assert raw.headers["x-pilotfish-service"] == chat_service["id"]
    assert raw.headers["x-pilotfish-model-revision"] == chat_service["revision"]
    text = client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert text.choices[0].text == "tok0 tok1 "
    embedding = client.embeddings.create(model=MODEL, input="hi")
    assert embedding.data[0].embedding == [0.1, 0.2, 0.3]


def test_streaming_chunks_arrive_while_the_upstream_is_still_sending(client):
    started = time.time()
    arrivals = []
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=6, stream=True)
    for chunk in stream:
        arrivals.append((time.time(), chunk))
    contents = [chunk.choices[0].delta.content for _, chunk in arrivals if chunk.choices]
    assert contents == [f"tok{i} " for i in range(6)]
    # The upstream pauses 0.2 s between tokens: the first arrives long before the last is sent.
    first, last = arrivals[0][0] - started, arrivals[-1][0] - started
    assert last - first >= 0.9, (first, last)
    # Each token reaches the client before the upstream sends the next one (0.2 s later, however fast the machine):
    # nothing is held back for the tokens after it.
    tokens = [(arrived, chunk.model_extra["sent_at"]) for arrived, chunk in arrivals if chunk.choices]
    assert all(arrived < next_sent for (arrived, _), (_, next_sent) in zip(tokens, tokens[1:])), \
        [(round(arrived - sent, 3), round(next_sent - sent, 3)) for (arrived, sent), (_, next_sent) in
         zip(tokens, tokens[1:])]


def test_per_service_base_url(portal, chat_service):
    service_client = connect(home=str(portal.home)).service(chat_service["id"][:5]).openai(max_retries=0)
    assert [model.id for model in service_client.models.list()] == [MODEL]
    reply = service_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                   max_tokens=1)
    assert reply.choices[0].message.content == "tok0 "
    by_model = connect(home=str(portal.home)).service(MODEL)
    assert by_model.id == chat_service["id"]


def test_large_audio_upload_streams_through_without_filling_memory(portal, client, tmp_path):
    audio = tmp_path / "speech.wav"
    size = 120 * 1024 * 1024
    block = os.urandom(1024 * 1024)
    digest = hashlib.sha256()
    with open(audio, "wb") as handle:
        for _ in range(size // len(block)):
            handle.write(block)
            digest.update(block)
    workers = [child for child in psutil.Process(portal.proc.pid).children()]
    before = sum(worker.memory_info().rss for worker in workers)
    with open(audio, "rb") as handle:
        result = client.audio.transcriptions.create(model=AUDIO_MODEL, file=handle)
    after = sum(worker.memory_info().rss for worker in workers)
    assert result.text == f"received {size} bytes"
    assert result.model_extra["sha256"] == digest.hexdigest()
    assert after - before < 40 * 1024 * 1024, f"workers grew by {(after - before) >> 20} MB"


def test_a_slow_reader_holds_the_service_back_instead_of_filling_memory(portal, chat_service):
    workers = [child for child in psutil.Process(portal.proc.pid).children()]
    before = sum(worker.memory_info().rss for worker in workers)
    size = 200 << 20
    response = portal.request("GET", f"/services/{chat_service['id']}/big?mb={size >> 20}", stream=True)
    digest = hashlib.sha256(response.raw.read(1 << 20))
    time.sleep(3)  # the service could send all of it meanwhile; the proxy must pause it instead of holding it
    during = sum(worker.memory_info().rss for worker in workers)
    received = 1 << 20
    for data in response.iter_content(1 << 20):
        digest.update(data)
        received += len(data)
    block = bytes(range(256)) * 256
    expected = hashlib.sha256()
    for _ in range(size // len(block)):
        expected.update(block)
    assert received == size and digest.hexdigest() == expected.hexdigest()
    assert during - before < 40 * 1024 * 1024, f"workers grew by {(during - before) >> 20} MB"


def test_an_answer_before_the_whole_upload_reaches_the_caller_at_once(portal, chat_service):
    """A service that answers (413) without reading a large upload, and keeps the connection open: the caller gets
    that answer while the service still holds the connection, instead of the proxy waiting to send the rest."""
    started = time.monotonic()
    refused = portal.request("POST", f"/services/{chat_service['id']}/refuse?hold=20", data=b"x" * (64 << 20),
                             headers={"Content-Type": "application/octet-stream"}, timeout=60)
    assert refused.status_code == 413 and refused.json()["error"]["message"] == "too large for this service"
    assert time.monotonic() - started < 15  # the service holds the connection for 20 s
    again = portal.request("GET", f"/services/{chat_service['id']}/v1/models")
    assert again.status_code == 200


def test_upstream_errors_pass_through_unchanged(client, portal, chat_service):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=-1)
    assert err.value.status_code == 400
    assert "max_tokens must be at least 1" in err.value.message
    teapot = portal.request("GET", f"/services/{chat_service['id']}/status/418")
    assert teapot.status_code == 418
    assert teapot.json() == {"error": {"message": "status 418 on purpose", "code": 418}}


def test_without_the_token_is_401(portal):
    stranger = openai.OpenAI(base_url=portal.url + "/v1", api_key="not-the-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    assert requests.get(portal.url + "/v1/models", timeout=10).status_code == 401


def test_refusals_on_v1_come_in_the_openai_error_shape(portal, chat_service):
    """A wrong or missing credential on /v1/... is answered as OpenAI answers it, so OpenAI clients show the
    portal's words; the portal's own paths and the per-service paths keep {"error": "<message>"}."""
    wrong = {"message": "invalid token or API key", "type": "authentication_error", "param": None,
             "code": "invalid_api_key"}
    stranger = openai.OpenAI(base_url=portal.url + "/v1", api_key="not-the-token", max_retries=0)
    calls = {"/v1/chat/completions": lambda: stranger.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1),
        "/v1/models": lambda: stranger.models.list()}
    for path, call in calls.items():
        with pytest.raises(openai.AuthenticationError) as err:
            call()
        assert err.value.status_code == 401, path
        assert err.value.message == "Error code: 401 - invalid token or API key", path
        assert err.value.body == wrong, path
        assert err.value.code == "invalid_api_key" and err.value.type == "authentication_error", path
        assert err.value.response.headers["WWW-Authenticate"] == 'Bearer realm="pilotfish"'
    prefix = f"/node/127.0.0.1/{portal.port}"
    for path in ("/v1/chat/completions", prefix + "/v1/chat/completions", "/v1/audio/transcriptions"):
        bare = requests.post(portal.url + path, json={"model": MODEL, "messages": []}, timeout=10)
        assert bare.status_code == 401, path
        error = bare.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, path
        assert error["code"] == "missing_api_key" and error["type"] == "authentication_error"
        assert "Authorization: Bearer <token>" in error["message"]
    # A login cookie without its CSRF token: 403, which the openai client raises as PermissionDeniedError.
    browser = requests.Session()
    browser.post(portal.url + prefix + "/login", json={"token": portal.token}, timeout=10)
    refused = browser.post(portal.url + prefix + "/v1/chat/completions", json={"model": MODEL, "messages": []},
                           timeout=10)
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error" and "CSRF" in refused.json()["error"]["message"]
    # Elsewhere the error stays a string.
    for path in ("/api/services", f"/services/{chat_service['id']}/v1/models", "/metrics"):
        other = requests.get(portal.url + path, headers={"Authorization": "Bearer wrong"}, timeout=10)
        assert other.status_code == 401 and other.json() == {"error": "invalid token or API key"}, path


def test_service_is_protected_by_its_own_key(chat_service):
    host, port = chat_service["endpoint"]["host"], chat_service["endpoint"]["port"]
    # The service speaks only TLS (with its own certificate), and wants its key behind that.
    direct = requests.post(f"https://{host}:{port}/v1/chat/completions", json={"model": MODEL, "messages": []},
                           timeout=10, verify=False)
    assert direct.status_code == 401
    with pytest.raises(requests.ConnectionError):
        requests.post(f"http://{host}:{port}/v1/chat/completions", json={"model": MODEL, "messages": []}, timeout=10)


def test_unknown_model_is_404_listing_what_is_there(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="org/nothing", messages=[{"role": "user", "content": "x"}])
    assert f"available: {', '.join(sorted([AUDIO_MODEL, MODEL]))}" in err.value.message
    assert "org/nothing" in err.value.message


def test_starting_model_is_503_with_retry_after(portal, client):
    slow = portal.launch(model="test/slow", engine_args=["--delay", "30"]).json()
    portal.wait_state(slow["id"], ("STARTING", "PENDING", "SUBMITTED"), timeout=10)
    response = portal.request("POST", "/v1/chat/completions", json={"model": "test/slow", "messages": []})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == str(START_WAIT_FIRST)  # its first start: nothing measured yet
    assert response.json()["error"]["code"] == "model_not_ready"
    direct = portal.request("GET", f"/services/{slow['id']}/v1/models")
    assert direct.status_code == 503 and direct.json()["error"]["state"] in ("STARTING", "PENDING", "SUBMITTED")
    portal.request("POST", f"/api/services/{slow['id']}/stop")
    portal.wait_state(slow["id"], "STOPPED", timeout=30)
    ended = portal.request("GET", f"/services/{slow['id']}/v1/models")
    assert ended.status_code == 503 and ended.json()["error"]["state"] == "STOPPED"
    assert "Retry-After" not in ended.headers
    missing = portal.request("GET", "/services/0123456789ab/v1/models")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "service_not_found"


def test_request_is_forwarded_faithfully(portal, chat_service):
    body = os.urandom(300_000)
    response = portal.request("PUT", f"/services/{chat_service['id']}/echo?a=1&b=two", data=body,
                              headers={"Cookie": "pilotfish_session=abc", "X-Custom": "kept",
                                       "Connection": "keep-alive, X-Custom-Hop", "X-Custom-Hop": "dropped",
                                       "Content-Type": "audio/wav"})
    seen = response.json()
    assert seen["method"] == "PUT" and seen["query"] == "a=1&b=two"
    assert seen["length"] == len(body) and seen["sha256"] == hashlib.sha256(body).hexdigest()
    headers = {key.lower(): value for key, value in seen["headers"].items()}
    assert headers["authorization"] != f"Bearer {portal.token}" and headers["authorization"].startswith("Bearer ")
    assert "cookie" not in headers and headers["x-custom"] == "kept" and headers["content-type"] == "audio/wav"
    assert "x-custom-hop" not in headers  # named in Connection: a hop-by-hop header of this request
    assert len(response.raw.headers.getlist("Date")) == 1  # the portal's, not the service's as well
    # What answered: the service and its model's revision, named by the portal (the service's own claim dropped).
    assert response.raw.headers.getlist("X-Pilotfish-Service") == [chat_service["id"]]
    assert chat_service["revision"] and response.headers["X-Pilotfish-Model-Revision"] == chat_service["revision"]
    encoded = portal.request("GET", f"/services/{chat_service['id']}/echo?x=a%20b&y=%2F%3F").json()
    assert encoded["query"] == "x=a%20b&y=%2F%3F"  # as sent, not decoded and encoded again
    # A chunked upload (no Content-Length) streams through too.
    chunked = portal.request("POST", f"/services/{chat_service['id']}/echo", data=iter([b"ab", b"cd" * 5000]))
    assert chunked.json()["length"] == 10002
    # HEAD: the status and headers, no body, and the caller's connection stays usable.
    with requests.Session() as http:
        auth = {"Authorization": f"Bearer {portal.token}"}
        head = http.head(f"{portal.url}/services/{chat_service['id']}/v1/models", headers=auth, timeout=10)
        assert head.status_code == 200 and head.content == b"" and int(head.headers["Content-Length"]) > 10
        assert http.get(f"{portal.url}/services/{chat_service['id']}/v1/models", headers=auth,
                        timeout=10).json()["data"]


def test_a_kept_alive_connection_the_service_dropped_is_retried_on_a_new_one(portal, chat_service):
    """A service may close an idle keep-alive connection just as the next request goes out on it (uvicorn closes
    them after 5 s): a request whose body can be sent again is, on a new connection."""
    stats = f"/services/{chat_service['id']}/stats"
    before = portal.request("GET", stats).json()["dropped"]
    with requests.Session() as http:  # one connection to the portal: one worker, whose pool the requests share
        auth = {"Authorization": f"Bearer {portal.token}"}
        for _ in range(4):
            answer = http.post(f"{portal.url}/services/{chat_service['id']}/once", json={"n": 1}, headers=auth,
                               timeout=10)
            assert answer.status_code == 200 and answer.json() == {"once": True}
    assert portal.request("GET", stats).json()["dropped"] >= before + 3


def test_the_retry_after_a_dropped_kept_alive_connection_goes_on_a_new_one_not_another_idle_one(portal,
                                                                                                chat_service):
    """After a busy spell a worker holds several idle connections the service may all have closed: the request that
    met one closed is sent again on a new connection, not on the next idle one (which could be closed too)."""
    once = f"/services/{chat_service['id']}/once?seconds=1"
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # three connections at once, each dropped on its next use
        answers = list(pool.map(lambda _: portal.request("POST", once, json={}, timeout=10), range(3)))
    assert [answer.status_code for answer in answers] == [200] * 3
    answer = portal.request("POST", f"/services/{chat_service['id']}/echo", data=b"again", timeout=10)
    assert answer.status_code == 200 and answer.json()["length"] == 5, answer.text


def test_read_timeout_is_504_naming_the_service(portal, chat_service):
    response = portal.request("GET", f"/services/{chat_service['id']}/slow?seconds=7")
    assert response.status_code == 504
    assert chat_service["id"] in response.json()["error"]["message"]


def test_a_stream_is_cut_only_after_read_timeout_seconds_without_a_byte(portal, chat_service):
    """proxy_read_timeout (5 s here) bounds the silence between a stream's parts, not its length: a stream with
    pauses of 3 s lasting 9 s arrives whole; one silent for 8 s after its second event is cut about 5 s into the
    silence, with what came before it delivered."""
    started = time.monotonic()
    whole = portal.request("GET", f"/services/{chat_service['id']}/pauses?gaps=3,3,3", timeout=30)
    assert whole.status_code == 200 and whole.text.count("data: ") == 4
    assert time.monotonic() - started > 8.5
    response = portal.request("GET", f"/services/{chat_service['id']}/pauses?gaps=0.2,8", stream=True, timeout=30)
    events, last, cut = [], None, None
    try:
        for line in response.iter_lines():
            if line:
                events.append(line)
                last = time.monotonic()
    except requests.exceptions.ChunkedEncodingError:
        cut = time.monotonic()
    assert events == [b'data: {"n": 0}', b'data: {"n": 1}'] and cut is not None, (events, cut)
    assert 4.5 < cut - last < 7.5, f"cut {cut - last:.1f} s into the silence"


def test_client_disconnect_closes_the_upstream(portal, chat_service):
    stats_url = f"/services/{chat_service['id']}/stats"
    before = portal.request("GET", stats_url).json()["disconnects"]
    response = portal.request("POST", f"/services/{chat_service['id']}/v1/chat/completions", stream=True,
                              json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                    "max_tokens": 100, "stream": True})
    lines = response.iter_lines()
    assert next(lines).startswith(b"data: ")
    response.close()
    wait_for(lambda: portal.request("GET", stats_url).json()["disconnects"] == before + 1, timeout=10,
             what="the upstream to see the disconnect")


def test_last_activity_is_recorded(portal, chat_service, client):
    client.models.list()
    service = wait_for(lambda: (lambda s: s if s["last_activity"] else None)(portal.service(chat_service["id"])),
                       timeout=15, what="last_activity")
    assert service["last_activity"]


def test_browser_login_cookie_and_csrf(portal):
    prefix = f"/node/127.0.0.1/{portal.port}"
    browser = requests.Session()
    assert browser.get(portal.url + prefix + "/api/services", timeout=10).status_code == 401
    wrong = browser.post(portal.url + prefix + "/login", data={"token": "nope"}, timeout=10, allow_redirects=False)
    assert wrong.status_code == 401
    login = browser.post(portal.url + prefix + "/login", data={"token": portal.token}, timeout=10,
                         allow_redirects=False)
    assert login.status_code == 303 and login.headers["Location"].split("#")[0] == prefix + "/"  # #pf-csrf=...
    cookie = login.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and f"Path={prefix}/" in cookie and portal.token not in cookie
    index = browser.get(portal.url + prefix + "/", timeout=10).json()
    assert index["links"]["openai_base_url"] == prefix + "/v1"
    # State-changing calls with the cookie need the CSRF token.
    created = browser.post(portal.url + prefix + "/api/keys", json={"name": "csrf-test"}, timeout=10)
    assert created.status_code == 403 and "CSRF" in created.json()["error"]
    token = browser.post(portal.url + prefix + "/login", json={"token": portal.token}, timeout=10).json()["csrf_token"]
    created = browser.post(portal.url + prefix + "/api/keys", json={"name": "csrf-test"}, timeout=10,
                           headers={"X-CSRF-Token": token})
    assert created.status_code == 201
    browser.delete(portal.url + prefix + f"/api/keys/{created.json()['id']}", headers={"X-CSRF-Token": token})
    browser.post(portal.url + prefix + "/logout", headers={"X-CSRF-Token": token}, timeout=10)
    assert browser.get(portal.url + prefix + "/api/services", timeout=10).status_code == 401
    # Off-site redirects are refused.
    evil = requests.post(portal.url + "/login", data={"token": portal.token, "next": "https://evil.example/"},
                         timeout=10, allow_redirects=False)
    assert evil.headers["Location"].split("#")[0] == "/"


def test_proxied_paths_refuse_every_bad_credential(portal, chat_service):
    """The proxy's paths are served outside Flask's routes (tests/test_api.py walks those): the same walk here,
    bare and under the OOD prefix, every method, every kind of wrong credential."""
    service_id = chat_service["id"]
    paths = [f"/services/{service_id}", f"/services/{service_id}/", f"/services/{service_id}/v1/chat/completions",
             f"/services/{service_id}/echo", "/services/0123456789ab/v1/models", "/v1/chat/completions",
             "/v1/audio/transcriptions", "/v1/models", "/v1/models/test/tiny"]
    bad = ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic Zm9vOmJhcg=="},
           {"Authorization": "Bearer pf_notakey"}, {"Cookie": "pilotfish_session=forged"},
           {"Authorization": "Bearer", "Cookie": "pilotfish_session="})
    before = portal.request("GET", f"/services/{service_id}/stats").json()["api_requests"]
    checked = 0
    with requests.Session() as http:
        for path in paths:
            for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"):
                for prefix in ("", f"/node/127.0.0.1/{portal.port}"):
                    for headers in bad:
                        response = http.request(method, portal.url + prefix + path, headers=headers,
                                                json={"model": MODEL}, timeout=10)
                        assert response.status_code == 401, (method, prefix + path, headers, response.text[:200])
                        if method != "HEAD":
                            assert "error" in response.json()
                        checked += 1
    assert checked == len(paths) * 7 * 2 * len(bad)
    # None of them reached the service.
    assert portal.request("GET", f"/services/{service_id}/stats").json()["api_requests"] == before + 1


def test_proxied_paths_with_the_login_cookie_need_the_csrf_token(portal, chat_service):
    prefix = f"/node/127.0.0.1/{portal.port}"
    browser = requests.Session()
    csrf = browser.post(portal.url + prefix + "/login", json={"token": portal.token}, timeout=10).json()["csrf_token"]
    url = f"{portal.url}{prefix}/services/{chat_service['id']}/v1/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert browser.get(f"{portal.url}{prefix}/services/{chat_service['id']}/v1/models", timeout=10).status_code == 200
    refused = browser.post(url, json=body, timeout=10)
    assert refused.status_code == 403 and "CSRF" in refused.json()["error"]
    wrong = browser.post(url, json=body, headers={"X-CSRF-Token": "not-it"}, timeout=10)
    assert wrong.status_code == 403
    answered = browser.post(url, json=body, headers={"X-CSRF-Token": csrf}, timeout=10)
    assert answered.status_code == 200 and answered.json()["choices"]
    gateway = browser.post(f"{portal.url}{prefix}/v1/chat/completions", json=body, headers={"X-CSRF-Token": csrf},
                           timeout=10)
    assert gateway.status_code == 200
    # The cookie of another path (bare) is not sent by a browser, but a forged or stale one is refused all the same.
    browser.post(portal.url + prefix + "/logout", headers={"X-CSRF-Token": csrf}, timeout=10)
    assert browser.post(url, json=body, headers={"X-CSRF-Token": csrf}, timeout=10).status_code == 401


def test_api_keys_create_use_revoke(portal):
    created = portal.request("POST", "/api/keys", json={"name": "laptop"})
    assert created.status_code == 201
    key = created.json()["key"]
    assert key.startswith("pf_")
    listed = portal.request("GET", "/api/keys").json()["keys"]
    assert [k["name"] for k in listed] == ["laptop"] and key not in json.dumps(listed)
    with_key = {"Authorization": f"Bearer {key}"}
    assert requests.get(portal.url + "/v1/models", headers=with_key, timeout=10).status_code == 200
    refused = requests.post(portal.url + "/api/keys", headers=with_key, json={"name": "x"}, timeout=10)
    assert refused.status_code == 403
    duplicate = portal.request("POST", "/api/keys", json={"name": "laptop"})
    assert duplicate.status_code == 400 and duplicate.json()["field"] == "name"
    assert portal.request("DELETE", f"/api/keys/{created.json()['id']}").status_code == 200
    wait_for(lambda: requests.get(portal.url + "/v1/models", headers=with_key, timeout=10).status_code == 401,
             timeout=10, what="the revoked key to be refused")


def test_no_secret_reaches_the_log(portal, chat_service):
    log = portal.log_text()
    assert portal.token not in log
    assert chat_service["id"] in log or "/v1/" in log  # the access log is there
    service_key = portal.request("GET", f"/services/{chat_service['id']}/echo").json()["headers"]["Authorization"]
    service_key = service_key.split()[1]
    assert service_key not in log
    # Nor on any command line other users could read with ps.
    for process in psutil.process_iter(["cmdline"]):
        assert service_key not in " ".join(process.info["cmdline"] or []) and portal.token not in \
            " ".join(process.info["cmdline"] or [])


def test_stopping_the_portal_ends_open_streams_and_the_service_sees_it(start_portal):
    """On stop, a stream still open gets the graceful period, then the worker cancels it: the caller's answer ends
    cut short and the service sees its caller go (an engine aborts the generation), before gunicorn would kill."""
    portal = start_portal("local", runtimes={"text-generation": {"command": UPSTREAM + " --token-delay 0.2"}})
    service = portal.wait_state(portal.launch(model=MODEL).json()["id"], "RUNNING", timeout=30)
    key = (portal.home / "jobs" / service["id"] / "service.key").read_text().strip()
    stats = f"https://{service['endpoint']['host']}:{service['endpoint']['port']}/stats"
    try:
        stream = portal.request("POST", f"/services/{service['id']}/v1/chat/completions", stream=True,
                                json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                      "max_tokens": 500, "stream": True})  # 100 s of tokens
        lines = stream.iter_lines()
        assert next(lines).startswith(b"data: ")
        started = time.monotonic()
        portal.stop()
        assert time.monotonic() - started < 15
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for line in lines:
                assert line != b"data: [DONE]"
        seen = wait_for(lambda: (lambda s: s if s["disconnects"] else None)(
            requests.get(stats, headers={"Authorization": f"Bearer {key}"}, timeout=10,
                         verify=False).json()), timeout=10)
        assert seen["disconnects"] == 1 and seen["streams_completed"] == 0
        assert "timeout graceful shutdown exceeded" in portal.log_text()  # cancelled by the worker, not killed
    finally:
        for process in psutil.process_iter(["cmdline"]):  # the service outlives its portal: end it here
            if str(service["endpoint"]["port"]) in (process.info["cmdline"] or []):
                process.terminate()


def test_a_quick_stop_ends_the_workers_at_once_and_they_still_write_their_usage(start_portal):
    """Ctrl-C (SIGINT to gunicorn's master) is its quick stop: the workers get SIGQUIT and stop at once, open streams
    cut, rather than being killed by the master at the end of graceful_timeout; each still writes its last usage."""
    portal = start_portal("local", runtimes={"text-generation": {"command": UPSTREAM + " --token-delay 0.2"}},
                          workers=2)
    service = portal.wait_state(portal.launch(model=MODEL).json()["id"], "RUNNING", timeout=30)
    stream = portal.request("POST", f"/services/{service['id']}/v1/chat/completions", stream=True,
                            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 500,
                                  "stream": True})
    assert next(stream.iter_lines()).startswith(b"data: ")
    portal.request("POST", f"/services/{service['id']}/v1/chat/completions",
                   json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3})
    try:
        os.kill(portal.proc.pid, signal.SIGINT)
        assert portal.proc.wait(timeout=60) == 0
        log = portal.log_text()
        assert "was sent SIGKILL" not in log and "timeout graceful shutdown exceeded" not in log, log[-2000:]
        with sqlite3.connect(portal.home / "pilotfish.db") as database:
            requests_counted = database.execute("SELECT SUM(requests) FROM usage").fetchone()[0]
        assert requests_counted == 2  # the stream cut short and the answered request, written as the workers ended
    finally:
        for process in psutil.process_iter(["cmdline"]):  # the service outlives its portal: end it here
            if str(service["endpoint"]["port"]) in (process.info["cmdline"] or []):
                process.terminate()


def test_connect_fails_clearly_when_the_portal_stops(start_portal, tmp_path):
    portal = start_portal("local")
    assert connect(home=str(portal.home)).url.endswith(str(portal.port))
    portal.stop()
    assert not (portal.home / "connection.json").exists()
    with pytest.raises(PortalNotRunning, match="no portal is running"):
        connect(home=str(portal.home))
    with pytest.raises(PortalNotRunning, match="does not answer"):
        connect(url=portal.url, token="x", timeout=2)


def test_every_committed_change_is_seen_even_within_one_clock_tick(tmp_path):
    """The reconciler's change mark differs after each change, however close together (the size grows)."""
    from portal.proxy.directory import ServiceDirectory, routes_changed

    directory = ServiceDirectory(tmp_path)
    assert not directory.changed
    for _ in range(5000):  # past the point where the mark file starts over
        routes_changed(tmp_path)
        assert directory.changed
        directory._seen_change = directory._change_mark()  # what a reload records
        assert not directory.changed


def test_routes_are_never_older_than_the_bound_after_a_quiet_spell(portal):
    """A service that ended while the portal was quiet is not routed to on the directory's old word: the first
    request after the spell waits for a fresh read of the database (here the database says FAILED while the server
    still answers, so only a stale route could reach it)."""
    import sqlite3

    from portal.proxy.directory import DIRECTORY_MAX_AGE

    service = portal.wait_state(portal.launch(model=MODEL).json()["id"], "RUNNING", timeout=30)
    path = f"/services/{service['id']}/v1/models"
    assert portal.request("GET", path).status_code == 200
    database = sqlite3.connect(portal.home / "pilotfish.db")
    try:
        with database:  # no routes.changed mark: as if the end had not been seen by this worker yet
            database.execute("UPDATE services SET state = 'FAILED', reason = 'ended during the quiet spell' "
                             "WHERE id = ?", (service["id"],))
        time.sleep(DIRECTORY_MAX_AGE + 0.5)
        answer = portal.request("GET", path)
        assert answer.status_code == 503, answer.text
        assert "ended during the quiet spell" in answer.json()["error"]["message"]
    finally:
        with database:
            database.execute("UPDATE services SET state = 'RUNNING' WHERE id = ?", (service["id"],))
        database.close()
        portal.request("POST", f"/api/services/{service['id']}/stop")


def test_each_request_is_counted_for_whoever_made_it(portal, chat_service):
    """Two named keys and the owner: /api/usage counts each one's requests, errors and tokens exactly, and the service's
    busy seconds grow (the stand-in answers 5 prompt tokens and one completion token per max_token)."""
    keys = {}
    for name in ("counted-a", "counted-b", "counted-mark"):
        created = portal.request("POST", "/api/keys", json={"name": name})
        assert created.status_code == 201, created.text
        keys[name] = created.json()["key"]

    def usage_of(principal):
        rows = {row["principal"]: row for row in portal.request("GET", "/api/usage").json()["rows"]}
        return rows.get(principal, {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0})

    def api(token):
        return openai.OpenAI(base_url=f"{portal.url}/v1", api_key=token, max_retries=0)

    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    # What earlier tests sent is written before the baselines are read: the portal's one worker writes everything it
    # counted in one go, so once a request made after them is counted, they are too.
    assert portal.workers == 1
    api(keys["counted-mark"]).chat.completions.create(**chat, max_tokens=1)
    wait_for(lambda: usage_of("key:counted-mark")["requests"] == 1, timeout=15, what="the marking request's count")
    owner_before = usage_of("owner")
    busy_before = portal.request("GET", f"/api/services/{chat_service['id']}/cost").json()
    owner = api(portal.token)
    for _ in range(3):
        owner.chat.completions.create(**chat, max_tokens=3)
    for _ in range(2):
        assert len(list(owner.chat.completions.create(**chat, max_tokens=4, stream=True))) >= 4
    assert portal.request("GET", f"/services/{chat_service['id']}/status/500").status_code == 500
    for _ in range(2):
        api(keys["counted-a"]).chat.completions.create(**chat, max_tokens=2)
    api(keys["counted-b"]).completions.create(model=MODEL, prompt="hi", max_tokens=5)

    expected = {"key:counted-a": {"requests": 2, "errors": 0, "prompt_tokens": 10, "completion_tokens": 4},
                "key:counted-b": {"requests": 1, "errors": 0, "prompt_tokens": 5, "completion_tokens": 5},
                "owner": {"requests": 6, "errors": 1, "prompt_tokens": 25, "completion_tokens": 17}}

    def counted():
        found = {principal: {field: usage_of(principal)[field] for field in expected[principal]}
                 for principal in expected}
        found["owner"] = {field: value - owner_before[field] for field, value in found["owner"].items()}
        return found

    wait_for(lambda: counted() == expected, timeout=15, what=f"the usage to be counted: {counted()} != {expected}")
    listed = {key["name"]: key for key in portal.request("GET", "/api/keys").json()["keys"]}
    assert listed["counted-a"]["last_used_at"] and listed["counted-b"]["last_used_at"]
    cost = portal.request("GET", f"/api/services/{chat_service['id']}/cost").json()
    assert cost["tokens"]["total"] - busy_before["tokens"]["total"] == 10 + 4 + 5 + 5 + 25 + 17
    assert cost["busy_seconds"] - busy_before["busy_seconds"] >= 1.1  # each stream: 4 tokens 0.2 s apart


def test_a_keys_scopes_models_and_rates_hold_on_the_proxied_paths(portal, chat_service, audio_service):
    """Through the gateway and a service's own path: a read-only key is refused (403 before its body is read), a key
    limited to one model calls it and nothing else (and sees only it in /v1/models), and a rate-limited key gets 429
    with Retry-After once over its rate, and is answered again when that time has passed."""
    def key(name, **limits):
        made = portal.request("POST", "/api/keys", json={"name": name, **limits})
        assert made.status_code == 201, made.text
        return made.json()["key"]

    def api(token):
        return openai.OpenAI(base_url=f"{portal.url}/v1", api_key=token, max_retries=0)

    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    reader = key("reader", scopes=["read"])
    with pytest.raises(openai.PermissionDeniedError) as refused:
        api(reader).chat.completions.create(**chat)
    assert refused.value.code == "insufficient_scope" and "scopes read" in refused.value.message
    direct = requests.post(f"{portal.url}/services/{chat_service['id']}/v1/chat/completions", json=chat,
                           headers={"Authorization": f"Bearer {reader}"}, timeout=10)
    assert direct.status_code == 403 and direct.json()["error"]["code"] == "insufficient_scope"
    assert requests.get(f"{portal.url}/api/services", headers={"Authorization": f"Bearer {reader}"},
                        timeout=10).status_code == 200  # what it may do

    audio_only = key("audio-only", models=[AUDIO_MODEL])
    assert [model.id for model in api(audio_only).models.list()] == [AUDIO_MODEL]
    with pytest.raises(openai.PermissionDeniedError) as refused:
        api(audio_only).chat.completions.create(**chat)
    assert refused.value.code == "model_not_allowed" and MODEL in refused.value.message
    for path in (f"/services/{chat_service['id']}/v1/models", "/services/0123456789abcdef/v1/models"):
        answer = requests.get(portal.url + path, headers={"Authorization": f"Bearer {audio_only}"}, timeout=10)
        assert answer.status_code in (403, 404), answer.text  # another model's service; no such service
    assert requests.get(f"{portal.url}/services/{audio_service['id']}/v1/models",
                        headers={"Authorization": f"Bearer {audio_only}"}, timeout=10).status_code == 200

    limited = api(key("limited", requests_per_minute=3))  # 3 at once after a quiet minute, then one every 20 s
    for _ in range(3):
        limited.chat.completions.create(**chat)
    with pytest.raises(openai.RateLimitError) as over:
        limited.chat.completions.create(**chat)
    wait = int(over.value.response.headers["Retry-After"])
    assert 1 <= wait <= 20 and over.value.code == "rate_limit_exceeded"
    time.sleep(wait + 0.5)
    assert limited.chat.completions.create(**chat).choices  # answered again after Retry-After

    tokens = api(key("tokens", tokens_per_minute=12))  # each call below spends 5 prompt + 4 completion tokens
    tokens.chat.completions.create(**dict(chat, max_tokens=4))
    tokens.chat.completions.create(**dict(chat, max_tokens=4))
    with pytest.raises(openai.RateLimitError):
        tokens.chat.completions.create(**dict(chat, max_tokens=4))
