"""The start-up cost of LoRA adapters: the tiny Llama on real vLLM (CPU build), one job on the real test Slurm per
service, launched through a real portal with 0, 1 and 4 of the tiny adapters (interleaved: 0, 1, 4, 0, 1, 4, ...),
one service at a time, each stopped before the next, after an unmeasured warm-up launch (the first start after the
portal's reads the engine and the model from disk). Reports each service's start-up phases (the service's `phases`:
queued, job start to endpoint, endpoint to answering its health check, and the total) per adapter count as the median
and the range, and the extra seconds of 1 and 4 adapters over none (medians of the totals and of the engine's start:
job start to healthy).

Run: .venv/bin/python benchmarks/adapters.py [--rounds 3] [--warmup 1] [--json]
Needs the test Slurm (tests/cluster/start.sh) and installs the vLLM engine and stages the tiny models if missing.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from portal.distribution import percentile  # noqa: E402
from portal.engines import installer  # noqa: E402
from portal.engines.demo_site import slurm_default_partition, write_site  # noqa: E402
from tests.support.portal_process import PortalProcess, wait_for  # noqa: E402

COUNTS = (0, 1, 4)
PHASES = ("queued", "job_to_endpoint", "endpoint_to_healthy", "total")
ENGINE_ARGS = ["--max-model-len", "256"]
READY_TIMEOUT = 900  # vLLM takes one to two minutes to start on 2 busy cores


def launch_once(portal: PortalProcess, adapters: list, name: str) -> dict:
    """One service with `adapters`, waited for until it serves, then stopped; its phases (and `job_to_healthy`)."""
    made = portal.request("POST", "/api/services", json={
        "kind": "text-generation", "model": installer.TINY_LLAMA_REPO_ID, "adapters": adapters,
        "engine_args": ENGINE_ARGS, "name": name, "time": 30})
    if made.status_code != 201:
        raise SystemExit(f"launch {name} refused: {made.status_code} {made.text}")
    service_id = made.json()["id"]
    try:
        service = portal.wait_state(service_id, {"RUNNING", "FAILED", "TIMEOUT"}, timeout=READY_TIMEOUT)
        if service["state"] != "RUNNING":
            raise SystemExit(f"service {name} ended {service['state']}: {service['reason']}")
    finally:
        portal.request("POST", f"/api/services/{service_id}/stop", timeout=30)
        wait_for(lambda: portal.service(service_id)["state"] in ("STOPPED", "FAILED", "TIMEOUT"), timeout=180,
                 what=f"service {service_id} to stop")
    phases = dict(service["phases"])
    engine = [phases["job_to_endpoint"], phases["endpoint_to_healthy"]]
    phases["job_to_healthy"] = round(sum(engine), 3) if None not in engine else None
    return phases


def summary(runs: list) -> dict:
    """Per phase: the median and the range (min, max) of the runs' seconds."""
    rows = {}
    for phase in PHASES + ("job_to_healthy",):
        values = [run[phase] for run in runs if run.get(phase) is not None]
        rows[phase] = {"median": percentile(values, 50), "min": min(values, default=None),
                       "max": max(values, default=None)}
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="launches per adapter count, interleaved (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured launches (no adapter) first (default 1)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds: at least 1; --warmup: at least 0")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stop ends the running service and the portal

    python = installer.venv_python("vllm")
    errors = installer.install_engines(["vllm"], progress=lambda line: print(line, flush=True))
    if errors:
        raise SystemExit(f"the vLLM engine is not installed: {errors}")
    installer.stage_tiny_llama(installer.models_dir(), python)
    installer.stage_tiny_loras(installer.models_dir(), python, installer.engines_dir() / "peft")
    adapters = list(installer.TINY_LORA_REPO_IDS)
    if len(adapters) < max(COUNTS):
        raise SystemExit(f"only {len(adapters)} tiny adapters are staged; {max(COUNTS)} are needed")
    partition = slurm_default_partition()
    if not partition:
        raise SystemExit("the test Slurm does not answer sinfo (tests/cluster/start.sh)")

    runs = {count: [] for count in COUNTS}
    with tempfile.TemporaryDirectory(prefix="pilotfish-adapters-") as folder:
        site = write_site(Path(folder), ["vllm"], scheduler="slurm", partition=partition)
        portal = PortalProcess(Path(folder) / "home", site).start()
        try:
            for number in range(1, args.warmup + 1):
                phases = launch_once(portal, [], f"adapters-warmup-{number}")
                print(f"warm-up {number}: total {phases['total']}", flush=True)
            for round_number in range(1, args.rounds + 1):
                for count in COUNTS:
                    phases = launch_once(portal, adapters[:count], f"adapters-{count}-round-{round_number}")
                    runs[count].append(phases)
                    print(f"round {round_number}, {count} adapters: " + ", ".join(
                        f"{phase} {phases[phase]}" for phase in PHASES), flush=True)
        except BaseException:
            print(f"the portal's log, last lines:\n{portal.log_text()[-3000:]}", file=sys.stderr)
            raise
        finally:
            portal.stop()

    table = {count: summary(runs[count]) for count in COUNTS}
    print(f"\nstart-up phases (s), median [min-max] of {args.rounds} launches per count")
    print(f"{'adapters':<10}" + "".join(f"{phase:>26}" for phase in PHASES))
    for count in COUNTS:
        cells = [f"{row['median']} [{row['min']}-{row['max']}]" for row in (table[count][p] for p in PHASES)]
        print(f"{count:<10}" + "".join(f"{cell:>26}" for cell in cells))
    extra = {}
    for count in COUNTS[1:]:
        extra[count] = {measure: round(table[count][measure]["median"] - table[0][measure]["median"], 1)
                        for measure in ("total", "job_to_healthy")
                        if table[count][measure]["median"] is not None and table[0][measure]["median"] is not None}
        print(f"{count} adapters over none (medians): total {extra[count].get('total'):+} s, "
              f"job start to healthy {extra[count].get('job_to_healthy'):+} s")
    if args.json:
        print(json.dumps({"rounds": args.rounds, "runs": runs, "summary": table, "extra_over_none": extra}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
