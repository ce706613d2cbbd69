"""Audio batches on the real test Slurm with the real Whisper server (faster-whisper, Whisper tiny.en) and the
espeak-ng sentence, through the portal with the official `openai` client and the REST API:

- lines naming audio by path and by uploaded file id come back as the spoken words (json and srt), and a file that
  is not audio goes to the error file with Whisper's reason;
- a folder with a subfolder is transcribed into a mirror tree: the file already done beforehand is skipped (its
  transcript untouched), a file added while the job runs is picked up, srt timestamps are right;
- every other format (vtt, json, txt) written as it should be.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import openai
import pytest

from tests.conftest import PortalProcess, wait_for
from tests.e2e.conftest import WHISPER

pytestmark = pytest.mark.slurm
WORDS = ("quick", "brown", "fox", "lazy", "dog")
ENDED = {"completed", "failed", "expired", "cancelled"}
SRT_TIME = re.compile(r"^\d\d:\d\d:\d\d,\d\d\d --> \d\d:\d\d:\d\d,\d\d\d$", re.M)
VTT_TIME = re.compile(r"^\d\d:\d\d:\d\d\.\d\d\d --> \d\d:\d\d:\d\d\.\d\d\d$", re.M)


@pytest.fixture(scope="module")
def portal(tmp_path_factory, engine_site):
    portal = PortalProcess(tmp_path_factory.mktemp("audio-batches") / "home", engine_site).start()
    yield portal
    for batch in portal.request("GET", "/v1/batches", params={"limit": 100}).json()["data"]:
        if batch["status"] not in ENDED:
            portal.request("POST", f"/v1/batches/{batch['id']}/cancel")
    portal.stop()


@pytest.fixture(scope="module")
def client(portal):
    return openai.OpenAI(base_url=portal.url + "/v1", api_key=portal.token, max_retries=0, timeout=120)


def heard(text: str) -> int:
    return sum(word in text.lower() for word in WORDS)


def wait_batch(client, batch_id: str, timeout: float = 600):
    def ended():
        batch = client.batches.retrieve(batch_id)
        return batch if batch.status in ENDED else None
    return wait_for(ended, timeout=timeout, interval=1, what=f"batch {batch_id} to end")


def folder_batch(portal, source: Path, out: Path, response_format: str) -> dict:
    answer = portal.request("POST", "/api/batches/folders", json={"folder": str(source), "model": WHISPER,
                                                                  "out": str(out), "format": response_format,
                                                                  "metadata": {"time": "10"}})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_audio_lines_by_path_and_file_id_come_back_as_the_spoken_words(portal, client, speech, tmp_path):
    notes = tmp_path / "notes.wav"
    notes.write_text("this is not audio\n" * 20)
    uploaded = client.files.create(file=open(speech, "rb"), purpose="user_data")
    lines = [{"custom_id": "by-path", "method": "POST", "url": "/v1/audio/transcriptions",
              "body": {"model": WHISPER, "file": str(speech), "language": "en"}},
             {"custom_id": "by-id", "method": "POST", "url": "/v1/audio/transcriptions",
              "body": {"model": WHISPER, "file": uploaded.id, "response_format": "srt"}},
             {"custom_id": "not-audio", "method": "POST", "url": "/v1/audio/transcriptions",
              "body": {"model": WHISPER, "file": str(notes)}}]
    source = tmp_path / "audio.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    batch_input = client.files.create(file=open(source, "rb"), purpose="batch")
    started = time.monotonic()
    batch = client.batches.create(input_file_id=batch_input.id, endpoint="/v1/audio/transcriptions",
                                  completion_window="24h", metadata={"time": "10"})
    assert batch.status == "in_progress" and batch.request_counts.total == 3
    done = wait_batch(client, batch.id)
    assert done.status == "completed", portal.request("GET", f"/v1/batches/{batch.id}").json()["pilotfish"]
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    answers = {line["custom_id"]: line for line in map(json.loads, client.files.content(done.output_file_id)
                                                       .text.splitlines())}
    assert list(answers) == ["by-path", "by-id"]  # input order
    assert heard(answers["by-path"]["response"]["body"]["text"]) >= 4, answers["by-path"]
    srt = answers["by-id"]["response"]["body"]
    assert SRT_TIME.search(srt) and heard(srt) >= 4, srt
    failed = json.loads(client.files.content(done.error_file_id).text)
    assert failed["custom_id"] == "not-audio" and failed["response"]["status_code"] == 400
    assert "could not decode" in failed["error"]["message"]
    print(f"\n3 audio lines: {time.monotonic() - started:.0f} s from create to completed")


def test_a_folder_is_transcribed_into_a_mirror_tree_skipping_what_is_done_and_picking_up_new_files(
        portal, client, speech, tmp_path):
    source, out = tmp_path / "recordings", tmp_path / "transcripts"
    for relative in ("fox.wav", "b.wav", "sub/c.wav", "sub/d.wav", "sub/e.wav", "sub/done.wav"):
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(speech, source / relative)
    settled = time.time() - 3600
    for path in source.rglob("*.wav"):
        os.utime(path, (settled, settled))
    # A file still being copied in (changed an hour from now, so never settled): the runner does not list it, and
    # cannot end while it is there. It becomes whole only once the job is under way: a file added while it runs.
    late = source / "sub" / "late.wav"
    shutil.copy(speech, late)
    unsettled = time.time() + 3600
    os.utime(late, (unsettled, unsettled))
    (out / "sub").mkdir(parents=True)
    done_before = out / "sub" / "done.srt"
    done_before.write_text("1\n00:00:00,000 --> 00:00:01,000\nwritten before\n")
    os.utime(done_before, (1_000_000_000, 1_000_000_000))
    started = time.monotonic()
    batch = folder_batch(portal, source, out, "srt")
    assert batch["endpoint"] == "/v1/audio/transcriptions" and batch["pilotfish"]["folder"]["format"] == "srt"
    first = wait_for(lambda: [path.name for path in out.rglob("*.srt") if path != done_before], timeout=400,
                     interval=0.2, what="the first transcript")
    still_running = client.batches.retrieve(batch["id"]).status == "in_progress"
    os.utime(late, (settled, settled))
    added_at = time.monotonic()
    done = wait_batch(client, batch["id"])
    detail = portal.request("GET", f"/v1/batches/{batch['id']}").json()
    assert done.status == "completed", detail["pilotfish"]
    assert still_running, "the job ended while a file of its folder was still being copied in"
    written = sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())
    assert written == ["b.srt", "fox.srt", "sub/c.srt", "sub/d.srt", "sub/done.srt", "sub/e.srt", "sub/late.srt"]
    assert done_before.read_text() == "1\n00:00:00,000 --> 00:00:01,000\nwritten before\n"
    assert done_before.stat().st_mtime == 1_000_000_000  # skipped: untouched
    for path in out.rglob("*.srt"):
        if path != done_before:
            text = path.read_text()
            assert text.startswith("1\n") and SRT_TIME.search(text) and heard(text) >= 4, (path, text)
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (6, 6, 0)
    listed = [json.loads(line)["custom_id"] for line in client.files.content(done.output_file_id).text.splitlines()]
    assert listed[-1] == "sub/late.wav" and "sub/done.wav" not in listed
    # the late file was not in the first pass: the job started with the other five, and took a second pass for it,
    # whose transcript came after all of the first pass's
    log = (portal.home / "batches" / batch["id"] / "tasks" / "0" / "job.log").read_text(errors="replace")
    assert "5 file(s) to transcribe, 1 already done" in log and "2 pass(es) over" in log, log
    late_written = (out / "sub" / "late.srt").stat().st_mtime_ns
    assert all(path.stat().st_mtime_ns < late_written for path in out.rglob("*.srt")
               if path.name not in ("late.srt", "done.srt"))
    print(f"\nfolder of 6 files (+1 settled {added_at - started:.0f} s in, after {first}): "
          f"{time.monotonic() - started:.0f} s from create to completed")


def test_every_format_of_a_folder_is_written_as_it_should_be(portal, client, speech, tmp_path):
    batches = {}
    for response_format in ("vtt", "json", "txt"):
        source = tmp_path / response_format / "in"
        source.mkdir(parents=True)
        shutil.copy(speech, source / "fox.wav")
        batches[response_format] = folder_batch(portal, source, tmp_path / response_format / "out", response_format)
    for response_format, batch in batches.items():
        done = wait_batch(client, batch["id"])
        assert (done.status, done.request_counts.completed) == ("completed", 1), response_format
    vtt = (tmp_path / "vtt" / "out" / "fox.vtt").read_text()
    assert vtt.startswith("WEBVTT\n\n") and VTT_TIME.search(vtt) and heard(vtt) >= 4, vtt
    answer = json.loads((tmp_path / "json" / "out" / "fox.json").read_text())
    assert set(answer) == {"text"} and heard(answer["text"]) >= 4, answer
    txt = (tmp_path / "txt" / "out" / "fox.txt").read_text()
    assert heard(txt) >= 4 and "-->" not in txt and txt.endswith("\n"), txt
