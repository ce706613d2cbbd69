"""Model inventory from local files only: scan, safetensors metadata, service kind, lookup and deletion."""
from __future__ import annotations

import os
import stat
import subprocess

import pytest

from portal.catalog import models
from portal.errors import NotFoundError, ValidationError
from tests.support.model_builders import (LLAMA_PARAMS, LLAMA_TENSOR_BYTES, ct2_whisper, config_json, gguf_model,
                                          safetensors_bytes, tiny_llama, tiny_whisper, write_cache_repo)


def disk(files) -> int:
    return sum(len(data) for data in files.values())


def by_id(entries):
    return {entry.repo_id: entry for entry in entries}


def test_safetensors_header_is_read_without_the_tensors(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(tiny_llama()["model.safetensors"])
    header = models.read_safetensors_header(path)
    assert header["__metadata__"] == {"format": "pt"}
    assert header["lm_head.weight"]["shape"] == [64, 16]
    assert models.safetensors_summary([path]) == (LLAMA_PARAMS, "bfloat16", LLAMA_TENSOR_BYTES)


@pytest.mark.parametrize("content, problem", [
    (b"", "too short for a safetensors file"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{}", "header length 16 does not fit a 10-byte file"),
    ((2**63).to_bytes(8, "little") + b"{}", "does not fit a 10-byte file"),
])
def test_broken_safetensors_headers(tmp_path, content, problem):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=problem):
        models.read_safetensors_header(path)


@pytest.mark.parametrize("header", [b'{"a": 5}', b'{"a": {"dtype": "F16", "shape": [2], "data_offsets": [null, null]}}',
                                    b'{"a": {"dtype": "F16", "shape": [-2], "data_offsets": [0, 4]}}',
                                    b'{"a": {"dtype": 3, "shape": [2], "data_offsets": [0, 4]}}', b"[1]",
                                    b"[" * 100000 + b"]" * 100000, b"\xff\xfe", b"{"])
def test_hostile_safetensors_headers_become_an_error_field(dirs, header):
    cache, home = dirs
    header += b" " * (-len(header) % 8)
    write_cache_repo(home / "models", "org/bad", {
        "config.json": b"[" * 100000,  # too deep for json: treated as no config
        "model.safetensors": len(header).to_bytes(8, "little") + header + b"\0" * 4})
    rev = models.scan_models(cache, home)[0].revisions[0]
    assert rev.meta["error"].startswith("cannot read the weights: ")
    assert (rev.meta["parameters"], rev.meta["kind"], rev.meta["architectures"]) == (None, None, [])


def test_scan_reads_metadata_from_local_files(dirs):
    cache, home = dirs
    llama, whisper, ct2, gguf = tiny_llama(), tiny_whisper(), ct2_whisper(), gguf_model()
    bert = {"config.json": config_json(architectures=["BertModel"]),
            "model.safetensors": safetensors_bytes({"w": ("F32", [10, 10])})}
    write_cache_repo(cache / "models", "org/llama", llama, commit="a" * 40)
    write_cache_repo(cache / "models", "openai/whisper-tiny", whisper, commit="b" * 40)
    write_cache_repo(home / "models", "Systran/faster-whisper-tiny", ct2, commit="c" * 40)
    write_cache_repo(home / "models", "org/gemma-gguf", gguf, commit="d" * 40)
    write_cache_repo(home / "models", "org/bert", bert, commit="e" * 40)
    (cache / "models" / "version.txt").write_text("1")  # not a repo: ignored
    (cache / "models" / ".locks").mkdir()

    entries = by_id(models.scan_models(cache, home))
    assert sorted(entries) == ["Systran/faster-whisper-tiny", "openai/whisper-tiny", "org/bert", "org/gemma-gguf",
                               "org/llama"]
    rev = entries["org/llama"].revisions[0]
    assert rev.to_dict() == {
        "revision": "a" * 40, "refs": ["main"], "location": "cache",
        "path": str(cache / "models" / "models--org--llama" / "snapshots" / ("a" * 40)),
        "size_bytes": disk(llama), "size_gb": 0.0, "complete": True, "format": "safetensors",
        "kind": "text-generation", "parameters": LLAMA_PARAMS, "dtype": "bfloat16",  # the header, not config.json
        "kinds": ["text-generation", "text-embedding"], "kind_reason": "a causal language model (LlamaForCausalLM)",
        "modalities": ["text"],
        "model_type": "llama", "weights_bytes": LLAMA_TENSOR_BYTES, "architectures": ["LlamaForCausalLM"],
        "error": None, "adapter": None}
    assert rev.size_gb == LLAMA_TENSOR_BYTES / 1e9
    whisper_rev = entries["openai/whisper-tiny"].revisions[0]
    assert (whisper_rev.kind, whisper_rev.meta["parameters"], whisper_rev.meta["dtype"]) == ("speech-recognition", 768, "float16")
    ct2_rev = entries["Systran/faster-whisper-tiny"].revisions[0]
    assert (ct2_rev.location, ct2_rev.kind, ct2_rev.meta["format"], ct2_rev.meta["weights_bytes"],
            ct2_rev.meta["parameters"]) == ("home", "speech-recognition", "ctranslate2", 4000, None)
    gguf_rev = entries["org/gemma-gguf"].revisions[0]
    assert (gguf_rev.kind, gguf_rev.meta["format"], gguf_rev.meta["weights_bytes"], gguf_rev.size_bytes) == (
        "text-generation", "gguf", 3004, 3004 + 5004)
    assert (gguf_rev.meta["model_file"], gguf_rev.meta["gguf_variants"]) == ("gemma-Q4_K_M.gguf", ["gemma-Q4_K_M", "gemma-Q8_0"])
    bert_rev = entries["org/bert"].revisions[0]
    assert (bert_rev.kind, bert_rev.meta["parameters"], bert_rev.meta["dtype"]) == ("text-embedding", 100, "float32")
    assert (entries["org/llama"].to_dict()["kind"], entries["org/llama"].to_dict()["kinds"]) == (
        "text-generation", ["text-generation", "text-embedding"])
    assert (gguf_rev.kinds, ct2_rev.kinds, bert_rev.kinds) == (
        ["text-generation"], ["speech-recognition"], ["text-embedding"])


def test_sharded_weights_follow_the_index(dirs):
    cache, home = dirs
    files = tiny_llama(sharded=True)
    write_cache_repo(cache / "models", "org/sharded", files)
    rev = models.scan_models(cache, home)[0].revisions[0]
    # consolidated.safetensors (1000 float32) is not in the index: not counted twice.
    assert (rev.meta["parameters"], rev.meta["dtype"], rev.meta["weights_bytes"]) == (LLAMA_PARAMS, "bfloat16",
                                                                                      LLAMA_TENSOR_BYTES)
    assert rev.size_bytes == disk(files)


def test_sizes_count_each_blob_once_across_revisions_and_locations(dirs):
    cache, home = dirs
    v1 = tiny_llama()
    v2 = dict(v1, **{"config.json": config_json(architectures=["LlamaForCausalLM"], note="v2")})
    write_cache_repo(home / "models", "org/llama", v1, commit="1" * 40, refs=["v1"])
    write_cache_repo(home / "models", "org/llama", v2, commit="2" * 40, refs=["main", "refs/pr/1"])
    write_cache_repo(cache / "models", "org/llama", v1, commit="1" * 40, refs=["main"])
    entry = models.scan_models(cache, home)[0]
    assert [(r.location, r.revision[:1], r.refs) for r in entry.revisions] == [
        ("cache", "1", ["main"]), ("home", "2", ["main", "refs/pr/1"]), ("home", "1", ["v1"])]
    assert [r.size_bytes for r in entry.revisions] == [disk(v1), disk(v2), disk(v1)]
    # home: v1 and v2 share every blob but config.json; the cache copy is separate files.
    assert entry.size_bytes == disk(v1) + (disk(v1) + len(v2["config.json"])) 


def test_dangling_links_and_tree_listing_mark_incomplete_snapshots(dirs):
    cache, home = dirs
    files = tiny_llama()
    snap = write_cache_repo(home / "models", "org/partial", files, commit="f" * 40)
    (snap / "model.safetensors").resolve().unlink()
    rev = models.scan_models(cache, home)[0].revisions[0]
    assert rev.complete is False
    assert rev.meta["error"] == "cannot read the weights: No such file or directory"
    snap2 = write_cache_repo(home / "models", "org/partial2", files, commit="9" * 40)
    (snap2 / "tokenizer.json").unlink()
    trees = snap2.parent.parent / "trees"
    trees.mkdir()
    (trees / ("9" * 40 + ".json")).write_text('{"format_version": 1, "files": {"config.json": {}, "tokenizer.json": {}}}')
    assert by_id(models.scan_models(cache, home))["org/partial2"].revisions[0].complete is False
    with pytest.raises(ValidationError) as info:
        models.find_model("org/partial2", cache_dir=cache, home_dir=home)
    assert str(info.value) == ("model: org/partial2 is incomplete (an interrupted download?): download it again; "
                               "available: 999999999999 (main) in home, incomplete")


def test_find_model_lookup_order_and_revisions(dirs):
    cache, home = dirs
    files = tiny_llama()
    cache_snap = write_cache_repo(cache / "models", "org/llama", files, commit="1" * 40)
    home_snap = write_cache_repo(home / "models", "org/llama",
                                 dict(files, extra=b"x"), commit="2" * 40, refs=["main", "v2"])
    assert models.find_model("org/llama", cache_dir=cache, home_dir=home) == cache_snap
    assert models.find_model("org/llama", "v2", cache_dir=cache, home_dir=home) == home_snap
    assert models.find_model("org/llama", "2" * 40, cache_dir=cache, home_dir=home) == home_snap
    assert models.find_model("org/llama", "2222222", cache_dir=cache, home_dir=home) == home_snap
    found = models.find_revision("org/llama", cache_dir=cache, home_dir=home)
    assert (found.location, found.revision, found.refs, found.meta["parameters"]) == ("cache", "1" * 40, ["main"],
                                                                                      LLAMA_PARAMS)
    with pytest.raises(ValidationError) as info:
        models.find_model("org/llama", "v3", cache_dir=cache, home_dir=home)
    assert str(info.value) == ("revision: v3 is not downloaded for org/llama; available: 111111111111 (main) in cache, "
                               "222222222222 (main, v2) in home")
    with pytest.raises(ValidationError) as info:
        models.find_model("org/other", cache_dir=cache, home_dir=home)
    assert str(info.value) == (f"model: org/other is not downloaded (looked in {cache}/models or {home}/models); "
                               "available: org/llama")
    assert info.value.extra["field"] == "model"


def test_without_main_the_newest_snapshot_is_used(dirs):
    cache, home = dirs
    old = write_cache_repo(home / "models", "org/m", tiny_llama(), commit="1" * 40, refs=[])
    new = write_cache_repo(home / "models", "org/m", tiny_whisper(), commit="2" * 40, refs=[])
    os.utime(old, (1_000_000, 1_000_000))
    os.utime(new, (2_000_000, 2_000_000))
    assert models.find_model("org/m", cache_dir=cache, home_dir=home) == new


@pytest.mark.parametrize("repo_id", ["org", "../etc", "org/../x", "org/a--b", "/abs/path", "org/name/extra", "org/",
                                     "org/name.", "-org/name", "org/na me", 42, None])
def test_repo_ids_are_validated(dirs, repo_id):
    cache, home = dirs
    with pytest.raises(ValidationError, match=r"^model: expected a Hugging Face repo id such as org/name"):
        models.find_model(repo_id, cache_dir=cache, home_dir=home)
    with pytest.raises(ValidationError, match=r"^model: "):
        models.delete_model(repo_id, cache_dir=cache, home_dir=home)


@pytest.mark.parametrize("revision", ["../../etc", "a/../../b", "/main", "main/", "-x", ""])
def test_revisions_are_validated(dirs, revision):
    cache, home = dirs
    with pytest.raises(ValidationError, match=r"^revision: expected a branch, tag or commit"):
        models.find_model("org/m", revision, cache_dir=cache, home_dir=home)


def test_read_only_cache_dir_is_scanned_and_used_but_never_deleted(dirs):
    cache, home = dirs
    files = tiny_llama()
    snap = write_cache_repo(cache / "models", "org/shared", files, commit="1" * 40)
    subprocess.run(["chmod", "-R", "a-w", str(cache)], check=True)
    try:
        assert models.scan_models(cache, home)[0].revisions[0].meta["parameters"] == LLAMA_PARAMS
        assert models.find_model("org/shared", cache_dir=cache, home_dir=home) == snap
        with pytest.raises(ValidationError) as info:
            models.delete_model("org/shared", cache_dir=cache, home_dir=home)
        assert str(info.value) == (f"model: org/shared is in the shared cache_dir ({cache}), which the site admins "
                                   "manage: it cannot be deleted here")
        with pytest.raises(ValidationError, match=r"^model: org/shared is in the shared cache_dir"):
            models.delete_model("org/shared", "main", cache_dir=cache, home_dir=home)
        assert (snap / "model.safetensors").is_file()
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(cache)], check=True)


def test_delete_a_whole_repo_from_home(dirs):
    cache, home = dirs
    files = tiny_llama()
    write_cache_repo(home / "models", "org/mine", files)
    result = models.delete_model("org/mine", cache_dir=cache, home_dir=home)
    assert result["freed_bytes"] == disk(files) and len(result["revisions"]) == 1
    assert not (home / "models" / "models--org--mine").exists()
    with pytest.raises(NotFoundError) as info:
        models.delete_model("org/mine", cache_dir=cache, home_dir=home)
    assert str(info.value) == f"model org/mine is not in your models ({home}/models)"


def test_delete_one_revision_keeps_shared_blobs(dirs):
    cache, home = dirs
    v1 = tiny_llama()
    v2 = dict(v1, **{"config.json": b'{"architectures": ["LlamaForCausalLM"], "v": 2}'})
    write_cache_repo(home / "models", "org/mine", v1, commit="1" * 40, refs=["v1"])
    snap2 = write_cache_repo(home / "models", "org/mine", v2, commit="2" * 40, refs=["main"])
    repo = home / "models" / "models--org--mine"
    assert len(list((repo / "blobs").iterdir())) == 4
    result = models.delete_model("org/mine", "v1", cache_dir=cache, home_dir=home)
    assert result == {"repo_id": "org/mine", "revisions": ["1" * 40], "freed_bytes": len(v1["config.json"])}
    assert not (repo / "snapshots" / ("1" * 40)).exists() and not (repo / "refs" / "v1").exists()
    assert len(list((repo / "blobs").iterdir())) == 3
    assert (snap2 / "model.safetensors").read_bytes() == v1["model.safetensors"]
    assert models.find_model("org/mine", cache_dir=cache, home_dir=home) == snap2
    with pytest.raises(NotFoundError) as info:
        models.delete_model("org/mine", "v1", cache_dir=cache, home_dir=home)
    assert str(info.value) == "revision v1 of org/mine is not in your models; available: 222222222222 (main)"


def test_delete_refuses_links_leading_out_of_home(dirs, tmp_path):
    cache, home = dirs
    elsewhere = tmp_path / "precious"
    write_cache_repo(elsewhere, "org/x", tiny_llama())
    os.symlink(elsewhere / "models--org--x", home / "models" / "models--org--x")
    with pytest.raises(ValidationError, match=r"is not a model folder of your own \(a link or inside cache_dir\)"):
        models.delete_model("org/x", cache_dir=cache, home_dir=home)
    assert (elsewhere / "models--org--x" / "blobs").is_dir()


def test_home_and_cache_both_hold_a_repo_delete_takes_the_home_copy(dirs):
    cache, home = dirs
    write_cache_repo(cache / "models", "org/both", tiny_llama(), commit="1" * 40)
    write_cache_repo(home / "models", "org/both", tiny_llama(), commit="2" * 40)
    assert models.delete_model("org/both", cache_dir=cache, home_dir=home)["revisions"] == ["2" * 40]
    assert models.find_revision("org/both", cache_dir=cache, home_dir=home).location == "cache"
    with pytest.raises(ValidationError, match=r"^model: org/both is in the shared cache_dir"):
        models.delete_model("org/both", cache_dir=cache, home_dir=home)


def test_no_folders_at_all(tmp_path):
    assert models.scan_models(None, tmp_path / "missing") == []
    with pytest.raises(ValidationError, match=r"available: none$"):
        models.find_model("org/x", cache_dir=None, home_dir=tmp_path / "missing")


def test_special_files_are_not_opened(dirs):
    cache, home = dirs
    snap = write_cache_repo(home / "models", "org/fifo", {"config.json": b"{}"})
    os.mkfifo(snap / "model.safetensors")  # opening it would block forever
    os.mkfifo(snap / "config2.json")
    rev = models.scan_models(cache, home)[0].revisions[0]
    assert stat.S_ISFIFO(os.stat(snap / "model.safetensors").st_mode)
    assert rev.meta["error"] is not None and rev.meta["parameters"] is None
