"""The browser's login and logout: `POST /login` with the portal token (what Open OnDemand's Connect button sends)
starts a session cookie; `POST /logout` ends it. Who a session makes the caller is portal.auth's rule.

A blueprint of its own, "auth", registered with the pages: its endpoints are named in portal.auth.PUBLIC_ENDPOINTS
and count as the `auth` route class in the metrics."""
from __future__ import annotations

from typing import Optional
from urllib.parse import urlsplit

from flask import Blueprint, current_app, jsonify, redirect, render_template, request, session

from ..auth import csrf_token, token_id, token_matches, unauthorized

bp = Blueprint("auth", __name__)


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
    session["token_id"] = token_id(current_app.config["PILOTFISH_TOKEN"])
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
