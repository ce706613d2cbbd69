"""The portal's own defences, each against a real portal (docs/security.md): nothing server-side builds a URL from
request headers (a benchmark never sends a credential where a forged Host points), the login never redirects off
the portal, sessions end on the server (logout, idle time, a new token), and pages readable with the cookie alone
carry no secret (the CSRF token included, under Open OnDemand's shared origin)."""
from __future__ import annotations

import re
import socket
import sys
import threading
import time
from urllib.parse import urljoin, urlsplit

import pytest
import requests

from tests.conftest import REPO, wait_for

UPSTREAM = f"{sys.executable} {REPO / 'tests' / 'support' / 'openai_upstream.py'}"
RUNTIMES = {"text-generation": {"command": UPSTREAM}, "speech-recognition": {"command": UPSTREAM}}
MODEL = "test/tiny"


def ood_prefix(portal) -> str:
    return f"/node/127.0.0.1/{portal.port}"


def running_service(portal) -> dict:
    launched = portal.launch(model=MODEL, tier="Tiny")
    assert launched.status_code == 201, launched.text
    return portal.wait_state(launched.json()["id"], "RUNNING", timeout=60)


class Listener:
    """A TCP listener on 127.0.0.1 that records every byte anyone sends it (and answers nothing useful)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.received = []
        self.closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn):
        data = b""
        conn.settimeout(2)
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
                if b"\r\n\r\n" in data:
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    break
        except OSError:
            pass
        finally:
            self.received.append(data)
            conn.close()

    def close(self):
        self.closed = True
        self.sock.close()


# --- 8: a forged Host header ------------------------------------------------------------------------------------

def test_a_benchmark_never_sends_a_credential_where_a_forged_host_header_points(start_portal):
    portal = start_portal("local", runtimes=RUNTIMES)
    service = running_service(portal)
    key = portal.request("POST", "/api/keys", json={"name": "collaborator"}).json()["key"]
    (portal.home / "connection.json").unlink()  # the portal must know its own address without it
    listener = Listener()
    try:
        started = requests.post(f"{portal.url}/api/benchmarks", timeout=30,
                                json={"service": service["id"], "clients": 1, "requests": 2, "max_tokens": 2},
                                headers={"Authorization": f"Bearer {key}", "Host": f"127.0.0.1:{listener.port}"})
        assert started.status_code == 202, started.text
        run_id = started.json()["id"]
        run = wait_for(lambda: (lambda r: r if r["state"] != "RUNNING" else None)(
            portal.request("GET", f"/api/benchmarks/{run_id}").json()), timeout=60, what="the benchmark to end")
        time.sleep(0.5)
        seen = b"".join(listener.received)
        assert portal.token.encode() not in seen, "the owner's token went to the forged host"
        assert listener.received == [], f"the forged host was called: {seen[:300]!r}"
        # The benchmark reached the service through the portal at the portal's real address.
        assert run["state"] == "DONE", run
        assert run["summary"]["completed"] == 2, run["summary"]
    finally:
        listener.close()
    # Whatever credential the benchmark had is gone with it; the collaborator's key is all that is left.
    assert [k["name"] for k in portal.request("GET", "/api/keys").json()["keys"]] == ["collaborator"]


# --- 9: the login's redirect ------------------------------------------------------------------------------------

TRICKY_NEXT = [
    "////evil.com", "///evil.com", "//evil.com", "//evil.com/", "/\\evil.com", "\\\\evil.com", "\\/evil.com",
    "/%2F%2Fevil.com", "/%2f%2fevil.com", "%2F%2Fevil.com", "/%5Cevil.com", "https:evil.com", "https://evil.com",
    "http:\\\\evil.com", "http:/evil.com", "//evil.com@good", "/\t/evil.com", "/\n/evil.com", "/\r\n/evil.com",
    "\t//evil.com", " //evil.com", "\x00//evil.com", "/\x0b/evil.com", "javascript:alert(1)", "/./evil.com/..//x",
    "/.//evil.com", "/..//evil.com", "/%2e%2e/%2e%2e/other-app/", "/../../node/other/1/", "//\u3002evil.com",
    "/\u2215\u2215evil.com", "/ui/../..//evil.com", "https://127.0.0.1@evil.com/", "",
]


def browser_location(base: str, location: str) -> str:
    """Where a browser goes for `Location: location` on a page at `base` (WHATWG: tabs and newlines removed, leading
    and trailing C0 controls and spaces stripped, a backslash is a slash in http(s) URLs)."""
    cleaned = re.sub(r"[\t\n\r]", "", location).strip("".join(map(chr, range(0x21))))
    return urljoin(base, cleaned.replace("\\", "/"))


@pytest.mark.parametrize("under_prefix", [False, True], ids=["bare", "ood-prefix"])
def test_the_login_never_redirects_off_the_portal(start_portal, under_prefix):
    portal = start_portal("local")
    prefix = ood_prefix(portal) if under_prefix else ""
    login_url = f"{portal.url}{prefix}/login"
    wrong = []
    for target in TRICKY_NEXT + [f"{prefix}//evil.com", f"{prefix}/\\evil.com", f"{prefix}/../../evil",
                                 f"{prefix}/%2e%2e/%2e%2e/x", f"{prefix}/\t/evil.com"]:
        answer = requests.post(login_url, data={"token": portal.token, "next": target}, allow_redirects=False,
                               timeout=10)
        assert answer.status_code == 303, (target, answer.status_code)
        location = answer.headers["Location"]
        landed = urlsplit(browser_location(login_url, location))
        if (landed.scheme, landed.netloc) != ("http", f"127.0.0.1:{portal.port}") \
                or not landed.path.startswith(prefix + "/") or location.startswith(("//", "\\")) \
                or re.search(r"[\x00-\x20\\]", location):
            wrong.append((target, location))
    assert wrong == []
    # A path of the portal is still where the login leads.
    answer = requests.post(login_url, data={"token": portal.token, "next": f"{prefix}/ui/benchmarks?service=ab"},
                           allow_redirects=False, timeout=10)
    assert answer.headers["Location"].split("#")[0] == f"{prefix}/ui/benchmarks?service=ab"


# --- 10: sessions end on the server ------------------------------------------------------------------------------

def login(portal, prefix=""):
    answer = requests.post(f"{portal.url}{prefix}/login", json={"token": portal.token}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.cookies["pilotfish_session"], answer.json()["csrf_token"]


def with_cookie(portal, path, cookie, method="GET", **kwargs):
    return requests.request(method, portal.url + path, cookies={"pilotfish_session": cookie}, timeout=10, **kwargs)


def test_logout_ends_the_session_on_the_server_for_pages_and_the_proxy(start_portal):
    portal = start_portal("local", runtimes=RUNTIMES)
    service = running_service(portal)
    proxied = f"/services/{service['id']}/v1/models"
    cookie, csrf = login(portal)
    assert with_cookie(portal, "/api/services", cookie).status_code == 200
    assert with_cookie(portal, proxied, cookie).status_code == 200
    logout = with_cookie(portal, "/logout", cookie, "POST", headers={"X-CSRF-Token": csrf,
                                                                     "Accept": "application/json"})
    assert logout.status_code == 200
    # A copy of the cookie (another tab, a stolen copy) is worth nothing now, on Flask's paths and the proxy's.
    assert with_cookie(portal, "/api/services", cookie).status_code == 401
    wait_for(lambda: with_cookie(portal, proxied, cookie).status_code == 401, timeout=2, interval=0.1,
             what="the proxy to refuse the ended session")
    chat = with_cookie(portal, f"/services/{service['id']}/v1/chat/completions", cookie, "POST",
                       headers={"X-CSRF-Token": csrf}, json={"model": MODEL, "messages": [], "max_tokens": 1})
    assert chat.status_code == 401
    # The cookie holds no data of its own (a random id): nothing in it can be edited into a session.
    assert "." not in cookie and portal.token not in cookie


def test_an_idle_session_ends_and_a_busy_one_does_not(start_portal):
    portal = start_portal("local", runtimes=RUNTIMES, session_idle=3)
    service = running_service(portal)
    proxied = f"/services/{service['id']}/v1/models"
    busy, _ = login(portal)
    idle, _ = login(portal)
    assert with_cookie(portal, "/api/services", idle).status_code == 200
    for _ in range(6):  # 6 s of use, a request every second on each path: the busy session stays
        assert with_cookie(portal, "/api/services", busy).status_code == 200
        assert with_cookie(portal, proxied, busy).status_code == 200
        time.sleep(1)
    assert with_cookie(portal, "/api/services", idle).status_code == 401
    assert with_cookie(portal, proxied, idle).status_code == 401
    assert with_cookie(portal, "/api/services", busy).status_code == 200


def test_a_session_of_an_earlier_token_is_refused(start_portal):
    portal = start_portal("local")
    cookie, _ = login(portal)
    assert with_cookie(portal, "/api/services", cookie).status_code == 200
    portal.stop()
    (portal.home / "token").write_text("a-new-token-for-this-portal\n")
    portal.start()
    assert portal.token == "a-new-token-for-this-portal"
    assert with_cookie(portal, "/api/services", cookie).status_code == 401


def test_a_session_ends_with_the_open_ondemand_job(start_portal, monkeypatch):
    end = round(time.time()) + 40  # 30 s a portal may take to start, then room for the login and the first call
    monkeypatch.setenv("PILOTFISH_SESSION_END", str(end))
    portal = start_portal("local")
    cookie, _ = login(portal)
    assert with_cookie(portal, "/api/services", cookie).status_code == 200
    wait_for(lambda: with_cookie(portal, "/api/services", cookie).status_code == 401, timeout=55, interval=0.5,
             what="the session to end with the job")
    assert time.time() >= end - 1, "the session ended before the job did"


# --- 12: the shared origin --------------------------------------------------------------------------------------

def test_under_the_shared_origin_nothing_readable_with_the_cookie_alone_lets_a_page_change_anything(start_portal):
    """Another app's page on Open OnDemand's origin can send (and read) requests with this portal's cookie. Every
    page and JSON answer it can read that way must lack what a state change needs: the CSRF token is handed only to
    the tab that signed in (the login's redirect, in its fragment), never written into a page."""
    portal = start_portal("local", runtimes=RUNTIMES)
    service = running_service(portal)
    prefix = ood_prefix(portal)
    signed_in = requests.Session()
    login_answer = signed_in.post(f"{portal.url}{prefix}/login", data={"token": portal.token}, allow_redirects=False,
                                  timeout=10)
    assert login_answer.status_code == 303
    cookie_header = login_answer.headers["Set-Cookie"]
    assert "HttpOnly" in cookie_header and "SameSite=Strict" in cookie_header and f"Path={prefix}/" in cookie_header
    assert login_answer.headers.get("Cache-Control") == "no-store"
    csrf = dict(part.split("=", 1) for part in urlsplit(login_answer.headers["Location"]).fragment.split("&")
                if "=" in part).get("pf-csrf")
    assert csrf, login_answer.headers["Location"]

    other_app = requests.Session()  # what a same-origin page can do: send the cookie, read the answers
    other_app.cookies.set("pilotfish_session", signed_in.cookies["pilotfish_session"])
    read = ""
    for path in ("/", "/ui/services", f"/ui/services/{service['id']}", f"/ui/services/{service['id']}/playground",
                 "/ui/launch", "/ui/models", "/ui/keys", "/ui/benchmarks", "/ui/cluster", "/api/services",
                 f"/api/services/{service['id']}", "/api/keys", "/api/status", "/login"):
        answer = other_app.get(f"{portal.url}{prefix}{path}", headers={"Accept": "text/html"}, timeout=10)
        assert answer.status_code in (200, 404), (path, answer.status_code)
        if answer.status_code == 200 and path != "/login":
            assert answer.headers.get("Cache-Control") == "no-store", path
        read += answer.text
    for secret in (csrf, portal.token, signed_in.cookies["pilotfish_session"]):
        assert secret not in read
    # Without the token it cannot make a key, launch, or use a service's API for anything but reading.
    made = other_app.post(f"{portal.url}{prefix}/api/keys", json={"name": "stolen"}, timeout=10)
    assert made.status_code == 403
    for guess in re.findall(r"[A-Za-z0-9_-]{24,}", read)[:50]:  # any long value a page shows is no CSRF token
        assert other_app.post(f"{portal.url}{prefix}/api/keys", json={"name": "stolen"}, timeout=10,
                              headers={"X-CSRF-Token": guess}).status_code == 403
    # The tab that signed in has it, and can.
    made = signed_in.post(f"{portal.url}{prefix}/api/keys", json={"name": "mine"}, headers={"X-CSRF-Token": csrf},
                          timeout=10)
    assert made.status_code == 201 and made.headers.get("Cache-Control") == "no-store"


def test_a_malformed_login_body_is_a_4xx_never_a_500(start_portal):
    portal = start_portal("local")
    for body in (b"[]", b"1", b'"token"', b"null", b'{"token": 5}', b'{"token": NaN}', b"{not json", b"\xff\xfe"):
        answer = requests.post(portal.url + "/login", data=body, headers={"Content-Type": "application/json"},
                               timeout=10)
        assert 400 <= answer.status_code < 500, (body, answer.status_code, answer.text)
        assert isinstance(answer.json()["error"], str)
        assert "set-cookie" not in {name.lower() for name in answer.headers}
