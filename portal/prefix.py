"""Answer under Open OnDemand's /node/<host>/<port> prefix and at bare paths alike."""
from __future__ import annotations

import re
from typing import Tuple

OOD_PREFIX = re.compile(r"^(/r?node/[^/]+/\d+)(/.*)?$")


def split_prefix(path: str, prefix: str = "") -> Tuple[str, str]:
    """(prefix, rest) of a request path: the configured prefix or OOD's /node/<host>/<port>, else ("", path)."""
    path = path or "/"
    if prefix and (path == prefix or path.startswith(prefix + "/")):
        return prefix, path[len(prefix):] or "/"
    match = OOD_PREFIX.match(path)
    if match:
        return match.group(1), match.group(2) or "/"
    return "", path


class PrefixMiddleware:
    """WSGI: moves a known prefix from PATH_INFO to SCRIPT_NAME, so links and cookies follow the way the portal was
    reached."""

    def __init__(self, app, prefix: str = ""):
        self.app = app
        self.prefix = prefix.rstrip("/")

    def __call__(self, environ, start_response):
        prefix, rest = split_prefix(environ.get("PATH_INFO", ""), self.prefix)
        if prefix:
            environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + prefix
            environ["PATH_INFO"] = rest
        return self.app(environ, start_response)
