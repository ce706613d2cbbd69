"""Replicas (`replicas`) on every surface that carries a launch to the API, checked by the API alone: the Python
client's body, `pilotfish run --replicas/--target-in-flight`, the launch page's fields, a recipe entry (YAML's 1:3
too); what `pilotfish ls`/`details` and the pages' script say of a service with replicas and its jobs. In process, as
tests/test_renewal_surfaces.py: no portal process or scheduler job."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import playwright
import pytest
from click.testing import CliRunner

from portal.cli import command
from portal.cli.command import main as pilotfish
from portal.client import PortalClientError, replicas_value
from portal.recipes import RecipeError, load_recipe, parse_recipe
from tests.conftest import REPO
from tests.test_renewal_surfaces import LAUNCH, FakePortal, launch_page, portal, service  # noqa: F401 (fixture)

BAD = ("x", "1:99", "3:1")  # refused by the API's parse_replicas: not a count, over the maximum, max below min


def counts(low, high, target=4, serving=None):
    """A service's replicas as the API answers them (`serving` counted by the portal), or as a plan has them."""
    found = {"min": low, "max": high, "target_in_flight": target}
    return found if serving is None else {**found, "serving": serving}


# --- the Python client ----------------------------------------------------------------------------------

def test_the_client_passes_replicas_as_given(portal):  # noqa: F811
    def planned(**fields):
        return portal.dry_run(LAUNCH["kind"], LAUNCH["model"], **fields)["replicas"]
    assert planned() is None
    assert planned(replicas=2) == counts(2, 2)
    assert planned(replicas="1:3") == counts(1, 3)
    assert planned(replicas={"min": 1, "max": 3, "target_in_flight": 8}) == counts(1, 3, 8)


def test_the_client_launch_sends_replicas(portal, monkeypatch):  # noqa: F811
    sent = []

    def record(method, path, **kwargs):
        sent.append(kwargs.get("json"))
        raise PortalClientError("recorded", status=418)

    monkeypatch.setattr(portal, "request", record)
    for value in (2, "1:3", {"max": 3}):
        with pytest.raises(PortalClientError):
            portal.launch(LAUNCH["kind"], LAUNCH["model"], wait=False, replicas=value)
    with pytest.raises(PortalClientError):
        portal.launch(LAUNCH["kind"], LAUNCH["model"], wait=False)
    assert [body.get("replicas", "absent") for body in sent] == [2, "1:3", {"max": 3}, "absent"]


def test_the_client_gets_the_apis_refusal_naming_replicas(portal):  # noqa: F811
    for bad in (*BAD, True, {"min": 1, "max": 3, "target_in_flight": 0}):
        with pytest.raises(PortalClientError) as caught:
            portal.dry_run(LAUNCH["kind"], LAUNCH["model"], replicas=bad)
        assert caught.value.status == 400 and caught.value.field == "replicas", caught.value.message


def test_a_count_and_a_target_become_the_apis_object_and_nothing_else_is_judged():
    assert replicas_value("1:3") == "1:3" and replicas_value("2", "") == "2" and replicas_value(None) is None
    assert replicas_value("1:3", 8) == counts(1, 3, 8)
    assert replicas_value(" 2 ", "8") == counts(2, 2, 8)
    assert replicas_value("x", 8) == "x" and replicas_value("1:3:5", 8) == "1:3:5"  # for the portal to refuse
    assert replicas_value("1:3", "many") == {"min": 1, "max": 3, "target_in_flight": "many"}


# --- pilotfish run -----------------------------------------------------------------------------------------

@pytest.fixture
def cli(portal, monkeypatch):  # noqa: F811
    """Runs `pilotfish ...` in this process against `portal`; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(command, "connect", lambda url=None, token=None: portal)

    def run(*args):
        result = CliRunner().invoke(pilotfish, list(args))
        return result.exit_code, result.stdout, result.stderr
    return run


DRY = ["run", "text-generation", "--model", "test/tiny", "--dry-run"]


def test_run_replica_flags_reach_the_launch(cli):
    def planned(*flags):
        code, out, err = cli(*DRY, "--json", *flags)
        assert code == 0, (out, err)
        return json.loads(out)["replicas"]
    assert planned() is None
    assert planned("--replicas", "2") == counts(2, 2)
    assert planned("--replicas", "1:3") == counts(1, 3)
    assert planned("--replicas", "1:3", "--target-in-flight", "8") == counts(1, 3, 8)
    code, out, err = cli(*DRY, "--replicas", "1:3")
    assert code == 0 and "; replicas: 1:3 jobs" in out, (out, err)


@pytest.mark.parametrize("flags", [["--replicas", bad] for bad in BAD] + [["--replicas", "x", "--target-in-flight",
                                                                          "8"], ["--replicas", "1:3",
                                                                                 "--target-in-flight", "0"]])
def test_run_a_bad_replica_count_is_the_apis_refusal_in_one_line(cli, flags):
    code, out, err = cli(*DRY, *flags)
    assert code == 2 and err.startswith("pilotfish: replicas: "), (code, out, err)
    assert len(err.strip().splitlines()) == 1


def test_run_a_target_without_replicas_is_a_usage_error(cli):
    code, _, err = cli(*DRY, "--target-in-flight", "8")
    assert code == 2 and "--target-in-flight needs --replicas" in err and len(err.strip().splitlines()) == 1


def test_run_help_explains_replicas(cli):
    code, out, _ = cli("run", "--help")
    assert code == 0
    text = " ".join(out.split())
    assert "--replicas N|MIN:MAX" in text and "--target-in-flight N" in text and "least busy" in text
    assert "--replicas 1:3 --target-in-flight 8" in text and "(default 4)" in text


# --- pilotfish ls and details ------------------------------------------------------------------------------

@pytest.fixture
def shown(monkeypatch):
    def run(services, *args):
        monkeypatch.setattr(command, "connect", lambda url=None, token=None: FakePortal(services))
        result = CliRunner().invoke(pilotfish, list(args))
        assert result.exit_code == 0, (result.stdout, result.stderr)
        return result.stdout
    return run


JOBS = [{"generation": 2, "phase": "replica", "job_id": "1204", "node": "n1", "ready_at": "2026-01-01T00:05:00Z",
         "reason": None},
        {"generation": 3, "phase": "replica", "job_id": "1205", "node": None, "ready_at": None, "reason": None},
        {"generation": 4, "phase": "ended", "job_id": "1206", "node": "n2", "ready_at": "2026-01-01T00:06:00Z",
         "reason": "quiet: removed"}]


def test_details_count_the_serving_jobs_and_list_the_replicas(shown):
    text = shown([service(replicas=counts(1, 3, serving=2), jobs=JOBS)], "details", "3fa2")
    assert "replicas     2 of 1:3 jobs serving (one added above 4 requests in flight per job)" in text, text
    assert "  generation 2  replica   job 1204 on n1  serving" in text, text
    assert "  generation 3  replica   job 1205 on -  starting" in text, text
    assert "  generation 4  ended     job 1206 on n2  quiet: removed" in text, text
    # the current job counts only while RUNNING; a fixed count says no target
    text = shown([service(state="UNHEALTHY", replicas=counts(2, 2, serving=1), jobs=JOBS[:1])], "details", "3fa2")
    assert "replicas     1 of 2 jobs serving\n" in text, text
    plain = shown([service()], "details", "3fa2")
    assert "replicas     none (one job)" in plain, plain


def test_ls_shows_the_replica_count_of_live_services(shown):
    listed = shown([service(replicas=counts(1, 3, serving=1), jobs=None), service(id="77aa00000000", name="two",
                                                                                 replicas=counts(2, 2, serving=2),
                                                                                 jobs=None),
                    service(id="88bb00000000", name="single", jobs=None)], "ls")
    header, first, second, third = listed.splitlines()[:4]
    columns = header.split()
    assert columns[columns.index("JOB") + 1] == "REPLICAS", header
    at = header.index("REPLICAS")
    assert first[at:].split()[:3] == ["1", "of", "1:3"] and second[at:].split()[:3] == ["2", "of", "2"], listed
    assert third[at:at + len("REPLICAS")].strip() == "", listed
    ended = shown([service(state="STOPPED", replicas=counts(1, 3, serving=0), jobs=None)], "ls", "--all")
    assert "1:3" not in ended


# --- the pages' words (static/js/pilotfish.js, run by the Node.js that Playwright ships) --------------------------

NODE = Path(playwright.__file__).parent / "driver" / "node"
PAGE_WORDS = """
global.document = {body: {dataset: {}}, querySelector: () => null, addEventListener() {}};
global.window = {location: {hash: "", pathname: "", search: ""}, history: {},
                 sessionStorage: {getItem: () => "", setItem() {}}};
eval(require("fs").readFileSync(process.argv[1], "utf8") + "; global.PF = PF;");
const cases = JSON.parse(process.argv[2]);
console.log(JSON.stringify({replicas: cases.services.map(PF.replicas), phases: cases.jobs.map(PF.jobPhase),
                            live: PF.isLive({state: "SCALED_TO_ZERO"})}));
"""


def test_the_pages_say_how_many_jobs_serve_and_each_replicas_phase():
    plan = service(replicas=counts(1, 3))  # a plan: nothing serves yet
    cases = {"services": [service(replicas=counts(1, 3, serving=2), jobs=JOBS), plan,
                          service(state="UNHEALTHY", replicas=counts(2, 2, serving=1), jobs=JOBS[:1]), service()],
             "jobs": JOBS + [{"generation": 5, "phase": "draining", "ready_at": "2026-01-01T00:07:00Z"}]}
    result = subprocess.run([str(NODE), "-e", PAGE_WORDS, str(REPO / "static" / "js" / "pilotfish.js"),
                             json.dumps(cases)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    words = json.loads(result.stdout)
    assert words["replicas"] == ["2 of 1:3 serving", "1:3 jobs", "1 of 2 serving", ""]
    assert words["phases"] == ["replica, serving", "replica, starting", "ended", "draining"]
    assert words["live"] is True  # a service scaled to zero can be stopped from the pages


# --- the launch page ---------------------------------------------------------------------------------------

def test_the_launch_page_has_the_replica_fields(client, auth):
    text = client.get("/ui/launch", headers=auth).get_data(as_text=True)
    assert 'id="replicas" name="replicas"' in text and 'id="target_in_flight" name="target_in_flight"' in text
    assert '<label for="replicas"' in text and '<label for="target_in_flight"' in text


def test_the_launch_page_sends_replicas_to_the_launch(client, auth):
    assert "plan-replicas" not in launch_page(client, auth)
    assert '<dd class="col-sm-9" id="plan-replicas">2 jobs</dd>' in launch_page(client, auth, replicas="2")
    ranged = launch_page(client, auth, replicas=" 1:3 ")
    assert "1 to 3 jobs, a job added above 4 requests in flight per job" in ranged, ranged
    targeted = launch_page(client, auth, replicas="1:3", target_in_flight="8")
    assert "1 to 3 jobs, a job added above 8 requests in flight per job" in targeted


@pytest.mark.parametrize("form", [{"replicas": "x"}, {"replicas": "1:99"}, {"replicas": "1:3", "target_in_flight": "0"},
                                  {"target_in_flight": "8"}])
def test_the_launch_page_shows_a_bad_replica_count_next_to_its_field(client, auth, form):
    text = launch_page(client, auth, **form)
    assert 'id="replicas-error"' in text and "Check passed" not in text, text
    error = text.split('id="replicas-error">', 1)[1].split("</div>", 1)[0]
    assert error.strip(), text
    assert f'value="{form.get("replicas", "")}"' in text.split('id="replicas"', 1)[1].split(">", 1)[0]


# --- recipes -----------------------------------------------------------------------------------------------

def test_a_recipe_entry_carries_replicas_as_written():
    recipe = parse_recipe({"services": [
        {**LAUNCH, "replicas": 2}, {**LAUNCH, "replicas": "1:3"}, {**LAUNCH, "replicas": {"max": 3}}, {**LAUNCH}]})
    assert [body.get("replicas", "absent") for body in recipe.launches] == [2, "1:3", {"max": 3}, "absent"]


def test_a_yaml_recipe_reads_1_3_as_a_range_not_a_number_in_base_60(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text("services:\n"
                    "  - {kind: text-generation, model: test/tiny, replicas: 1:3, time: 1:00:00}\n"
                    "  - {kind: text-generation, model: test/tiny, replicas: 2, time: 30}\n")
    first, second = load_recipe(path).launches
    assert first["replicas"] == "1:3" and first["time"] == 60
    assert second["replicas"] == 2 and second["time"] == 30


@pytest.mark.parametrize("value", [*BAD, True, {"min": 1}, {"max": 3, "spare": 1}])
def test_a_recipe_entrys_bad_replicas_names_it(value):
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"services": [LAUNCH, {**LAUNCH, "replicas": value}]})
    assert str(caught.value).startswith("services[1].replicas: "), str(caught.value)


def test_a_recipes_replicas_are_accepted_by_the_api(portal):  # noqa: F811
    body = parse_recipe({"services": [{**LAUNCH, "replicas": "1:3"}]}).launches[0]
    answer = portal.request("POST", "/api/services", params={"dry_run": "1"}, json=body).json()
    assert answer["replicas"] == counts(1, 3)
