"""A stand-in for the Hugging Face Hub on 127.0.0.1: the endpoints huggingface_hub's snapshot_download calls.

Checked against huggingface_hub 2.4 (its source): snapshot_download asks
  GET  /api/models/{repo}/revision/{rev}            model info (`?blobs=True` adds sizes, blob ids and LFS data)
  GET  /api/models/{repo}/tree/{commit}?recursive=  the file list, one page (no Link header)
  HEAD /{repo}/resolve/{commit}/{file}              X-Repo-Commit, ETag (git blob id) or X-Linked-Etag (LFS sha256),
                                                    X-Linked-Size / Content-Length
  GET  /{repo}/resolve/{commit}/{file}              the bytes; `Range: bytes=N-` gives 206 (used to resume)
Errors carry the Hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) and
`X-Error-Message` headers, which huggingface_hub turns into its typed exceptions.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Optional, Union
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".h5", ".onnx")


def git_blob_id(data: bytes) -> str:
    """The git object id of a file's content (what the Hub calls its blob id, and the ETag of non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def etag_of(path: str, data: bytes) -> str:
    """The ETag huggingface_hub stores a file's blob under: sha256 for LFS files, the git blob id otherwise."""
    return hashlib.sha256(data).hexdigest() if path.endswith(LFS_SUFFIXES) else git_blob_id(data)


def read_folder(folder: Path) -> Dict[str, bytes]:
    """Every file below `folder`, keyed by its '/'-separated path."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


class FakeHub:
    """A threaded HTTP server holding repos in memory. `throttle` (bytes/s) slows file bodies down. With
    `hold_weights_after` = N, the bodies of weight files (LFS suffixes) after the first N asked for stop after their
    first chunk until `release` is set: a transfer stays in flight for as long as a test needs, on any machine."""

    def __init__(self, throttle: Optional[int] = None, hide_sizes: bool = False):
        self.repos: Dict[str, dict] = {}
        self.granted_tokens = {"hf_granted"}  # tokens allowed into gated repos
        self.throttle = throttle
        self.hide_sizes = hide_sizes  # model info without sizes (so the client cannot plan disk space)
        self.hold_weights_after: Optional[int] = None
        self.release = threading.Event()
        self.weights_asked = 0
        self.requests = []  # (method, path, Authorization header)
        self.bytes_sent = 0
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self.url = ""

    def add_repo(self, repo_id: str, files: Union[Dict[str, bytes], Path], branch: str = "main",
                 gated: bool = False) -> str:
        """Add a commit with `files` (a dict or a folder) on `branch`; return its commit hash."""
        files = read_folder(files) if isinstance(files, Path) else dict(files)
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}, "gated": gated})
        repo["gated"] = repo["gated"] or gated
        digest = hashlib.sha1(json.dumps([repo_id, branch, len(repo["commits"]),
                                          sorted((p, git_blob_id(d)) for p, d in files.items())]).encode())
        commit = digest.hexdigest()
        repo["commits"][commit] = files
        repo["refs"][branch] = commit
        return commit

    def start(self) -> "FakeHub":
        """Listen on a free port of 127.0.0.1; the base URL is then in `url`."""
        hub = self

        class Handler(_Handler):
            pass
        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening (idempotent); held bodies go on."""
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def files_requested(self, method: str = "GET") -> list:
        """Paths of file downloads seen, in order."""
        return [path for m, path, _auth in self.requests if m == method and "/resolve/" in path]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    # --- replies --------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None, method: str = "GET") -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def _json(self, data, method: str) -> None:
        self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"}, method)

    def _error(self, status: int, code: Optional[str], message: str, method: str, extra: Optional[dict] = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, method)

    # --- routing --------------------------------------------------------------------------------------

    def _route(self, method: str) -> None:
        hub = self.hub
        url = urlsplit(self.path)
        with hub._lock:
            hub.requests.append((method, url.path, self.headers.get("Authorization")))
        parts = [unquote(part) for part in url.path.strip("/").split("/")]
        if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] in ("revision", "tree"):
            repo_id, action, rev = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo_id, action, rev = f"{parts[0]}/{parts[1]}", "resolve", parts[3]
        else:
            return self._error(404, None, "Not found", method)
        repo = hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found", method)
        commit = repo["refs"].get(rev, rev if rev in repo["commits"] else None)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", method)
        files = repo["commits"][commit]
        if action == "revision":
            blobs = "blobs" in parse_qs(url.query)
            return self._json(self._info(repo_id, repo, commit, files, blobs), method)
        if action == "tree":
            return self._json(self._tree(files), method)
        return self._resolve(method, repo_id, repo, commit, files, "/".join(parts[4:]))

    def _info(self, repo_id: str, repo: dict, commit: str, files: Dict[str, bytes], blobs: bool) -> dict:
        siblings = []
        for path, data in sorted(files.items()):
            sibling = {"rfilename": path}
            if blobs and not self.hub.hide_sizes:
                sibling.update(size=len(data), blobId=git_blob_id(data))
                if path.endswith(LFS_SUFFIXES):
                    sibling["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            elif blobs:
                sibling["blobId"] = git_blob_id(data)
            siblings.append(sibling)
        return {"_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                "gated": "manual" if repo["gated"] else False, "disabled": False, "tags": [],
                "lastModified": "2024-01-01T00:00:00.000Z", "siblings": siblings}

    @staticmethod
    def _tree(files: Dict[str, bytes]) -> list:
        entries, folders = [], set()
        for path, data in sorted(files.items()):
            parts = path.split("/")
            for depth in range(1, len(parts)):
                folders.add("/".join(parts[:depth]))
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
            if path.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return [{"type": "directory", "path": folder, "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0}
                for folder in sorted(folders)] + entries

    def _resolve(self, method: str, repo_id: str, repo: dict, commit: str, files: Dict[str, bytes], name: str) -> None:
        if repo["gated"]:
            auth = self.headers.get("Authorization") or ""
            token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
            if token is None:
                return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access "
                                   "to it and be authenticated to access it. Please log in.", method)
            if token not in self.hub.granted_tokens:
                return self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in "
                                   "the authorized list.", method)
        data = files.get(name)
        if data is None:
            return self._error(404, "EntryNotFound", "Entry not found", method, {"X-Repo-Commit": commit})
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(data)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if name.endswith(LFS_SUFFIXES):
            headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))})
        start = 0
        ranged = self.headers.get("Range", "")
        if method == "GET" and ranged.startswith("bytes=") and ranged[6:].split("-")[0].isdigit():
            start = min(int(ranged[6:].split("-")[0]), len(data))
        self.send_response(206 if start else 200)
        for key, value in headers.items():
            self.send_header(key, value)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if method == "HEAD":
            return
        held = False
        if name.endswith(LFS_SUFFIXES):
            with self.hub._lock:
                self.hub.weights_asked += 1
                held = self.hub.hold_weights_after is not None and self.hub.weights_asked > self.hub.hold_weights_after
        self._stream(data[start:], held)

    def _stream(self, body: bytes, held: bool = False) -> None:
        hub, chunk = self.hub, 16384
        for offset in range(0, len(body), chunk):
            if held and offset:
                hub.release.wait(120)
                held = False
            piece = body[offset:offset + chunk]
            try:
                self.wfile.write(piece)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
                return
            with hub._lock:
                hub.bytes_sent += len(piece)
            if hub.throttle:
                time.sleep(len(piece) / hub.throttle)
