"""Python client for notebooks: find the running portal and get `openai` clients for its gateway or one service.

    from portal.client import connect
    portal = connect()                       # reads ~/.pilotfish/connection.json (or PILOTFISH_HOME)
    chat = portal.openai()                   # openai.OpenAI at the portal's /v1 gateway
    chat.chat.completions.create(model="Qwen/Qwen2.5-0.5B-Instruct", messages=[...])
    portal.service("3fa2").openai()          # one service by id (prefix) or model

    with portal.launch("text-generation", "Qwen/Qwen2.5-0.5B-Instruct", tier="Small", time=60) as svc:
        svc.openai().chat.completions.create(...)   # RUNNING here; stopped when the block ends

    svc = portal.launch("text-generation", "Qwen/Qwen2.5-0.5B-Instruct", lease=600, idle_timeout="30m")
    # lease: kept while this kernel runs (a heartbeat thread renews it) or the service is used; a crashed or
    # shut-down kernel lets it lapse and the portal stops the service 10 minutes later.

    svc = portal.launch("text-generation", "Qwen/Qwen2.5-0.5B-Instruct", time=60, renew="8h")
    # renew: a successor job takes over before each job's time limit (same id and URLs) for 8 hours in all

    svc = portal.launch("text-generation", "Qwen/Qwen2.5-0.5B-Instruct", replicas="1:3")
    # replicas: one to three jobs behind the same id and URLs, a job added under load and removed when quiet

Needs only `requests` (and `openai` for the .openai() helpers).
"""
from __future__ import annotations

import os
import re
import threading
import time
from datetime import datetime
from typing import Callable, List, Optional

import requests

from .batches.client import BatchesClient  # requests only
from .connection import connection_path, read_connection  # standard library only, like states
from .states import State  # plain Python: the client still needs only requests


class PortalClientError(Exception):
    """The portal could not be found or refused a call; the message is the API's own (or says what to do)."""

    def __init__(self, message: str, status: Optional[int] = None, field: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.status = status  # the HTTP status of a refused call (400: bad input)
        self.field = field  # for bad input: the request field it is about


class PortalNotRunning(PortalClientError):
    pass


class ServiceEnded(PortalClientError):
    """A service ended (FAILED, STOPPED, TIMEOUT) while it was awaited; the message holds its reason."""

    def __init__(self, service: dict):
        super().__init__(f"service {service['id']} {service['state']}: {service.get('reason') or 'no reason given'}")
        self.service = service


class WaitTimeout(PortalClientError):
    """A service did not become RUNNING in time (it keeps running: stop it or wait again)."""


def connect(url: Optional[str] = None, token: Optional[str] = None, home: Optional[str] = None,
            timeout: float = 10.0) -> "Portal":
    """The running portal: from `url` and `token` (or PILOTFISH_URL and PILOTFISH_TOKEN), else from
    connection.json in PILOTFISH_HOME."""
    url = url or os.environ.get("PILOTFISH_URL") or None
    token = token or os.environ.get("PILOTFISH_TOKEN") or None
    if not (url and token):
        path = connection_path(home)
        try:
            data = read_connection(home)
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


LIVE_STATES = State.LIVE
ENDED_STATES = State.TERMINAL


def replicas_value(written, target_in_flight=None):
    """A launch's `replicas` from a command line or a form: the count as written ("2", "1:3"), or, with a target of
    requests in flight per job, the object {min, max, target_in_flight} of the same count. Only the shape changes:
    the portal judges the value (a count that is not N or MIN:MAX is sent as written, for the portal to refuse)."""
    if target_in_flight is None or target_in_flight == "":
        return written
    low, _, high = str(written if written is not None else "").strip().partition(":")
    high = high or low
    if not (low.isascii() and low.isdigit() and high.isascii() and high.isdigit()):
        return written
    target = str(target_in_flight).strip()
    return {"min": int(low), "max": int(high),
            "target_in_flight": int(target) if target.isascii() and target.isdigit() else target_in_flight}


class Portal(BatchesClient):
    """A running portal, through its REST API. As a context manager, stops the services it launched on exit."""

    def __init__(self, url: str, token: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"
        self.http.trust_env = False
        self.launched: List["ServiceHandle"] = []

    def __repr__(self):
        return f"<Portal {self.url}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop_launched()

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        try:
            response = self.http.request(method, self.url + path, **kwargs)
        except requests.RequestException as exc:
            raise PortalNotRunning(f"the portal at {self.url} does not answer ({type(exc).__name__})") from None
        if response.status_code >= 400:
            field = None
            try:
                body = response.json()
                error = body.get("error")
                message = error.get("message") if isinstance(error, dict) else error
                field = error.get("param") if isinstance(error, dict) else body.get("field")
            except (ValueError, AttributeError):
                message = None
            if not message:
                message = f"{method} {path}: HTTP {response.status_code}: {response.text[:200].strip()}"
            raise PortalClientError(str(message), status=response.status_code, field=field)
        return response

    def get(self, path: str, **params) -> dict:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None} or None).json()

    # --- services ---------------------------------------------------------------------------------------

    def services(self, state: Optional[str] = None) -> List[dict]:
        """The services, newest first; `state` filters (RUNNING,PENDING or LIVE or ENDED)."""
        params = {"state": state} if state else None
        return self.request("GET", "/api/services", params=params).json()["services"]

    def service(self, id_or_model: str) -> "ServiceHandle":
        """A service by id (or unique id prefix), or the running service of a model (repo id)."""
        if re.fullmatch(r"[0-9a-f]{1,16}", id_or_model):
            try:
                return ServiceHandle(self, self.request("GET", f"/api/services/{id_or_model}").json())
            except PortalClientError as exc:
                if exc.status != 404:
                    raise
        running = [s for s in self.services("RUNNING") if s["model"] == id_or_model]
        if not running:
            raise PortalClientError(f"no service {id_or_model!r} (no id, id prefix or running model matches)",
                                    status=404)
        return ServiceHandle(self, running[0])

    def launch(self, kind: str, model: str, tier: Optional[str] = None, wait: bool = True, timeout: float = 600,
               on_change: Optional[Callable[[dict, dict], None]] = None, lease=None, renew=None, replicas=None,
               **fields) -> "ServiceHandle":
        """Launch a service (fields as in POST /api/services: revision, time, name, resources, engine_args, force,
        idle_timeout).

        With `renew`, the service outlives its job's time limit: before each job ends, a successor job is submitted;
        once it answers, new requests go to it (same id and URLs) and the old job finishes its open requests.
        `renew=True` renews until the service is stopped; a duration ("8h", "2d", "1h30m") is how long it lives in all
        from the launch; an ISO 8601 time ("2026-12-01T18:00", the portal's local time, or with Z or an offset) is
        when it ends (a `datetime` is sent as one). The portal checks the value (PortalClientError, 400, naming
        `renew`).

        With `replicas`, the service runs on several jobs at once behind the same id and URLs (each request goes to
        the job with the fewest requests in flight): `replicas=2` keeps two jobs, `replicas="1:3"` one to three (a job
        is added while requests in flight per job stay above 4, and removed after a quiet spell), and
        `replicas={"min": 1, "max": 3, "target_in_flight": 8}` sets that target too. The portal checks the value
        (PortalClientError, 400, naming `replicas`).

        With `lease` (seconds, or "10m"), the service lives while this process renews its lease (a daemon thread
        beats every third of it, from the launch on) or the service is used: a crashed, killed or shut-down kernel
        stops beating and the portal stops the service once the lease lapses. `handle.release()` stops beating.
        With `wait`, return once it is RUNNING; raises ServiceEnded (with the reason) if it ends first,
        WaitTimeout after `timeout` seconds. The handle, used as a context manager, stops the service on exit.
        """
        body = {"kind": kind, "model": model, **{k: v for k, v in fields.items() if v is not None}}
        if tier is not None:
            body["tier"] = tier
        if lease is not None:
            body["lease"] = lease
        if renew is not None:
            body["renew"] = renew.isoformat(timespec="seconds") if isinstance(renew, datetime) else renew
        if replicas is not None:
            body["replicas"] = replicas
        handle = ServiceHandle(self, self.request("POST", "/api/services", json=body).json())
        self.launched.append(handle)
        if handle.data.get("lease"):
            handle.keep_alive()
        if wait:
            handle.wait_ready(timeout, on_change=on_change)
        return handle

    def dry_run(self, kind: str, model: str, tier: Optional[str] = None, **fields) -> dict:
        """What a launch would do (plan, sbatch arguments, job script), without submitting anything."""
        body = {"kind": kind, "model": model, **{k: v for k, v in fields.items() if v is not None}}
        if tier is not None:
            body["tier"] = tier
        return self.request("POST", "/api/services", params={"dry_run": "1"}, json=body).json()

    def stop_launched(self) -> None:
        """Stop every live service this Portal object launched."""
        for handle in self.launched:
            try:
                handle.stop()
            except PortalClientError:
                pass

    # --- portal, catalog, keys --------------------------------------------------------------------------

    def health(self) -> dict:
        return self.get("/health")

    def status(self) -> dict:
        return self.get("/api/status")

    def tiers(self) -> dict:
        return self.get("/api/tiers")

    def recommend(self, model: str, revision: Optional[str] = None) -> dict:
        return self.get("/api/tiers/recommend", model=model, revision=revision)

    def models(self, refresh: bool = False) -> dict:
        return self.get("/api/models", refresh="1" if refresh else None)

    def delete_model(self, repo_id: str, revision: Optional[str] = None) -> dict:
        params = {"revision": revision} if revision else None
        return self.request("DELETE", f"/api/models/{repo_id}", params=params).json()

    def start_download(self, repo_id: str, revision: Optional[str] = None, use_cache: bool = False) -> dict:
        body = {"repo_id": repo_id, "use_cache": use_cache, **({"revision": revision} if revision else {})}
        return self.request("POST", "/api/models/downloads", json=body).json()

    def download(self, task_id: str) -> dict:
        return self.get(f"/api/models/downloads/{task_id}")

    def cancel_download(self, task_id: str) -> dict:
        return self.request("DELETE", f"/api/models/downloads/{task_id}").json()

    def images(self) -> List[dict]:
        return self.get("/api/images")["images"]

    def keys(self) -> List[dict]:
        return self.get("/api/keys")["keys"]

    def create_key(self, name: str, **limits) -> dict:
        """A new named key (its secret in `key`, shown once), limited by `scopes`, `models`, `expires` ("30d", an ISO
        time), `requests_per_minute`, `tokens_per_minute` (left out: all scopes, any model, no end, no rate)."""
        body = {"name": name, **{field: value for field, value in limits.items() if value is not None}}
        return self.request("POST", "/api/keys", json=body).json()

    def revoke_key(self, key_id: str) -> dict:
        return self.request("DELETE", f"/api/keys/{key_id}").json()

    def openai(self, **kwargs):
        """An `openai.OpenAI` client for the gateway: any running model, chosen by the `model` argument."""
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.token, **kwargs)


class ServiceHandle:
    """One service. As a context manager, stops it on exit."""

    def __init__(self, portal: Portal, data: dict):
        self.portal = portal
        self.data = data
        self.id = data["id"]
        self.model = data["model"]
        self._heartbeat: Optional[Heartbeat] = None

    def __repr__(self):
        return f"<Service {self.id} {self.model} {self.data.get('state')}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        try:
            self.stop()
        except PortalClientError:
            pass

    def refresh(self) -> dict:
        """The service as the portal sees it now, with its events."""
        self.data = self.portal.request("GET", f"/api/services/{self.id}").json()
        return self.data

    @property
    def state(self) -> str:
        return self.refresh()["state"]

    @property
    def base_url(self) -> str:
        return f"{self.portal.url}/services/{self.id}"

    def wait_for(self, states, timeout: float = 600, on_change: Optional[Callable[[dict, dict], None]] = None,
                 interval: float = 0.5) -> dict:
        """Poll until the state is one of `states`; `on_change(old, new)` sees every change. Raises
        ServiceEnded if the service ends in another state, WaitTimeout after `timeout` seconds."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        previous = None
        while True:
            data = self.refresh()
            if on_change is not None and (previous is None or previous["state"] != data["state"]):
                on_change(previous, data)
            previous = data
            if data["state"] in states:
                return data
            if data["state"] in ENDED_STATES:
                raise ServiceEnded(data)
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"service {self.id} is still {data['state']} after {timeout:g} s "
                                  f"({data.get('reason') or 'no reason given'})")
            time.sleep(interval)

    def wait_ready(self, timeout: float = 600, on_change: Optional[Callable[[dict, dict], None]] = None) -> "ServiceHandle":
        """Block until RUNNING (the server answers its health check)."""
        self.wait_for("RUNNING", timeout, on_change)
        return self

    def wait_ended(self, timeout: float = 60) -> dict:
        return self.wait_for(ENDED_STATES, timeout)

    def logs(self, tail: int = 200) -> str:
        return self.portal.request("GET", f"/api/services/{self.id}/logs", params={"tail": tail}).json()["log"]

    def provenance(self) -> dict:
        """Model revision and file sha256s, engine version, image digest, arguments; `recipe` and `methods`."""
        return self.portal.request("GET", f"/api/services/{self.id}/provenance").json()

    def renew_lease(self) -> dict:
        """Renew the service's lease from now (what the heartbeat does); PortalClientError (409) when it has none or
        has ended."""
        self.data = self.portal.request("POST", f"/api/services/{self.id}/lease").json()
        return self.data

    def keep_alive(self) -> "ServiceHandle":
        """Renew the lease in a daemon thread every third of its length until the service ends, `release()` or
        `stop()` is called, or this process exits."""
        if self._heartbeat is None or not self._heartbeat.is_alive():
            self._heartbeat = Heartbeat(self, float(self.data["lease"]) / 3)
            self._heartbeat.start()
        return self

    def release(self) -> None:
        """Stop renewing the lease: the service stops once it lapses, unless it is used."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None

    def stop(self, wait: bool = False, timeout: float = 60) -> dict:
        """Cancel the job (and stop renewing its lease); with `wait`, until the scheduler confirms it ended."""
        self.release()
        self.data = self.portal.request("POST", f"/api/services/{self.id}/stop").json()
        if wait and self.data["state"] not in ENDED_STATES:
            return self.wait_ended(timeout)
        return self.data

    def delete(self) -> None:
        """Forget an ended service and its job directory."""
        self.portal.request("DELETE", f"/api/services/{self.id}")

    def openai(self, **kwargs):
        """An `openai.OpenAI` client for this one service."""
        import openai
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.portal.token, **kwargs)


class Heartbeat(threading.Thread):
    """Renews a service's lease every `interval` seconds (a daemon thread: it ends with its process). It ends when the
    portal says the service has no lease to renew any more (it ended, or is stopping: 404 or 409), or when
    cancelled; a portal that does not answer is tried again at the next beat."""

    def __init__(self, handle: ServiceHandle, interval: float):
        super().__init__(name=f"pilotfish-lease-{handle.id}", daemon=True)
        self.handle = handle
        self.interval = interval
        self.beats = 0
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def run(self) -> None:
        own = self.handle.portal  # a session of its own: the caller's may be in use on another thread
        portal, path = Portal(own.url, own.token, timeout=own.timeout), f"/api/services/{self.handle.id}/lease"
        while not self._cancelled.wait(self.interval):
            try:
                portal.request("POST", path, timeout=min(portal.timeout, self.interval))
                self.beats += 1
            except PortalNotRunning:
                continue
            except PortalClientError as exc:
                if exc.status in (404, 409):
                    return
