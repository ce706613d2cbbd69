"""Batch vs online: the same chat requests on the tiny Llama (vLLM, CPU) run as a batch (Slurm job array) and sent
through the gateway to a RUNNING service at the best concurrency a `pilotfish bench --sweep` finds, on the real test
Slurm, in one run.

Both routes send the very same bodies (portal/benchmark_requests.request_body: chat, fixed prompts of --prompt-len
words, --max-tokens with ignore_eos, not streamed). For each it reports the wall time including queue and start-up
(online: launch to RUNNING, then the requests; batch: create to completed), and once running: requests and output
tokens per second (online: the benchmark's own wall time; batch: the time the runner says it spent sending, from each
task's log). The batch is run with 1 shard and with 2 shards (2 tasks side by side on this machine's 2 cores).

Run:  .venv/bin/python benchmarks/batches.py [--requests 1000] [--max-tokens 32] [--sweep 8,16,32,64]
Needs the test Slurm (tests/cluster/start.sh) and the engines (python -m portal.engines.installer).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from portal.benchmark_requests import LoadSpec, request_body  # noqa: E402
from portal.engines import installer  # noqa: E402
from portal.engines.demo_site import slurm_default_partition, write_site  # noqa: E402
from tests.support.portal_process import PortalProcess  # noqa: E402

TINY_LLAMA = installer.TINY_LLAMA_REPO_ID
SPENT = re.compile(r"(\d+) answered, (\d+) failed in ([0-9.]+) s")


def wait(what: str, check, timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(interval)
    raise RuntimeError(f"timed out waiting for {what}")


def benchmark(portal: PortalProcess, body: dict, timeout: float = 1800) -> dict:
    run = portal.request("POST", "/api/benchmarks", json=body)
    if run.status_code != 202:
        raise RuntimeError(f"benchmark refused: {run.text}")
    run_id = run.json()["id"]
    return wait("the benchmark", lambda: (lambda r: r if r["state"] != "RUNNING" else None)(
        portal.request("GET", f"/api/benchmarks/{run_id}").json()), timeout, 0.5)


def online(portal: PortalProcess, args) -> dict:
    started = time.monotonic()
    launched = portal.request("POST", "/api/services", json={
        "kind": "text-generation", "model": TINY_LLAMA, "name": "batch-bench-online", "time": 60,
        "engine_args": ["--max-model-len", "512"]})
    if launched.status_code != 201:
        raise RuntimeError(f"launch refused: {launched.text}")
    service_id = launched.json()["id"]
    try:
        service = portal.wait_state(service_id, {"RUNNING", "FAILED", "TIMEOUT"}, timeout=600)
        if service["state"] != "RUNNING":
            raise RuntimeError(f"the service is {service['state']}: {service['reason']}")
        start_up = time.monotonic() - started
        common = {"service": service_id, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
                  "stream": False, "api": "chat", "ignore_eos": True}
        # The sweep compares time to first token, so it streams; the measured run sends the batch's very bodies.
        sweep = benchmark(portal, dict(common, stream=True, sweep=args.sweep, requests=max(args.sweep) * 4,
                                       ttft_target=60))
        points = sweep["result"]["points"]
        best = max(points, key=lambda point: point["output_tokens_per_second"])["clients"]
        swept = [(point["clients"], round(point["output_tokens_per_second"], 1)) for point in points]
        print(f"online: started in {start_up:.1f} s; sweep (clients, tokens/s) {swept} -> {best} clients", flush=True)
        run = benchmark(portal, dict(common, clients=best, requests=args.requests))["result"]
        return {"clients": best, "start_up_s": round(start_up, 1), "running_s": round(run["wall_seconds"], 2),
                "wall_s": round(start_up + run["wall_seconds"], 1), "failed": run["failed"],
                "requests_per_s": round(run["completed"] / run["wall_seconds"], 1),
                "output_tokens_per_s": round(run["output_tokens_per_second"], 1)}
    finally:
        portal.request("POST", f"/api/services/{service_id}/stop")
        wait("the online service to stop", lambda: portal.service(service_id)["state"] in ("STOPPED", "FAILED"), 120)


def batch(portal: PortalProcess, args, shards: int, folder: Path) -> dict:
    spec = LoadSpec(base_url="", model=TINY_LLAMA, clients=1, requests=args.requests, prompt_len=args.prompt_len,
                    max_tokens=args.max_tokens, stream=False, api="chat", ignore_eos=True)
    source = folder / f"batch-{shards}.jsonl"
    with open(source, "w") as out:
        for index in range(args.requests):
            out.write(json.dumps({"custom_id": f"request-{index}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": json.loads(request_body(spec, index))}) + "\n")
    with open(source, "rb") as handle:
        uploaded = portal.request("POST", "/v1/files", files={"file": (source.name, handle)},
                                  data={"purpose": "batch"}).json()
    started = time.monotonic()
    created = portal.request("POST", "/v1/batches", json={
        "input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h",
        "metadata": {"shard_size": str(-(-args.requests // shards)), "time": "60",
                     "engine_args": "--max-model-len 512"}})
    if created.status_code != 200:
        raise RuntimeError(f"batch refused: {created.text}")
    batch_id = created.json()["id"]
    done = wait("the batch", lambda: (lambda b: b if b["status"] in ("completed", "failed", "expired",
                                                                     "cancelled") else None)(
        portal.request("GET", f"/v1/batches/{batch_id}").json()), 1800, 0.5)
    wall = time.monotonic() - started
    if done["status"] != "completed":
        raise RuntimeError(f"batch {batch_id} {done['status']}: {done['pilotfish'].get('reason')}")
    spent = []
    for log in sorted((portal.home / "batches" / batch_id / "tasks").glob("*/job.log")):
        spent += [float(found.group(3)) for found in SPENT.finditer(log.read_text(errors="replace"))]
    running = max(spent) if spent else None  # tasks side by side: the longest one
    counts = done["request_counts"]
    return {"shards": shards, "wall_s": round(wall, 1), "running_s": running, "failed": counts["failed"],
            "requests_per_s": round(counts["completed"] / running, 1) if running else None,
            "output_tokens_per_s": round(counts["completed"] * args.max_tokens / running, 1) if running else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="chat requests per route (default 1000)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer, ignore_eos (default 32)")
    parser.add_argument("--prompt-len", type=int, default=32, help="words per prompt (default 32)")
    parser.add_argument("--sweep", default="8,16,32,64", help="client counts of the online sweep (default 8,16,32,64)")
    parser.add_argument("--shards", default="1,2", help="batch shard counts to run (default 1,2)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = parser.parse_args()
    args.sweep = [int(n) for n in args.sweep.split(",")]
    with tempfile.TemporaryDirectory(prefix="pilotfish-batch-bench-") as tmp:
        folder = Path(tmp)
        installer.stage_tiny_llama(installer.models_dir(), installer.venv_python("vllm"))
        site = write_site(folder / "site", ["vllm"], scheduler="slurm", partition=slurm_default_partition())
        portal = PortalProcess(folder / "home", site).start()
        try:
            results = {"online": online(portal, args)}
            print(f"online: {results['online']}", flush=True)
            results["batch"] = []
            for shards in (int(n) for n in args.shards.split(",")):
                results["batch"].append(batch(portal, args, shards, folder))
                print(f"batch: {results['batch'][-1]}", flush=True)
        finally:
            portal.stop()
    on = results["online"]
    print(f"\n{args.requests} chat requests, {args.max_tokens} tokens each (ignore_eos), tiny Llama on vLLM (CPU)")
    print(f"{'route':24} {'wall s':>8} {'running s':>10} {'req/s':>8} {'tok/s':>8} {'x online':>9}")
    print(f"{'online, ' + str(on['clients']) + ' clients':24} {on['wall_s']:>8} {on['running_s']:>10} "
          f"{on['requests_per_s']:>8} {on['output_tokens_per_s']:>8} {1.0:>9.2f}")
    for row in results["batch"]:
        ratio = row["output_tokens_per_s"] / on["output_tokens_per_s"] if row["output_tokens_per_s"] else None
        shown = "-" if ratio is None else f"{ratio:.2f}"
        print(f"{'batch, ' + str(row['shards']) + ' shard(s)':24} {row['wall_s']:>8} {row['running_s']:>10} "
              f"{row['requests_per_s']:>8} {row['output_tokens_per_s']:>8} {shown:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
