"""The Open OnDemand app files rendered with Ruby as the dashboard renders them: the form offers exactly the site's
tiers, submit.yml asks Slurm for exactly what the portal's own tier code asks, anything else is refused, and the
job templates are valid shell."""
import os
import stat
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import yaml

from portal.catalog.tiers import all_tiers, default_specs, parse_specs, sbatch_options, tier_resources
from tests.catalog.test_tiers import SEED
from tests.conftest import REPO, TEST_SPECS
from tests.ood.dashboard import RenderError, form_values, render_form, render_submit, ruby_render, stage

NO_SITE = {"PILOTFISH_SITE_CONFIG": None, "PILOTFISH_RESOURCE_SPECS": None, "PILOTFISH_CACHE_DIR": None}


def site(tmp_path: Path, specs_text=None, how="cache_dir", **settings) -> dict:
    """A site config (and its specs file, in cache_dir or named by `resource_specs`); the env the ERB reads."""
    cache = tmp_path / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    data = {"cache_dir": str(cache), **settings}
    if specs_text is not None:
        if how == "cache_dir":
            (cache / "resource_specs.yaml").write_text(specs_text)
        else:
            (tmp_path / "tiers.yaml").write_text(specs_text)
            data["resource_specs"] = str(tmp_path / "tiers.yaml")
    path = tmp_path / "site.yml"
    path.write_text(yaml.safe_dump(data))
    return {**NO_SITE, "PILOTFISH_SITE_CONFIG": str(path)}


# Values where a careless copy of the portal's rules would differ: half a megabyte (Python rounds halves to even),
# fractions, gres replacing gpu_count/gpu_type, a constraint alone, a name with spaces in a second partition.
ODD_SPECS = """\
time: {default: 5, max: 45}
partitions:
  big-mem:
    default: true
    tiers:
      - {name: Half, description: "1024.5 MB", max_model_size_gb: 1, gpu_count: 0, cpu_cores: 1, memory_gb: 1.00048828125}
      - {name: Odd, description: "3.7 GB", max_model_size_gb: null, gpu_count: 3, gpu_type: h100, cpu_cores: 7, memory_gb: 3.7}
  gpu_2:
    tiers:
      - {name: Sliced GPU, description: "MIG", max_model_size_gb: 9, gpu_count: 1, gpu_type: a100, cpu_cores: 2,
         memory_gb: 12, slurm: {gres: "gpu:a100_1g.10gb:1", constraint: "ib&nvlink"}}
      - {name: Picky, description: "constraint only", max_model_size_gb: 2, gpu_count: 0, cpu_cores: 2, memory_gb: 2.5,
         slurm: {constraint: "skylake|cascadelake"}}
"""

CASES = {
    "seed example in cache_dir": (SEED, "cache_dir"),
    "seed example named by resource_specs": (SEED, "resource_specs"),
    "test cluster tiers": (TEST_SPECS, "cache_dir"),
    "unusual values": (ODD_SPECS, "resource_specs"),
    "no specs file: the default tiers": (None, "cache_dir"),
}


def expected_specs(text):
    return parse_specs(text) if text is not None else default_specs()


@pytest.mark.parametrize("case", CASES)
def test_form_offers_exactly_the_sites_tiers(tmp_path, case):
    text, how = CASES[case]
    env = site(tmp_path, text, how)
    form = render_form(env)
    specs = expected_specs(text)
    tiers = all_tiers(specs)
    options = form["attributes"]["tier"]["options"]
    assert [value for _, value in options] == [tier.ref for tier in tiers]
    for (label, _), tier in zip(options, tiers):  # each label says what the tier is and what it takes
        assert label.startswith(f"{tier.name}: {tier.description}"), label
        assert f"{tier.cpu_cores} CPU cores" in label and f"partition {tier.partition}" in label, label
        assert (tier.gpu_type or "") in label and (f"{tier.gpu_count} GPU" in label or tier.gpu_count == 0), label
    assert form["form"][:4] == ["service_placement", "tier", "hours", "auto_accounts"]
    hours = form["attributes"]["hours"]
    assert hours["max"] == specs.time_max // 15 / 4 and hours["min"] == 0.25 and hours["value"] <= hours["max"]
    placements = form["attributes"]["service_placement"]["options"]
    assert [value for _, value, *_ in placements] == ["separate_jobs", "this_allocation"]
    assert placements[0][2] == {"data-hide-tier": True}  # a light CPU job: the tier does not apply
    assert form["attributes"]["app_dir"] == str(REPO)
    assert form["attributes"]["site_config"] == env["PILOTFISH_SITE_CONFIG"]
    assert form["cluster"] == "*"


def test_the_default_tiers_are_one_file_for_the_portal_and_the_form():
    default_file = REPO / "portal" / "catalog" / "default_resource_specs.yaml"
    assert [t.ref for t in all_tiers(parse_specs(default_file.read_text()))] == [t.ref for t in all_tiers(default_specs())]
    if not Path("/etc/pilotfish/site.yml").exists():  # the form's own fallback, on a machine without a site
        form = render_form(NO_SITE)
        assert [value for _, value in form["attributes"]["tier"]["options"]] == [
            t.ref for t in all_tiers(default_specs())]
        assert form["attributes"]["site_config"] == ""


def test_environment_overrides_the_site_config_as_for_the_portal(tmp_path):
    env = site(tmp_path, SEED)
    (tmp_path / "other.yaml").write_text(TEST_SPECS)
    form = render_form({**env, "PILOTFISH_RESOURCE_SPECS": str(tmp_path / "other.yaml")})
    assert [value for _, value in form["attributes"]["tier"]["options"]] == [t.ref for t in all_tiers(parse_specs(TEST_SPECS))]
    form = render_form(site(tmp_path / "x", SEED, ood_cluster="owens"))
    assert form["cluster"] == "owens"


@pytest.mark.parametrize("case", CASES)
def test_submit_asks_slurm_for_what_the_portal_asks(tmp_path, case):
    text, how = CASES[case]
    env = site(tmp_path, text, how)
    form = render_form(env)
    specs = expected_specs(text)
    cases = []  # (what was chosen, the sbatch options the portal's own code gives it)
    for tier in all_tiers(specs):
        for hours, minutes in (("1", 60), ("0.25", 15), (f"{specs.time_max / 60:g}", specs.time_max)):
            if minutes > specs.time_max:
                continue
            cases.append((form_values(form, service_placement="this_allocation", tier=tier.ref, hours=hours),
                          sbatch_options(tier_resources(tier, minutes))))
        cases.append((form_values(form, service_placement="separate_jobs", tier=tier.ref, hours="0.5"),
                      ["--time=30", "--cpus-per-task=1", "--mem=2048M"]))
    answers = ruby_render([{"kind": "submit", "path": str(REPO / "submit.yml.erb"), "env": env, "context": values}
                           for values, _ in cases])
    for (values, expected), answer in zip(cases, answers):
        assert answer.get("result", {}).get("script", {}).get("native") == expected, (values, answer)


def test_submit_gres_and_constraint_as_the_site_wrote_them(tmp_path):
    text = SEED.replace('constraint: "gpu80"', 'constraint: "gpu80&ib"\n          gres: "gpu:a100:1,shard:2"')
    env = site(tmp_path, text)
    tier = all_tiers(parse_specs(text))[0]
    native = render_submit(env, form_values(render_form(env), service_placement="this_allocation", tier=tier.ref))
    assert native["script"]["native"] == sbatch_options(tier_resources(tier, 60))
    assert "--gres=gpu:a100:1,shard:2" in native["script"]["native"] and "--constraint=gpu80&ib" in native["script"]["native"]


def test_the_light_portal_job_follows_the_site_config(tmp_path):
    default = site(tmp_path / "default", SEED)
    form = render_form(default)
    assert "the portal takes 1 CPU and 2 GB on the default partition;" in form["attributes"]["service_placement"]["help"]
    env = site(tmp_path / "set", SEED, portal_job={"partition": "interactive", "cpus": 2, "memory_gb": 3.5})
    form = render_form(env)
    assert "the portal takes 2 CPUs and 3.5 GB on partition interactive;" in \
        form["attributes"]["service_placement"]["help"]
    native = render_submit(env, form_values(form, service_placement="separate_jobs", tier="gpu.Small", hours="2"))
    assert native["script"]["native"] == ["--time=120", "--partition=interactive", "--cpus-per-task=2", "--mem=3584M"]
    # Inside the allocation the tier decides, whatever portal_job says.
    tier = all_tiers(parse_specs(SEED))[0]
    native = render_submit(env, form_values(form, service_placement="this_allocation", tier=tier.ref, hours="1"))
    assert native["script"]["native"] == sbatch_options(tier_resources(tier, 60))


@pytest.mark.parametrize("portal_job, message", [
    ({"partition": "gpu; rm -rf /"}, r'portal_job.partition: expected a partition name .*, got "gpu; rm -rf /"$'),
    ({"partition": 7}, r"portal_job.partition: expected a partition name .*, got 7$"),
    ({"cpus": 0}, r"portal_job.cpus: expected a whole number from 1 to 256, got 0$"),
    ({"cpus": "2"}, r'portal_job.cpus: expected a whole number from 1 to 256, got "2"$'),
    ({"memory_gb": -1}, r"portal_job.memory_gb: expected a number of GB above 0 and up to 4096, got -1$"),
    ({"gpus": 1}, r"portal_job.gpus: unknown setting \(known: partition, cpus, memory_gb\)$"),
    ("small", r"portal_job: expected a mapping such as"),
])
def test_a_wrong_portal_job_setting_is_named_on_the_form(tmp_path, portal_job, message):
    env = site(tmp_path, SEED, portal_job=portal_job)
    with pytest.raises(RenderError, match=message):
        render_form(env)


REFUSED = {
    "tier": ["gpu.Huge", "Small", "gpu.small", "", "x; rm -rf /", "$(id)", "`id`", "gpu.Small\n--wrap=id",
             "cpu.Tiny"],  # the last one is another file's tier
    "hours": ["4", "3.25", "0", "-1", "1e9", "abc", "1; id", "", " 1 1", "99999999"],
    "service_placement": ["elsewhere", "", "this_allocation; id"],
    "idle_timeout": ["5", "off", "1h", "30; id", "$(id)"],
}


@pytest.mark.parametrize("field", REFUSED)
def test_submit_refuses_what_the_form_did_not_offer(tmp_path, field):
    env = site(tmp_path, SEED)
    form = render_form(env)
    good = form_values(form, service_placement="this_allocation", tier="gpu.Small", hours="1")
    render_submit(env, good)
    answers = ruby_render([{"kind": "submit", "path": str(REPO / "submit.yml.erb"), "env": env,
                            "context": {**good, field: value}} for value in REFUSED[field]])
    for value, answer in zip(REFUSED[field], answers):
        assert "error" in answer, (field, value, answer)
        assert answer["error"].startswith("PilotfishSite::Error: "), answer
        assert {"tier": "unknown resource tier", "hours": "hours: ", "service_placement": "where services run",
                "idle_timeout": "for the idle timeout"}[field] in answer["error"], answer
    with pytest.raises(RenderError, match=r"exceeds the site maximum of 180 minutes \(time.max in "):
        render_submit(env, {**good, "hours": "3.5"})


def test_broken_or_missing_files_are_named(tmp_path):
    env = site(tmp_path, SEED.replace("gpu_count: 2", "gpu_count: two"))
    with pytest.raises(RenderError, match=r"resource_specs.yaml: partitions.gpu.tiers\[1\].gpu_count: expected an "
                                          r'integer, got "two"$'):
        render_form(env)
    with pytest.raises(RenderError, match=r"tiers.yaml: file not found$"):
        render_form(site(tmp_path / "named", None, "resource_specs", resource_specs=str(tmp_path / "tiers.yaml")))
    with pytest.raises(RenderError, match=r"site config /nonexistent/site.yml: file not found"):
        render_form({**NO_SITE, "PILOTFISH_SITE_CONFIG": "/nonexistent/site.yml"})
    # The portal's reader says the same about the same file.
    from portal.catalog.tiers import TierSpecError
    with pytest.raises(TierSpecError, match=r'partitions.gpu.tiers\[1\].gpu_count: expected an integer, got "two"$'):
        parse_specs(SEED.replace("gpu_count: 2", "gpu_count: two"))


def test_job_templates_are_valid_shell_with_every_value_quoted(tmp_path):
    env = site(tmp_path, TEST_SPECS)
    form = render_form(env)
    assert [value for _, value in form["attributes"]["idle_timeout"]["options"]] == ["", "15", "30", "60", "120",
                                                                                    "240", "0"]
    values = form_values(form, service_placement="this_allocation", tier="cpu.Big", idle_timeout="30")
    values["app_dir"] = "/opt/it's $(id) `id`/pilotfish"  # quoting is checked, not assumed
    rendered = {path.name: path for path in stage(tmp_path / "staged", values)}
    assert sorted(rendered) == ["after.sh", "before.sh", "script.sh"]
    assert os.stat(REPO / "template" / "script.sh.erb").st_mode & stat.S_IXUSR, "script.sh.erb must be executable"
    assert os.access(rendered["script.sh"], os.X_OK)
    for path in rendered.values():
        assert "<%" not in path.read_text()
        check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, (path.name, check.stderr)
        check = subprocess.run(["shellcheck", "--severity=style", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, (path.name, check.stdout)
    script = rendered["script.sh"].read_text()
    assert "app_dir=/opt/it\\'s\\ \\$\\(id\\)\\ \\`id\\`/pilotfish\n" in script
    assert f"export PILOTFISH_SITE_CONFIG={env['PILOTFISH_SITE_CONFIG']}\n" in script
    assert "--placement this_allocation" in script and "--idle-timeout 30\n" in script
    printed = subprocess.run(["bash", "-c", script.split("\nexport PILOTFISH_HOME")[0].split("set -euo pipefail\n")[1]
                              + '\nprintf %s "$app_dir"'], capture_output=True, text=True)
    assert printed.stdout == values["app_dir"]


def test_manifest_and_icon():
    manifest = yaml.safe_load((REPO / "manifest.yml").read_text())
    assert manifest["role"] == "batch_connect" and manifest["name"] == "Pilotfish"
    assert manifest["category"] and manifest["description"] and manifest["icon"].startswith("fa://")
    png = (REPO / "icon.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width == height and 64 <= width <= 512
    assert zlib.crc32(png[12:29]) == struct.unpack(">I", png[29:33])[0]  # the IHDR chunk is intact
