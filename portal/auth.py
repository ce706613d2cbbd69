"""Who is asking: one rule for every request, whether Flask answers it (the `authenticate` hook) or the proxy does
(portal.proxy.routing asks `caller_of_headers` on its event loop).

The rule (`caller`): a bearer credential decides alone: the portal token is "owner", a live API key (portal.keys) is
"key:<name>", anything else is refused. Without one, a login session cookie of this portal's current token is
"owner", and a state-changing method also needs the session's CSRF token. Otherwise the request is refused.
The login pages that set the cookie are portal/ui/login.py; the key routes are portal/api/keys.py.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Callable, Mapping, NamedTuple, Optional
from urllib.parse import urlencode

from flask import current_app, g, jsonify, redirect, request, session
from flask.sessions import SecureCookieSessionInterface
from itsdangerous import BadSignature
from werkzeug.http import parse_cookie

from .errors import PortalError
from .keys import KEY_PREFIX, NEEDS_LOOKUP, init_keys, key_cache

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
    """Who a bearer credential is ("owner" or "key:<name>"), or None if it is neither the token nor a live key.

    `cached_only` (the proxy, on its event loop) never queries the database: NEEDS_LOOKUP when that would be needed.
    """
    app = app or current_app
    if token_matches(token, app):
        return "owner"
    if token.startswith(KEY_PREFIX):
        keys = key_cache(app)
        name = keys.peek(token) if cached_only else keys.lookup(token)
        if name is NEEDS_LOOKUP:
            return NEEDS_LOOKUP
        if name is not None:
            return f"key:{name}"
    return None


def session_is_valid(data, app=None) -> bool:
    """A login session of this portal's current token."""
    return bool(data.get("auth")) and hmac.compare_digest(
        data.get("token_id", ""), token_id((app or current_app).config["PILOTFISH_TOKEN"]))


def csrf_matches(data, sent: Optional[str]) -> bool:
    return bool(sent) and hmac.compare_digest(sent, data.get("csrf", ""))


def caller(app, method: str, bearer: Optional[str], session_data: Optional[Callable[[], Optional[Mapping]]] = None,
           csrf_sent: Optional[Callable[[], Optional[str]]] = None, cached_only: bool = False):
    """Who is asking: "owner" or "key:<name>", else the Refusal that answers the request.

    `bearer` is the Authorization header's bearer credential (or None); `session_data()` the login session (None
    without one) and `csrf_sent()` the CSRF token sent, each asked only when the rule needs it: never when there is
    a bearer credential (they may be left out then). With `cached_only` (the proxy's event loop), NEEDS_LOOKUP when
    an API key has to be looked up in the database.
    """
    if bearer is not None:
        principal = principal_from_bearer(bearer, app, cached_only)
        return WRONG_CREDENTIAL if principal is None else principal
    data = session_data()
    if data is not None and session_is_valid(data, app):
        if method not in SAFE_METHODS and not csrf_matches(data, csrf_sent()):
            return WRONG_CSRF
        return "owner"
    return NO_CREDENTIAL


# --- the proxy's requests (outside Flask) -----------------------------------------------------------------

def caller_of_headers(app, method: str, header: Callable[[bytes], Optional[bytes]], cached_only: bool = False):
    """`caller` for a request the proxy reads: `header(name)` is a raw header's value (lower-case bytes name)."""
    authorization = header(b"authorization")
    bearer = bearer_from_header(authorization.decode("latin-1")) if authorization is not None else None
    if bearer is not None:  # the hot path: the credential decides alone, the cookie is not read
        return caller(app, method, bearer, cached_only=cached_only)
    return caller(app, method, None, lambda: session_from_cookie(app, header(b"cookie")),
                  lambda: _decoded(header(_CSRF_HEADER_KEY)), cached_only)


def session_from_cookie(app, cookie_header: Optional[bytes]) -> Optional[dict]:
    """The login session in a Cookie header, read as Flask's session interface reads it; None without a valid one."""
    if cookie_header is None:
        return None
    value = parse_cookie(cookie_header.decode("latin-1")).get(app.config["SESSION_COOKIE_NAME"])
    if not value:
        return None
    serializer = app.session_interface.get_signing_serializer(app)
    try:
        data = serializer.loads(value, max_age=int(app.permanent_session_lifetime.total_seconds()))
    except BadSignature:
        return None
    return data if isinstance(data, dict) else None


def _decoded(value: Optional[bytes]) -> Optional[str]:
    return value.decode("latin-1") if value is not None else None


# --- Flask's requests -------------------------------------------------------------------------------------

def authenticate():
    """before_request hook: every route but the public ones needs the token, an API key or a login session."""
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    bearer = bearer_from_header(request.headers.get("Authorization", ""))
    who = caller(current_app, request.method, bearer, _flask_session, _csrf_sent)
    if not isinstance(who, Refusal):
        g.principal, g.via_cookie = who, bearer is None
        return None
    if who is NO_CREDENTIAL and request.blueprint == "ui" and request.method in SAFE_METHODS and prefers_html():
        here = request.script_root + request.full_path.rstrip("?")
        return redirect(f"{request.script_root}/login?{urlencode({'next': here})}")
    return refusal(*who)


def _flask_session():
    return session


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

class PrefixedSessionInterface(SecureCookieSessionInterface):
    """Scope the session cookie to the prefix the portal was reached by (/node/<host>/<port>/)."""

    def get_cookie_path(self, app):
        return (request.script_root or "") + "/"

    def get_cookie_secure(self, app):
        return request.is_secure or request.headers.get("X-Forwarded-Proto", "") == "https"


def csrf_token() -> str:
    """The session's CSRF token (made on first use); pages put it in their forms and scripts."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(24)
    return session["csrf"]


def init_auth(app) -> None:
    """The session cookie (signed with a key derived from the portal token), the key cache and the rule's hook."""
    app.secret_key = hmac.new(app.config["PILOTFISH_TOKEN"].encode(), b"pilotfish-session-signing",
                              hashlib.sha256).digest()
    app.config.update(SESSION_COOKIE_NAME=SESSION_COOKIE, SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Lax")
    app.session_interface = PrefixedSessionInterface()
    init_keys(app)
    app.before_request(authenticate)
    app.jinja_env.globals["csrf_token"] = csrf_token
