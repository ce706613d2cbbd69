"""Batches on the real test Slurm with the official `openai` client: the tiny Llama on the real vLLM, each shard an
array task that starts vLLM as a service would and sends it the shard's lines.

- A chat batch of a few hundred lines completes, every custom_id answered exactly once, in input order.
- An embeddings batch on a tiny sentence-transformers BERT (vLLM's pooling runner): the same text, the same vector.
- A chat batch of a GGUF model (SmolLM2) on llama.cpp.
- A shard whose task hits a one-minute time limit (its runner frozen once it answers, so on any machine) is submitted
  again, resumes where it stopped, and the batch completes with each custom_id exactly once (counted).
- A batch cancelled mid-run is `cancelled`, its jobs gone from squeue, its partial output downloadable.

vLLM starts in about a minute on 2 busy cores: each batch here is one shard (one vLLM at a time on this machine).
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import openai
import psutil
import pytest
import yaml

from tests.conftest import PortalProcess, wait_for
from portal.engines import installer
from tests.e2e.conftest import SMOLLM, TINY_LLAMA

pytestmark = pytest.mark.slurm
LONG = 3000  # lines of the batch whose first task hits its time limit
ENGINE_ARGS = "--max-model-len 256"  # the tiny Llama's window; vLLM's CPU build reserves KV cache per token


@pytest.fixture(scope="module")
def portal(tmp_path_factory, engine_site):
    installer.stage_tiny_embedding(installer.models_dir(), installer.venv_python("vllm"))
    root = tmp_path_factory.mktemp("batches")
    site = yaml.safe_load(Path(engine_site).read_text())
    site["batch_max_attempts"] = 3
    site_path = root / "site.yaml"
    site_path.write_text(yaml.safe_dump(site))
    portal = PortalProcess(root / "home", site_path).start()
    yield portal
    for batch in portal.request("GET", "/v1/batches", params={"limit": 100}).json()["data"]:
        if batch["status"] in ("validating", "in_progress", "finalizing"):
            portal.request("POST", f"/v1/batches/{batch['id']}/cancel")
    portal.stop()


@pytest.fixture(scope="module")
def client(portal):
    return openai.OpenAI(base_url=portal.url + "/v1", api_key=portal.token, max_retries=0, timeout=120)


def write_input(path: Path, count: int, max_tokens: int, prefix: str = "line", model: str = TINY_LLAMA) -> Path:
    with open(path, "w") as out:
        for number in range(count):
            out.write(json.dumps({"custom_id": f"{prefix}-{number}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": {"model": model, "max_tokens": max_tokens, "ignore_eos": True,
                                           "messages": [{"role": "user", "content": f"Count to {number}."}]}}) + "\n")
    return path


def wait_batch(client, batch_id: str, statuses, timeout: float, portal=None):
    def ended():
        batch = client.batches.retrieve(batch_id)
        return batch if batch.status in statuses else None
    try:
        return wait_for(ended, timeout=timeout, interval=2, what=f"batch {batch_id} to reach {sorted(statuses)}")
    except BaseException:
        if portal is not None:  # what its tasks said, for the failure's report
            print(json.dumps(portal.request("GET", f"/v1/batches/{batch_id}").json()["pilotfish"], indent=1))
        raise


def custom_ids(text: str) -> list:
    return [json.loads(line)["custom_id"] for line in text.splitlines()]


def runner_lines(portal, batch_id: str) -> list:
    """What each task's runner said of its engine's start and its pace (from the tasks' logs)."""
    found = []
    logs = (portal.home / "batches" / batch_id / "tasks").glob("*/job.log*")
    for log in sorted(logs, key=lambda log: log.stat().st_mtime):  # oldest first: job.log.1 is an earlier task's
        found += re.findall(r"the engine answered after [0-9.]+ s|[0-9]+ answered, [0-9]+ failed in [0-9.]+ s "
                            r"\([0-9.]+ lines/s\)", log.read_text(errors="replace"))
    return found


def test_a_chat_batch_on_the_tiny_llama_completes_with_every_custom_id_once_in_input_order(portal, client, tmp_path):
    source = write_input(tmp_path / "chat.jsonl", 300, max_tokens=8)
    uploaded = client.files.create(file=open(source, "rb"), purpose="batch")
    assert uploaded.id.startswith("file-") and uploaded.bytes == source.stat().st_size
    started = time.monotonic()
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"engine_args": ENGINE_ARGS, "time": "15"})
    assert batch.status == "in_progress" and batch.request_counts.total == 300
    done = wait_batch(client, batch.id, {"completed", "failed", "expired", "cancelled"}, timeout=600, portal=portal)
    seconds = time.monotonic() - started
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (300, 0)
    assert done.error_file_id is None
    output = client.files.content(done.output_file_id).text
    assert custom_ids(output) == [f"line-{n}" for n in range(300)]  # each once, in input order
    first = json.loads(output.splitlines()[0])
    assert first["response"]["status_code"] == 200 and first["error"] is None
    answer = first["response"]["body"]
    assert answer["model"] == TINY_LLAMA and answer["usage"]["completion_tokens"] == 8
    assert [entry.id for entry in client.batches.list()][:1] == [batch.id]

    def counted():  # the owner's usage, under the batch's id, as vLLM reported it
        rows = portal.request("GET", "/api/usage", params={"by": "service"}).json()["rows"]
        return [row for row in rows if row["service"] == batch.id and row["requests"] == 300] or None
    row = wait_for(counted, timeout=30, what="the batch's usage")[0]
    assert (row["errors"], row["completion_tokens"]) == (0, 300 * 8)
    assert row["prompt_tokens"] == sum(json.loads(line)["response"]["body"]["usage"]["prompt_tokens"]
                                       for line in output.splitlines())
    print(f"\n300 chat lines on the tiny Llama: {seconds:.0f} s from create to completed; runner: "
          f"{runner_lines(portal, batch.id)}")


def runner_of(batch_folder: Path) -> psutil.Process:
    """The batch runner of shard 0 working in `batch_folder` (its task runs on this machine, the test Slurm's node)."""
    for process in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = process.info["cmdline"] or []
        if "portal.batches.runner" in cmdline and process.info["cwd"] == str(batch_folder):
            return process
    raise AssertionError(f"no batch runner works in {batch_folder}")


def test_a_shard_past_its_time_limit_is_resumed_and_each_custom_id_comes_back_once(portal, client, tmp_path):
    # Once the first task has written answers, its runner is frozen (SIGSTOP) and the task's time limit cut to one
    # minute: Slurm ends it 60 to 90 s after it started, on any machine however fast, with lines left to do; the task
    # submitted again has the batch's 15 minutes to finish them.
    source = write_input(tmp_path / "long.jsonl", LONG, max_tokens=64, prefix="long")
    uploaded = client.files.create(file=open(source, "rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"engine_args": ENGINE_ARGS, "time": "15", "shard_size": str(LONG)})
    folder = portal.home / "batches" / batch.id
    answers = folder / "shard-0000.output.jsonl"
    wait_for(lambda: answers.exists() and answers.read_bytes().count(b"\n") >= 20, timeout=400, interval=0.1,
             what="the first task's first answers")
    runner_of(folder).suspend()
    first_task = answers.read_bytes().count(b"\n")
    first = portal.request("GET", f"/v1/batches/{batch.id}").json()["pilotfish"]["shards"][0]["job_id"]
    subprocess.run(["scontrol", "update", f"JobId={first}", "TimeLimit=1"], check=True, timeout=30)
    done = wait_batch(client, batch.id, {"completed", "failed", "expired", "cancelled"}, timeout=900, portal=portal)
    detail = portal.request("GET", f"/v1/batches/{batch.id}").json()["pilotfish"]
    assert done.status == "completed", (done, detail)
    shard = detail["shards"][0]
    assert shard["attempts"] == 2, detail  # one minute was not enough: its task was submitted again, once
    again = [event["reason"] for event in detail["events"] if "submitted again" in event["reason"]]
    assert len(again) == 1 and re.search(r"time ?limit|timeout", again[0], re.I), detail["events"]
    output = client.files.content(done.output_file_id).text
    ids = custom_ids(output)
    errors = custom_ids(client.files.content(done.error_file_id).text) if done.error_file_id else []
    assert len(ids) == len(set(ids)) and not set(ids) & set(errors)
    assert (done.request_counts.completed, done.request_counts.failed) == (len(ids), len(errors)) == (LONG, 0)
    assert ids == [f"long-{n}" for n in range(LONG)]  # each exactly once, in input order
    assert 20 <= first_task < LONG  # the first task wrote some, the second the rest
    print(f"\nresumed: {shard['attempts']} tasks; runner: {runner_lines(portal, batch.id)}")


def test_a_batch_cancelled_mid_run_ends_its_jobs_and_keeps_its_partial_output(portal, client, tmp_path):
    source = write_input(tmp_path / "cancel.jsonl", 6000, max_tokens=64, prefix="cancel")
    uploaded = client.files.create(file=open(source, "rb"), purpose="batch")
    # Two requests in flight, and the answers watched in the shard's file itself (not through the reconciler's
    # counts, which lag by a poll): on any machine the cancel arrives long before 6,000 lines are answered.
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"engine_args": ENGINE_ARGS, "time": "15", "concurrency": "2"})
    answers = portal.home / "batches" / batch.id / "shard-0000.output.jsonl"
    wait_for(lambda: answers.exists() and answers.read_bytes().count(b"\n") >= 20, timeout=400, interval=0.2,
             what="the batch's first answers")
    job = portal.request("GET", f"/v1/batches/{batch.id}").json()["pilotfish"]["shards"][0]["job_id"]
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    done = wait_batch(client, batch.id, {"cancelled"}, timeout=120, portal=portal)
    queue = subprocess.run(["squeue", "--noheader", "--array", "--format=%i|%T"], capture_output=True, text=True,
                           timeout=30).stdout
    assert not [line for line in queue.splitlines() if line.split("|")[0] == job and line.split("|")[1] in (
        "PENDING", "RUNNING", "COMPLETING")], queue
    # The task ended on the cancel's SIGTERM, its runner cutting off the requests in flight and the engine's server
    # stopping cleanly: the job script's trap wrote 143, well before Slurm's SIGKILL (KillWait, 30 s) would have come.
    exit_code = portal.home / "batches" / batch.id / "tasks" / "0" / "exit_code"
    wait_for(lambda: exit_code.exists() and exit_code.read_text().strip() == "143", timeout=20,
             what="the task to end on SIGTERM")
    assert done.output_file_id is not None
    ids = custom_ids(client.files.content(done.output_file_id).text)
    assert 20 <= len(ids) < 6000 and len(ids) == len(set(ids)) == done.request_counts.completed
    assert ids == [f"cancel-{n}" for n in range(6000) if f"cancel-{n}" in set(ids)]  # in input order


def test_an_embeddings_batch_on_a_sentence_transformers_model_gives_one_vector_per_text(portal, client, tmp_path):
    model = installer.TINY_EMBEDDING_REPO_ID
    texts = ["Pilotfish runs models on the cluster.", "Hello, how are you today?"] * 20  # each text twice or more
    source = tmp_path / "embeddings.jsonl"
    source.write_text("".join(json.dumps({"custom_id": f"text-{number}", "method": "POST", "url": "/v1/embeddings",
                                          "body": {"model": model, "input": text}}) + "\n"
                              for number, text in enumerate(texts)))
    uploaded = client.files.create(file=open(source, "rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h",
                                  metadata={"engine_args": "--max-model-len 128", "time": "15"})
    done = wait_batch(client, batch.id, {"completed", "failed", "expired", "cancelled"}, timeout=600, portal=portal)
    assert done.status == "completed" and (done.request_counts.completed, done.request_counts.failed) == (40, 0), done
    lines = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    assert [line["custom_id"] for line in lines] == [f"text-{n}" for n in range(40)]
    vectors = [line["response"]["body"]["data"][0]["embedding"] for line in lines]
    hidden = json.loads((installer.snapshot_of(installer.models_dir(), model) / "config.json").read_text())
    assert {len(vector) for vector in vectors} == {hidden["hidden_size"]}
    assert vectors[0] == vectors[2] and vectors[1] == vectors[3] and vectors[0] != vectors[1]
    assert portal.request("GET", f"/v1/batches/{batch.id}").json()["pilotfish"]["engine"] == "vllm"


def test_a_chat_batch_of_a_gguf_model_runs_on_llama_cpp(portal, client, tmp_path):
    source = write_input(tmp_path / "gguf.jsonl", 24, max_tokens=8, prefix="gguf", model=SMOLLM)
    uploaded = client.files.create(file=open(source, "rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"time": "15"})
    done = wait_batch(client, batch.id, {"completed", "failed", "expired", "cancelled"}, timeout=600, portal=portal)
    assert done.status == "completed" and (done.request_counts.completed, done.request_counts.failed) == (24, 0), done
    lines = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    assert [line["custom_id"] for line in lines] == [f"gguf-{n}" for n in range(24)]
    answer = lines[0]["response"]["body"]
    assert answer["choices"][0]["message"]["content"] and answer["usage"]["completion_tokens"] >= 1
    assert portal.request("GET", f"/v1/batches/{batch.id}").json()["pilotfish"]["engine"] == "llama-cpp"
