"""WSGI middleware: answer under Open OnDemand's /node/<host>/<port> prefix and at bare paths alike."""
from __future__ import annotations

import re

OOD_PREFIX = re.compile(r"^(/r?node/[^/]+/\d+)(/.*)?$")


class PrefixMiddleware:
    """Moves a known prefix from PATH_INFO to SCRIPT_NAME, so links and cookies follow the way the portal was reached."""

    def __init__(self, app, prefix: str = ""):
        self.app = app
        self.prefix = prefix.rstrip("/")

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "") or "/"
        if self.prefix and (path == self.prefix or path.startswith(self.prefix + "/")):
            environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + self.prefix
            environ["PATH_INFO"] = path[len(self.prefix):] or "/"
        else:
            match = OOD_PREFIX.match(path)
            if match:
                environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + match.group(1)
                environ["PATH_INFO"] = match.group(2) or "/"
        return self.app(environ, start_response)
