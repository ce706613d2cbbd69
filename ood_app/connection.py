"""connection.json: where notebooks find the running portal (base URL and token), written 0600 in PILOTFISH_HOME."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Optional

FILE_NAME = "connection.json"


def client_host(bind_host: str) -> str:
    """The host name other nodes use to reach a portal bound to `bind_host`."""
    if bind_host in ("0.0.0.0", "::", ""):
        return socket.getfqdn()
    return bind_host


def write_connection(home: Path, host: str, port: int, token: str, prefix: str = "", pid: Optional[int] = None) -> Path:
    """Atomically write connection.json with mode 0600 (it holds the token)."""
    path = Path(home) / FILE_NAME
    data = {"url": f"http://{client_host(host)}:{port}{prefix}", "token": token, "host": socket.gethostname(),
            "pid": pid or os.getpid()}
    tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
    os.replace(tmp, path)
    return path


def remove_connection(home: Path, pid: Optional[int] = None) -> None:
    """Remove connection.json if it still describes this portal (pid), so notebooks learn it stopped."""
    path = Path(home) / FILE_NAME
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return
    if pid is None or data.get("pid") == pid:
        path.unlink(missing_ok=True)
