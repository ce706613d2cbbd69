"""One authentication rule for both paths: Flask's `authenticate` hook and the proxy's `caller_of_headers` (which
reads raw headers on the event loop, and must never touch the database there) agree on every kind of credential."""
import pytest

from portal.auth import NEEDS_LOOKUP, NO_CREDENTIAL, WRONG_CREDENTIAL, WRONG_CSRF, Refusal, caller_of_headers


def raw(headers: dict):
    """`header(name)` as the proxy's Incoming answers it: lower-case bytes names, bytes values."""
    encoded = {name.lower().encode(): value.encode("latin-1") for name, value in headers.items()}
    return encoded.get


@pytest.fixture
def credentials(app, client):
    token = app.config["PILOTFISH_TOKEN"]
    owner = {"Authorization": f"Bearer {token}"}
    key = client.post("/api/keys", json={"name": "laptop"}, headers=owner).get_json()
    gone = client.post("/api/keys", json={"name": "old"}, headers=owner).get_json()
    assert client.delete(f"/api/keys/{gone['id']}", headers=owner).status_code == 200
    login = client.post("/login", json={"token": token})
    cookie = login.headers["Set-Cookie"].split(";")[0]
    return {"token": token, "key": key["key"], "revoked": gone["key"], "cookie": cookie,
            "csrf": login.get_json()["csrf_token"]}


CASES = [  # (method, headers, who: a principal or a Refusal)
    ("GET", lambda c: {"Authorization": f"Bearer {c['token']}"}, "owner"),
    ("POST", lambda c: {"Authorization": f"bearer  {c['token']} "}, "owner"),
    ("POST", lambda c: {"Authorization": f"Bearer {c['key']}"}, "key:laptop"),
    ("GET", lambda c: {"Authorization": f"Bearer {c['revoked']}"}, WRONG_CREDENTIAL),
    ("GET", lambda c: {"Authorization": "Bearer pf_notakey"}, WRONG_CREDENTIAL),
    ("GET", lambda c: {"Authorization": "Bearer wrong", "Cookie": c["cookie"]}, WRONG_CREDENTIAL),
    ("GET", lambda c: {"Authorization": "Basic Zm9vOmJhcg=="}, NO_CREDENTIAL),
    ("GET", lambda c: {"Authorization": "Basic Zm9vOmJhcg==", "Cookie": c["cookie"]}, "owner"),
    ("GET", lambda c: {"Cookie": c["cookie"]}, "owner"),
    ("POST", lambda c: {"Cookie": c["cookie"]}, WRONG_CSRF),
    ("POST", lambda c: {"Cookie": c["cookie"], "X-CSRF-Token": "not-it"}, WRONG_CSRF),
    ("POST", lambda c: {"Cookie": c["cookie"], "X-CSRF-Token": c["csrf"]}, "owner"),
    ("GET", lambda c: {"Cookie": "pilotfish_session=forged"}, NO_CREDENTIAL),
    ("GET", lambda c: {"Cookie": "other=1"}, NO_CREDENTIAL),
    ("GET", lambda c: {}, NO_CREDENTIAL),
]


@pytest.mark.parametrize("method, headers, who", CASES)
def test_flask_and_the_proxy_follow_the_same_rule(app, credentials, method, headers, who):
    sent = headers(credentials)
    with app.app_context():  # as the proxy's thread does when the cache cannot answer
        assert caller_of_headers(app, method, raw(sent), False) == who
    browser = app.test_client(use_cookies=False)  # sends exactly the case's headers
    response = browser.open("/api/keys/none", method="PATCH" if method == "POST" else method, headers=sent)
    if isinstance(who, Refusal):
        assert (response.status_code, response.get_json()["error"]) == (who.status, who.message)
    else:
        assert response.status_code == 405  # past authentication: no such method on the route


def test_the_proxy_answers_a_cached_key_without_the_database(app, credentials):
    header = raw({"Authorization": f"Bearer {credentials['key']}"})
    app.extensions["pilotfish.keys"].forget()
    # Outside an app context any database access would raise: the cached-only rule never tries.
    assert caller_of_headers(app, "POST", header, True) is NEEDS_LOOKUP
    with app.app_context():
        assert caller_of_headers(app, "POST", header, False) == "key:laptop"
    assert caller_of_headers(app, "POST", header, True) == "key:laptop"
    assert caller_of_headers(app, "POST", raw({"Authorization": f"Bearer {credentials['token']}"}), True) == "owner"
    assert caller_of_headers(app, "POST", raw({"Cookie": credentials["cookie"], "X-CSRF-Token": credentials["csrf"]}),
                             True) == "owner"
