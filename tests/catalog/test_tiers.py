"""Resource tiers: loading resource_specs.yaml (the seed's schema), errors, recommendation and resources."""
from __future__ import annotations

import pytest

from portal.catalog import tiers
from portal.catalog.tiers import TierSpecError
from portal.errors import ValidationError
from portal.scheduler import Resources

# The example of the seed (Blackfish management guide, "Resource Tiers"), verbatim.
SEED = """\
time:
  default: 30
  max: 180

partitions:
  gpu:
    default: true
    tiers:
      - name: Small
        description: "Small models (up to 16GB)"
        max_model_size_gb: 16
        gpu_count: 1
        gpu_type: a100
        cpu_cores: 4
        memory_gb: 16
        slurm:
          constraint: "gpu80"

      - name: Medium
        description: "Medium models (up to 80GB)"
        max_model_size_gb: 80
        gpu_count: 2
        cpu_cores: 8
        memory_gb: 32

      - name: Large
        description: "Large models (80GB+)"
        max_model_size_gb: null
        gpu_count: 4
        cpu_cores: 16
        memory_gb: 64

  cpu:
    default: false
    tiers:
      - name: CPU Only
        description: "For testing or small models"
        max_model_size_gb: 2
        gpu_count: 0
        cpu_cores: 4
        memory_gb: 8

models:
  "meta-llama/Llama-2-70b-hf": "gpu.Large"
  "openai/whisper-large-v3": "gpu.Medium"
"""
SOURCE = "/x/resource_specs.yaml"


@pytest.fixture
def specs():
    return tiers.parse_specs(SEED, SOURCE)


def broken(text: str) -> str:
    with pytest.raises(TierSpecError) as info:
        tiers.parse_specs(text, SOURCE)
    return str(info.value)


def test_seed_file_loads(specs):
    assert specs.time_default == 30 and specs.time_max == 180
    assert specs.default_partition == "gpu"
    assert [t.ref for t in tiers.all_tiers(specs)] == ["gpu.Small", "gpu.Medium", "gpu.Large", "cpu.CPU Only"]
    small = specs.partitions["gpu"][0]
    assert (small.max_model_size_gb, small.gpu_count, small.gpu_type, small.cpu_cores, small.memory_gb) == (16, 1, "a100", 4, 16)
    assert small.slurm == {"constraint": "gpu80"}
    assert specs.partitions["gpu"][2].catch_all
    assert specs.models["meta-llama/Llama-2-70b-hf"].ref == "gpu.Large"
    assert specs.models["openai/whisper-large-v3"].ref == "gpu.Medium"


def test_defaults_without_a_file(tmp_path):
    for specs in (tiers.load_specs(None), tiers.load_specs(tmp_path / "absent.yaml"),
                  tiers.load_site_specs(cache_dir=tmp_path)):
        assert specs.source is None
        assert [(t.ref, t.max_model_size_gb, t.gpu_count, t.cpu_cores, t.memory_gb) for t in tiers.all_tiers(specs)] == [
            ("gpu.Small", 16, 1, 4, 16), ("gpu.Medium", 80, 2, 8, 32), ("gpu.Large", None, 4, 16, 64),
            ("cpu.CPU Only", 2, 0, 4, 8)]
        assert (specs.time_default, specs.time_max) == (30, 180)


def test_site_file_in_cache_dir_and_explicit_path(tmp_path):
    (tmp_path / "resource_specs.yaml").write_text(SEED.replace("default: 30", "default: 45"))
    assert tiers.load_site_specs(cache_dir=tmp_path).time_default == 45
    assert tiers.load_site_specs(cache_dir=tmp_path).source == tmp_path / "resource_specs.yaml"
    with pytest.raises(TierSpecError, match=r"^/nope/specs.yaml: file not found$"):
        tiers.load_site_specs(cache_dir=tmp_path, specs_path="/nope/specs.yaml")


@pytest.mark.parametrize("old, new, message", [
    ("gpu_count: 2", 'gpu_count: "two"', 'partitions.gpu.tiers[1].gpu_count: expected an integer, got "two"'),
    ("gpu_count: 2", "gpu_count: 2.5", "partitions.gpu.tiers[1].gpu_count: expected an integer, got 2.5"),
    ("gpu_count: 2", "gpu_count: true", "partitions.gpu.tiers[1].gpu_count: expected an integer, got true"),
    ("gpu_count: 2", "gpu_count: -1", "partitions.gpu.tiers[1].gpu_count: must be at least 0, got -1"),
    ("cpu_cores: 8", "cpu_cores: 0", "partitions.gpu.tiers[1].cpu_cores: must be at least 1, got 0"),
    ("memory_gb: 32", "memory_gb: -4", "partitions.gpu.tiers[1].memory_gb: must be greater than 0, got -4"),
    ("memory_gb: 32", "memory_gb: [32]", "partitions.gpu.tiers[1].memory_gb: expected a number, got a list"),
    ("max_model_size_gb: 80", "max_model_size_gb: -80",
     "partitions.gpu.tiers[1].max_model_size_gb: must be at least 0, got -80"),
    ("max_model_size_gb: 80", "max_model_size_gb: big",
     'partitions.gpu.tiers[1].max_model_size_gb: expected a number, got "big"'),
    ("        max_model_size_gb: 80\n", "",
     "partitions.gpu.tiers[1]: missing required field `max_model_size_gb`"),
    ('        description: "Medium models (up to 80GB)"\n', "", "partitions.gpu.tiers[1]: missing required field `description`"),
    ("gpu_count: 2", "gpu_count: 2\n        gpus: 2",
     "partitions.gpu.tiers[1].gpus: unknown field (expected one of: name, description, max_model_size_gb, gpu_count, "
     "gpu_type, cpu_cores, memory_gb, slurm, idle_timeout)"),
    ('constraint: "gpu80"', 'constraint: "gpu80"\n          qos: high',
     "partitions.gpu.tiers[0].slurm.qos: unknown field (expected one of: constraint, gres)"),
    ('constraint: "gpu80"', 'constraint: "gpu 80"',
     'partitions.gpu.tiers[0].slurm.constraint: expected a Slurm value without spaces, got "gpu 80"'),
    ("name: Medium", "name: Small", 'partitions.gpu.tiers[1].name: duplicate tier name "Small" (also tiers[0])'),
    ("name: Medium", "name: small", 'partitions.gpu.tiers[1].name: duplicate tier name "small" (also tiers[0])'),
    ("name: Medium", "name: 7", "partitions.gpu.tiers[1].name: expected a single line of text, got 7"),
    ("  default: 30", "  default: 300", "time.default: 300 minutes is more than time.max (180 minutes)"),
    ("  max: 180", "  max: 0", "time.max: must be at least 1, got 0"),
    ("  max: 180", "  max: 3h", 'time.max: expected an integer, got "3h"'),
    ("time:", "timeout: 3\ntime:", "timeout: unknown field (expected one of: time, partitions, models)"),
    ("    default: false", "    default: true", "partitions: gpu and cpu both have `default: true`; mark exactly one"),
    ("    default: true", "    default: false", "partitions: no partition has `default: true`; mark exactly one"),
    ("    default: true", "    default: yes please", 'partitions.gpu.default: expected true or false, got "yes please"'),
    ('"gpu.Medium"', '"gpu.Huge"', 'models."openai/whisper-large-v3": unknown tier \'gpu.Huge\' (available: gpu.Small, '
                                   "gpu.Medium, gpu.Large, cpu.CPU Only)"),
    ('"gpu.Medium"', "[gpu, Medium]", 'models."openai/whisper-large-v3": expected a tier, "partition.tier" or "tier", '
                                      "got a list"),
    ("  cpu:\n", "  cpu nodes:\n", 'partitions.cpu nodes: expected a partition name of letters, digits, \'_\' or \'-\' '
                                   '(the key), got "cpu nodes"'),
    ("    tiers:\n      - name: CPU Only", "    tiers: []\n    old:\n      - name: CPU Only",
     "partitions.cpu.old: unknown field (expected one of: default, tiers)"),
])
def test_broken_files_name_the_file_the_path_and_the_problem(old, new, message):
    assert old in SEED
    assert broken(SEED.replace(old, new, 1)) == f"{SOURCE}: {message}"


def test_yaml_syntax_error_gives_the_line():
    text = SEED.replace("        gpu_count: 2\n", "        gpu_count: [2\n", 1)
    # The list opened on line 22 runs into line 23, where the parser notices.
    assert broken(text) == f"{SOURCE}: not valid YAML: line 23, column 18: expected ',' or ']', but got ':'"


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty (expected a mapping with `partitions`)"),
    (b"# only a comment\n", "the file is empty (expected a mapping with `partitions`)"),
    (b"- a\n- b\n", "expected a mapping, got a list"),
    (b"just text", 'expected a mapping, got "just text"'),
    (b"time: {default: 1}\n", "missing required field `partitions`"),
    (b"partitions: {}\n", "partitions: no partition defined"),
    (b"partitions: {gpu: {tiers: []}}\n", "partitions.gpu.tiers: expected a non-empty list of tiers, got a list"),
    (b"partitions: {gpu: {tiers: [3]}}\n", "partitions.gpu.tiers[0]: expected a mapping, got 3"),
    (b"\xff\xfe\x00garbage\x00\x01", "not UTF-8 text (byte 0)"),
    (bytes(range(256)) * 4, "not UTF-8 text (byte 128)"),
    (b"a: 2024-13-45\n", "not valid YAML: month must be in 1..12"),
    (b"[" * 3000, "not valid YAML: nested too deeply"),
    (b"x" * (2 * 1024 * 1024), "larger than 1024 KB: not a resource specs file"),
])
def test_hostile_content_raises_only_tier_spec_error(content, message):
    with pytest.raises(TierSpecError) as info:
        tiers.parse_specs(content, SOURCE)
    assert str(info.value) == f"{SOURCE}: {message}"


@pytest.mark.parametrize("content", [b"\x00\x01\x02", b"!!python/object:os.system {}", b"a: *nope", b"? [a, b]\n: c",
                                     b"partitions: !!binary aGVsbG8=", b"{", b"partitions:\n  - - - -", b"\t\tx: y",
                                     b"partitions: {gpu: {tiers: [{name: [], description: {}}]}}", b"1e999",
                                     b"partitions: {.nan: 1}", b"partitions: {gpu: {tiers: [{max_model_size_gb: .inf}]}}"])
def test_fuzzish_inputs_never_escape_as_other_exceptions(content):
    with pytest.raises(TierSpecError, match=r"^/x/resource_specs.yaml: "):
        tiers.parse_specs(content, SOURCE)


def test_unreadable_file(tmp_path):
    folder = tmp_path / "resource_specs.yaml"
    folder.mkdir()
    with pytest.raises(TierSpecError, match=r"resource_specs.yaml: cannot read: Is a directory$"):
        tiers.load_specs(folder)


def test_single_partition_needs_no_default_flag():
    specs = tiers.parse_specs("partitions:\n  batch:\n    tiers:\n      - {name: One, description: '', "
                              "max_model_size_gb: null, gpu_count: 0, cpu_cores: 1, memory_gb: 0.5}\n", SOURCE)
    assert specs.default_partition == "batch" and specs.time_max == 180
    assert tiers.resources_for(specs, "One") == Resources(time=30, partition="batch", cpus=1, memory_gb=0.5)


# --- recommendation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, tier, reason", [
    (7.2, "gpu.Small", "7.2 GB fits Small (up to 16 GB)"),
    (16, "gpu.Small", "16.0 GB fits Small (up to 16 GB)"),  # "up to" is inclusive
    (16.01, "gpu.Medium", "16.0 GB fits Medium (up to 80 GB)"),
    (0.5, "gpu.Small", "0.50 GB fits Small (up to 16 GB)"),
    (80, "gpu.Medium", "80.0 GB fits Medium (up to 80 GB)"),
    (140.2, "gpu.Large", "140.2 GB is larger than every sized tier: catch-all Large"),
    (None, "gpu.Large", "size unknown: catch-all Large"),
])
def test_recommend_by_size_in_the_default_partition(specs, size, tier, reason):
    rec = tiers.recommend(specs, "org/model", size)
    assert (rec.tier.ref, rec.reason) == (tier, reason)


def test_recommend_smallest_fitting_tier_whatever_the_file_order():
    text = SEED.replace("max_model_size_gb: 16", "max_model_size_gb: 90").replace("max_model_size_gb: 80", "max_model_size_gb: 20")
    specs = tiers.parse_specs(text, SOURCE)
    assert tiers.recommend(specs, None, 10).tier.name == "Medium"
    assert tiers.recommend(specs, None, 50).tier.name == "Small"


def test_site_override_wins(specs):
    rec = tiers.recommend(specs, "openai/whisper-large-v3", 3.1)
    assert rec.tier.ref == "gpu.Medium"
    assert rec.reason == 'set for this model by the site (models: "openai/whisper-large-v3": "gpu.Medium")'
    rec = tiers.recommend(specs, "meta-llama/Llama-2-70b-hf", None)
    assert rec.tier.ref == "gpu.Large"


def test_override_by_bare_tier_name():
    specs = tiers.parse_specs(SEED.replace('"gpu.Medium"', '"CPU Only"'), SOURCE)
    assert tiers.recommend(specs, "openai/whisper-large-v3", 3.1).tier.ref == "cpu.CPU Only"


def test_recommend_in_another_partition(specs):
    rec = tiers.recommend(specs, "org/m", 1.5, partition="cpu")
    assert (rec.tier.ref, rec.reason) == ("cpu.CPU Only", "1.5 GB fits CPU Only (up to 2 GB)")
    rec = tiers.recommend(specs, "org/m", 3, partition="cpu")
    assert rec.tier is None
    assert rec.reason == ("3.0 GB is larger than every tier of partition cpu (the largest, CPU Only, takes up to 2 GB)"
                          " and it has no catch-all tier")
    rec = tiers.recommend(specs, "org/m", None, partition="cpu")
    assert (rec.tier, rec.reason) == (None, "size unknown and partition cpu has no catch-all tier: pick a tier")
    # The site's override is for the gpu partition: asked for cpu, the size rules apply there.
    assert tiers.recommend(specs, "openai/whisper-large-v3", 1, partition="cpu").tier.ref == "cpu.CPU Only"
    with pytest.raises(ValidationError, match=r"^partition: unknown partition 'gpux' \(available: gpu, cpu\)$"):
        tiers.recommend(specs, "org/m", 1, partition="gpux")


def test_fit_check_for_launches(specs):
    small = tiers.resolve_tier(specs, "Small")
    assert tiers.model_fits(small, 16) and not tiers.model_fits(small, 16.5) and not tiers.model_fits(small, None)
    assert tiers.model_fits(tiers.resolve_tier(specs, "Large"), 10_000)
    tiers.check_model_fits(small, 12, "org/m")
    tiers.check_model_fits(small, None, "org/m")
    tiers.check_model_fits(small, 20.5, "org/m", force=True)
    with pytest.raises(ValidationError) as info:
        tiers.check_model_fits(small, 20.5, "org/m")
    assert str(info.value) == "tier: gpu.Small takes models up to 16 GB and org/m is 20.5 GB: pick a larger tier, or force the launch"


# --- tier references and resources ---------------------------------------------------------------------

def test_resources_for_a_tier(specs):
    assert tiers.resources_for(specs, "Small") == Resources(
        time=30, partition="gpu", cpus=4, memory_gb=16.0, gpus=1, gpu_type="a100", constraint="gpu80")
    assert tiers.resources_for(specs, "gpu.Medium", 120) == Resources(
        time=120, partition="gpu", cpus=8, memory_gb=32.0, gpus=2)
    assert tiers.resources_for(specs, "cpu.CPU Only", 180) == Resources(time=180, partition="cpu", cpus=4, memory_gb=8.0)
    # A name not in the default partition but unique elsewhere, and case-insensitive names.
    assert tiers.resources_for(specs, "CPU Only").partition == "cpu"
    assert tiers.resources_for(specs, "medium").gpus == 2


def test_gres_takes_precedence():
    specs = tiers.parse_specs(SEED.replace('constraint: "gpu80"', 'gres: "gpu:a100:1"'), SOURCE)
    resources = tiers.resources_for(specs, "Small")
    assert resources.gres == "gpu:a100:1" and resources.constraint is None
    assert tiers.sbatch_options(resources) == ["--time=30", "--partition=gpu", "--cpus-per-task=4", "--mem=16384M",
                                               "--gres=gpu:a100:1"]


def test_time_above_the_site_maximum_is_refused_not_clamped(specs):
    with pytest.raises(ValidationError) as info:
        tiers.resources_for(specs, "Small", 181)
    assert str(info.value) == "time: 181 minutes exceeds the site maximum of 180 minutes"
    assert info.value.extra["field"] == "time"
    with pytest.raises(ValidationError, match=r"^time: must be at least 1 minute$"):
        tiers.resources_for(specs, "Small", 0)
    with pytest.raises(ValidationError, match=r"^time: expected minutes, got '60'$"):
        tiers.resources_for(specs, "Small", "60")


@pytest.mark.parametrize("ref, message", [
    ("Huge", "tier: unknown tier 'Huge' (available: gpu.Small, gpu.Medium, gpu.Large, cpu.CPU Only)"),
    ("cpu.Small", "tier: unknown tier 'cpu.Small' (available: gpu.Small, gpu.Medium, gpu.Large, cpu.CPU Only)"),
    ("", "tier: expected a tier name such as 'gpu.Small' (available: gpu.Small, gpu.Medium, gpu.Large, cpu.CPU Only)"),
    (None, "tier: expected a tier name such as 'gpu.Small' (available: gpu.Small, gpu.Medium, gpu.Large, cpu.CPU Only)"),
])
def test_unknown_tier(specs, ref, message):
    with pytest.raises(ValidationError) as info:
        tiers.resources_for(specs, ref)
    assert str(info.value) == message


def test_same_name_in_two_partitions_must_be_qualified():
    specs = tiers.parse_specs(SEED.replace("name: CPU Only", "name: Tiny").replace("name: Small", "name: Tiny"), SOURCE)
    assert tiers.resolve_tier(specs, "Tiny").ref == "gpu.Tiny"  # the default partition first
    assert tiers.resolve_tier(specs, "cpu.Tiny").ref == "cpu.Tiny"


def test_tiers_as_dicts_for_the_api(specs):
    rows = tiers.tiers_as_dicts(specs)
    assert [row["ref"] for row in rows] == ["gpu.Small", "gpu.Medium", "gpu.Large", "cpu.CPU Only"]
    assert rows[0] == {
        "ref": "gpu.Small", "partition": "gpu", "name": "Small", "description": "Small models (up to 16GB)",
        "default_partition": True, "max_model_size_gb": 16, "gpu_count": 1, "gpu_type": "a100", "cpu_cores": 4,
        "memory_gb": 16, "slurm": {"constraint": "gpu80"}, "idle_timeout": None,
        "resources": {"time": 30, "partition": "gpu", "cpus": 4, "memory_gb": 16.0, "gpus": 1, "gpu_type": "a100",
                      "gres": None, "constraint": "gpu80"},
        "sbatch": ["--time=30", "--partition=gpu", "--cpus-per-task=4", "--mem=16384M", "--gres=gpu:a100:1",
                   "--constraint=gpu80"],
    }
    assert rows[3]["sbatch"] == ["--time=30", "--partition=cpu", "--cpus-per-task=4", "--mem=8192M"]
    assert rows[2]["max_model_size_gb"] is None
