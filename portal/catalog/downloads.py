"""Model downloads from the Hugging Face Hub (or a mirror) into home_dir, each in a child process that cancel can
stop: a tracked child (portal/scheduler/processes.py, as the local scheduler runs jobs) with a folder of its own
outside the models' disk: request.json in (the token goes through the environment), plan.json (the file list),
result.json (the snapshot's path, or what went wrong) and download.log out.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import ConflictError, NotFoundError, ValidationError
from ..scheduler import job_environment, processes
from .models import human_bytes, repo_folder, validate_repo_id, validate_revision

DEFAULT_ENDPOINT = "https://huggingface.co"
STATES_LIVE = ("queued", "running")
TOKEN_ENV = "PILOTFISH_HF_TOKEN"  # the token, for the download process only
LOG_NAME = "download.log"
POLL_SECONDS = 0.1  # how often the file list is looked for while the download runs


# --- downloads -----------------------------------------------------------------------------------------

def hub_endpoint(endpoint: Optional[str] = None) -> str:
    """The Hub to download from: `endpoint`, else HF_ENDPOINT read now (not at import), else huggingface.co."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _writable(path: Path) -> bool:
    """Writable and not marked read-only: write bits are checked too, because root passes os.access anyway."""
    try:
        return os.access(path, os.W_OK) and bool(path.stat().st_mode & 0o222)
    except OSError:
        return False


def describe_hub_error(facts: dict, repo_id: str, revision: str, endpoint: str, root: Path) -> Tuple[str, str]:
    """(code, message in plain words) for a failed download, from the facts the download process reported."""
    types, status, number = set(facts.get("types", [])), facts.get("status"), facts.get("errno")
    page = f"{endpoint}/{repo_id}"
    if "GatedRepoError" in types:
        if status == 403:
            return "gated", f"{repo_id} is a gated model and the token in use has not been granted access: " \
                            f"request access at {page}"
        return "gated", f"{repo_id} is a gated model: accept its conditions at {page}, then set HF_TOKEN to a " \
                        "token of that account"
    if "RevisionNotFoundError" in types:
        return "revision_not_found", f"revision {revision!r} does not exist in {repo_id}"
    if "RepositoryNotFoundError" in types:
        return "not_found", f"{repo_id} does not exist on {endpoint} (or it is private: set HF_TOKEN)"
    if number in (errno.ENOSPC, errno.EDQUOT):
        return "disk_full", f"not enough disk space in {root}: {facts.get('detail') or os.strerror(number)}"
    if number in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission", f"cannot write to {root}: {os.strerror(number)}"
    if "OfflineModeIsEnabled" in types:
        return "offline", "downloads are disabled on this machine (HF_HUB_OFFLINE is set)"
    if types & {"ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError", "ProxyError",
                "ReadTimeout", "RemoteProtocolError"}:
        return "network", f"cannot reach the Hub at {endpoint}: network unreachable (air-gapped nodes cannot " \
                          "download: use a login node with internet, or ask the admins to add the model)"
    if status:
        return "hub_error", f"the Hub answered HTTP {status}: {str(facts.get('message', '')).splitlines()[0][:300]}"
    return "failed", f"download failed: {facts.get('type', 'error')}: {str(facts.get('message', ''))[:300]}"


class DownloadTask:
    """One download running in its own process (so cancel really stops it); progress is read from disk."""

    def __init__(self, repo_id: str, revision: str, location: str, root: Path, endpoint: str):
        self.id = secrets.token_hex(6)
        self.repo_id, self.revision, self.location, self.root, self.endpoint = repo_id, revision, location, root, endpoint
        self.state = "queued"
        self.commit: Optional[str] = None
        self.files: List[Tuple[str, Optional[int], str]] = []  # (name, size, blob name) from the Hub's file list
        self.bytes_total: Optional[int] = None
        self.path: Optional[str] = None
        self.error: Optional[str] = None
        self.error_code: Optional[str] = None
        self.created_at, self.started_at, self.ended_at = time.time(), None, None
        self.cancel_requested = False
        self.folder: Optional[Path] = None  # the download process's own files, while it runs
        self._child: Optional[processes.Child] = None
        self._lock = threading.Lock()
        self._finished = threading.Event()

    @property
    def blobs(self) -> Path:
        """The folder huggingface_hub writes this repo's files (and their .incomplete parts) into."""
        return self.root / repo_folder(self.repo_id) / "blobs"

    @property
    def bytes_done(self) -> int:
        """Bytes of this download on disk: finished blobs of the file list plus their .incomplete parts."""
        if self.state == "done" and self.bytes_total is not None:
            return self.bytes_total
        wanted = {blob: size or 0 for _name, size, blob in self.files}
        done = 0
        try:
            for entry in os.scandir(self.blobs):
                base = entry.name.split(".", 1)[0]
                if entry.name in wanted:
                    done += wanted[entry.name]
                elif base in wanted and entry.name.endswith(".incomplete"):
                    done += entry.stat().st_size
        except OSError:
            return 0
        return min(done, self.bytes_total) if self.bytes_total is not None else done

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the task ends; False on timeout."""
        return self._finished.wait(timeout)

    def to_dict(self) -> dict:
        """Plain data for the API: state, bytes_done/bytes_total, error (plain words) and error_code."""
        return {"id": self.id, "repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "location": self.location, "state": self.state, "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total, "files": len(self.files), "path": self.path, "error": self.error,
                "error_code": self.error_code, "created_at": self.created_at, "started_at": self.started_at,
                "ended_at": self.ended_at}


class DownloadManager:
    """The download tasks of this process, kept in memory: start, look up, cancel. Each download process gets a
    folder under `work_dir` (by default a private temporary folder), removed when it ends."""

    def __init__(self, home_dir: Path, cache_dir: Optional[Path] = None, endpoint: Optional[str] = None,
                 token: Optional[str] = None, max_workers: int = 8, work_dir: Optional[Path] = None):
        self.home_dir, self.cache_dir = Path(home_dir), Path(cache_dir) if cache_dir else None
        self.endpoint, self.token, self.max_workers = endpoint, token, max_workers
        self.work_dir = Path(work_dir) if work_dir else None
        self._own_work_dir: Optional[Path] = None
        self._tasks: Dict[str, DownloadTask] = {}
        self._lock = threading.Lock()

    def start(self, repo_id: str, revision: Optional[str] = None, use_cache: bool = False) -> DownloadTask:
        """Queue a download into home_dir/models (cache_dir/models if `use_cache` and it is writable).

        HF_TOKEN and HF_ENDPOINT are read now. Raises ValidationError for bad input or a read-only cache,
        ConflictError if the same model is already downloading to the same place.
        """
        validate_repo_id(repo_id)
        revision = validate_revision(revision) if revision is not None else "main"
        location, base = ("cache", self.cache_dir) if use_cache else ("home", self.home_dir)
        if use_cache and base is None:
            raise ValidationError("use_cache", "this site has no cache_dir; download to your home_dir instead")
        if use_cache and not _writable(base / "models" if (base / "models").exists() else base):
            raise ValidationError("use_cache", f"the shared cache_dir ({base}) is read-only: only the site admins add "
                                               "models there; download to your home_dir instead")
        task = DownloadTask(repo_id, revision, location, base / "models", hub_endpoint(self.endpoint))
        with self._lock:
            for other in self._tasks.values():
                if other.state in STATES_LIVE and (other.repo_id, other.root) == (repo_id, task.root):
                    raise ConflictError(f"model: {repo_id} is already downloading to {task.root} (task {other.id})")
            self._tasks[task.id] = task
        request = {"repo_id": repo_id, "revision": revision, "root": str(task.root), "endpoint": task.endpoint,
                   "max_workers": self.max_workers}
        token = self.token or os.environ.get("HF_TOKEN") or None
        threading.Thread(target=self._run, args=(task, request, token), name=f"download-{task.id}",
                         daemon=True).start()
        return task

    def get(self, task_id: str) -> DownloadTask:
        """A task by id; NotFoundError if this process has none."""
        task = self._tasks.get(task_id)
        if task is None:
            raise NotFoundError(f"no download {task_id!r}")
        return task

    def tasks(self) -> List[DownloadTask]:
        """All tasks, newest first."""
        return sorted(self._tasks.values(), key=lambda task: task.created_at, reverse=True)

    def cancel(self, task_id: str, timeout: float = 10) -> DownloadTask:
        """Stop a download now (its process is killed, partial files removed); an ended task is left as it is."""
        task = self.get(task_id)
        with task._lock:
            task.cancel_requested = task.state in STATES_LIVE
            folder = task.folder if task._child is not None else None
        if task.cancel_requested and folder is not None:
            processes.stop(folder, "cancelled", grace=0)  # the whole group at once: no byte more is fetched
        task.wait(timeout)
        return task

    def close(self) -> None:
        """Cancel every live download (when the portal stops)."""
        for task in list(self._tasks.values()):
            if task.state in STATES_LIVE:
                self.cancel(task.id)

    def _folder(self, task: DownloadTask) -> Path:
        """A new folder for the task's process: under work_dir, else under a private temporary folder."""
        with self._lock:
            base = self.work_dir
            if base is None:
                if self._own_work_dir is None or not self._own_work_dir.is_dir():
                    self._own_work_dir = Path(tempfile.mkdtemp(prefix="pilotfish-downloads-"))
                base = self._own_work_dir
            folder = base / task.id
            folder.mkdir(parents=True, mode=0o700)
            return folder

    def _forget_folder(self, folder: Path) -> None:
        with self._lock:
            shutil.rmtree(folder, ignore_errors=True)
            if self._own_work_dir is not None and folder.parent == self._own_work_dir:
                try:
                    self._own_work_dir.rmdir()  # only once no other download uses it
                    self._own_work_dir = None
                except OSError:
                    pass

    def _run(self, task: DownloadTask, request: dict, token: Optional[str]) -> None:
        code, facts, folder = -1, {}, None
        # Nothing secret but the Hub token, given by name: not the portal's token or settings (job_environment).
        env = dict(job_environment(), HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                           os.environ.get("PYTHONPATH")])))
        if token:
            env[TOKEN_ENV] = token
        try:
            with task._lock:
                if task.cancel_requested:
                    return
                folder = task.folder = self._folder(task)
                (folder / "request.json").write_text(json.dumps(request))
                task.state, task.started_at = "running", time.time()
                task._child = processes.start([sys.executable, "-m", "portal.catalog.downloads", str(folder)],
                                              folder, LOG_NAME, env, cwd=Path.cwd(), name=f"download-{task.id}")
            while True:
                code = task._child.wait(POLL_SECONDS)
                self._read_reports(task, folder)
                if code is not None:
                    break
            facts = _read_json(folder / "result.json").get("error", {})
        except (OSError, ValueError) as exc:
            facts = {"types": [type(exc).__name__], "message": str(exc), "errno": getattr(exc, "errno", None)}
        finally:
            tail = _last_line(folder / LOG_NAME) if folder is not None else ""
            if folder is not None:
                self._forget_folder(folder)  # before the task says it ended: whoever waits for it finds it gone
            self._finish(task, code if code is not None else -1, facts, tail)

    @staticmethod
    def _read_reports(task: DownloadTask, folder: Path) -> None:
        """What the download process reported so far: its file list (once), the snapshot's path at the end."""
        if task.commit is None:
            plan = _read_json(folder / "plan.json")
            if "plan" in plan:
                task.files = [tuple(f) for f in plan["plan"]]
                sizes = [size for _name, size, _blob in task.files]
                task.bytes_total = None if None in sizes else sum(sizes)
                task.commit = plan["commit"]
        task.path = _read_json(folder / "result.json").get("path", task.path)

    def _finish(self, task: DownloadTask, code: int, facts: dict, tail: str) -> None:
        succeeded = code == 0 and bool(task.path)  # a cancel that came too late does not undo a download
        if not succeeded:
            for blob in {blob for _name, _size, blob in task.files}:
                for part in task.blobs.glob(f"{blob}.*incomplete"):
                    part.unlink(missing_ok=True)
            repo_dir = task.root / repo_folder(task.repo_id)
            if repo_dir.is_dir() and not any(repo_dir.glob("snapshots/*")) and not any(repo_dir.glob("blobs/*")):
                shutil.rmtree(repo_dir, ignore_errors=True)  # only refs and locks of a download that got nothing
        with task._lock:
            if succeeded:
                task.state = "done"
            elif task.cancel_requested:
                task.state, task.error, task.error_code = "cancelled", "cancelled by the user", "cancelled"
            else:
                task.state = "failed"
                if facts:
                    task.error_code, task.error = describe_hub_error(facts, task.repo_id, task.revision,
                                                                     task.endpoint, task.root)
                else:
                    task.error_code = "failed"
                    task.error = f"the download process exited with {code}: {tail or 'no output'}"
            task.ended_at = time.time()
            task.folder, task._child = None, None
        task._finished.set()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].rstrip() if lines else ""


def _report(folder: Path, name: str, **message) -> None:
    tmp = folder / f".{name}.tmp"
    tmp.write_text(json.dumps(message))
    os.replace(tmp, folder / name)


def _download_child(folder: Path) -> None:
    """The download process: its request in folder/request.json (the token in TOKEN_ENV); it reports the file list
    in plan.json, then the snapshot's path or the error's facts in result.json."""
    args = json.loads((folder / "request.json").read_text())
    token = os.environ.pop(TOKEN_ENV, None) or None
    try:
        from huggingface_hub import HfApi, snapshot_download
        api = HfApi(endpoint=args["endpoint"], token=token)
        info = api.model_info(args["repo_id"], revision=args["revision"], files_metadata=True)
        def blob_name(sibling):  # what hf_hub_download names the blob: the LFS sha256, else the git blob id
            lfs = sibling.lfs
            sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)  # dict before 0.2x
            return sha or sibling.blob_id
        plan = [(s.rfilename, s.size, blob_name(s)) for s in info.siblings or []]
        _report(folder, "plan.json", plan=plan, commit=info.sha)
        blobs = Path(args["root"]) / repo_folder(args["repo_id"]) / "blobs"
        needed = sum(size or 0 for _name, size, blob in plan if not (blobs / blob).exists())
        probe = Path(args["root"])
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if needed > free:
            raise OSError(errno.ENOSPC, f"the download needs {human_bytes(needed)}, {human_bytes(free)} is free")
        path = snapshot_download(args["repo_id"], revision=args["revision"], cache_dir=args["root"],
                                 endpoint=args["endpoint"], token=token, max_workers=args["max_workers"])
        _report(folder, "result.json", path=path)
    except BaseException as exc:  # reported to the parent, which words it
        chain, cause = [], exc
        while cause is not None and len(chain) < 5:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        response = getattr(exc, "response", None)
        number = next((c.errno for c in chain if isinstance(getattr(c, "errno", None), int)), None)
        _report(folder, "result.json", error={
            "types": [cls.__name__ for c in chain for cls in type(c).__mro__], "type": type(exc).__name__,
            "message": str(exc)[:2000], "status": getattr(response, "status_code", None), "errno": number,
            "detail": exc.strerror if isinstance(exc, OSError) and number == errno.ENOSPC else None})
        sys.exit(1)


if __name__ == "__main__":
    _download_child(Path(sys.argv[1]))
