"""What usage accounting costs: the microseconds of UsageLedger.count on the proxy's hot path, and the database a
month of requests leaves behind.

1. count: `--requests` calls with the principals, models and services of the simulation (the real clock), timed
   without any flush; then the same with the ledger's flush thread writing every FLUSH_SECONDS beside it.
2. storage: `--requests` simulated requests spread over `--days` UTC days (an injected clock), `--principals`
   principals, `--models` models served by `--services` services, counted through the ledger and flushed into a
   real SQLite database file (the portal's own, migrated) every `--flush-every` requests. Prints the database's
   size before and after (after a WAL checkpoint), the rows in `usage`, the row writes the flushes made, and checks
   that the table adds up to exactly what was counted.

Run: .venv/bin/python benchmarks/usage_storage.py [--requests 1000000] [--days 30] [--principals 20] [--models 5]
     [--services 8] [--flush-every 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from portal.app import create_app  # noqa: E402
from portal.usage_ledger import UsageLedger  # noqa: E402
from tests.support.portal_process import write_site_config  # noqa: E402


def traffic(args, seed: int = 7):
    """The requests, as (principal, service, model, failed, prompt, completion) tuples, principals and services
    skewed the way shared services are (a few heavy users, many light ones)."""
    rng = random.Random(seed)
    principals = ["owner"] + [f"key:user-{n:02d}" for n in range(args.principals - 1)]
    models = [f"org/model-{n}" for n in range(args.models)]
    services = [(f"{n:016x}"[-16:], models[n % len(models)]) for n in range(args.services)]
    weights = [1 / (rank + 1) for rank in range(len(principals))]
    picked_principals = rng.choices(principals, weights, k=args.requests)
    picked_services = rng.choices(services, k=args.requests)
    return [(principal, service, model, rng.random() < 0.01, rng.randint(10, 2000), rng.randint(1, 500))
            for principal, (service, model) in zip(picked_principals, picked_services)]


def time_counts(ledger: UsageLedger, requests: list) -> float:
    """Microseconds per count over `requests`."""
    count = ledger.count
    started = time.perf_counter()
    for principal, service, model, failed, prompt, completion in requests:
        count(principal, service, model, failed, prompt, completion)
    return (time.perf_counter() - started) / len(requests) * 1e6


def sizes(path: Path) -> dict:
    found = {suffix or "db": os.path.getsize(str(path) + suffix) for suffix in ("", "-wal")
             if os.path.exists(str(path) + suffix)}
    return {**found, "total": sum(found.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--principals", type=int, default=20)
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--services", type=int, default=8)
    parser.add_argument("--flush-every", type=int, default=1000, help="requests between two flushes")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="usage-storage-"))
    site = write_site_config(folder / "site.yaml", scheduler="local")
    app = create_app({"home": folder / "home", "site_config_path": site, "testing": True})
    database = Path(app.config["SQLALCHEMY_DATABASE_URI"].replace("sqlite:///", ""))
    requests = traffic(args)
    result = {"requests": args.requests, "days": args.days, "principals": args.principals, "models": args.models,
              "services": args.services}

    # 1. The hot path: counts alone (no flush), then with the flush thread writing beside them.
    alone = UsageLedger(None)
    result["count_us"] = round(time_counts(alone, requests), 3)
    result["count_keys_in_memory"] = len(alone.taken()[0])
    beside = UsageLedger(app, flush_seconds=0.05)
    result["count_us_with_flushes"] = round(time_counts(beside, requests), 3)
    beside.close()
    with app.app_context():
        from portal.db import db
        db.session.execute(db.text("DELETE FROM usage"))
        db.session.commit()
        db.session.remove()

    # 2. A month of requests, flushed into the database file as the workers would.
    with sqlite3.connect(database) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    result["size_before"] = sizes(database)
    now = [time.time() - args.days * 86400]
    step = args.days * 86400 / args.requests
    ledger = UsageLedger(app, clock=lambda: now[0])
    flushes, row_writes, flush_seconds = 0, 0, 0.0
    for index, (principal, service, model, failed, prompt, completion) in enumerate(requests, 1):
        ledger.count(principal, service, model, failed, prompt, completion)
        now[0] += step
        if index % args.flush_every == 0 or index == len(requests):
            started = time.perf_counter()
            row_writes += ledger.flush()
            flush_seconds += time.perf_counter() - started
            flushes += 1
    with sqlite3.connect(database) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        rows, counted, prompt, completion = connection.execute(
            "SELECT count(*), sum(requests), sum(prompt_tokens), sum(completion_tokens) FROM usage").fetchone()
        days = connection.execute("SELECT count(DISTINCT day) FROM usage").fetchone()[0]
    result["size_after"] = sizes(database)
    result["growth_bytes"] = result["size_after"]["total"] - result["size_before"]["total"]
    result.update(usage_rows=rows, days_with_rows=days, flushes=flushes, row_writes=row_writes,
                  flush_ms_mean=round(flush_seconds / flushes * 1000, 3),
                  bytes_per_row=round(result["growth_bytes"] / rows, 1) if rows else None)
    exact = counted == len(requests) and prompt == sum(r[4] for r in requests) and \
        completion == sum(r[5] for r in requests)
    result["adds_up"] = exact
    print(json.dumps(result, indent=2))
    if not exact:
        sys.exit("the usage table does not add up to the requests counted")


if __name__ == "__main__":
    main()
