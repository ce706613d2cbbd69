"""Python client for notebooks: find the running portal and get `openai` clients for its gateway or one service.

    from portal.client import connect
    portal = connect()                       # reads ~/.pilotfish/connection.json (or PILOTFISH_HOME)
    chat = portal.openai()                   # openai.OpenAI at the portal's /v1 gateway
    chat.chat.completions.create(model="Qwen/Qwen2.5-0.5B-Instruct", messages=[...])
    portal.service("3fa2").openai()          # one service by id (prefix) or model

Needs only `requests` (and `openai` for the .openai() helpers).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import List, Optional

import requests


class PortalClientError(Exception):
    """The portal could not be found or refused a call; the message says what to do."""


class PortalNotRunning(PortalClientError):
    pass


def _home(home: Optional[str]) -> Path:
    return Path(home or os.environ.get("PILOTFISH_HOME") or Path.home() / ".pilotfish").expanduser()


def connect(url: Optional[str] = None, token: Optional[str] = None, home: Optional[str] = None,
            timeout: float = 10.0) -> "Portal":
    """The running portal: from `url` and `token`, else from connection.json in PILOTFISH_HOME."""
    if not (url and token):
        path = _home(home) / "connection.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PortalNotRunning(f"no portal is running (no {path}): start one from the Pilotfish tile in "
                                   "Open OnDemand, or with `pilotfish start`") from None
        except (OSError, ValueError) as exc:
            raise PortalClientError(f"cannot read {path}: {exc}") from None
        url, token = url or data.get("url"), token or data.get("token")
    portal = Portal(url, token, timeout=timeout)
    try:
        requests.get(portal.url + "/health", timeout=timeout).raise_for_status()
    except requests.RequestException as exc:
        raise PortalNotRunning(f"the portal at {portal.url} does not answer ({type(exc).__name__}): it may have "
                               "stopped; start it again from Open OnDemand or with `pilotfish start`") from None
    return portal


class Portal:
    def __init__(self, url: str, token: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"
        self.http.trust_env = False

    def __repr__(self):
        return f"<Portal {self.url}>"

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        try:
            response = self.http.request(method, self.url + path, **kwargs)
        except requests.RequestException as exc:
            raise PortalNotRunning(f"the portal at {self.url} does not answer ({type(exc).__name__})") from None
        if response.status_code >= 400:
            try:
                error = response.json().get("error")
                message = error.get("message") if isinstance(error, dict) else error
            except ValueError:
                message = response.text[:200]
            raise PortalClientError(f"{method} {path}: {response.status_code}: {message}")
        return response

    def services(self, state: Optional[str] = None) -> List[dict]:
        params = {"state": state} if state else None
        return self.request("GET", "/api/services", params=params).json()["services"]

    def service(self, id_or_model: str) -> "ServiceHandle":
        """A service by id (or unique id prefix), or the running service of a model (repo id)."""
        if re.fullmatch(r"[0-9a-f]{1,16}", id_or_model):
            try:
                return ServiceHandle(self, self.request("GET", f"/api/services/{id_or_model}").json())
            except PortalClientError:
                pass
        running = [s for s in self.services("RUNNING") if s["model"] == id_or_model]
        if not running:
            raise PortalClientError(f"no running service with id or model {id_or_model!r}")
        return ServiceHandle(self, running[0])

    def openai(self, **kwargs):
        """An `openai.OpenAI` client for the gateway: any running model, chosen by the `model` argument."""
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.token, **kwargs)


class ServiceHandle:
    def __init__(self, portal: Portal, data: dict):
        self.portal = portal
        self.data = data
        self.id = data["id"]
        self.model = data["model"]

    def __repr__(self):
        return f"<Service {self.id} {self.model} {self.data.get('state')}>"

    @property
    def state(self) -> str:
        self.data = self.portal.request("GET", f"/api/services/{self.id}").json()
        return self.data["state"]

    @property
    def base_url(self) -> str:
        return f"{self.portal.url}/services/{self.id}"

    def openai(self, **kwargs):
        """An `openai.OpenAI` client for this one service."""
        import openai
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.portal.token, **kwargs)
