"""Renewal (`renew`) on every surface that carries a launch to the API, checked by the API alone: the Python client's
body, `pilotfish run --renew/--renew-until`, the launch page's box and its end, a recipe entry; and what `pilotfish
ls`/`details` say of a renewed service and its jobs. In process: the client's calls go to the Flask app through a
requests adapter, no portal process or scheduler job."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import pytest
import requests
from click.testing import CliRunner

from portal.cli import command
from portal.cli.command import main as pilotfish
from portal.client import Portal, PortalClientError
from portal.recipes import RecipeError, parse_recipe

LAUNCH = {"kind": "text-generation", "model": "test/tiny"}
IN_A_MONTH = datetime.now() + timedelta(days=30)  # an end the API takes (at most 366 days away), in local time
END = f"{IN_A_MONTH:%Y-%m-%dT%H:%M}"


class FlaskAdapter(requests.adapters.BaseAdapter):
    """Sends a requests call to a Flask app's test client and answers with what it said."""

    def __init__(self, app):
        super().__init__()
        self.client = app.test_client()

    def send(self, request, **kwargs):
        parts = urlsplit(request.url)
        answer = self.client.open(parts.path, method=request.method, query_string=parts.query,
                                  data=request.body, headers=dict(request.headers))
        response = requests.Response()
        response.status_code = answer.status_code
        response._content = answer.get_data()
        response.headers.update(answer.headers)
        response.url, response.request = request.url, request
        return response

    def close(self):
        pass


@pytest.fixture
def portal(app):
    """The Python client of the app's API."""
    client = Portal("http://portal.test", app.config["PILOTFISH_TOKEN"])
    client.http.mount("http://portal.test", FlaskAdapter(app))
    return client


def dry_run_renew(portal, **fields):
    return portal.dry_run(LAUNCH["kind"], LAUNCH["model"], **fields)["renew"]


# --- the Python client ----------------------------------------------------------------------------------

def test_the_client_passes_renew_as_given(portal):
    assert dry_run_renew(portal) is False
    assert dry_run_renew(portal, renew=True) is True
    assert dry_run_renew(portal, renew="8h") == "8h"
    assert dry_run_renew(portal, renew=END) == END


def test_the_client_launch_sends_renew_and_a_datetime_as_iso(portal, monkeypatch):
    sent = []

    def record(method, path, **kwargs):
        sent.append(kwargs.get("json"))
        raise PortalClientError("recorded", status=418)

    monkeypatch.setattr(portal, "request", record)
    end = datetime(2099, 12, 1, 18, 0, tzinfo=timezone(timedelta(hours=1)))
    for renew in ("8h", True, end):
        with pytest.raises(PortalClientError):
            portal.launch(LAUNCH["kind"], LAUNCH["model"], wait=False, renew=renew)
    with pytest.raises(PortalClientError):
        portal.launch(LAUNCH["kind"], LAUNCH["model"], wait=False)
    assert [body.get("renew", "absent") for body in sent] == ["8h", True, "2099-12-01T18:00:00+01:00", "absent"]


def test_the_client_gets_the_apis_refusal_naming_renew(portal):
    for bad in ("soon", "1m", 5):
        with pytest.raises(PortalClientError) as caught:
            dry_run_renew(portal, renew=bad)
        assert caught.value.status == 400 and caught.value.field == "renew", caught.value.message


# --- pilotfish run -----------------------------------------------------------------------------------------

@pytest.fixture
def cli(portal, monkeypatch):
    """Runs `pilotfish ...` in this process against `portal`; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(command, "connect", lambda url=None, token=None: portal)

    def run(*args):
        result = CliRunner().invoke(pilotfish, list(args))
        return result.exit_code, result.stdout, result.stderr
    return run


def test_run_renew_flags_reach_the_launch(cli):
    base = ["run", "text-generation", "--model", "test/tiny", "--dry-run", "--json"]
    assert json.loads(cli(*base)[1])["renew"] is False
    assert json.loads(cli(*base, "--renew")[1])["renew"] is True
    assert json.loads(cli(*base, "--renew-until", "8h")[1])["renew"] == "8h"
    assert json.loads(cli(*base, "--renew", "--renew-until", END + "Z")[1])["renew"] == END + "Z"
    code, out, err = cli("run", "text-generation", "--model", "test/tiny", "--dry-run", "--renew-until", "8h")
    assert code == 0 and "renewed before its time limit (8h)" in out, (out, err)


def test_run_a_bad_renewal_is_the_apis_refusal_in_one_line(cli):
    code, out, err = cli("run", "text-generation", "--model", "test/tiny", "--dry-run", "--renew-until", "soon")
    assert code == 2 and err.strip().startswith("pilotfish: renew: expected true"), (code, out, err)
    assert len(err.strip().splitlines()) == 1


def test_run_help_explains_renewal(cli):
    code, out, _ = cli("run", "--help")
    assert code == 0
    assert "--renew " in out and "--renew-until" in out and "8h" in out and "2026-12-01T18:00" in out


# --- pilotfish ls and details ------------------------------------------------------------------------------

def service(**fields) -> dict:
    data = {"id": "3fa2c0ffee00", "name": "chat", "kind": "text-generation", "engine": "vllm", "model": "org/m",
            "revision": "abc", "tier": "Small", "state": "RUNNING", "reason": "answering", "scheduler": "slurm",
            "job_id": "1203", "node": "n2", "endpoint": None, "resources": {}, "engine_args": [], "time_limit": 60,
            "created_at": "2026-01-01T00:00:00Z", "idle_timeout": None, "lease": None, "stops_at": None,
            "renew": False, "renew_until": None, "generation": 1, "events": [], "jobs": []}
    data.update(fields)
    return data


class FakePortal:
    def __init__(self, services):
        self.listed = services

    def services(self, state=None):
        return self.listed

    def get(self, path, **params):  # GET /api/services/<id>/cost: nothing run yet
        assert path.endswith("/cost"), path
        return {"gpu_hours": 0.0, "cpu_hours": 0.0, "source": "job times", "tokens": {}, "jobs": []}

    def service(self, service_id):
        found = self.listed[0]

        class Handle:
            def refresh(self):
                return found
        return Handle()


@pytest.fixture
def shown(monkeypatch):
    def run(services, *args):
        monkeypatch.setattr(command, "connect", lambda url=None, token=None: FakePortal(services))
        result = CliRunner().invoke(pilotfish, list(args))
        assert result.exit_code == 0, (result.stdout, result.stderr)
        return result.stdout
    return run


def test_details_show_renewal_generation_and_the_other_jobs(shown):
    jobs = [{"generation": 2, "phase": "draining", "job_id": "1190", "node": "n1", "reason": "replaced"},
            {"generation": 4, "phase": "successor", "job_id": "1215", "node": None, "reason": None}]
    text = shown([service(renew=True, generation=3, jobs=jobs)], "details", "3fa2")
    assert "renewal      renews until stopped (generation 3)" in text, text
    assert "  generation 2  draining  job 1190 on n1  replaced" in text, text
    assert "  generation 4  successor job 1215 on -" in text, text
    plain = shown([service()], "details", "3fa2")
    assert "renewal      none (it ends at its time limit)" in plain and "\njobs\n" not in plain, plain


def test_details_and_ls_show_a_renewal_end_in_local_time(shown):
    end = (datetime.now(timezone.utc) + timedelta(hours=5, minutes=1)).replace(microsecond=0)
    local = end.astimezone()
    clock = f"{local:%H:%M}" if local.date() == datetime.now().astimezone().date() else f"{local:%Y-%m-%d %H:%M}"
    data = service(renew=True, renew_until=end.isoformat().replace("+00:00", "Z"), generation=2)
    assert f"renews until {clock} (in 5h; generation 2)" in shown([data], "details", "3fa2")
    listed = shown([data, service(id="77aa00000000", name="other")], "ls")
    header, first, second = listed.splitlines()[:3]
    assert header.split()[-1] == "RENEWS"
    assert first.endswith(f"until {clock} (gen 2)") and "until" not in second, listed
    ended = shown([service(state="STOPPED", renew=True)], "ls")
    assert "until stopped" not in ended


# --- the launch page ---------------------------------------------------------------------------------------

def launch_page(client, auth, **form):
    page = client.post("/ui/launch", data={**LAUNCH, "action": "check", **form}, headers=auth)
    assert page.status_code == 200
    return page.get_data(as_text=True)


def test_the_launch_page_has_the_renewal_controls(client, auth):
    text = client.get("/ui/launch", headers=auth).get_data(as_text=True)
    assert 'id="renew" name="renew" type="checkbox"' in text and 'id="renew_until" name="renew_until"' in text


def test_the_launch_page_sends_renewal_to_the_launch(client, auth):
    assert "plan-renewal" not in launch_page(client, auth)
    assert "before each time limit, until stopped" in launch_page(client, auth, renew="1")
    ticked = launch_page(client, auth, renew="1", renew_until="8h")
    assert "before each time limit, renew: 8h" in ticked
    assert "before each time limit, renew: 8h" in launch_page(client, auth, renew_until=" 8h ")  # the end implies it


def test_the_launch_page_shows_a_bad_renewal_next_to_its_field(client, auth):
    text = launch_page(client, auth, renew="1", renew_until="soon")
    assert 'id="renew_until-error"' in text and "expected true" in text and "Check passed" not in text
    assert 'value="soon"' in text and 'checked' in text.split('id="renew"', 1)[1].split(">", 1)[0]


# --- recipes -----------------------------------------------------------------------------------------------

def test_a_recipe_entry_carries_renew_as_written():
    recipe = parse_recipe({"services": [
        {**LAUNCH, "renew": True}, {**LAUNCH, "renew": "8h"}, {**LAUNCH, "renew": END},
        {**LAUNCH, "renew": IN_A_MONTH.replace(second=30, microsecond=0)}, {**LAUNCH}]})
    assert [body.get("renew", "absent") for body in recipe.launches] == [
        True, "8h", END, f"{END}:30", "absent"]


@pytest.mark.parametrize("value", ["soon", "1m", 3, "2099-12-01T18:00"])
def test_a_recipe_entrys_bad_renew_names_it(value):
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"services": [LAUNCH, {**LAUNCH, "renew": value}]})
    assert str(caught.value).startswith("services[1].renew: "), str(caught.value)


def test_a_recipes_launch_is_accepted_by_the_api(portal):
    body = parse_recipe({"services": [{**LAUNCH, "renew": "8h"}]}).launches[0]
    answer = portal.request("POST", "/api/services", params={"dry_run": "1"}, json=body).json()
    assert answer["renew"] == "8h"
