"""Audio batches on a portal with the local scheduler, whose speech recognition is the OpenAI-shaped test engine (it
answers each upload's size and sha256, and 400 to a file that is not audio): lines naming audio by path or file id,
checked up front (a 400 naming the line) and at run time (the error file, with the reason); what a named key may
name; a folder transcribed into a mirror tree (skipping what is done, picking up files added while it runs) and its
refusals. The same with the real Whisper on the real Slurm: tests/e2e/test_audio_batches.py."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from portal.app import create_app
from portal.batches import audio, lines as batch_lines
from portal.batches.folder_files import new_files, write_transcript
from portal.batches.runner import FolderRunner
from tests.conftest import REPO, wait_for, write_site_config
from tests.test_batches import jsonl, run_until, upload

UPSTREAM = f"{__import__('sys').executable} {REPO / 'tests' / 'support' / 'openai_upstream.py'}"
WHISPER = "test/whisper"
TRANSCRIBE = "/v1/audio/transcriptions"


@pytest.fixture
def app(tmp_path):
    site = write_site_config(tmp_path / "site.yaml", scheduler="local", key_audio_folders=[str(tmp_path / "shared")],
                             runtimes={"text-generation": {"command": UPSTREAM},
                                       "speech-recognition": {"command": UPSTREAM}})
    yield create_app({"home": tmp_path / "home", "site_config_path": site, "testing": True})


def audio_line(number: int, file: str, **body) -> dict:
    return {"custom_id": f"audio-{number}", "method": "POST", "url": TRANSCRIBE,
            "body": {"model": WHISPER, "file": file, **body}}


def start(client, auth, lines, endpoint=TRANSCRIBE):
    file_id = upload(client, auth, jsonl(lines)).json["id"]
    return client.post("/v1/batches", headers=auth, json={"input_file_id": file_id, "endpoint": endpoint,
                                                          "completion_window": "24h"})


def content(client, auth, file_id) -> list:
    return [json.loads(line) for line in client.get(f"/v1/files/{file_id}/content", headers=auth).data.splitlines()]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_audio_lines_by_path_and_file_id_are_sent_as_multipart_and_a_file_gone_at_run_time_is_an_error(
        app, client, auth, tmp_path):
    first, second, doomed, broken = (tmp_path / name for name in ("one.wav", "two.mp3", "doomed.wav", "broken.wav"))
    first.write_bytes(b"RIFF" + os.urandom(3000))
    second.write_bytes(os.urandom(70000))
    doomed.write_bytes(b"RIFF....")
    broken.write_bytes(b"not audio at all")
    uploaded = client.post("/v1/files", headers=auth, content_type="multipart/form-data",
                           data={"purpose": "user_data", "file": (open(second, "rb"), "two.mp3")}).json
    created = start(client, auth, [audio_line(0, str(first), language="en", prompt="names", temperature=0.2),
                                   audio_line(1, uploaded["id"], response_format="text"),
                                   audio_line(2, str(doomed)), audio_line(3, str(broken))])
    assert created.status_code == 200, created.json
    doomed.unlink()  # gone before its line runs
    assert run_until(app, created.json["id"], {"completed", "failed"}) == "completed"
    done = client.get(f"/v1/batches/{created.json['id']}", headers=auth).json
    assert done["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    answers = {line["custom_id"]: line["response"]["body"] for line in content(client, auth, done["output_file_id"])}
    assert answers["audio-0"] == {"text": "received 3004 bytes", "sha256": sha(first.read_bytes()),
                                  "fields": {"language": "en", "prompt": "names", "temperature": "0.2"}}
    assert answers["audio-1"] == f"text: received 70000 bytes {sha(second.read_bytes())}\n"
    errors = {line["custom_id"]: line for line in content(client, auth, done["error_file_id"])}
    assert errors["audio-2"]["error"]["code"] == "invalid_file"
    assert errors["audio-2"]["error"]["message"] == f"{doomed}: no such file"
    assert errors["audio-3"]["response"]["status_code"] == 400
    assert "could not decode" in errors["audio-3"]["error"]["message"]


def bad_audio_cases(tmp_path):
    (tmp_path / "folder.wav").mkdir()
    good = tmp_path / "good.wav"
    good.write_bytes(b"RIFF")
    return {
        "a missing file": ([audio_line(0, str(good)), audio_line(1, str(tmp_path / "gone.wav"))], 2,
                           f"body.file: {tmp_path / 'gone.wav'}: no such file"),
        "a folder": ([audio_line(0, str(tmp_path / "folder.wav"))], 1, "not a file"),
        "a relative path": ([audio_line(0, "talk.wav")], 1, "neither an absolute path nor a file id"),
        "no file": ([{**audio_line(0, ""), "body": {"model": WHISPER}}], 1, "body.file: missing"),
        "an unknown file id": ([audio_line(0, "file-0123abcd")], 1, "no file 'file-0123abcd'"),
        "an unknown field": ([audio_line(0, str(good), speed=2)], 1, "body.speed: not a field of an audio line"),
        "a bad format": ([audio_line(0, str(good), response_format="mp3")], 1, "body.response_format: expected one"),
        "a hot temperature": ([audio_line(0, str(good), temperature=3)], 1, "body.temperature"),
        "a chat model": ([audio_line(0, str(good)) | {"body": {"model": "test/tiny", "file": str(good)}}], 1,
                         "not a speech-recognition (Whisper) model"),
    }


def test_a_bad_audio_line_is_a_400_naming_it(app, client, auth, tmp_path):
    for case, (lines, number, words) in bad_audio_cases(tmp_path).items():
        answer = start(client, auth, lines)
        assert answer.status_code == 400, (case, answer.json)
        message = answer.json["error"]["message"]
        assert message.startswith(f"input_file_id: line {number}: ") and words in message, (case, message)
    whisper_for_chat = start(client, auth, [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                                             "body": {"model": WHISPER, "messages": []}}], "/v1/chat/completions")
    assert whisper_for_chat.status_code == 400 and "speech-recognition model" in whisper_for_chat.json["error"]["message"]


def test_an_unreadable_audio_file_is_a_400_naming_its_line(client, auth, tmp_path):
    """A file the portal's user cannot read: refused naming its line. Root reads every file, so there the same check
    runs as another user of the node (nobody), against the kernel's own permissions."""
    folder = Path(tempfile.mkdtemp(prefix="pilotfish-unreadable-"))
    try:
        folder.chmod(0o755)
        locked = folder / "locked.wav"
        locked.write_bytes(b"RIFF")
        locked.chmod(0)
        if os.geteuid() != 0:
            answer = start(client, auth, [audio_line(0, str(locked))])
            assert answer.status_code == 400 and "not readable" in answer.json["error"]["message"]
            return
        script = ("import sys\nfrom portal.batches.audio import AudioFileError, readable_file\n"
                  "try:\n    readable_file(sys.argv[1])\nexcept AudioFileError as exc:\n    print(exc)\n")
        checked = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                                  script, str(locked)], capture_output=True, text=True, timeout=60,
                                 env={"PYTHONPATH": str(REPO), "PATH": os.environ["PATH"]}, cwd="/")
        assert checked.returncode == 0, checked.stderr
        assert checked.stdout.strip() == f"{locked}: not readable (permission denied)"
    finally:
        shutil.rmtree(folder)


def test_a_named_key_names_only_its_own_uploads_or_paths_under_key_audio_folders(app, client, auth, tmp_path):
    secret = client.post("/api/keys", headers=auth, json={"name": "student", "scopes": ["use", "read", "launch"]}
                         ).json["key"]
    key = {"Authorization": f"Bearer {secret}"}
    private = tmp_path / "private.wav"  # the owner's file, outside key_audio_folders
    private.write_bytes(b"RIFF secret")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "talk.wav").write_bytes(b"RIFF shared")
    (shared / "link.wav").symlink_to(private)  # a link under the shared folder to the owner's file
    owner_upload = upload(client, auth, b"RIFF owner", name="owner.wav", purpose="user_data").json["id"]
    own_upload = upload(client, key, b"RIFF mine", name="mine.wav", purpose="user_data").json["id"]
    for lines, words in (([audio_line(0, str(private))], "not under the folders a named key may read"),
                         ([audio_line(0, str(shared / "link.wav"))], "not under the folders a named key may read"),
                         ([audio_line(0, owner_upload)], f"no file {owner_upload!r}")):
        refused = start(client, key, lines)
        assert refused.status_code == 400 and words in refused.json["error"]["message"], refused.json
    assert start(client, auth, [audio_line(0, str(private))]).status_code == 200  # the owner may
    allowed = start(client, key, [audio_line(0, str(shared / "talk.wav")), audio_line(1, own_upload)])
    assert allowed.status_code == 200, allowed.json
    assert run_until(app, allowed.json["id"], {"completed"}) == "completed"
    done = client.get(f"/v1/batches/{allowed.json['id']}", headers=key).json
    assert done["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    refused = client.post("/api/batches/folders", headers=key, json={"folder": str(tmp_path), "model": WHISPER,
                                                                      "out": str(shared / "out")})
    assert refused.status_code == 400 and refused.json["field"] == "folder"
    refused = client.post("/api/batches/folders", headers=key, json={"folder": str(shared), "model": WHISPER,
                                                                      "out": str(tmp_path / "out")})
    assert refused.status_code == 400 and refused.json["field"] == "out" and not (tmp_path / "out").exists()


def test_the_file_sent_is_the_file_checked_even_when_a_link_is_swapped_in_between(tmp_path, monkeypatch):
    """A named key's path is checked on the file opened: a link under key_audio_folders that points at the owner's
    file while it is opened and back at an allowed file while it is checked is refused; a named pipe is refused as
    not a file without waiting for a writer."""
    shared, private = tmp_path / "shared", tmp_path / "private.wav"
    shared.mkdir()
    (shared / "talk.wav").write_bytes(b"RIFF shared")
    private.write_bytes(b"RIFF secret")
    link = shared / "swap.wav"

    def point(target: Path) -> None:
        (shared / ".next").symlink_to(target)
        os.replace(shared / ".next", link)
    point(shared / "talk.wav")
    fd = audio.open_audio(str(link), [str(shared)])
    try:
        assert os.pread(fd, 100, 0) == b"RIFF shared"
    finally:
        os.close(fd)
    real_open = os.open

    def swapped_while_opening(path, flags, *rest):
        point(private)  # the owner's file is what gets opened ...
        try:
            return real_open(path, flags, *rest)
        finally:
            point(shared / "talk.wav")  # ... and an allowed one is what the name shows afterwards
    monkeypatch.setattr(os, "open", swapped_while_opening)
    with pytest.raises(audio.AudioFileError, match="not under the folders a named key may read"):
        audio.open_audio(str(link), [str(shared)])
    monkeypatch.undo()
    pipe = shared / "pipe.wav"
    os.mkfifo(pipe)
    outcome = []
    opener = threading.Thread(target=lambda: outcome.append(pytest.raises(audio.AudioFileError, audio.open_audio,
                                                                          str(pipe), [str(shared)])), daemon=True)
    opener.start()
    opener.join(10)
    assert not opener.is_alive(), "opening a named pipe waited for a writer"
    assert "not a file" in str(outcome[0].value)


def test_a_transcript_is_written_in_the_folder_checked_even_when_a_link_is_swapped_in_between(tmp_path, monkeypatch):
    """A named key's transcript goes only into a folder under key_audio_folders, checked as opened: an output
    sub-folder that is a link to the owner's folder while it is opened, and a real folder again while it is checked,
    gets nothing written; a transcript is written whole in the folder checked."""
    shared, private = tmp_path / "shared", tmp_path / "private"
    (shared / "out" / "real").mkdir(parents=True)
    private.mkdir()
    target, size = write_transcript(str(shared / "out"), "real/talk.wav", "txt", "hello", [str(shared)])
    assert (target, size, target.read_text()) == (shared / "out" / "real" / "talk.txt", 5, "hello")
    sub, parked = shared / "out" / "sub", shared / "out" / "parked"
    sub.mkdir()
    real_open = os.open

    def swapped_while_opening(path, flags, *rest, **named):
        if str(path) == str(sub):
            os.rename(sub, parked)
            sub.symlink_to(private)  # the owner's folder is what gets opened ...
            try:
                return real_open(path, flags, *rest, **named)
            finally:
                sub.unlink()
                os.rename(parked, sub)  # ... and a folder under the allowed one is what the name shows afterwards
        return real_open(path, flags, *rest, **named)
    monkeypatch.setattr(os, "open", swapped_while_opening)
    with pytest.raises(OSError, match="not under the folders a named key may write"):
        write_transcript(str(shared / "out"), "sub/talk.wav", "txt", "stolen", [str(shared)])
    monkeypatch.undo()
    assert list(private.iterdir()) == [] and list(sub.iterdir()) == []


def make_tree(root: Path) -> Path:
    source = root / "audio"
    (source / "sub" / "deeper").mkdir(parents=True)
    (source / ".hidden").mkdir()
    for relative in ("a.wav", "sub/b.mp3", "sub/deeper/c.flac", "sub/done.wav", ".hidden/x.wav"):
        (source / relative).write_bytes(os.urandom(500))
    (source / "notes.txt").write_text("not audio: left alone")
    return source


def test_a_folder_is_transcribed_into_a_mirror_tree_skipping_what_is_done(app, client, auth, tmp_path):
    source, out = make_tree(tmp_path), tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "done.srt").write_text("done before")
    created = client.post("/api/batches/folders", headers=auth, json={"folder": str(source), "model": WHISPER,
                                                                       "out": str(out), "format": "srt"})
    assert created.status_code == 200, created.json
    batch = created.json
    assert batch["endpoint"] == TRANSCRIBE and batch["pilotfish"]["folder"] == {
        "source": str(source), "output": str(out), "format": "srt"}
    assert run_until(app, batch["id"], {"completed", "failed"}) == "completed"
    done = client.get(f"/v1/batches/{batch['id']}", headers=auth).json
    assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    written = sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())
    assert written == ["a.srt", "sub/b.srt", "sub/deeper/c.srt", "sub/done.srt"]
    assert (out / "sub" / "done.srt").read_text() == "done before"
    assert (out / "sub" / "b.srt").read_text() == \
        f"srt: received 500 bytes {sha((source / 'sub' / 'b.mp3').read_bytes())}\n"
    listed = content(client, auth, done["output_file_id"])
    assert [line["custom_id"] for line in listed] == ["a.wav", "sub/b.mp3", "sub/deeper/c.flac"]
    assert listed[1]["response"]["body"]["output"] == str(out / "sub" / "b.srt")
    assert [entry["id"] for entry in client.get("/v1/batches", headers=auth).json["data"]] == [batch["id"]]


def test_a_folder_request_is_refused_naming_its_field(app, client, auth, tmp_path):
    source = make_tree(tmp_path)
    (tmp_path / "file.wav").write_bytes(b"RIFF")
    cases = [({"folder": str(tmp_path / "nowhere")}, "folder", "no such folder"),
             ({"folder": str(tmp_path / "file.wav")}, "folder", "not a folder"),
             ({"folder": "audio"}, "folder", "absolute path"),
             ({"out": str(source / "sub" / "out")}, "out", "inside the input folder"),
             ({"out": str(source)}, "out", "inside the input folder"),
             ({"out": str(tmp_path / "file.wav")}, "out", "not a folder"),
             ({"model": "nobody/nothing"}, "model", "not downloaded"),
             ({"model": "test/tiny"}, "model", "not a speech-recognition (Whisper) model"),
             ({"format": "mp3"}, "format", None),
             ({"language": 7}, "language", None)]
    for change, field, words in cases:
        body = {"folder": str(source), "model": WHISPER, "out": str(tmp_path / "out"), **change}
        answer = client.post("/api/batches/folders", headers=auth, json=body)
        assert answer.status_code == 400 and answer.json["field"] == field, (change, answer.json)
        assert words is None or words in answer.json["error"], (change, answer.json)
    assert not (source / "sub" / "out").exists()
    with app.app_context():
        from portal.models import Batch
        assert Batch.query.count() == 0


def test_a_folder_runner_picks_up_a_file_added_while_it_runs(tmp_path):
    from tests.test_batches import _Engine

    source, out = make_tree(tmp_path), tmp_path / "out"
    seen = []

    class Handler(_Engine):
        def do_POST(self):
            length = int(self.headers["Content-Length"])
            data = self.rfile.read(length)
            seen.append(data)
            if len(seen) == 1:
                (source / "sub" / "late.wav").write_bytes(b"RIFF late")
            self._send(200, {"text": f"heard {len(data)}"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    folder = tmp_path / "batch"
    folder.mkdir()
    batch_lines.shard_path(folder, 0).touch()
    config = {"endpoint": TRANSCRIBE, "model": WHISPER, "concurrency": 1, "health_path": "/health",
              "folder": {"source": str(source), "output": str(out), "format": "json", "extension": "json",
                         "body": {"response_format": "json"}}}
    try:
        runner = FolderRunner(folder, 0, config, server.server_address[1], "k3y", None)
        assert runner.run(start_timeout=10) == 0
    finally:
        server.shutdown()
        server.server_close()
    written = sorted(str(path.relative_to(out)) for path in out.rglob("*.json"))
    assert written == ["a.json", "sub/b.json", "sub/deeper/c.json", "sub/done.json", "sub/late.json"]
    assert len(seen) == 5 and b"RIFF late" in seen[-1] and b'name="response_format"' in seen[-1]
    assert json.loads((out / "sub" / "late.json").read_text())["text"].startswith("heard ")
    again = FolderRunner(folder, 0, config, 9, "k3y", None)  # everything done: nothing is sent, no server needed
    assert again.run(start_timeout=1) == 0


def test_a_file_still_being_written_waits_for_a_later_pass(tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    (source / "old.wav").write_bytes(b"RIFF old")
    (source / "copying.wav").write_bytes(b"RIFF half")
    os.utime(source / "old.wav", (time.time() - 60, time.time() - 60))
    unsettled, skipped = set(), set()
    found = list(new_files(str(source), str(out), "txt", set(), skipped, time.time() - 2, unsettled))
    assert [relative for relative, _ in found] == ["old.wav"] and unsettled == {"copying.wav"}
    os.utime(source / "copying.wav", (time.time() - 60, time.time() - 60))  # the copy ended a while ago
    assert [r for r, _ in new_files(str(source), str(out), "txt", {"old.wav"}, skipped, time.time() - 2)] == \
        ["copying.wav"]


def test_a_folder_transcription_is_cancelled_and_keeps_the_transcripts_written(tmp_path):
    site = write_site_config(tmp_path / "slow.yaml", scheduler="local", runtimes={
        "speech-recognition": {"command": UPSTREAM + " --answer-delay 0.5"}})
    slow = create_app({"home": tmp_path / "slow-home", "site_config_path": site, "testing": True})
    client, auth = slow.test_client(), {"Authorization": f"Bearer {slow.config['PILOTFISH_TOKEN']}"}
    source, out = tmp_path / "many", tmp_path / "out"
    source.mkdir()
    for number in range(40):
        (source / f"{number:02d}.wav").write_bytes(b"RIFF" + bytes([number]))
    batch = client.post("/api/batches/folders", headers=auth, json={"folder": str(source), "model": WHISPER,
                                                                     "out": str(out)}).json
    wait_for(lambda: list(out.glob("*.txt")), timeout=30, what="the first transcript")
    assert client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth).json["status"] == "cancelling"
    assert run_until(slow, batch["id"], {"cancelled"}, timeout=30) == "cancelled"
    done = client.get(f"/v1/batches/{batch['id']}", headers=auth).json
    written = sorted(path.name for path in out.glob("*.txt"))
    assert 1 <= len(written) < 40 and done["request_counts"]["completed"] == len(written)
    assert [line["custom_id"] for line in content(client, auth, done["output_file_id"])] == \
        [name.replace(".txt", ".wav") for name in written]
