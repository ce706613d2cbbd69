"""connection.json: where notebooks, the `pilotfish` command and a second Open OnDemand session find the running
portal (its base URL and token), written 0600 in PILOTFISH_HOME by whoever starts the portal and removed when it
stops. Also the portal's own addresses, as `GET /api` lists them.

Standard library only: portal.client imports this in a notebook's Python, which has `requests` and nothing else.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Optional

FILE_NAME = "connection.json"


def default_home() -> Path:
    """PILOTFISH_HOME, else ~/.pilotfish (as portal.config reads it)."""
    return Path(os.environ.get("PILOTFISH_HOME") or Path.home() / ".pilotfish").expanduser()


def connection_path(home=None) -> Path:
    """Where connection.json is: in `home`, else in default_home()."""
    return (Path(home).expanduser() if home else default_home()) / FILE_NAME


def client_host(bind_host: str) -> str:
    """The host name other nodes use to reach a portal bound to `bind_host`."""
    if bind_host in ("0.0.0.0", "::", ""):
        return socket.getfqdn()
    return bind_host


def write_connection(home, host: str, port: int, token: str, prefix: str = "", pid: Optional[int] = None) -> Path:
    """Atomically write connection.json with mode 0600 (it holds the token)."""
    path = connection_path(home)
    data = {"url": f"http://{client_host(host)}:{port}{prefix}", "token": token, "host": socket.gethostname(),
            "pid": pid or os.getpid()}
    tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
    os.replace(tmp, path)
    return path


def read_connection(home=None) -> dict:
    """The content of connection.json. FileNotFoundError when there is none (no portal runs), another OSError
    when it cannot be read, ValueError when it is not a JSON object."""
    data = json.loads(connection_path(home).read_text())
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    return data


def portal_url(home=None) -> Optional[str]:
    """The portal's URL from connection.json, or None when there is no such file or it does not say."""
    try:
        url = read_connection(home).get("url")
    except (OSError, ValueError):
        return None
    return url if isinstance(url, str) and url else None


def remove_connection(home, pid: Optional[int] = None) -> None:
    """Remove connection.json if it still describes this portal (pid), so notebooks learn it stopped."""
    path = connection_path(home)
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return
    if pid is None or data.get("pid") == pid:
        path.unlink(missing_ok=True)


def portal_links(root: str) -> dict:
    """What this portal offers, for a person or a script that lands on its root (`root`: the URL prefix)."""
    return {"portal": "pilotfish", "links": {
        "services": f"{root}/api/services", "status": f"{root}/api/status", "keys": f"{root}/api/keys",
        "openai_base_url": f"{root}/v1", "service_base_url": f"{root}/services/<id>/v1"}}
