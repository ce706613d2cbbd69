"""Engines: chosen from the model format (site-overridable), their runtimes, GGUF metadata, launch arguments."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from portal.catalog import gguf
from portal.catalog.kinds import ENGINES, KINDS
from portal.catalog.gguf import choose_gguf, gguf_variants
from portal.config import ConfigError, load_config
from portal.engines import llama_cpp
from portal.engines.base import GUARD_DIR
from portal.errors import ValidationError
from portal.site import build_site


def gguf_bytes(pairs: dict, version: int = 3) -> bytes:
    """A GGUF header with `pairs` (str, int, float, bool, list of str) and no tensors."""
    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    out = b"GGUF" + struct.pack("<IQQ", version, 0, len(pairs))
    for key, value in pairs.items():
        out += string(key)
        if isinstance(value, bool):
            out += struct.pack("<I?", 7, value)
        elif isinstance(value, int):
            out += struct.pack("<Iq", 11, value)
        elif isinstance(value, float):
            out += struct.pack("<Id", 12, value)
        elif isinstance(value, str):
            out += struct.pack("<I", 8) + string(value)
        else:
            out += struct.pack("<IIQ", 9, 8, len(value)) + b"".join(string(item) for item in value)
    return out


def config(tmp_path, **site):
    """The resolved site of a site config holding `site`."""
    import yaml

    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(site))
    return build_site(load_config({"home": tmp_path / "home", "site_config_path": path}))


def test_engine_follows_the_model_format(tmp_path):
    site = config(tmp_path)
    text, speech = KINDS["text-generation"], KINDS["speech-recognition"]
    assert site.engine_for(text, "safetensors").name == "vllm"
    assert site.engine_for(text, "gguf").name == "llama-cpp"
    assert site.engine_for(text, None).name == "vllm"
    assert site.engine_for(speech, "ctranslate2").name == "whisper"
    assert site.engine_for(speech, "safetensors").name == "vllm"  # vLLM serves transformers Whisper models
    assert site.engine_for(speech, "gguf").name == "whisper"  # llama.cpp does no speech: the kind's default
    assert text.engines == ["vllm", "llama-cpp"] and speech.engines == ["vllm", "whisper"]


def test_site_overrides_the_engine_of_a_format(tmp_path):
    site = config(tmp_path, engines={"gguf": "vllm", "ctranslate2": "llama-cpp"})
    assert site.engine_for(KINDS["text-generation"], "gguf").name == "vllm"
    with pytest.raises(ValidationError, match="the site serves ctranslate2 models with llama-cpp, which does not "
                                              "serve speech-recognition"):
        site.engine_for(KINDS["speech-recognition"], "ctranslate2")
    with pytest.raises(ConfigError, match=r"engines.gguf: unknown engine 'ollama' \(known: vllm, llama-cpp, whisper\)"):
        config(tmp_path, engines={"gguf": "ollama"})
    with pytest.raises(ConfigError, match="engines: expected a mapping of model format to engine"):
        config(tmp_path, engines=["gguf"])


def test_runtime_entry_of_the_engine_wins_over_the_kind(tmp_path):
    site = config(tmp_path, runtimes={"text-generation": {"command": "kind-wide"}, "llama-cpp": {"command": "llama"}})
    text = KINDS["text-generation"]
    llama = site.runtime(text, ENGINES["llama-cpp"])
    assert (llama.command, llama.config_key, llama.health_path, llama.engine.key_env) == (
        "llama", "llama-cpp", "/v1/models", ("API_KEY",))
    vllm = site.runtime(text, ENGINES["vllm"])
    assert (vllm.command, vllm.config_key, vllm.health_path) == ("kind-wide", "text-generation", "/health")
    bare = config(tmp_path).runtime(KINDS["speech-recognition"])
    assert (bare.engine.name, bare.command, bare.config_key) == ("whisper", "python -m portal.engines.whisper_server", "")


def test_llama_cpp_arguments():
    args = ENGINES["llama-cpp"].server_arguments("/snap", "org/m", gpus=0, cpus=4, model_file="/snap/m.gguf")
    assert args == ["--model", "/snap/m.gguf", "--model_alias", "org/m", "--interrupt_requests", "false",
                    "--n_threads", "4"]
    assert ENGINES["llama-cpp"].server_arguments("/snap", "org/m", gpus=1, model_file="/snap/m.gguf")[-2:] == [
        "--n_gpu_layers", "-1"]
    assert ENGINES["vllm"].server_arguments("/snap", "org/m", gpus=2) == [
        "--middleware", "pilotfish_guard.KeyGuard",  # the key guard on every path (vLLM's own check covers /v1)
        "--model", "/snap", "--served-model-name", "org/m", "--tensor-parallel-size", "2"]


def test_gguf_metadata_and_chat_format(tmp_path):
    plain = tmp_path / "plain.gguf"
    plain.write_bytes(gguf_bytes({"general.architecture": "gemma3", "general.name": "Gemma 3 270m",
                                  "gemma3.block_count": 18, "tokenizer.ggml.tokens": ["<pad>", "a", "b"] * 1000,
                                  "general.good": True, "rope": 0.5}))
    meta = gguf.read_metadata(plain)
    assert (meta["general.architecture"], meta["gemma3.block_count"], meta["tokenizer.ggml.tokens"].length,
            meta["general.good"], meta["rope"]) == ("gemma3", 18, 3000, True, 0.5)
    assert llama_cpp.chat_format_for(plain) == "gemma"
    templated = tmp_path / "templated.gguf"
    templated.write_bytes(gguf_bytes({"general.architecture": "gemma3", "tokenizer.chat_template": "{{ x }}"}))
    assert llama_cpp.chat_format_for(templated) is None  # its own template wins
    unknown = tmp_path / "unknown.gguf"
    unknown.write_bytes(gguf_bytes({"general.architecture": "mamba"}))
    assert llama_cpp.chat_format_for(unknown) is None


@pytest.mark.parametrize("data, message", [
    (b"GGML" + b"\0" * 40, "is not a GGUF file"),
    (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "GGUF version 1 is not supported"),
    (gguf_bytes({"a": "b"})[:-1], "the file ends inside its metadata"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 99), "value type 99"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 40), "a metadata string of"),
])
def test_broken_gguf_files_raise_one_error(tmp_path, data, message):
    path = tmp_path / "broken.gguf"
    path.write_bytes(data)
    with pytest.raises(gguf.GGUFError, match=message):
        gguf.read_metadata(path)
    assert llama_cpp.chat_format_for(path) is None


def test_gguf_variants_and_the_one_a_launch_loads():
    files = [Path(name) for name in ("m-Q8_0.gguf", "m-Q4_K_M-00002-of-00002.gguf", "m-Q4_K_M-00001-of-00002.gguf",
                                     "m-F16.gguf")]
    variants = gguf_variants(files)
    assert sorted(variants) == ["m-F16", "m-Q4_K_M", "m-Q8_0"]
    assert [p.name for p in variants["m-Q4_K_M"]] == ["m-Q4_K_M-00001-of-00002.gguf", "m-Q4_K_M-00002-of-00002.gguf"]
    assert choose_gguf(variants) == "m-Q4_K_M"
    assert choose_gguf(gguf_variants([Path("b.gguf"), Path("a.gguf")])) == "a"


def test_a_gguf_launch_plans_llama_cpp_with_the_key_in_the_environment(tmp_path):
    import subprocess

    import yaml

    from portal.app import create_app
    from tests.conftest import TEST_SPECS
    from tests.support.model_builders import write_cache_repo

    cache = tmp_path / "cache"
    write_cache_repo(cache / "models", "org/gem", {
        "gem-Q4_K_M.gguf": gguf_bytes({"general.architecture": "gemma3"}),
        "gem-Q8_0.gguf": gguf_bytes({"general.architecture": "gemma3", "pad": "x" * 100})})
    (cache / "resource_specs.yaml").write_text(TEST_SPECS)
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"cache_dir": str(cache), "scheduler": "local",
                                    "runtimes": {"llama-cpp": {"command": "/opt/llama/bin/python -m llama_cpp.server"}}}))
    app = create_app({"home": tmp_path / "home", "site_config_path": site, "testing": True})
    auth = {"Authorization": f"Bearer {app.config['PILOTFISH_TOKEN']}"}
    client = app.test_client()
    plan = client.post("/api/services?dry_run=1", json={"kind": "text-generation", "model": "org/gem"}, headers=auth)
    assert plan.status_code == 200, plan.json
    body = plan.json
    assert body["engine"] == "llama-cpp"
    args = body["arguments"]
    assert args[args.index("--model") + 1].endswith("/gem-Q4_K_M.gguf")
    assert args[args.index("--chat_format") + 1] == "gemma" and args[args.index("--model_alias") + 1] == "org/gem"
    script = body["job_script"]
    assert 'export API_KEY="$PILOTFISH_API_KEY"' in script
    assert "/opt/llama/bin/python -m pilotfish_guard llama_cpp.server " in script  # the key guard's launcher
    assert f"export PYTHONPATH={GUARD_DIR}" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    mine = client.post("/api/services?dry_run=1", headers=auth, json={
        "kind": "text-generation", "model": "org/gem", "engine_args": ["--chat_format", "chatml", "--n_ctx", "4096"]})
    assert mine.json["arguments"].count("--chat_format") == 1 and "chatml" in mine.json["arguments"]
    refused = client.post("/api/services?dry_run=1", headers=auth, json={
        "kind": "text-generation", "model": "org/gem", "engine_args": ["--max-model-len", "256"]})
    assert refused.status_code == 400
    assert refused.json["error"].startswith("engine_args: --max-model-len is not an allowed llama.cpp option")


def test_installer_command_line(capsys):
    from portal.engines import installer

    assert installer.main(["--help"]) == 0
    assert "usage: python -m portal.engines.installer" in capsys.readouterr().out
    assert installer.main(["vllm", "ollama"]) == 2
    assert capsys.readouterr().err.strip() == "pilotfish: unknown engine(s): ollama (known: vllm, llama-cpp, whisper)"


LLAMA_CMAKE = """\
if (GGML_CPU_ALL_VARIANTS)
    if (GGML_SYSTEM_ARCH STREQUAL "x86")
        ggml_add_cpu_backend_variant(x64)
        ggml_add_cpu_backend_variant(sse42              SSE42)
        ggml_add_cpu_backend_variant(sandybridge        SSE42 AVX)
        ggml_add_cpu_backend_variant(haswell            SSE42 AVX F16C FMA AVX2 BMI2)
        ggml_add_cpu_backend_variant(skylakex           SSE42 AVX F16C FMA AVX2 BMI2 AVX512)
        if (NOT MSVC)
            ggml_add_cpu_backend_variant(sapphirerapids SSE42 AVX F16C FMA AVX2 BMI2 AVX512 AMX_TILE AMX_INT8)
        endif()
    elseif(GGML_SYSTEM_ARCH STREQUAL "ARM")
            ggml_add_cpu_backend_variant(armv8.2_1    DOTPROD)
    endif()
endif()
"""


def test_only_the_chosen_cpu_back_ends_are_built(tmp_path):
    from portal.engines import installer

    cmake = tmp_path / "CMakeLists.txt"
    cmake.write_text(LLAMA_CMAKE)
    installer.restrict_cpu_variants(cmake, ("x64", "sse42", "haswell"))
    active = [line.strip() for line in cmake.read_text().splitlines()
              if line.strip().startswith("ggml_add_cpu_backend_variant(")]
    assert [line.split("(")[1].split()[0].rstrip(")") for line in active] == ["x64", "sse42", "haswell", "armv8.2_1"]
    assert "# not built: ggml_add_cpu_backend_variant(sapphirerapids" in cmake.read_text()
    # A llama.cpp that does not define a wanted back end is refused, not built without it.
    cmake.write_text(LLAMA_CMAKE.replace("sandybridge", "ivybridge"))
    with pytest.raises(installer.InstallError, match="defines no CPU back end sandybridge"):
        installer.restrict_cpu_variants(cmake, ("x64", "sandybridge"))


def test_cpu_back_ends_from_the_environment(monkeypatch):
    from portal.engines import installer

    monkeypatch.delenv("PILOTFISH_LLAMA_CPU_VARIANTS", raising=False)
    assert installer.cpu_variants() == ("x64", "sse42", "sandybridge", "haswell")
    monkeypatch.setenv("PILOTFISH_LLAMA_CPU_VARIANTS", "icelake, haswell")
    assert installer.cpu_variants() == ("x64", "haswell", "icelake")  # the baseline always, in level order
    monkeypatch.setenv("PILOTFISH_LLAMA_CPU_VARIANTS", "haswell,pentium4")
    with pytest.raises(installer.InstallError, match="unknown pentium4"):
        installer.cpu_variants()


def test_an_install_counts_only_as_its_recipe_and_after_its_check(tmp_path, monkeypatch):
    import json

    from portal.engines import installer

    monkeypatch.delenv("PILOTFISH_LLAMA_CPU_VARIANTS", raising=False)
    python = installer.venv_python("llama-cpp", tmp_path)
    python.parent.mkdir(parents=True)
    python.write_text("")
    stamp = tmp_path / "llama-cpp" / "installed.json"
    stamp.write_text(json.dumps({"packages": installer.ENGINE_INSTALLS["llama-cpp"].packages}))  # an older, native build
    assert not installer.is_installed("llama-cpp", tmp_path)
    stamp.write_text(json.dumps(installer.install_recipe("llama-cpp")))  # built the portable way, never checked
    assert not installer.is_installed("llama-cpp", tmp_path)
    stamp.write_text(json.dumps({**installer.install_recipe("llama-cpp"), "check": "answered"}))
    assert installer.is_installed("llama-cpp", tmp_path)
    monkeypatch.setenv("PILOTFISH_LLAMA_CPU_VARIANTS", "icelake")  # another set of back ends: build again
    assert not installer.is_installed("llama-cpp", tmp_path)


@pytest.mark.parametrize("code, words", [
    (139, "the server crashed: segmentation fault (signal 11, SIGSEGV; exit code 139)"),
    (-11, "the server crashed: segmentation fault (signal 11, SIGSEGV; exit code 139)"),
    (132, "the server crashed: illegal instruction (built for another CPU?) (signal 4, SIGILL; exit code 132)"),
    (143, "the server was stopped: terminated (signal 15, SIGTERM; exit code 143)"),
    (1, "the server exited with code 1"),
    (0, "the server exited with code 0"),
])
def test_exit_codes_in_words(code, words):
    from portal.exit_codes import describe_exit

    assert describe_exit(code) == words
