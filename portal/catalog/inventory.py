"""The model inventory and downloads as the API sees them: scanned into the database, shared by every worker."""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import List, Optional

from ..db import db
from ..errors import NotFoundError
from ..models import DownloadRecord, ModelRecord, utcnow
from .adapters import link_adapters
from .downloads import STATES_LIVE, DownloadManager
from .models import scan_models

log = logging.getLogger(__name__)
_refresh_lock = threading.Lock()
SYNC_SECONDS = 0.5


def refresh_inventory(app) -> int:
    """Scan cache_dir and home_dir and replace the stored inventory; returns the number of models."""
    config = app.config["PILOTFISH"]
    with _refresh_lock:
        entries = scan_models(config.cache_dir, config.home_dir)
        with app.app_context():
            now = utcnow()
            ModelRecord.query.delete()
            for entry in entries:
                db.session.add(ModelRecord(repo_id=entry.repo_id, kind=entry.kind, size_bytes=entry.size_bytes,
                                           data_json=json.dumps(entry.to_dict()), scanned_at=now))
            db.session.commit()
    return len(entries)


def refresh_in_background(app, wait: float = 0.0) -> bool:
    """Start a rescan; wait up to `wait` seconds for it. True if it finished in that time."""
    done = threading.Event()

    def run():
        try:
            refresh_inventory(app)
        except Exception:
            log.exception("model inventory refresh failed")
        finally:
            done.set()

    threading.Thread(target=run, name="pilotfish-inventory", daemon=True).start()
    return done.wait(wait) if wait else False


def list_models() -> list:
    """The inventory's models, each base with the local adapters of it and each adapter with its base."""
    return link_adapters([record.to_dict() for record in ModelRecord.query.order_by(ModelRecord.repo_id).all()])


def adapters_of(repo_id: str) -> list:
    """The repo ids of the inventory's adapters whose base is `repo_id`."""
    return next((entry["adapters"] for entry in list_models() if entry["repo_id"] == repo_id), [])


def adapter_base(repo_id: str) -> Optional[str]:
    """The base model the inventory names for `repo_id` when it is a LoRA adapter, else None."""
    record = db.session.get(ModelRecord, repo_id)
    revisions = (record.to_dict().get("revisions") or [{}]) if record is not None else [{}]
    return (revisions[0].get("adapter") or {}).get("base") or None


def model_modalities(repo_id: str, revision: Optional[str] = None) -> List[str]:
    """What the inventory says a model's revision (default: the one used without a revision) takes as input: text,
    image, audio; [] when the inventory does not have it."""
    record = db.session.get(ModelRecord, repo_id)
    revisions = record.to_dict().get("revisions") or [] if record is not None else []
    found = next((entry for entry in revisions if revision in (None, entry.get("revision"))), None)
    return list((found or {}).get("modalities") or [])


# --- downloads ------------------------------------------------------------------------------------------

def _manager(app) -> DownloadManager:
    manager = app.extensions.get("pilotfish.downloads")
    if manager is None:
        config = app.config["PILOTFISH"]
        manager = app.extensions["pilotfish.downloads"] = DownloadManager(config.home_dir, config.cache_dir)
    return manager


def start_download(app, repo_id: str, revision=None, use_cache: bool = False) -> dict:
    """Start a download in this worker and mirror its progress into the database until it ends."""
    task = _manager(app).start(repo_id, revision, use_cache)
    record = DownloadRecord(id=task.id, repo_id=repo_id, state=task.state, data_json=json.dumps(task.to_dict()))
    db.session.add(record)
    db.session.commit()

    def sync():
        with app.app_context():
            while True:
                ended = task.wait(SYNC_SECONDS)
                row = db.session.get(DownloadRecord, task.id)
                if row is None:
                    return
                if row.cancel_requested and task.state in STATES_LIVE:
                    _manager(app).cancel(task.id)
                    ended = True
                row.state, row.data_json, row.updated_at = task.state, json.dumps(task.to_dict()), utcnow()
                db.session.commit()
                db.session.expire_all()
                if ended and task.state not in STATES_LIVE:
                    break
        if task.state == "done":
            refresh_inventory(app)

    threading.Thread(target=sync, name=f"download-sync-{task.id}", daemon=True).start()
    return task.to_dict()


def list_downloads() -> list:
    return [row.to_dict() for row in DownloadRecord.query.order_by(DownloadRecord.created_at.desc()).all()]


def get_download(task_id: str) -> dict:
    row = db.session.get(DownloadRecord, task_id)
    if row is None:
        raise NotFoundError(f"no download {task_id!r}")
    return row.to_dict()


def cancel_download(app, task_id: str, timeout: float = 10.0) -> dict:
    """Cancel wherever the download runs: directly in this worker, else through the database flag."""
    row = db.session.get(DownloadRecord, task_id)
    if row is None:
        raise NotFoundError(f"no download {task_id!r}")
    if row.state not in STATES_LIVE:
        return row.to_dict()
    row.cancel_requested = True
    db.session.commit()
    manager = app.extensions.get("pilotfish.downloads")
    if manager is not None and task_id in {task.id for task in manager.tasks()}:
        manager.cancel(task_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        db.session.expire_all()
        row = db.session.get(DownloadRecord, task_id)
        if row.state not in STATES_LIVE:
            break
        time.sleep(0.2)
    return row.to_dict()
