"""`pilotfish batch` against a real portal on the local scheduler, whose text generation is the OpenAI-shaped test
engine: create a batch from a JSONL file and wait for it, list and show it, download its output and errors (each line
checked); cancel one mid-run and download what it kept; transcribe a folder of audio into a mirror tree; bad input is
exit 2 with one line and leaves nothing behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, wait_for

UPSTREAM = f"{sys.executable} {REPO / 'tests' / 'support' / 'openai_upstream.py'}"
MODEL = "test/tiny"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def portal(start_module_portal):
    return start_module_portal("local", runtimes={"text-generation": {
        "command": UPSTREAM, "allowed_args": ["--answer-delay"]}, "speech-recognition": {"command": UPSTREAM}})


@pytest.fixture(scope="module")
def env(portal):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PILOTFISH_")}
    return dict(clean, PILOTFISH_URL=portal.url, PILOTFISH_TOKEN=portal.token)


def pf(env, *args, timeout=120, cwd=None):
    return subprocess.run([sys.executable, "-m", "portal.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def one_line_error(result, code, *fragments):
    assert result.returncode == code, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pilotfish: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def chat_line(number: int, **body) -> dict:
    return {"custom_id": f"request-{number}", "method": "POST", "url": CHAT,
            "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Say {number}"}], "max_tokens": 3,
                     **body}}


def write_jsonl(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def file_ids(portal) -> set:
    return {entry["id"] for entry in portal.request("GET", "/v1/files").json()["data"]}


def test_every_batch_command_has_help_with_an_example(env):
    for command in ("create", "transcribe", "ls", "show", "cancel", "download"):
        result = ok(pf(env, "batch", command, "--help"))
        assert "Example" in result.stdout, command


def test_a_batch_is_created_waited_for_listed_shown_and_downloaded(env, portal, tmp_path):
    lines = [chat_line(n) for n in range(12)] + [chat_line(12, max_tokens=0)]  # the engine refuses max_tokens 0
    source = write_jsonl(tmp_path / "prompts.jsonl", lines)
    created = ok(pf(env, "batch", "create", str(source), "--shard-size", "5", "--concurrency", "2", "--time", "5",
                    "--wait", timeout=180))
    batch_id = created.stdout.strip()
    assert batch_id.startswith("batch_") and "\n" not in batch_id
    progress = created.stderr.strip().splitlines()
    assert progress[-1] == f"pilotfish: {batch_id} completed: 12 done, 1 failed of 13; 0 of 3 shards running, 3 done"
    assert all(line.startswith(f"pilotfish: {batch_id} ") for line in progress)

    listed = ok(pf(env, "batch", "ls")).stdout.splitlines()
    assert listed[0].split() == ["ID", "STATUS", "ENDPOINT", "MODEL", "DONE/FAILED/TOTAL", "CREATED", "SHARDS"]
    row = next(line.split() for line in listed if line.startswith(batch_id))
    assert row[1:5] == ["completed", CHAT, MODEL, "12/1/13"] and row[-1] == "3"
    as_json = json.loads(ok(pf(env, "batch", "ls", "--json")).stdout)
    assert batch_id in {entry["id"] for entry in as_json}

    shown = ok(pf(env, "batch", "show", batch_id)).stdout
    assert "status     completed" in shown and "12 done, 1 failed of 13" in shown
    shards = [line.split() for line in shown.split("shards (", 1)[1].split("events:")[0].splitlines()[2:] if line]
    assert [(shard[0], shard[2], shard[5]) for shard in shards] == [("0", "done", "5/0/5"), ("1", "done", "5/0/5"),
                                                                    ("2", "done", "2/1/3")]
    assert all(shard[1] != "-" and int(shard[4]) >= 1 for shard in shards)  # each ran as a job, at least once
    assert "validating" in shown and "in_progress -> finalizing" in shown and "finalizing -> completed" in shown
    detail = json.loads(ok(pf(env, "batch", "show", batch_id, "--json")).stdout)
    assert len(detail["pilotfish"]["shards"]) == 3 and detail["request_counts"]["completed"] == 12

    out = tmp_path / "results"
    written = ok(pf(env, "batch", "download", batch_id, "-o", str(out))).stdout.splitlines()
    output, errors = out / f"{batch_id}.output.jsonl", out / f"{batch_id}.errors.jsonl"
    assert written == [f"{output}  (12 lines)", f"{errors}  (1 line)"]
    answers = read_jsonl(output)
    assert [line["custom_id"] for line in answers] == [f"request-{n}" for n in range(12)]  # input order, once each
    assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in answers)
    assert all(line["response"]["body"]["choices"][0]["message"]["content"] for line in answers)
    failed = read_jsonl(errors)
    assert [line["custom_id"] for line in failed] == ["request-12"] and failed[0]["response"]["status_code"] == 400


def test_a_cancelled_batch_keeps_and_downloads_what_was_answered(env, portal, tmp_path):
    slow = write_jsonl(tmp_path / "slow.jsonl", [chat_line(n) for n in range(40)])
    # One shard, one request at a time, each answered after half a second (an engine flag): cancelled part way.
    batch_id = ok(pf(env, "batch", "create", str(slow), "--concurrency", "1", "--", "--answer-delay", "0.5")
                  ).stdout.strip()
    wait_for(lambda: portal.request("GET", f"/v1/batches/{batch_id}").json()["request_counts"]["completed"] >= 1,
             timeout=60, what="the first answers")
    cancelled = ok(pf(env, "batch", "cancel", batch_id)).stdout
    assert cancelled.startswith(f"{batch_id} cancelling: ")
    wait_for(lambda: portal.request("GET", f"/v1/batches/{batch_id}").json()["status"] == "cancelled", timeout=60,
             what="the batch to be cancelled")
    one_line_error(pf(env, "batch", "cancel", batch_id), 1, "cancelled: nothing to cancel")
    ok(pf(env, "batch", "download", batch_id, "-o", str(tmp_path)))
    kept = read_jsonl(tmp_path / f"{batch_id}.output.jsonl")
    total = portal.request("GET", f"/v1/batches/{batch_id}").json()["request_counts"]
    assert 1 <= len(kept) == total["completed"] < 40
    ids = [line["custom_id"] for line in kept]
    assert len(set(ids)) == len(ids) and set(ids) <= {f"request-{n}" for n in range(40)}


def test_bad_input_is_exit_2_in_one_line_and_leaves_nothing(env, portal, tmp_path):
    before = file_ids(portal)
    one_line_error(pf(env, "batch", "create", str(tmp_path / "missing.jsonl")), 2, "missing.jsonl: no such file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chat_line(1)) + "\n" + '{"custom_id": "x", "method": \n')
    one_line_error(pf(env, "batch", "create", str(bad)), 2, "input_file_id: line 2: ", "not valid JSON")
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [dict(chat_line(1), body={"model": "nobody/nothing"})])
    one_line_error(pf(env, "batch", "create", str(unknown)), 2, "line 1: body.model: nobody/nothing is not downloaded")
    good = write_jsonl(tmp_path / "good.jsonl", [chat_line(1)])
    one_line_error(pf(env, "batch", "create", str(good), "--tier", "Enormous"), 2, "Enormous")
    one_line_error(pf(env, "batch", "create", str(good), "--endpoint", "/v1/embeddings"), 2, "line 1")
    assert file_ids(portal) == before  # each refused upload was deleted again
    one_line_error(pf(env, "batch", "create", "file-0123456789abcdef"), 2, "file-0123456789abcdef")
    one_line_error(pf(env, "batch", "show", "batch_0123456789abcdef"), 2, "no batch 'batch_0123456789abcdef'")
    one_line_error(pf(env, "batch", "download", "batch_0123456789abcdef"), 2, "batch_0123456789abcdef")
    one_line_error(pf(env, "batch", "cancel", "batch_0123456789abcdef"), 2, "batch_0123456789abcdef")
    one_line_error(pf(env, "batch", "show"), 2, "Missing argument 'ID'")
    one_line_error(pf(env, "batch", "create", str(good), "--timeout", "5"), 2, "--timeout needs --wait")


def test_a_folder_is_transcribed_into_a_mirror_tree_and_shown_as_a_batch(env, portal, tmp_path):
    source, out = tmp_path / "talks", tmp_path / "text"
    (source / "day2").mkdir(parents=True)
    for relative in ("intro.wav", "day2/panel.mp3", "day2/keynote.flac"):
        (source / relative).write_bytes(b"RIFF" + relative.encode() * 50)
    (out / "day2").mkdir(parents=True)
    (out / "day2" / "keynote.vtt").write_text("done before\n")
    created = ok(pf(env, "batch", "transcribe", "talks", "--model", "test/whisper", "--out", "text", "--format", "vtt",
                    "--wait", cwd=tmp_path, timeout=180))  # relative folders: the command's working folder's
    batch_id = created.stdout.strip()
    assert created.stderr.strip().splitlines()[-1] == \
        f"pilotfish: {batch_id} completed: 2 done, 0 failed of 2; 0 of 1 shard running, 1 done"
    assert sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file()) == [
        "day2/keynote.vtt", "day2/panel.vtt", "intro.vtt"]
    assert (out / "day2" / "keynote.vtt").read_text() == "done before\n"  # already done: skipped
    assert (out / "intro.vtt").read_text().startswith("vtt: received 454 bytes ")
    shown = ok(pf(env, "batch", "show", batch_id)).stdout
    assert f"folder     {source} -> {out} (vtt)" in shown and "2 done, 0 failed of 2" in shown
    row = next(line.split() for line in ok(pf(env, "batch", "ls")).stdout.splitlines() if line.startswith(batch_id))
    assert row[1:5] == ["completed", "/v1/audio/transcriptions", "test/whisper", "2/0/2"]
    ok(pf(env, "batch", "download", batch_id, "-o", str(tmp_path / "lists")))
    done = read_jsonl(tmp_path / "lists" / f"{batch_id}.output.jsonl")
    assert [line["custom_id"] for line in done] == ["intro.wav", "day2/panel.mp3"]  # a folder's files, then its subfolders'


def test_a_bad_folder_request_is_exit_2_in_one_line(env, portal, tmp_path):
    source = tmp_path / "talks"
    source.mkdir()
    (tmp_path / "one.wav").write_bytes(b"RIFF")
    base = ["batch", "transcribe"]
    one_line_error(pf(env, *base, str(tmp_path / "nowhere"), "--model", "test/whisper", "--out", str(tmp_path / "o")),
                   2, "folder: ", "nowhere: no such folder")
    one_line_error(pf(env, *base, str(tmp_path / "one.wav"), "--model", "test/whisper", "--out", str(tmp_path / "o")),
                   2, "one.wav: not a folder")
    one_line_error(pf(env, *base, str(source), "--model", "test/whisper", "--out", str(source / "out")), 2,
                   "out: ", "inside the input folder")
    one_line_error(pf(env, *base, str(source), "--model", "nobody/nothing", "--out", str(tmp_path / "o")), 2,
                   "model: nobody/nothing is not downloaded")
    one_line_error(pf(env, *base, str(source), "--model", MODEL, "--out", str(tmp_path / "o")), 2,
                   "model: ", "not a speech-recognition (Whisper) model")
    one_line_error(pf(env, *base, str(source), "--model", "test/whisper", "--out", str(tmp_path / "o"), "--format",
                      "mp3"), 2, "Invalid value for '--format'")
    one_line_error(pf(env, *base, str(source), "--out", str(tmp_path / "o")), 2, "Missing option '--model'")
    assert not (source / "out").exists()
