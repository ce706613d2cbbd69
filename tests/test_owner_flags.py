"""Engine flags that run code or read files (--trust-remote-code, --chat-template, --generation-config) are the
portal owner's alone: an API key gets 403 naming engine_args, through the API and the launch page alike. The files
they name must lie in the model's folder or the site's allowed_paths, for the owner too (400 naming the flag)."""
import os

import pytest

LAUNCH = {"kind": "text-generation", "model": "test/tiny"}


@pytest.fixture
def key(client, auth):
    created = client.post("/api/keys", json={"name": "collaborator"}, headers=auth)
    assert created.status_code == 201
    return {"Authorization": f"Bearer {created.get_json()['key']}"}


@pytest.fixture
def snapshot(client, auth):
    plan = client.post("/api/services?dry_run=1", json=LAUNCH, headers=auth).get_json()
    return plan["model_path"]


def dry_run(client, headers, *engine_args):
    return client.post("/api/services?dry_run=1", json={**LAUNCH, "engine_args": list(engine_args)}, headers=headers)


@pytest.mark.parametrize("args", [
    ["--trust-remote-code"],
    ["--trust-remote-code=true"],
    ["--chat-template", "SNAPSHOT/template.jinja"],
    ["--chat-template=/etc/passwd"],
    ["--chat-template", "{% for m in messages %}{{ m.content }}{% endfor %}"],
    ["--generation-config", "SNAPSHOT"],
    ["--generation-config", "auto"],
])
def test_a_key_may_not_give_flags_that_run_code_or_read_files(client, key, snapshot, args):
    (open(os.path.join(snapshot, "template.jinja"), "w")).write("{{ messages }}")
    args = [arg.replace("SNAPSHOT", snapshot) for arg in args]
    response = dry_run(client, key, "--seed", "1", *args)
    assert response.status_code == 403, response.get_json()
    data = response.get_json()
    assert data["field"] == "engine_args" and args[0].split("=")[0] in data["error"]
    assert "key:collaborator" in data["error"]


def test_a_key_may_give_the_other_flags(client, key):
    response = dry_run(client, key, "--seed", "1", "--max-model-len", "256")
    assert response.status_code == 200, response.get_json()


def test_a_key_may_not_launch_them_for_real_either(client, key, auth):
    response = client.post("/api/services", json={**LAUNCH, "engine_args": ["--trust-remote-code"]}, headers=key)
    assert response.status_code == 403 and response.get_json()["field"] == "engine_args"
    assert client.get("/api/services", headers=auth).get_json()["services"] == []


def test_the_launch_page_applies_the_same_rule_to_a_key(client, key):
    page = client.post("/ui/launch", data={"kind": "text-generation", "model": "test/tiny", "action": "check",
                                           "engine_args": "--trust-remote-code"}, headers=key)
    assert page.status_code == 200
    text = page.get_data(as_text=True)
    assert "only the portal owner may give it" in text and "job_script" not in text


@pytest.mark.parametrize("args", [
    ["--chat-template", "/etc/passwd"],
    ["--chat-template=/etc/passwd"],
    ["--chat-template", "SNAPSHOT/../../../../../../../../etc/passwd"],
    ["--chat-template", "SNAPSHOT/escape.jinja"],  # a link out of the snapshot
    ["--chat-template", "template.jinja"],  # relative: resolved where? refused
    ["--generation-config", "/tmp"],
])
def test_the_owner_may_not_name_files_outside_the_allowed_folders(client, auth, snapshot, args):
    link = os.path.join(snapshot, "escape.jinja")
    if not os.path.lexists(link):
        os.symlink("/etc/passwd", link)
    args = [arg.replace("SNAPSHOT", snapshot) for arg in args]
    response = dry_run(client, auth, *args)
    assert response.status_code == 400, response.get_json()
    data = response.get_json()
    assert data["field"] == "engine_args" and args[0].split("=")[0] in data["error"]


@pytest.mark.parametrize("args", [
    ["--chat-template", "SNAPSHOT/template.jinja"],
    ["--chat-template=SNAPSHOT/template.jinja"],
    ["--chat-template", "{% for m in messages %}{{ m.content }}{% endfor %}"],
    ["--trust-remote-code"],
    ["--generation-config", "SNAPSHOT"],
    ["--generation-config", "vllm"],
])
def test_the_owner_may_name_files_inside_the_snapshot(client, auth, snapshot, args):
    (open(os.path.join(snapshot, "template.jinja"), "w")).write("{{ messages }}")
    args = [arg.replace("SNAPSHOT", snapshot) for arg in args]
    response = dry_run(client, auth, *args)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["arguments"][-len(args):] == args


def test_the_site_chooses_the_allowed_folders(tmp_path):
    from portal.app import create_app
    from tests.support.portal_process import write_site_config

    shared = tmp_path / "templates"
    shared.mkdir()
    (shared / "chatml.jinja").write_text("{{ messages }}")
    site = write_site_config(tmp_path / "site.yaml", scheduler="local", allowed_paths=[str(shared)])
    app = create_app({"home": tmp_path / "home", "site_config_path": site, "testing": True})
    client, auth = app.test_client(), {"Authorization": f"Bearer {app.config['PILOTFISH_TOKEN']}"}
    assert dry_run(client, auth, "--chat-template", str(shared / "chatml.jinja")).status_code == 200
    home_file = tmp_path / "home" / "t.jinja"
    home_file.write_text("{{ messages }}")  # home_dir is no longer allowed once the site names its folders
    assert dry_run(client, auth, "--chat-template", str(home_file)).status_code == 400
