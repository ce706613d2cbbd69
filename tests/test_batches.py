"""The Files and Batches API on a portal with the local scheduler and an OpenAI-shaped test engine: uploads (413 above
the limit), the input checked line by line (a 400 naming the line, nothing created), shards, the runner's resume
(a line cut short by a kill, no custom_id twice), the merge in input order, a whole batch run by the reconciler,
cancel, and what a named key sees. The same on the real Slurm with vLLM: tests/e2e/test_batches.py."""
from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from portal.app import create_app
from portal.batches import lines as batch_lines
from portal.batches.runner import Runner
from portal.batches.validation import write_shards
from portal.db import db
from portal.models import Batch, BatchEvent, StoredFile
from portal.reconciler import Reconciler
from portal.usage_ledger import usage_ledger
from portal.scheduler import array_ranges
from tests.conftest import REPO, wait_for, write_site_config

UPSTREAM = f"{sys.executable} {REPO / 'tests' / 'support' / 'openai_upstream.py'}"
MODEL = "test/tiny"
CHAT = "/v1/chat/completions"


@pytest.fixture
def app(tmp_path):
    site = write_site_config(tmp_path / "site.yaml", scheduler="local", batch_max_file_mb=0.05,
                             runtimes={"text-generation": {"command": UPSTREAM}})
    yield create_app({"home": tmp_path / "home", "site_config_path": site, "testing": True})


def chat_line(number: int, model: str = MODEL, **body) -> dict:
    return {"custom_id": f"request-{number}", "method": "POST", "url": CHAT,
            "body": {"model": model, "messages": [{"role": "user", "content": f"Say {number}"}], "max_tokens": 3,
                     **body}}


def jsonl(lines) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def upload(client, auth, data: bytes, name: str = "input.jsonl", purpose: str = "batch"):
    return client.post("/v1/files", headers=auth, content_type="multipart/form-data",
                       data={"purpose": purpose, "file": (io.BytesIO(data), name)})


def create(client, auth, file_id: str, **metadata):
    body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
    if metadata:
        body["metadata"] = metadata
    return client.post("/v1/batches", headers=auth, json=body)


# --- files ----------------------------------------------------------------------------------------------------

def test_a_file_is_uploaded_listed_read_and_deleted_in_openai_shapes(app, client, auth):
    data = jsonl([chat_line(1), chat_line(2)])
    answer = upload(client, auth, data)
    assert answer.status_code == 200, answer.json
    created = answer.json
    assert created["id"].startswith("file-") and created["object"] == "file"
    assert (created["bytes"], created["filename"], created["purpose"]) == (len(data), "input.jsonl", "batch")
    stored = Path(app.config["PILOTFISH"].files_dir) / created["id"]
    assert stored.read_bytes() == data and stored.stat().st_mode & 0o777 == 0o600
    assert [entry["id"] for entry in client.get("/v1/files", headers=auth).json["data"]] == [created["id"]]
    assert client.get(f"/v1/files/{created['id']}", headers=auth).json == created
    assert client.get(f"/v1/files/{created['id']}/content", headers=auth).data == data
    assert client.delete(f"/v1/files/{created['id']}", headers=auth).json == {
        "id": created["id"], "object": "file", "deleted": True}
    assert not stored.exists()
    missing = client.get(f"/v1/files/{created['id']}", headers=auth)
    assert missing.status_code == 404 and missing.json["error"]["type"] == "not_found_error"


def test_an_upload_over_the_limit_is_413_and_leaves_nothing(app, client, auth):
    limit = int(0.05 * 1024 * 1024)  # the site's batch_max_file_mb
    line = json.dumps(chat_line(0)).encode() + b"\n"
    for size in (limit + 200 * 1024, limit + 100):  # refused by its length at once; by its file's size once read
        answer = upload(client, auth, line * (size // len(line) + 1))
        assert answer.status_code == 413, size
        assert answer.json["error"]["code"] == "file_too_large"
        assert "batch_max_file_mb" in answer.json["error"]["message"]
    assert upload(client, auth, line * (limit // len(line))).status_code == 200  # at the limit: taken
    with app.app_context():
        assert StoredFile.query.count() == 1
    assert len(os.listdir(app.config["PILOTFISH"].files_dir)) == 1  # nothing left of the refused ones


def test_a_large_upload_streams_into_its_file(tmp_path):
    site = write_site_config(tmp_path / "large.yaml", scheduler="local", batch_max_file_mb=8)
    large = create_app({"home": tmp_path / "large-home", "site_config_path": site, "testing": True})
    auth = {"Authorization": f"Bearer {large.config['PILOTFISH_TOKEN']}"}
    data = jsonl([chat_line(n) for n in range(30000)])  # about 6 MB: many blocks of the parser
    answer = upload(large.test_client(), auth, data)
    assert answer.status_code == 200, answer.json
    assert (large.config["PILOTFISH"].files_dir / answer.json["id"]).read_bytes() == data


def test_an_upload_without_its_file_or_with_another_purpose_is_400(client, auth):
    answer = upload(client, auth, b"{}\n", purpose="fine-tune")
    assert answer.status_code == 400 and answer.json["error"]["param"] == "purpose"
    answer = client.post("/v1/files", headers=auth, content_type="multipart/form-data", data={"purpose": "batch"})
    assert answer.status_code == 400 and answer.json["error"]["param"] == "file"


# --- the input, checked line by line --------------------------------------------------------------------------

BAD_INPUTS = {
    "malformed JSON": ([chat_line(1), b'{"custom_id": "x", "method": '], 2, "not valid JSON"),
    "duplicated custom_id": ([chat_line(1), chat_line(2), chat_line(1)], 3, "duplicated custom_id 'request-1' "
                                                                            "(first on line 1)"),
    "another url": ([chat_line(1), dict(chat_line(2), url="/v1/embeddings")], 2, "is not this batch's endpoint"),
    "an unknown model": ([chat_line(1, model="nobody/nothing")], 1, "body.model: nobody/nothing is not downloaded"),
    "mixed models": ([chat_line(1), chat_line(2, model="test/slow")], 2, "differs from line 1's 'test/tiny'"),
    "a missing field": ([chat_line(1), {"custom_id": "b", "method": "POST", "url": CHAT}], 2, "missing body"),
    "another method": ([dict(chat_line(1), method="GET")], 1, "method: expected POST"),
    "no model": ([chat_line(1), {**chat_line(2), "body": {"messages": []}}], 2, "body.model: missing"),
    "an empty line": ([chat_line(1), b"", chat_line(2)], 2, "empty line"),
    "a stream": ([chat_line(1, stream=True)], 1, "cannot stream"),
    "a model of another kind": ([chat_line(1, model="test/whisper")], 1,
                                "test/whisper is a speech-recognition model: it answers /v1/audio"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_a_bad_line_is_a_400_naming_it_and_nothing_is_created(app, client, auth, case):
    lines, number, words = BAD_INPUTS[case]
    file_id = upload(client, auth, jsonl(lines)).json["id"]
    answer = create(client, auth, file_id)
    assert answer.status_code == 400, answer.json
    error = answer.json["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "input_file_id"
    assert error["message"].startswith(f"input_file_id: line {number}: ") and words in error["message"], error
    assert error["line"] == number
    with app.app_context():
        assert Batch.query.count() == 0 and BatchEvent.query.count() == 0
    assert not (app.config["PILOTFISH"].batches_dir.exists() and os.listdir(app.config["PILOTFISH"].batches_dir))


def test_a_bad_request_names_its_field(client, auth):
    file_id = upload(client, auth, jsonl([chat_line(1)])).json["id"]
    for body, field in (({"input_file_id": file_id, "endpoint": "/v1/moderations", "completion_window": "24h"},
                         "endpoint"),
                        ({"input_file_id": file_id, "endpoint": CHAT, "completion_window": "soon"},
                         "completion_window"),
                        ({"input_file_id": "file-0000", "endpoint": CHAT, "completion_window": "24h"},
                         "input_file_id"),
                        ({"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h",
                          "metadata": {"time": "later"}}, "metadata.time"),
                        ({"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h",
                          "metadata": {"tier": "Enormous"}}, "metadata.tier"),
                        ({"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h",
                          "metadata": {"concurrency": "0"}}, "metadata.concurrency")):
        answer = client.post("/v1/batches", headers=auth, json=body)
        assert answer.status_code == 400, (body, answer.json)
        assert answer.json["error"]["param"] == field, answer.json


# --- shards, resume, merge ------------------------------------------------------------------------------------

def test_the_input_is_split_into_shards_of_shard_size_lines(tmp_path):
    source = tmp_path / "input.jsonl"
    source.write_bytes(jsonl([chat_line(n) for n in range(25)]))
    assert write_shards(source, tmp_path, 10) == [10, 10, 5]
    ids = [custom_id for index in range(3) for custom_id in batch_lines.input_ids(batch_lines.shard_path(tmp_path,
                                                                                                        index))]
    assert ids == [f"request-{n}" for n in range(25)]


def test_array_indices_are_written_as_sbatch_ranges():
    assert array_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert array_ranges([4]) == "4" and array_ranges([3, 1, 2, 2]) == "1-3"


def test_the_merge_keeps_input_order_and_each_custom_id_once(tmp_path):
    source = tmp_path / "input.jsonl"
    source.write_bytes(jsonl([chat_line(n) for n in range(12)]))
    write_shards(source, tmp_path, 5)
    for index, numbers in ((0, [4, 0, 3, 1]), (1, [9, 5, 6, 8, 7]), (2, [11])):  # answered out of order
        batch_lines.append_lines(batch_lines.output_path(tmp_path, index),
                                 [batch_lines.output_line(f"request-{n}", 200, "", {"n": n}) for n in numbers])
    batch_lines.append_lines(batch_lines.errors_path(tmp_path, 0), [batch_lines.error_line("request-2", "http_400",
                                                                                           "bad")])
    batch_lines.append_lines(batch_lines.output_path(tmp_path, 1),  # a duplicate (never written by a runner)
                             [batch_lines.output_line("request-5", 200, "", {"n": "again"})])
    shards = [(batch_lines.shard_path(tmp_path, i), batch_lines.output_path(tmp_path, i),
               batch_lines.errors_path(tmp_path, i)) for i in range(3)]
    output, errors = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    assert batch_lines.merge_shards(shards, output, errors, ("batch_expired", "expired")) == (10, 2)
    answered = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["custom_id"] for line in answered] == [f"request-{n}" for n in (0, 1, 3, 4, 5, 6, 7, 8, 9, 11)]
    assert answered[4]["response"]["body"] == {"n": 5}
    failed = [json.loads(line) for line in errors.read_text().splitlines()]
    assert [(line["custom_id"], line["error"]["code"]) for line in failed] == [("request-2", "http_400"),
                                                                              ("request-10", "batch_expired")]


class _Engine(BaseHTTPRequestHandler):
    """An engine's server as the runner meets it: /health, and chat completions (400 for max_tokens 0)."""
    protocol_version = "HTTP/1.1"
    seen = []

    def log_message(self, *args):
        pass

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200 if self.headers.get("Authorization") == "Bearer k3y" else 401, {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][0]["content"]
        self.seen.append(text)
        if body.get("max_tokens") == 0:
            return self._send(400, {"error": {"message": "max_tokens must be at least 1"}})
        # U+2028 and U+0085 end lines for str.splitlines: the files escape them
        self._send(200, {"id": f"chatcmpl-{text}", "choices": [{"message": {"content": text + "\u2028\x85"}}]})


@pytest.fixture
def engine():
    _Engine.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Engine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_resumed_runner_skips_what_is_written_cuts_a_half_line_and_writes_each_custom_id_once(tmp_path, engine):
    source = tmp_path / "input.jsonl"
    source.write_bytes(jsonl([chat_line(n) for n in range(20)] + [chat_line(20, max_tokens=0)]))
    write_shards(source, tmp_path, 100)
    output, errors = batch_lines.output_path(tmp_path, 0), batch_lines.errors_path(tmp_path, 0)
    batch_lines.append_lines(output, [batch_lines.output_line(f"request-{n}", 200, "", {}) for n in (0, 1, 2)])
    batch_lines.append_lines(errors, [batch_lines.error_line("request-3", "http_400", "bad")])
    half = batch_lines.output_line("request-4", 200, "", {"choices": []})
    with open(output, "ab") as handle:  # a runner killed while writing this line
        handle.write(half[:len(half) // 2])
    config = {"endpoint": CHAT, "concurrency": 4, "health_path": "/health"}
    runner = Runner(tmp_path, 0, config, engine.server_address[1], "k3y", None)
    assert runner.run(start_timeout=10) == 0
    assert (runner.answered, runner.failed) == (16, 1)
    assert sorted(_Engine.seen) == sorted(f"Say {n}" for n in range(4, 21))  # 0-3 were not sent again
    written = [json.loads(line) for line in output.read_text().splitlines()]  # every line whole again, ASCII
    assert len(written) == 19 and output.read_bytes().isascii()
    failed = [json.loads(line) for line in errors.read_text().splitlines()]
    ids = [line["custom_id"] for line in written + failed]
    assert sorted(ids) == sorted(f"request-{n}" for n in range(21)) and len(ids) == len(set(ids))
    answer = next(line for line in written if line["custom_id"] == "request-7")
    assert answer["response"] == {"status_code": 200, "request_id": "chatcmpl-Say 7",
                                  "body": {"id": "chatcmpl-Say 7",
                                           "choices": [{"message": {"content": "Say 7\u2028\x85"}}]}}
    assert answer["id"].startswith("batch_req_") and answer["error"] is None
    refused = next(line for line in failed if line["custom_id"] == "request-20")
    assert refused["response"]["status_code"] == 400 and refused["error"]["code"] == "http_400"
    assert "max_tokens must be at least 1" in refused["error"]["message"]
    _Engine.seen = []
    again = Runner(tmp_path, 0, config, engine.server_address[1], "k3y", None)
    assert again.run(start_timeout=10) == 0 and _Engine.seen == []  # a finished shard sends nothing


def test_a_runner_whose_server_is_gone_writes_nothing_for_the_lines_it_could_not_send(tmp_path):
    source = tmp_path / "input.jsonl"
    source.write_bytes(jsonl([chat_line(n) for n in range(3)]))
    write_shards(source, tmp_path, 100)
    runner = Runner(tmp_path, 0, {"endpoint": CHAT, "concurrency": 2}, 9, "k3y", 2 ** 22 + 12345)  # no such pid
    assert runner.run(start_timeout=5) == 3  # the server is not there: nothing answered, nothing failed
    assert not batch_lines.output_path(tmp_path, 0).exists() and not batch_lines.errors_path(tmp_path, 0).exists()


def test_a_runner_that_fails_itself_ends_with_an_error_and_leaves_the_lines_left_for_its_next_task(tmp_path, engine,
                                                                                                     capsys):
    source = tmp_path / "input.jsonl"
    source.write_bytes(jsonl([chat_line(n) for n in range(10)]))
    write_shards(source, tmp_path, 100)
    config = {"endpoint": CHAT, "concurrency": 1, "health_path": "/health"}

    class Faulty(Runner):
        def answer_line(self, custom_id, *args):
            if custom_id == "request-4":
                raise KeyError("a fault of the runner's own")
            return super().answer_line(custom_id, *args)

    assert Faulty(tmp_path, 0, config, engine.server_address[1], "k3y", None).run(start_timeout=10) == 1
    said = capsys.readouterr()
    assert "stopped by an error of the runner (KeyError" in said.out and "Traceback" in said.err, said
    written = [json.loads(line)["custom_id"] for line in batch_lines.output_path(tmp_path, 0).read_text().splitlines()]
    assert written == [f"request-{n}" for n in range(4)]  # nothing for the line it failed on, nor after it
    again = Runner(tmp_path, 0, config, engine.server_address[1], "k3y", None)
    assert again.run(start_timeout=10) == 0
    written = [json.loads(line)["custom_id"] for line in batch_lines.output_path(tmp_path, 0).read_text().splitlines()]
    assert written == [f"request-{n}" for n in range(10)]


# --- a whole batch on the local scheduler -----------------------------------------------------------------------

def run_until(app, batch_id, statuses, timeout=60):
    reconciler = Reconciler(app)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with app.app_context():
                reconciler.cycle()
                batch = db.session.get(Batch, batch_id)
                if batch.status in statuses:
                    return batch.status
            time.sleep(0.3)
    finally:
        reconciler.stop()
    pytest.fail(f"batch {batch_id} did not reach {statuses} in {timeout} s")


def test_a_batch_runs_as_shards_and_its_output_keeps_input_order(app, client, auth):
    lines = [chat_line(n) for n in range(23)] + [chat_line(23, max_tokens=0)] + [chat_line(n) for n in range(24, 30)]
    file_id = upload(client, auth, jsonl(lines)).json["id"]
    created = create(client, auth, file_id, shard_size="8", concurrency="3", note="mine")
    assert created.status_code == 200, created.json
    batch = created.json
    assert batch["object"] == "batch" and batch["id"].startswith("batch_") and batch["status"] == "in_progress"
    assert batch["request_counts"] == {"total": 30, "completed": 0, "failed": 0}
    assert batch["metadata"] == {"shard_size": "8", "concurrency": "3", "note": "mine"}
    assert batch["pilotfish"]["shards"] == 4 and batch["pilotfish"]["concurrency"] == 3
    assert batch["expires_at"] - batch["created_at"] == 24 * 3600
    assert run_until(app, batch["id"], {"completed", "failed"}) == "completed"
    done = client.get(f"/v1/batches/{batch['id']}", headers=auth).json
    assert done["request_counts"] == {"total": 30, "completed": 29, "failed": 1}
    assert [event["to"] for event in done["pilotfish"]["events"]] == ["validating", "in_progress", "finalizing",
                                                                      "completed"]
    assert all(shard["state"] == "done" for shard in done["pilotfish"]["shards"])
    output = client.get(f"/v1/files/{done['output_file_id']}/content", headers=auth).data.decode()
    answered = [json.loads(line) for line in output.splitlines()]
    assert [line["custom_id"] for line in answered] == [f"request-{n}" for n in range(30) if n != 23]
    assert all(line["response"]["status_code"] == 200 for line in answered)
    errors = client.get(f"/v1/files/{done['error_file_id']}/content", headers=auth).data.decode()
    assert [json.loads(line)["custom_id"] for line in errors.splitlines()] == ["request-23"]
    output_file = client.get(f"/v1/files/{done['output_file_id']}", headers=auth).json
    assert output_file["purpose"] == "batch_output"
    listed = client.get("/v1/batches", headers=auth).json
    assert [entry["id"] for entry in listed["data"]] == [batch["id"]] and listed["has_more"] is False
    # Counted as the owner's usage under the batch's id: every line, the failed one an error, the answers' tokens.
    usage_ledger(app).flush()
    usage = client.get("/api/usage?by=service", headers=auth).json["rows"]
    prompt = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in answered)
    completion = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in answered)
    assert prompt and completion
    assert [(row["service"], row["name"], row["requests"], row["errors"], row["prompt_tokens"],
             row["completion_tokens"]) for row in usage] == [(batch["id"], f"batch ({CHAT})", 30, 1, prompt,
                                                              completion)]
    exposition = client.get("/metrics", headers=auth).data.decode()
    for sample in (f'pilotfish_batch_lines_total{{model="{MODEL}",outcome="completed"}} 29.0',
                   f'pilotfish_batch_lines_total{{model="{MODEL}",outcome="failed"}} 1.0',
                   f'pilotfish_batch_tokens_total{{kind="completion",model="{MODEL}"}} {float(completion)}'):
        assert sample in exposition.splitlines(), [line for line in exposition.splitlines() if "batch" in line]


def test_a_cycle_asks_the_scheduler_once_for_its_services_and_its_batches_tasks(app, client, auth):
    launched = client.post("/api/services", headers=auth, json={"kind": "text-generation", "model": MODEL})
    assert launched.status_code == 201, launched.json
    file_id = upload(client, auth, jsonl([chat_line(n) for n in range(12)])).json["id"]
    batch = create(client, auth, file_id, shard_size="4").json
    reconciler = Reconciler(app)
    try:
        with app.app_context():
            reports = [reconciler.cycle() for _ in range(3)]
    finally:
        reconciler.stop()
    assert [(report.services, report.batches, report.scheduler_calls) for report in reports] == [(1, 1, 1)] * 3
    client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth)
    client.post(f"/api/services/{launched.json['id']}/stop", headers=auth)
    assert run_until(app, batch["id"], {"cancelled", "completed"}) in ("cancelled", "completed")


def test_a_cancelled_batch_stops_its_tasks_and_keeps_what_was_done(app, client, auth, tmp_path):
    site = write_site_config(tmp_path / "slow.yaml", scheduler="local",
                             runtimes={"text-generation": {"command": UPSTREAM + " --delay 30"}})
    slow = create_app({"home": tmp_path / "slow-home", "site_config_path": site, "testing": True})
    slow_client = slow.test_client()
    slow_auth = {"Authorization": f"Bearer {slow.config['PILOTFISH_TOKEN']}"}
    file_id = upload(slow_client, slow_auth, jsonl([chat_line(n) for n in range(5)])).json["id"]
    batch = create(slow_client, slow_auth, file_id).json
    with slow.app_context():
        folder = Path(db.session.get(Batch, batch["id"]).folder)
    cancelled = slow_client.post(f"/v1/batches/{batch['id']}/cancel", headers=slow_auth)
    assert cancelled.status_code == 200 and cancelled.json["status"] == "cancelling"
    assert run_until(slow, batch["id"], {"cancelled"}, timeout=30) == "cancelled"
    done = slow_client.get(f"/v1/batches/{batch['id']}", headers=slow_auth).json
    assert done["request_counts"]["completed"] == 0 and done["output_file_id"] is None
    assert (folder / "tasks" / "0" / "end_mark").read_text() == "cancelled"
    again = slow_client.post(f"/v1/batches/{batch['id']}/cancel", headers=slow_auth)
    assert again.status_code == 409 and again.json["error"]["code"] == "batch_ended"


def test_a_named_key_sees_only_its_own_files_and_batches(app, client, auth):
    owner_file = upload(client, auth, jsonl([chat_line(1)])).json["id"]
    secret = client.post("/api/keys", headers=auth, json={"name": "student", "scopes": ["use"]}).json["key"]
    key = {"Authorization": f"Bearer {secret}"}
    mine = upload(client, key, jsonl([chat_line(2)])).json["id"]
    assert [entry["id"] for entry in client.get("/v1/files", headers=key).json["data"]] == [mine]
    assert {entry["id"] for entry in client.get("/v1/files", headers=auth).json["data"]} == {owner_file, mine}
    assert client.get(f"/v1/files/{owner_file}", headers=key).status_code == 404
    assert client.delete(f"/v1/files/{owner_file}", headers=key).status_code == 404
    assert create(client, key, owner_file).json["error"]["param"] == "input_file_id"
    limited = client.post("/api/keys", headers=auth, json={"name": "other-model", "models": ["test/slow"]}).json["key"]
    limited_file = upload(client, {"Authorization": f"Bearer {limited}"}, jsonl([chat_line(1)])).json["id"]
    refused = create(client, {"Authorization": f"Bearer {limited}"}, limited_file)
    assert refused.status_code == 403 and refused.json["error"]["type"] == "permission_error"
    read_only = client.post("/api/keys", headers=auth, json={"name": "reader", "scopes": ["read"]}).json["key"]
    assert client.get("/v1/batches", headers={"Authorization": f"Bearer {read_only}"}).status_code == 403


def test_the_openai_client_uploads_and_is_refused_in_its_own_shapes_through_a_real_portal(start_portal, tmp_path):
    """Through gunicorn and the ASGI layer: /v1/files and /v1/batches are the portal's own (not the gateway's), an
    upload streams to its file, a refusal comes as the openai client's exceptions."""
    import openai

    portal = start_portal("local", runtimes={"text-generation": {"command": UPSTREAM}})
    client = openai.OpenAI(base_url=portal.url + "/v1", api_key=portal.token, max_retries=0)
    source = tmp_path / "input.jsonl"
    source.write_bytes(jsonl([chat_line(n) for n in range(8000)]))  # about 1.5 MB: over the 1 MiB of other bodies
    uploaded = client.files.create(file=open(source, "rb"), purpose="batch")
    assert uploaded.bytes == source.stat().st_size
    assert client.files.content(uploaded.id).content == source.read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl([chat_line(1), chat_line(1)]))
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id=client.files.create(file=open(bad, "rb"), purpose="batch").id,
                              endpoint=CHAT, completion_window="24h")
    assert "line 2: duplicated custom_id 'request-1'" in refused.value.message
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=portal.url + "/v1", api_key="wrong", max_retries=0).files.list()
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    done = wait_for(lambda: (lambda b: b if b.status in ("completed", "failed") else None)(
        client.batches.retrieve(batch.id)), timeout=120, interval=0.5, what="the batch to complete")
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 8000, 0)
    assert [json.loads(line)["custom_id"] for line in client.files.content(done.output_file_id).text.splitlines()] \
        == [f"request-{n}" for n in range(8000)]
    assert [entry.id for entry in client.batches.list()] == [batch.id]


def local_portal(tmp_path, name: str, command: str, **settings):
    site = write_site_config(tmp_path / f"{name}.yaml", scheduler="local", runtimes={"text-generation": {
        "command": command}}, **settings)
    app = create_app({"home": tmp_path / f"{name}-home", "site_config_path": site, "testing": True})
    return app, app.test_client(), {"Authorization": f"Bearer {app.config['PILOTFISH_TOKEN']}"}


def test_a_shard_whose_tasks_answer_nothing_is_given_up_and_its_lines_are_errors_with_the_reason(tmp_path):
    app, client, auth = local_portal(tmp_path, "broken", UPSTREAM + " --exit 3", batch_max_attempts=2)
    file_id = upload(client, auth, jsonl([chat_line(n) for n in range(6)])).json["id"]
    batch = create(client, auth, file_id, shard_size="4").json
    assert run_until(app, batch["id"], {"completed", "failed"}) == "completed"
    done = client.get(f"/v1/batches/{batch['id']}", headers=auth).json
    assert done["request_counts"] == {"total": 6, "completed": 0, "failed": 6} and done["output_file_id"] is None
    assert [shard["attempts"] for shard in done["pilotfish"]["shards"]] == [2, 2]
    assert [shard["state"] for shard in done["pilotfish"]["shards"]] == ["given_up", "given_up"]
    assert sum("submitted again" in event["reason"] for event in done["pilotfish"]["events"]) == 2
    errors = [json.loads(line) for line in
              client.get(f"/v1/files/{done['error_file_id']}/content", headers=auth).data.decode().splitlines()]
    assert [line["custom_id"] for line in errors] == [f"request-{n}" for n in range(6)]
    assert errors[0]["error"]["code"] == "shard_given_up"
    assert "2 task(s) in a row ended without a new answer" in errors[0]["error"]["message"]


def test_a_batch_past_its_completion_window_expires_with_its_tasks_cancelled(tmp_path):
    app, client, auth = local_portal(tmp_path, "late", UPSTREAM + " --delay 30")
    file_id = upload(client, auth, jsonl([chat_line(n) for n in range(3)])).json["id"]
    batch = create(client, auth, file_id).json
    with app.app_context():
        record = db.session.get(Batch, batch["id"])
        record.expires_at = record.created_at  # its window has passed
        db.session.commit()
        folder = Path(record.folder)
    assert run_until(app, batch["id"], {"expired"}, timeout=30) == "expired"
    done = client.get(f"/v1/batches/{batch['id']}", headers=auth).json
    assert done["expired_at"] is not None and done["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    errors = client.get(f"/v1/files/{done['error_file_id']}/content", headers=auth).data.decode().splitlines()
    assert [json.loads(line)["error"]["code"] for line in errors] == ["batch_expired"] * 3
    assert (folder / "tasks" / "0" / "end_mark").read_text() == "cancelled"
