"""Model downloads with huggingface_hub against a local stand-in for the Hub (tests/support/fake_hub.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from portal.catalog import downloads as models
from portal.catalog.models import find_model, find_revision, scan_models
from portal.errors import ConflictError, NotFoundError, ValidationError
from portal.scheduler import processes
from tests.support.model_builders import LLAMA_PARAMS, sharded_big, tiny_llama, tiny_whisper
from tests.conftest import wait_for
from tests.support.fake_hub import FakeHub


def disk(files) -> int:
    return sum(len(data) for data in files.values())


def finished(task, timeout=30):
    assert task.wait(timeout), f"download still {task.state} after {timeout} s"
    return task


@pytest.fixture
def manager(dirs, hub):
    cache, home = dirs
    mgr = models.DownloadManager(home_dir=home, cache_dir=cache, endpoint=hub.url)
    yield mgr
    mgr.close()


def test_download_into_home_and_find_it_offline(manager, hub, dirs):
    cache, home = dirs
    files = tiny_llama()
    commit = hub.add_repo("org/tiny", files)
    task = manager.start("org/tiny")
    assert task.to_dict()["state"] in ("queued", "running")
    finished(task)
    assert task.to_dict() | {"id": None, "created_at": None, "started_at": None, "ended_at": None} == {
        "id": None, "repo_id": "org/tiny", "revision": "main", "commit": commit, "location": "home", "state": "done",
        "bytes_done": disk(files), "bytes_total": disk(files), "files": 3,
        "path": str(home / "models" / "models--org--tiny" / "snapshots" / commit), "error": None, "error_code": None,
        "created_at": None, "started_at": None, "ended_at": None}
    assert manager.get(task.id) is task and manager.tasks() == [task]
    hub.stop()  # from here on, no network: the inventory reads local files only
    rev = find_revision("org/tiny", cache_dir=cache, home_dir=home)
    assert (rev.revision, rev.refs, rev.location, rev.meta["parameters"], rev.meta["kind"]) == (
        commit, ["main"], "home", LLAMA_PARAMS, "text-generation")
    entry = scan_models(cache, home)[0]
    assert entry.size_bytes == disk(files) and entry.revisions[0].complete
    # The Hub saw exactly the calls documented in fake_hub.py: info (ours with blobs, then the library's), tree,
    # HEAD and GET per file.
    assert [m for m, path, _ in hub.requests if path.startswith("/api/")] == ["GET", "GET", "GET"]
    assert sorted(p.rsplit("/", 1)[1] for p in hub.files_requested("GET")) == sorted(files)


def test_a_branch_or_tag_and_a_second_revision(manager, hub, dirs):
    cache, home = dirs
    first = hub.add_repo("org/m", tiny_llama())
    second = hub.add_repo("org/m", tiny_whisper(), branch="v2")
    finished(manager.start("org/m"))
    task = finished(manager.start("org/m", "v2"))
    assert (task.state, task.commit) == ("done", second)
    assert find_model("org/m", "v2", cache_dir=cache, home_dir=home).name == second
    assert find_model("org/m", cache_dir=cache, home_dir=home).name == first
    by_commit = finished(manager.start("org/m", first))
    assert by_commit.state == "done" and by_commit.commit == first


def test_endpoint_from_hf_endpoint_read_at_call_time(dirs, hub, monkeypatch):
    cache, home = dirs
    hub.add_repo("org/tiny", tiny_llama())
    monkeypatch.setenv("HF_ENDPOINT", hub.url + "/")  # huggingface_hub itself read it at import: too late for it
    assert models.hub_endpoint() == hub.url
    mgr = models.DownloadManager(home_dir=home)
    assert finished(mgr.start("org/tiny")).state == "done"
    assert models.hub_endpoint("http://mirror.example") == "http://mirror.example"


def test_gated_repo_without_a_token(manager, hub, dirs):
    cache, home = dirs
    hub.add_repo("org/gated", tiny_llama(), gated=True)
    task = finished(manager.start("org/gated"))
    assert (task.state, task.error_code) == ("failed", "gated")
    assert task.error == (f"org/gated is a gated model: accept its conditions at {hub.url}/org/gated, then set "
                          "HF_TOKEN to a token of that account")
    assert not (home / "models" / "models--org--gated").exists()  # nothing half-made is left
    assert scan_models(cache, home) == []


def test_gated_repo_with_hf_token(manager, hub, dirs, monkeypatch):
    hub.add_repo("org/gated", tiny_llama(), gated=True)
    monkeypatch.setenv("HF_TOKEN", "hf_denied")
    task = finished(manager.start("org/gated"))
    assert task.error == (f"org/gated is a gated model and the token in use has not been granted access: request "
                          f"access at {hub.url}/org/gated")
    monkeypatch.setenv("HF_TOKEN", "hf_granted")
    assert finished(manager.start("org/gated")).state == "done"
    assert ("HEAD", "Bearer hf_granted") in {(m, auth) for m, path, auth in hub.requests if "/resolve/" in path}


def test_unknown_repo_and_revision(manager, hub):
    hub.add_repo("org/tiny", tiny_llama())
    task = finished(manager.start("org/nope"))
    assert (task.error_code, task.error) == ("not_found", f"org/nope does not exist on {hub.url} (or it is private: "
                                                          "set HF_TOKEN)")
    task = finished(manager.start("org/tiny", "v9"))
    assert (task.error_code, task.error) == ("revision_not_found", "revision 'v9' does not exist in org/tiny")


def test_network_unreachable(dirs):
    cache, home = dirs
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    task = finished(models.DownloadManager(home_dir=home, endpoint=f"http://127.0.0.1:{port}").start("org/x"))
    assert (task.state, task.error_code) == ("failed", "network")
    assert task.error == (f"cannot reach the Hub at http://127.0.0.1:{port}: network unreachable (air-gapped nodes "
                          "cannot download: use a login node with internet, or ask the admins to add the model)")


def test_offline_mode(manager, hub, monkeypatch):
    hub.add_repo("org/tiny", tiny_llama())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = finished(manager.start("org/tiny"))
    assert (task.error_code, task.error) == ("offline", "downloads are disabled on this machine (HF_HUB_OFFLINE is set)")
    assert hub.requests == []


def test_cache_dir_only_when_asked_and_writable(manager, hub, dirs):
    cache, home = dirs
    files = tiny_llama()
    commit = hub.add_repo("org/tiny", files)
    task = finished(manager.start("org/tiny", use_cache=True))
    assert (task.state, task.location, task.path) == (
        "done", "cache", str(cache / "models" / "models--org--tiny" / "snapshots" / commit))
    assert not (home / "models" / "models--org--tiny").exists()
    no_cache = models.DownloadManager(home_dir=home, endpoint=hub.url)
    with pytest.raises(ValidationError) as info:
        no_cache.start("org/tiny", use_cache=True)
    assert str(info.value) == "use_cache: this site has no cache_dir; download to your home_dir instead"


def test_read_only_cache_dir_is_refused(manager, hub, dirs):
    cache, home = dirs
    hub.add_repo("org/tiny", tiny_llama())
    subprocess.run(["chmod", "-R", "a-w", str(cache)], check=True)  # refused even for root, who could still write
    try:
        with pytest.raises(ValidationError) as info:
            manager.start("org/tiny", use_cache=True)
        assert str(info.value) == (f"use_cache: the shared cache_dir ({cache}) is read-only: only the site admins add "
                                   "models there; download to your home_dir instead")
        assert manager.tasks() == [] and hub.requests == []
        assert finished(manager.start("org/tiny")).location == "home"  # the default never touches it
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(cache)], check=True)


def test_bad_input_is_refused_before_anything_runs(manager, hub):
    with pytest.raises(ValidationError, match=r"^model: expected a Hugging Face repo id such as org/name, got '\.\./x'$"):
        manager.start("../x")
    with pytest.raises(ValidationError, match=r"^revision: expected a branch, tag or commit, got '\.\./\.\./x'$"):
        manager.start("org/x", "../../x")
    with pytest.raises(NotFoundError, match=r"^no download 'nope'$"):
        manager.get("nope")
    assert hub.requests == []


def test_progress_is_read_from_disk_and_cancel_stops_the_transfer(dirs):
    cache, home = dirs
    files = sharded_big(shards=3, shard_bytes=256 * 1024)
    total = disk(files)
    with FakeHub(throttle=800_000) as hub:
        hub.hold_weights_after = 1  # the second shard stops after its first chunk until the cancel: on any machine
        hub.add_repo("org/big", files)
        mgr = models.DownloadManager(home_dir=home, endpoint=hub.url, max_workers=1)
        task = mgr.start("org/big")
        wait_for(lambda: task.bytes_total, timeout=20, what="the file list")
        assert task.bytes_total == total
        # Files land one by one (max_workers=1): progress is a sum of whole files so far, until the transfer is cut.
        shard = len(files["model-00001-of-00003.safetensors"])
        wait_for(lambda: task.bytes_done >= shard, timeout=20, what="a first shard on disk")
        wait_for(lambda: hub.weights_asked == 2, timeout=20, what="the second shard asked for")
        assert task.state == "running" and task.bytes_done < total
        with pytest.raises(ConflictError, match=r"^model: org/big is already downloading to "):
            mgr.start("org/big")
        mgr.cancel(task.id)
        assert (task.state, task.error_code) == ("cancelled", "cancelled")
        sent = hub.bytes_sent
        assert sent < total
        # The held body goes on now: the server may still push a chunk or two into the socket before it notices the
        # peer is gone; then nothing. Had the transfer not been cut, the rest would flow (0.3 s a shard).
        hub.release.set()
        time.sleep(1.0)
        settled = hub.bytes_sent
        time.sleep(0.6)
        assert hub.bytes_sent == settled and settled - sent <= 2 * 16384, "bytes still flowing after cancel"
        blobs = home / "models" / "models--org--big" / "blobs"
        assert not [p for p in blobs.iterdir() if p.name.endswith(".incomplete")]
        assert task.bytes_done < total and task.to_dict()["state"] == "cancelled"
        mgr.cancel(task.id)  # again: nothing changes
        assert task.state == "cancelled"
        # A new download resumes from the files already there and completes.
        hub.throttle = None
        again = finished(mgr.start("org/big"))
        assert (again.state, again.bytes_done) == ("done", total)
        rev = find_revision("org/big", cache_dir=cache, home_dir=home)
        assert (rev.meta["parameters"], rev.meta["dtype"], rev.meta["kind"]) == (3 * 128 * 1024, "float16",
                                                                                 "text-generation")


def test_progress_counts_files_already_present(manager, hub, dirs):
    cache, home = dirs
    v1 = tiny_llama()
    v2 = dict(v1, **{"config.json": b'{"architectures": ["LlamaForCausalLM"], "v": 2}'})
    hub.add_repo("org/m", v1)
    finished(manager.start("org/m"))
    hub.add_repo("org/m", v2)
    task = finished(manager.start("org/m"))
    assert (task.bytes_done, task.bytes_total) == (disk(v2), disk(v2))
    assert sorted(p.rsplit("/", 1)[1] for p in hub.files_requested("GET")) == sorted(list(v1) + ["config.json"])


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_is_seen_before_downloading(small_disk):
    files = sharded_big(shards=3, shard_bytes=512 * 1024)
    with FakeHub() as hub:
        hub.add_repo("org/big", files)
        task = finished(models.DownloadManager(home_dir=small_disk, endpoint=hub.url).start("org/big"))
    assert (task.state, task.error_code) == ("failed", "disk_full")
    assert task.error == (f"not enough disk space in {small_disk}/models: the download needs 1.6 MB, 1.0 MB is free")
    assert hub.files_requested("GET") == []


def test_disk_full_during_the_download(small_disk):
    files = sharded_big(shards=3, shard_bytes=512 * 1024)
    with FakeHub(hide_sizes=True) as hub:  # no sizes in the file list: the check above cannot run
        hub.add_repo("org/big", files)
        task = finished(models.DownloadManager(home_dir=small_disk, endpoint=hub.url, max_workers=1).start("org/big"))
    assert (task.state, task.error_code, task.bytes_total) == ("failed", "disk_full", None)
    assert task.error == f"not enough disk space in {small_disk}/models: No space left on device"
    leftovers = [p.name for p in (small_disk / "models").rglob("*.incomplete")]
    assert leftovers == []


def test_describe_hub_error_words():
    root, end = "/h/models", "https://hub"
    assert models.describe_hub_error({"errno": 122}, "o/m", "main", end, root) == (
        "disk_full", "not enough disk space in /h/models: Disk quota exceeded")
    assert models.describe_hub_error({"errno": 13}, "o/m", "main", end, root) == (
        "permission", "cannot write to /h/models: Permission denied")
    assert models.describe_hub_error({"types": ["HfHubHTTPError"], "status": 500, "message": "500 Server Error\nx"},
                                     "o/m", "main", end, root) == ("hub_error", "the Hub answered HTTP 500: 500 Server Error")
    assert models.describe_hub_error({"type": "KeyError", "message": "'sha'"}, "o/m", "main", end, root) == (
        "failed", "download failed: KeyError: 'sha'")


def test_unwritable_home(dirs, hub):
    cache, home = dirs
    hub.add_repo("org/tiny", tiny_llama())
    target = home / "models"
    if os.geteuid() == 0:  # root writes through permission bits: a read-only file system refuses everyone
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {result.stderr.decode().strip()}")
        expected = "Read-only file system"
    else:
        os.chmod(target, 0o555)
        expected = "Permission denied"
    try:
        task = finished(models.DownloadManager(home_dir=home, endpoint=hub.url).start("org/tiny"))
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(target)], check=False)
        else:
            os.chmod(target, 0o755)
    assert (task.state, task.error_code, task.error) == ("failed", "permission", f"cannot write to {target}: {expected}")


def test_the_download_process_is_a_tracked_child_with_a_folder_of_its_own(dirs, tmp_path):
    cache, home = dirs
    work = tmp_path / "work"
    with FakeHub(throttle=200_000) as hub:
        hub.add_repo("org/big", sharded_big(shards=2, shard_bytes=256 * 1024))
        mgr = models.DownloadManager(home_dir=home, endpoint=hub.url, token="hf_secret", max_workers=1, work_dir=work)
        task = mgr.start("org/big")
        wait_for(lambda: task.bytes_total, timeout=20, what="the file list")
        folder = work / task.id
        record = processes.read_record(folder)
        assert processes.alive(record) and record["name"] == f"download-{task.id}"
        assert "hf_secret" not in (folder / "request.json").read_text()  # the token goes through the environment
        assert json.loads((folder / "plan.json").read_text())["commit"] == task.commit
        mgr.cancel(task.id)
        assert task.state == "cancelled" and not processes.alive(record)
        assert not folder.exists()  # the task keeps what it needs: its folder goes when it ends
        assert ("HEAD", "Bearer hf_secret") in {(m, auth) for m, path, auth in hub.requests if "/resolve/" in path}
