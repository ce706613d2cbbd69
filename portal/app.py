"""The Flask application: create_app() builds the portal (settings, database, scheduler, API, pages, proxy);
start_reconciler() starts the background loop of one process."""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from . import ROOT

log = logging.getLogger(__name__)


def create_app(config: Optional[Mapping[str, Any]] = None) -> Flask:
    """Build the portal. `config` overrides settings (see portal.config.load_config); tests pass `home` etc.

    The resolved site (portal.site) is app.extensions["pilotfish.site"]; a site config it cannot use raises
    SiteError (a ConfigError) before anything is created."""
    from .auth import init_auth
    from .config import MAX_REQUEST_BODY, ensure_token, load_config, prepare_home, use_private_umask
    from .db import init_db
    from .errors import PortalError
    from .site import build_site
    from .usage_ledger import init_usage

    use_private_umask()  # before anything is created: the database (-wal, -shm), job folders, logs, the spool
    settings = load_config(config)
    site = build_site(settings)  # what the site config means: a bad entry stops the portal here, in one line
    prepare_home(settings)

    app = Flask(__name__, template_folder=str(ROOT / "templates"), static_folder=str(ROOT / "static"))
    app.config.update(
        PILOTFISH=settings,
        PILOTFISH_TOKEN=ensure_token(settings),
        SQLALCHEMY_DATABASE_URI=settings.database_url,
        TESTING=settings.testing,
        MAX_CONTENT_LENGTH=MAX_REQUEST_BODY,  # portal/asgi.py refuses larger bodies before Flask sees them
    )
    app.json.sort_keys = False
    init_db(app)
    app.extensions["pilotfish.site"] = site
    app.extensions["pilotfish.scheduler"] = site.scheduler
    init_auth(app)
    init_usage(app)  # what the proxy counts per principal, written off the request path

    from .api import bp as api_bp
    from .prefix import PrefixMiddleware
    from .proxy import init_proxy
    from .ui import bp as ui_bp

    app.register_blueprint(api_bp)
    app.register_blueprint(ui_bp)
    init_proxy(app)
    app.wsgi_app = PrefixMiddleware(app.wsgi_app, settings.url_prefix)

    @app.errorhandler(PortalError)
    def portal_error(exc: PortalError):
        if openai_path():
            return openai_answer(exc.status, exc.message, exc.extra.get("field"), exc.extra.get("code"),
                                 {key: value for key, value in exc.extra.items() if key not in ("field", "code")})
        return jsonify(exc.to_dict()), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        message = f"{exc.name}: {exc.description}" if exc.code != 404 else "not found"
        if openai_path():
            return openai_answer(exc.code or 500, message)
        response = jsonify(error=message)
        response.status_code = exc.code or 500
        return response

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):
        log.exception("unexpected error")
        if openai_path():
            return openai_answer(500, "internal error: see the portal log")
        return jsonify(error="internal error: see the portal log"), 500

    return app


OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                      404: "not_found_error", 409: "invalid_request_error", 413: "invalid_request_error",
                      422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


def openai_path() -> bool:
    """Whether this request is one of OpenAI's API (/v1/...): its errors then come in OpenAI's shape."""
    return request.path == "/v1" or request.path.startswith("/v1/")


def openai_answer(status: int, message: str, param=None, code=None, extra=None):
    """{"error": {"message", "type", "param", "code"}}, the error the openai client parses (as the proxy's own:
    portal/proxy/answers.openai_error)."""
    response = jsonify(error={"message": message, "type": OPENAI_ERROR_TYPES.get(status, "api_error"), "param": param,
                              "code": code, **(extra or {})})
    response.status_code = status
    return response


def start_reconciler(app: Flask):
    """Start the background reconciler of this process (it only works while it holds the lock file)."""
    from .reconciler import Reconciler

    reconciler = Reconciler(app)
    app.extensions["pilotfish.reconciler"] = reconciler
    reconciler.start()
    return reconciler
