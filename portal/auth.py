"""Who is asking: one rule for every request, whether Flask answers it (the `authenticate` hook) or the proxy does
(portal.proxy.routing asks `caller_of_headers` on its event loop).

The rule (`caller`): a bearer credential decides alone: the portal token is "owner", a live API key (portal.keys) is
"key:<name>" (one past its end is refused: 401 `expired_api_key`), anything else is refused. Without one, the cookie
of a valid login session (portal.sessions: kept on the server, opened with this portal's current token, not logged
out, idle or past its end) is "owner", and a state-changing method also needs the session's CSRF token. Otherwise the
request is refused.
The login pages that set the cookie are portal/ui/login.py; the key routes are portal/api/keys.py.

What a caller may do: the owner (the token or a login session) anything; a named key what its scopes allow
(`scope_for`: `use` for the model paths, `read` for GET pages, API reads and /metrics, `launch` for every other
method), on its models only (`model_refusal`); managing keys is the owner's alone (`require_owner`). Flask's hook
refuses a key outside its scopes with 403; the proxy asks `grant_of` (from the cache, after `caller`) and
`scope_refusal`, `model_refusal` and portal.rate_limits with it.

Under a prefix (Open OnDemand's /node/<host>/<port>, an origin every app of every user shares) no page carries the
CSRF token: the login hands it to the tab that signed in (portal/ui/login.py), so another app's page that can read
this portal's pages with the cookie still cannot change anything (docs/security.md).
"""
from __future__ import annotations

import hashlib
import hmac
from datetime import datetime, timezone
from typing import Callable, NamedTuple, Optional
from urllib.parse import urlencode

from flask import current_app, g, jsonify, redirect, request
from werkzeug.http import parse_cookie

from .errors import PortalError
from .keys import KEY_PREFIX, NEEDS_LOOKUP, SCOPE_WORDS, SCOPES, KeyGrant, init_keys, key_cache, live_grant
from .models import iso
from .sessions import Session, init_sessions, session_cache
from .usage_ledger import EXTENSION as USAGE

PUBLIC_ENDPOINTS = {"api.health", "auth.login", "auth.login_form"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"  # HTML forms send the CSRF token as this field (uploads must use the header)
SESSION_COOKIE = "pilotfish_session"
_CSRF_HEADER_KEY = CSRF_HEADER.lower().encode()  # as the proxy sees header names


class ForbiddenError(PortalError):
    status = 403


class Refusal(NamedTuple):
    """Why a request is refused: the status, the message and the OpenAI-style error code of the answer."""
    status: int
    message: str
    code: str


WRONG_CREDENTIAL = Refusal(401, "invalid token or API key", "invalid_api_key")
NO_CREDENTIAL = Refusal(401, "authentication required: send the portal token as 'Authorization: Bearer <token>'",
                        "missing_api_key")
WRONG_CSRF = Refusal(403, f"missing or wrong CSRF token: send the {CSRF_HEADER} header", "csrf_token_invalid")


# --- the rule ---------------------------------------------------------------------------------------------

def bearer_from_header(header: str) -> Optional[str]:
    """The credential of an `Authorization: Bearer <credential>` header, or None."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def token_matches(candidate: Optional[str], app=None) -> bool:
    """Compare a presented token with the portal token in constant time."""
    if not candidate:
        return False
    return hmac.compare_digest(candidate.encode(), (app or current_app).config["PILOTFISH_TOKEN"].encode())


def token_id(token: str) -> str:
    """A fingerprint of the portal token, kept in the login session: a new token logs every browser out."""
    return hashlib.sha256(b"pilotfish-session:" + token.encode()).hexdigest()[:16]


def principal_from_bearer(token: str, app=None, cached_only: bool = False):
    """Who a bearer credential is ("owner" or "key:<name>"), None if it is neither the token nor a live key, or the
    Refusal of a key past its end.

    `cached_only` (the proxy, on its event loop) never queries the database: NEEDS_LOOKUP when that would be needed.
    """
    app = app or current_app
    if token_matches(token, app):
        return "owner"
    if token.startswith(KEY_PREFIX):
        keys = key_cache(app)
        grant = keys.peek_grant(token) if cached_only else keys.lookup_grant(token)
        if grant is NEEDS_LOOKUP:
            return NEEDS_LOOKUP
        if grant is not None:
            return expired_refusal(grant) if grant.expired() else f"key:{grant.name}"
    return None


def expired_refusal(grant: KeyGrant) -> Refusal:
    end = datetime.fromtimestamp(grant.expires_at, timezone.utc).replace(tzinfo=None)
    return Refusal(401, f"API key {grant.name!r} expired at {iso(end)}", "expired_api_key")


def csrf_matches(data: Session, sent: Optional[str]) -> bool:
    return bool(sent) and hmac.compare_digest(sent.encode("latin-1", "replace"), data.csrf.encode())


def caller(app, method: str, bearer: Optional[str], session_data: Optional[Callable[[], Optional[Session]]] = None,
           csrf_sent: Optional[Callable[[], Optional[str]]] = None, cached_only: bool = False):
    """Who is asking: "owner" or "key:<name>", else the Refusal that answers the request.

    `bearer` is the Authorization header's bearer credential (or None); `session_data()` the valid login session
    (None without one, NEEDS_LOOKUP when only the database can tell) and `csrf_sent()` the CSRF token sent, each
    asked only when the rule needs it: never when there is a bearer credential (they may be left out then). With
    `cached_only` (the proxy's event loop), NEEDS_LOOKUP when an API key or a session has to be looked up in the
    database.
    """
    if bearer is not None:
        principal = principal_from_bearer(bearer, app, cached_only)
        return WRONG_CREDENTIAL if principal is None else principal  # an expired key's Refusal as it is
    data = session_data()
    if data is NEEDS_LOOKUP:
        return NEEDS_LOOKUP
    if data is not None:
        if method not in SAFE_METHODS and not csrf_matches(data, csrf_sent()):
            return WRONG_CSRF
        return "owner"
    return NO_CREDENTIAL


# --- what a caller may do ---------------------------------------------------------------------------------

def scope_for(method: str, path: str) -> Optional[str]:
    """The scope a request needs (`path` without the Open OnDemand prefix): "use" for the model paths (/v1/...,
    /services/<id>/...), "read" for GET, HEAD and OPTIONS elsewhere (pages, API reads, /metrics), "launch" for any
    other method (launch, stop, renew a lease, downloads, benchmarks, deletes); None for the paths anyone may call
    (/health, /login, /logout)."""
    if path == "/v1" or path.startswith(("/v1/", "/services/")):
        return "use"
    if path in ("/health", "/login", "/logout"):
        return None
    return "read" if method in SAFE_METHODS else "launch"


def grant_of(app, principal) -> Optional[KeyGrant]:
    """What a named key may do, from the cache alone (never the database: the proxy asks it on its event loop right
    after `caller` accepted the key); None for the owner (who may do anything) and for a key not in the cache."""
    if isinstance(principal, str) and principal.startswith("key:"):
        return key_cache(app).grant(principal[4:])
    return None


def scope_refusal(grant: Optional[KeyGrant], method: str, path: str) -> Optional[Refusal]:
    """The 403 of a key whose scopes do not cover the request, else None (the owner: `grant` None)."""
    scope = scope_for(method, path)
    if grant is None or scope is None or grant.allows(scope):
        return None
    has = ", ".join(scope for scope in SCOPES if scope in grant.scopes) or "none"
    return Refusal(403, f"API key {grant.name!r} may not {SCOPE_WORDS[scope]} (scope {scope}): it has scopes {has}",
                   "insufficient_scope")


def model_refusal(grant: Optional[KeyGrant], model: str) -> Optional[Refusal]:
    """The 403 of a key limited to other models than `model`, else None."""
    if grant is None or grant.allows_model(model):
        return None
    return Refusal(403, f"API key {grant.name!r} may not use model {model!r}: it may use "
                        f"{', '.join(sorted(grant.models))}", "model_not_allowed")


# --- the proxy's requests (outside Flask) -----------------------------------------------------------------

def caller_of_headers(app, method: str, header: Callable[[bytes], Optional[bytes]], cached_only: bool = False):
    """`caller` for a request the proxy reads: `header(name)` is a raw header's value (lower-case bytes name)."""
    authorization = header(b"authorization")
    bearer = bearer_from_header(authorization.decode("latin-1")) if authorization is not None else None
    if bearer is not None:  # the hot path: the credential decides alone, the cookie is not read
        return caller(app, method, bearer, cached_only=cached_only)
    return caller(app, method, None, lambda: session_from_cookie(app, header(b"cookie"), cached_only),
                  lambda: _decoded(header(_CSRF_HEADER_KEY)), cached_only)


def session_from_cookie(app, cookie_header: Optional[bytes], cached_only: bool = False):
    """The valid login session of a Cookie header, or None. `cached_only` never queries the database: NEEDS_LOOKUP
    when that would be needed."""
    if cookie_header is None:
        return None
    value = parse_cookie(cookie_header.decode("latin-1")).get(SESSION_COOKIE)
    return session_of(app, value, cached_only)


def session_of(app, value: Optional[str], cached_only: bool = False):
    """The valid login session of a cookie's value, or None (NEEDS_LOOKUP: see session_from_cookie)."""
    if not value or len(value) > 100:
        return None
    sessions = session_cache(app)
    return sessions.peek(value) if cached_only else sessions.lookup(value)


def _decoded(value: Optional[bytes]) -> Optional[str]:
    return value.decode("latin-1") if value is not None else None


# --- Flask's requests -------------------------------------------------------------------------------------

def authenticate():
    """before_request hook: every route but the public ones needs the token, an API key or a login session."""
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    bearer = bearer_from_header(request.headers.get("Authorization", ""))
    who = caller(current_app, request.method, bearer, _flask_session, _csrf_sent)
    if isinstance(who, str) and who.startswith("key:"):
        who = _within_scopes(who)
    if not isinstance(who, Refusal):
        g.principal, g.via_cookie = who, bearer is None
        if who != "owner" and USAGE in current_app.extensions:  # a key's last use (portal/usage_ledger.py)
            current_app.extensions[USAGE].seen(who)
        return None
    if who is NO_CREDENTIAL and request.blueprint == "ui" and request.method in SAFE_METHODS and prefers_html():
        here = request.script_root + request.full_path.rstrip("?")
        return redirect(f"{request.script_root}/login?{urlencode({'next': here})}")
    return refusal(*who)


def _within_scopes(principal: str):
    """A key's principal if its scopes cover this request, else the Refusal (403)."""
    grant = live_grant(principal[4:])
    if grant is None:  # revoked since `caller` saw it
        return WRONG_CREDENTIAL
    return scope_refusal(grant, request.method, request.path) or principal


def _flask_session() -> Optional[Session]:
    g.login_session = session_of(current_app, request.cookies.get(SESSION_COOKIE))
    return g.login_session


def _csrf_sent() -> Optional[str]:
    sent = request.headers.get(CSRF_HEADER)
    if not sent and request.mimetype == "application/x-www-form-urlencoded":
        sent = request.form.get(CSRF_FIELD)  # HTML forms; uploads must use the header
    return sent


def refusal(status: int, message: str, code: str):
    """A 401 or 403: on the OpenAI API's paths (/v1/...) in its error shape, which OpenAI clients parse
    ({"error": {"message", "type", "param", "code"}}, as portal/proxy/answers.openai_error), else {"error": message}."""
    if request.path.startswith("/v1/") or request.path == "/v1":
        kind = "authentication_error" if status == 401 else "permission_error"
        response = jsonify(error={"message": message, "type": kind, "param": None, "code": code})
    else:
        response = jsonify(error=message)
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="pilotfish"'
    return response


def unauthorized(message: str, code: str = "invalid_api_key"):
    return refusal(401, message, code)


def prefers_html() -> bool:
    """A browser asking for a page (scripts and API clients get the 401 JSON)."""
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"


def require_owner() -> None:
    if getattr(g, "principal", None) != "owner":
        raise ForbiddenError("only the portal owner (the portal token) can manage API keys")


# --- the login session cookie -----------------------------------------------------------------------------

def shared_origin() -> bool:
    """Whether the portal was reached under a prefix (Open OnDemand's /node/<host>/<port>): an origin every app of
    every user shares, whose pages can read this portal's pages with its cookie."""
    return bool(request.script_root)


def csrf_token() -> str:
    """The CSRF token pages put in their forms and scripts: the session's, except under a shared origin, where no
    page carries it (the tab that signed in has it from the login; static/js/pilotfish.js fills it in)."""
    login_session = getattr(g, "login_session", None)
    if login_session is None or shared_origin():
        return ""
    return login_session.csrf


def set_session_cookie(response, value: str) -> None:
    """The cookie of a login session: only its random id, HttpOnly, SameSite=Strict, Secure under https, and scoped
    to the prefix the portal was reached by (/node/<host>/<port>/)."""
    response.set_cookie(SESSION_COOKIE, value, path=(request.script_root or "") + "/", httponly=True,
                        samesite="Strict", secure=_secure())


def clear_session_cookie(response) -> None:
    response.delete_cookie(SESSION_COOKIE, path=(request.script_root or "") + "/", httponly=True, samesite="Strict",
                           secure=_secure())


def _secure() -> bool:
    return request.is_secure or request.headers.get("X-Forwarded-Proto", "") == "https"


def no_store(response):
    """after_request hook: the portal's own answers (pages, API, login) are never cached by the browser or a proxy
    between; the static files keep their own caching."""
    if request.endpoint != "static":
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def init_auth(app) -> None:
    """Login sessions (portal.sessions), the key cache and the rule's hook."""
    init_sessions(app, token_id(app.config["PILOTFISH_TOKEN"]))
    init_keys(app)
    app.before_request(authenticate)
    app.after_request(no_store)
    app.jinja_env.globals["csrf_token"] = csrf_token
