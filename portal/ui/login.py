"""The browser's login and logout: `POST /login` with the portal token (what Open OnDemand's Connect button sends)
starts a login session (portal/sessions.py, kept on the server; the cookie holds its random id); `POST /logout` ends
it on the server. Who a session makes the caller is portal.auth's rule. The login only ever redirects to a path of
this portal under the prefix it was reached by (safe_next).

A blueprint of its own, "auth", registered with the pages: its endpoints are named in portal.auth.PUBLIC_ENDPOINTS
and count as the `auth` route class in the metrics."""
from __future__ import annotations

import re
from urllib.parse import unquote, urlencode, urlsplit

from flask import Blueprint, current_app, jsonify, redirect, render_template, request

from ..auth import (SESSION_COOKIE, clear_session_cookie, session_of, set_session_cookie, token_matches,
                    unauthorized)
from ..sessions import session_cache
from ..validation import parse_json_object

bp = Blueprint("auth", __name__)
CSRF_FRAGMENT = "pf-csrf"  # the login's redirect hands the tab its CSRF token as #pf-csrf=<token>


_PATH_CHARACTERS = re.compile(r"/[!-\[\]-~]*")  # printable ASCII but backslash: no space, no control


def safe_next(target, root: str) -> str:
    """`target` if it is a path of this portal under `root` (its prefix and "/"), else `root`: what the login may
    redirect to. Checked as written and percent-decoded once (the browser decodes neither, but a form or query value
    arrives decoded): no scheme or host, no backslash, control character, space or non-ASCII character (browsers
    drop or reinterpret them), no "//" at the start, no "." or ".." segment (a browser resolves them, out of the
    prefix into another app's path), no fragment."""
    if not isinstance(target, str) or not target:
        return root
    for form in (target, unquote(target)):
        parts = urlsplit(form)
        if (not _PATH_CHARACTERS.fullmatch(form) or form.startswith("//") or not form.startswith(root)
                or parts.scheme or parts.netloc or "#" in form
                or any(segment in (".", "..") for segment in parts.path.split("/"))):
            return root
    return target


@bp.get("/login")
def login_form():
    return render_template("ui/login.html", error=None, next=request.args.get("next", ""))


@bp.post("/login")
def login():
    """With the portal token: a session (the one this browser already has, if it is still valid, so its other tabs
    keep working; else a new one). A script gets the CSRF token in JSON; a browser is sent to `next` with the CSRF
    token in the URL's fragment, which never reaches a server or a log and which the page's script keeps for this tab
    (static/js/pilotfish.js): under Open OnDemand no page carries it (portal.auth.csrf_token)."""
    if request.is_json:  # a script: one JSON object {"token": "..."}, anything else is a 400 naming the body
        token = parse_json_object(request.get_data(), '{"token": "<portal token>"}').get("token")
    else:
        token = request.form.get("token")
    if not isinstance(token, str) or not token_matches(token):
        if request.is_json:
            return unauthorized("wrong token")
        return render_template("ui/login.html", error="That token is not this portal's token.",
                               next=request.form.get("next", "")), 401
    sessions = session_cache(current_app)
    value = request.cookies.get(SESSION_COOKIE)
    current = session_of(current_app, value)
    if current is None:
        value, current = sessions.open()
    if request.is_json:
        response = jsonify(ok=True, csrf_token=current.csrf)
    else:
        target = safe_next(request.form.get("next"), (request.script_root or "") + "/")
        response = redirect(f"{target}#{urlencode({CSRF_FRAGMENT: current.csrf})}", code=303)
    set_session_cookie(response, value)
    return response


@bp.post("/logout")
def logout():
    """End the session on the server: a copy of its cookie is worth nothing from now on."""
    value = request.cookies.get(SESSION_COOKIE)
    if value:
        session_cache(current_app).revoke(value)
    if request.is_json or request.accept_mimetypes.best == "application/json":
        response = jsonify(ok=True)
    else:
        response = redirect((request.script_root or "") + "/login", code=303)
    clear_session_cookie(response)
    return response
