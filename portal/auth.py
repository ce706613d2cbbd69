"""Authentication: the portal token (Bearer or the /login session cookie), named API keys, CSRF for cookie requests."""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from typing import Optional
from urllib.parse import urlencode, urlsplit

from flask import Blueprint, current_app, g, jsonify, redirect, render_template, request, session
from flask.sessions import SecureCookieSessionInterface
from itsdangerous import BadSignature
from werkzeug.http import parse_cookie

from .db import db
from .errors import NotFoundError, PortalError, ValidationError
from .models import ApiKey, utcnow

bp = Blueprint("auth", __name__)

PUBLIC_ENDPOINTS = {"api.health", "auth.login", "auth.login_form"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
KEY_PREFIX = "pf_"
KEY_CACHE_SECONDS = 5.0  # how long a verified key is trusted before the database is asked again (revocation delay)
CSRF_HEADER = "X-CSRF-Token"


class ForbiddenError(PortalError):
    status = 403


# --- presented credentials ------------------------------------------------------------------------------

def _bearer_token() -> Optional[str]:
    return bearer_from_header(request.headers.get("Authorization", ""))


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


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


NEEDS_LOOKUP = object()  # principal_from_bearer(..., cached_only=True): the answer needs the database


class KeyCache:
    """Verified API keys, so the hot path hashes once and skips the database for a few seconds."""

    def __init__(self):
        self._entries: dict = {}
        self._lock = threading.Lock()

    def peek(self, key: str):
        """The key's name if it was verified lately, else NEEDS_LOOKUP (never touches the database)."""
        entry = self._entries.get(hash_key(key))
        if entry and time.monotonic() - entry[1] < KEY_CACHE_SECONDS:
            return entry[0]
        return NEEDS_LOOKUP

    def lookup(self, key: str) -> Optional[str]:
        digest = hash_key(key)
        now = time.monotonic()
        entry = self._entries.get(digest)
        if entry and now - entry[1] < KEY_CACHE_SECONDS:
            return entry[0]
        row = ApiKey.query.filter_by(key_hash=digest, revoked_at=None).first()
        with self._lock:
            if row is None:
                self._entries.pop(digest, None)
                return None
            self._entries[digest] = (row.name, now)
        return row.name

    def forget(self) -> None:
        with self._lock:
            self._entries.clear()


def principal_from_bearer(token: str, app=None, cached_only: bool = False):
    """Who a bearer credential is ("owner" or "key:<name>"), or None if it is neither the token nor a live key.

    `cached_only` (the proxy, on its event loop) never queries the database: NEEDS_LOOKUP when that would be needed.
    """
    app = app or current_app
    if token_matches(token, app):
        return "owner"
    if token.startswith(KEY_PREFIX):
        keys = app.extensions["pilotfish.keys"]
        name = keys.peek(token) if cached_only else keys.lookup(token)
        if name is NEEDS_LOOKUP:
            return NEEDS_LOOKUP
        if name is not None:
            return f"key:{name}"
    return None


def session_is_valid(data, app=None) -> bool:
    """A login session of this portal's current token."""
    return bool(data.get("auth")) and hmac.compare_digest(
        data.get("token_id", ""), _token_id((app or current_app).config["PILOTFISH_TOKEN"]))


def csrf_matches(data, sent: Optional[str]) -> bool:
    return bool(sent) and hmac.compare_digest(sent, data.get("csrf", ""))


def principal_from_cookie(app, cookie_header: str, method: str, csrf_sent: Optional[str]) -> Optional[str]:
    """"owner" for a valid login session cookie (with the CSRF header on state-changing methods), else None.

    The proxy's check, outside Flask's request handling; the same rules as `authenticate`."""
    value = parse_cookie(cookie_header).get(app.config["SESSION_COOKIE_NAME"])
    if not value:
        return None
    serializer = app.session_interface.get_signing_serializer(app)
    try:
        data = serializer.loads(value, max_age=int(app.permanent_session_lifetime.total_seconds()))
    except BadSignature:
        return None
    if not isinstance(data, dict) or not session_is_valid(data, app):
        return None
    if method not in SAFE_METHODS and not csrf_matches(data, csrf_sent):
        return None
    return "owner"


def _token_id(token: str) -> str:
    """A fingerprint of the portal token: a new token logs every browser out."""
    return hashlib.sha256(b"pilotfish-session:" + token.encode()).hexdigest()[:16]


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(24)
    return session["csrf"]


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


def authenticate():
    """before_request hook: every route but the public ones needs the token, an API key or a login session."""
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    bearer = _bearer_token()
    if bearer is not None:
        principal = principal_from_bearer(bearer)
        if principal is None:
            return unauthorized("invalid token or API key")
        g.principal, g.via_cookie = principal, False
        return None
    if session_is_valid(session):
        if request.method not in SAFE_METHODS:
            sent = request.headers.get(CSRF_HEADER)
            if not sent and request.mimetype == "application/x-www-form-urlencoded":
                sent = request.form.get("csrf_token")  # HTML forms; uploads must use the header
            if not csrf_matches(session, sent):
                return refusal(403, f"missing or wrong CSRF token: send the {CSRF_HEADER} header", "csrf_token_invalid")
        g.principal, g.via_cookie = "owner", True
        return None
    if request.blueprint == "ui" and request.method in SAFE_METHODS and prefers_html():
        here = request.script_root + request.full_path.rstrip("?")
        return redirect(f"{request.script_root}/login?{urlencode({'next': here})}")
    return unauthorized("authentication required: send the portal token as 'Authorization: Bearer <token>'",
                        "missing_api_key")


def prefers_html() -> bool:
    """A browser asking for a page (scripts and API clients get the 401 JSON)."""
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"


def require_owner() -> None:
    if getattr(g, "principal", None) != "owner":
        raise ForbiddenError("only the portal owner (the portal token) can manage API keys")


# --- browser login ----------------------------------------------------------------------------------------

class PrefixedSessionInterface(SecureCookieSessionInterface):
    """Scope the session cookie to the prefix the portal was reached by (/node/<host>/<port>/)."""

    def get_cookie_path(self, app):
        return (request.script_root or "") + "/"

    def get_cookie_secure(self, app):
        return request.is_secure or request.headers.get("X-Forwarded-Proto", "") == "https"


def _safe_next(target: Optional[str]) -> str:
    root = (request.script_root or "") + "/"
    if not target:
        return root
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith(root) or "\\" in target:
        return root  # never redirect off the portal
    return target


@bp.get("/login")
def login_form():
    return render_template("ui/login.html", error=None, next=request.args.get("next", ""))


@bp.post("/login")
def login():
    token = request.form.get("token") or (request.get_json(silent=True) or {}).get("token")
    if not token_matches(token):
        if request.is_json:
            return unauthorized("wrong token")
        return render_template("ui/login.html", error="That token is not this portal's token.",
                               next=request.form.get("next", "")), 401
    session.clear()
    session["auth"] = True
    session["token_id"] = _token_id(current_app.config["PILOTFISH_TOKEN"])
    session.permanent = False
    csrf_token()
    if request.is_json:
        return jsonify(ok=True, csrf_token=session["csrf"])
    return redirect(_safe_next(request.form.get("next")), code=303)


@bp.post("/logout")
def logout():
    session.clear()
    if request.is_json or request.accept_mimetypes.best == "application/json":
        return jsonify(ok=True)
    return redirect((request.script_root or "") + "/login", code=303)


# --- API keys --------------------------------------------------------------------------------------------

@bp.get("/api/keys")
def list_keys():
    require_owner()
    return jsonify(keys=[key.to_dict() for key in list_api_keys()])


@bp.post("/api/keys")
def create_key():
    require_owner()
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ValidationError("body", "expected a JSON object such as {\"name\": \"laptop\"}")
    key, secret = create_api_key(body.get("name"))
    return jsonify({**key.to_dict(), "key": secret, "note": "shown once: store it now"}), 201


@bp.delete("/api/keys/<key_id>")
def revoke_key(key_id):
    require_owner()
    revoke_api_key(key_id)
    return jsonify(revoked=key_id)


def list_api_keys() -> list:
    """The keys in use (not revoked), oldest first."""
    return ApiKey.query.filter_by(revoked_at=None).order_by(ApiKey.created_at).all()


def create_api_key(name) -> tuple:
    """Create a named key; returns (row, secret). Only the hash is stored."""
    if not isinstance(name, str) or not name.strip() or len(name) > 60 or any(ord(c) < 32 for c in name):
        raise ValidationError("name", "expected a name of 1 to 60 characters")
    name = name.strip()
    if ApiKey.query.filter_by(name=name, revoked_at=None).first():
        raise ValidationError("name", f"a key named {name!r} already exists")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=secrets.token_hex(4), name=name, key_hash=hash_key(secret), hint=secret[:7] + "…")
    db.session.add(row)
    db.session.commit()
    return row, secret


def revoke_api_key(key_id: str) -> None:
    row = db.session.get(ApiKey, key_id) if isinstance(key_id, str) else None
    if row is None or row.revoked_at is not None:
        raise NotFoundError(f"no API key {key_id!r}")
    row.revoked_at = utcnow()
    db.session.commit()
    current_app.extensions["pilotfish.keys"].forget()


def init_auth(app) -> None:
    app.secret_key = hmac.new(app.config["PILOTFISH_TOKEN"].encode(), b"pilotfish-session-signing",
                              hashlib.sha256).digest()
    app.config.update(SESSION_COOKIE_NAME="pilotfish_session", SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Lax")
    app.session_interface = PrefixedSessionInterface()
    app.extensions["pilotfish.keys"] = KeyCache()
    app.before_request(authenticate)
    app.register_blueprint(bp)
    app.jinja_env.globals["csrf_token"] = csrf_token
