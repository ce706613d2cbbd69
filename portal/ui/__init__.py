"""The web pages: server-rendered Jinja (templates/ui/) over the domain functions the API calls too (never the API's
modules), plain JavaScript (static/js/) for live updates, and the login pages (login.py). Every URL is built from the
request's script root, so the pages work under Open OnDemand's /node/<host>/<port>/ prefix and at bare paths alike."""
from __future__ import annotations

from . import batches, benchmarks, catalog, launch, login, services, usage  # noqa: F401  (registers the pages)
from .blueprint import NAV, bp, place_problem  # noqa: F401


@bp.record_once
def _register_login(state) -> None:
    """The login pages are a blueprint of their own ("auth", see login.py), registered with the pages."""
    state.app.register_blueprint(login.bp)
