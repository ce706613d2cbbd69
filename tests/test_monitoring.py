"""Monitoring targets: Prometheus discovery files appear when a service is RUNNING and disappear when it ends,
on the local scheduler and on the real Slurm; exporters from the site config run inside the service's job and
are listed in its discovery file; a real Prometheus (Debian's) runs the example configuration in docs/."""
import json
import subprocess
import sys

import pytest
import requests
import yaml

from portal.app import create_app
from portal.config import ConfigError, load_config
from portal.monitoring import DiscoveryFiles, ServiceTarget
from portal.site import build_site
from tests.conftest import REPO, free_port, port_open, wait_for, write_site_config

EXPORTER_SCRIPT = '''\
import os
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"# TYPE test_exporter_up gauge\\ntest_exporter_up 1\\n" if self.path == "/metrics" else b"no"
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


HTTPServer(("0.0.0.0", int(os.environ["PILOTFISH_EXPORTER_PORT"])), Handler).serve_forever()
'''


@pytest.fixture(scope="module")
def exporter_command(tmp_path_factory):
    script = tmp_path_factory.mktemp("exporter") / "exporter.py"
    script.write_text(EXPORTER_SCRIPT)
    return f"{sys.executable} {script} --port $PILOTFISH_EXPORTER_PORT"


def site_exporters(command):
    return {"node": {"command": command},
            "dcgm": {"command": command, "when": "gpus", "metrics_path": "/metrics"}}



# --- the site config and the job script ---------------------------------------------------------------------

@pytest.mark.parametrize("exporters, message", [
    ("node", "exporters: expected a mapping"),
    ({"Node!": {"command": "x"}}, "exporters: names are lower-case"),
    ({"node": "x"}, "exporters.node: expected a mapping with `command`"),
    ({"node": {}}, "exporters.node.command: expected one command line"),
    ({"node": {"command": "a\nb"}}, "exporters.node.command: expected one command line"),
    ({"node": {"command": "x", "when": "sometimes"}}, "exporters.node.when: expected one of always, gpus"),
    ({"node": {"command": "x", "metrics_path": "metrics\"; rm"}}, "exporters.node.metrics_path: expected a path"),
    ({"node": {"command": "x", "port": 9100}}, "exporters.node: unknown setting(s) port"),
])
def test_bad_exporter_settings_name_the_setting(tmp_path, exporters, message):
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"exporters": exporters}))
    with pytest.raises(ConfigError) as err:  # the shape when the settings are read, the meaning when the site is built
        build_site(load_config({"home": tmp_path / "home", "site_config_path": site}))
    assert str(err.value).startswith(message), str(err.value)


def test_job_scripts_start_the_exporters_their_job_needs(tmp_path, exporter_command):
    site = write_site_config(tmp_path / "site.yaml", scheduler="local", exporters=site_exporters(exporter_command))
    app = create_app({"home": tmp_path / "home", "site_config_path": site, "testing": True})
    client = app.test_client()
    auth = {"Authorization": f"Bearer {app.config['PILOTFISH_TOKEN']}"}

    def script(tier):
        response = client.post("/api/services?dry_run=1", headers=auth,
                               json={"kind": "text-generation", "model": "test/tiny", "tier": tier})
        assert response.status_code == 200, response.get_json()
        return response.get_json()["job_script"]

    cpu, gpu = script("Tiny"), script("gpu.Small")
    assert "exporter-node.log" in cpu and "exporter-dcgm.log" not in cpu
    assert "exporter-node.log" in gpu and "exporter-dcgm.log" in gpu
    assert cpu.index("exporters.json") < cpu.index('server=$!')  # started before the server
    for number, text in enumerate((cpu, gpu)):
        path = tmp_path / f"job{number}.sh"
        path.write_text(text)
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
        check = subprocess.run(["shellcheck", "--severity=warning", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
    plain = create_app({"home": tmp_path / "home2", "testing": True,
                        "site_config_path": write_site_config(tmp_path / "plain.yaml", scheduler="local")})
    response = plain.test_client().post(
        "/api/services?dry_run=1", json={"kind": "text-generation", "model": "test/tiny", "tier": "Tiny"},
        headers={"Authorization": f"Bearer {plain.config['PILOTFISH_TOKEN']}"})
    assert "exporter" not in response.get_json()["job_script"]


# --- discovery files --------------------------------------------------------------------------------------------

def test_leftover_files_go_and_unchanged_files_are_not_rewritten(tmp_path):
    files = DiscoveryFiles(tmp_path)
    files.folder.mkdir()
    leftover = files.path_of("0123456789ab")
    leftover.write_text("[]")
    target = ServiceTarget("a1b2c3d4e5f6", "chat", "text-generation", "org/model", "cpu.Tiny", "node7", "node7",
                           40123, str(tmp_path / "job"))
    files.sync([target])
    assert not leftover.exists()
    written = files.path_of(target.id)
    groups = json.loads(written.read_text())
    assert groups == [{"targets": ["node7:40123"], "labels": {
        "pilotfish_service": "a1b2c3d4e5f6", "pilotfish_service_name": "chat", "kind": "text-generation",
        "model": "org/model", "tier": "cpu.Tiny", "node": "node7", "pilotfish_target": "engine",
        "__metrics_path__": "/metrics"}}]
    before = written.stat().st_mtime_ns
    files.sync([target])
    assert written.stat().st_mtime_ns == before
    files.sync([])
    assert not written.exists()


def check_discovery_follows_the_service(portal, service_id, timeout):
    """RUNNING: service-<id>.json lists the engine and the job's exporter (which answers); ended: both gone."""
    path = portal.home / "prometheus" / f"service-{service_id}.json"
    service = portal.wait_state(service_id, "RUNNING", timeout=timeout)
    groups = json.loads(wait_for(lambda: path.exists() and path.read_text(), timeout=15,
                                 what=f"discovery file {path.name}"))
    by_target = {group["labels"]["pilotfish_target"]: group for group in groups}
    assert set(by_target) == {"engine", "node"}  # no GPUs: no DCGM exporter
    endpoint = service["endpoint"]
    assert by_target["engine"]["targets"] == [f"{endpoint['host']}:{endpoint['port']}"]
    labels = by_target["engine"]["labels"]
    assert labels["pilotfish_service"] == service_id and labels["model"] == service["model"]
    assert labels["tier"] == service["tier"] and labels["node"] == service["node"]
    host, port = by_target["node"]["targets"][0].rsplit(":", 1)
    scraped = requests.get(f"http://{host}:{port}{by_target['node']['labels']['__metrics_path__']}", timeout=10)
    assert scraped.status_code == 200 and "test_exporter_up 1" in scraped.text

    portal.request("POST", f"/api/services/{service_id}/stop")
    portal.wait_state(service_id, "STOPPED", timeout=60)
    wait_for(lambda: not path.exists(), timeout=15, what=f"{path.name} to be removed")
    wait_for(lambda: not port_open(host, int(port)), timeout=20, what="the exporter to stop with its job")


def test_discovery_files_follow_services_with_their_exporters(start_portal, exporter_command):
    portal = start_portal("local", exporters=site_exporters(exporter_command))
    portal_target = json.loads((portal.home / "prometheus" / "portal.json").read_text())
    assert portal_target == [{"targets": [f"127.0.0.1:{portal.port}"],
                              "labels": {"pilotfish_target": "portal", "__metrics_path__": "/metrics"}}]
    launched = portal.launch(model="test/tiny", tier="Tiny").json()
    check_discovery_follows_the_service(portal, launched["id"], timeout=30)


@pytest.mark.slurm
def test_discovery_files_follow_services_on_slurm(slurm_cluster, start_portal, exporter_command):
    portal = start_portal("slurm", exporters=site_exporters(exporter_command))
    launched = portal.launch(model="test/tiny", tier="Tiny").json()
    assert launched["job_id"]
    check_discovery_follows_the_service(portal, launched["id"], timeout=90)


# --- a real Prometheus with the example configuration ---------------------------------------------------------

UPSTREAM = f"{sys.executable} {REPO / 'tests' / 'support' / 'openai_upstream.py'}"
NODE_EXPORTER = ("prometheus-node-exporter --web.listen-address=:$PILOTFISH_EXPORTER_PORT "
                 "--collector.disable-defaults --collector.loadavg --collector.meminfo")


def prometheus_config(portal, key_file, portal_address) -> str:
    """docs/prometheus.yml for this portal: its home, a key file, a 1 s scrape, the portal's address."""
    text = (REPO / "docs" / "prometheus.yml").read_text()
    text = text.replace("/home/USER/.pilotfish", str(portal.home)).replace("/etc/prometheus/pilotfish.key",
                                                                           str(key_file))
    text = text.replace("scrape_interval: 15s", "scrape_interval: 1s\n  scrape_timeout: 1s")
    return text.replace("portal-host.example.edu:8765", portal_address)


@pytest.fixture
def prometheus(tmp_path):
    """Starts the Debian `prometheus` with a config; stops it after the test."""
    processes = []

    def start(config_text):
        config = tmp_path / "prometheus.yml"
        config.write_text(config_text)
        check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        port = free_port()
        log = open(tmp_path / "prometheus.log", "wb")
        processes.append(subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: port_open("127.0.0.1", port), timeout=30, what="prometheus to listen")
        return url

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=20)


def active_targets(url) -> dict:
    """job -> [health of each active target]."""
    data = requests.get(f"{url}/api/v1/targets", params={"state": "active"}, timeout=10).json()["data"]
    found = {}
    for target in data["activeTargets"]:
        found.setdefault(target["labels"]["job"], []).append(target["health"])
    return found


def query(url, expr) -> list:
    answer = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def test_prometheus_scrapes_what_the_discovery_files_name(start_portal, prometheus, tmp_path):
    """The shipped example configuration, run by a real Prometheus: the portal (with an API key), the engine
    through the portal (its own port needs the service key), the node exporter of the job; targets go when the
    service ends. Every query of the shipped Grafana dashboard is valid PromQL there."""
    portal = start_portal("local", runtimes={"text-generation": {"command": UPSTREAM},
                                             "speech-recognition": {"command": UPSTREAM}},
                          exporters={"node": {"command": NODE_EXPORTER}})
    service = portal.launch(model="test/tiny", tier="Tiny").json()
    portal.wait_state(service["id"], "RUNNING", timeout=30)
    key_file = tmp_path / "pilotfish.key"
    key_file.write_text(portal.request("POST", "/api/keys", json={"name": "prometheus"}).json()["key"])
    key_file.chmod(0o600)
    url = prometheus(prometheus_config(portal, key_file, f"127.0.0.1:{portal.port}"))

    expected = {"pilotfish-portal": ["up"], "pilotfish-engines": ["up"], "pilotfish-node": ["up"]}
    wait_for(lambda: active_targets(url) == expected, timeout=60, what=f"targets {expected}")
    wait_for(lambda: query(url, 'pilotfish_services{state="RUNNING"} == 1'), timeout=15, what="portal metrics")
    engines = query(url, 'vllm:num_requests_running{model="test/tiny"}')
    assert [series["metric"]["job"] for series in engines] == ["pilotfish-engines"]  # through the portal
    assert all(series["metric"]["pilotfish_service"] == service["id"] for series in engines)
    assert query(url, 'node_load1{job="pilotfish-node"}')

    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 15
    for expr in exprs:
        query(url, expr.replace("$__rate_interval", "1m").replace("$model", ".*"))

    portal.request("POST", f"/api/services/{service['id']}/stop")
    portal.wait_state(service["id"], "STOPPED", timeout=30)
    wait_for(lambda: set(active_targets(url)) == {"pilotfish-portal"}, timeout=30,
             what="the service's targets to leave Prometheus")
