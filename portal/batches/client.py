"""The Python client's Files and Batches methods (portal.client.Portal has them): OpenAI's API under /v1 through the
portal's REST client, for notebooks, the CLI and scripts. Needs only requests."""
from __future__ import annotations

import os
from typing import List, Optional


class BatchesClient:
    """Files and batches of a portal: mixed into portal.client.Portal (its `request` and `get`)."""

    timeout: float

    def files_create(self, path, purpose: str = "batch") -> dict:
        """Upload a file (a batch's JSONL input) from `path`; OpenAI's file object."""
        with open(path, "rb") as handle:
            return self.request("POST", "/v1/files", files={"file": (os.path.basename(str(path)), handle)},
                                data={"purpose": purpose}, timeout=max(self.timeout, 600)).json()

    def files(self, purpose: Optional[str] = None) -> List[dict]:
        return self.get("/v1/files", purpose=purpose)["data"]

    def file(self, file_id: str) -> dict:
        return self.get(f"/v1/files/{file_id}")

    def file_content(self, file_id: str) -> bytes:
        """A file's bytes (a batch's output or errors: JSONL)."""
        return self.request("GET", f"/v1/files/{file_id}/content", timeout=max(self.timeout, 600)).content

    def file_delete(self, file_id: str) -> dict:
        return self.request("DELETE", f"/v1/files/{file_id}").json()

    def batch_create(self, input_file_id: str, endpoint: str = "/v1/chat/completions",
                     completion_window: str = "24h", metadata: Optional[dict] = None, **options) -> dict:
        """Start a batch of an uploaded file; `options` are Pilotfish's (tier, time, partition, shard_size,
        concurrency, engine_args), sent as metadata strings. OpenAI's batch object."""
        metadata = dict(metadata or {})
        metadata.update({key: " ".join(value) if isinstance(value, (list, tuple)) else str(value)
                         for key, value in options.items() if value is not None})
        body = {"input_file_id": input_file_id, "endpoint": endpoint, "completion_window": completion_window}
        if metadata:
            body["metadata"] = metadata
        return self.request("POST", "/v1/batches", json=body, timeout=max(self.timeout, 300)).json()

    def batch_transcribe(self, folder, model: str, out, response_format: str = "txt", task: str = "transcribe",
                         language: Optional[str] = None, completion_window: str = "24h", **options) -> dict:
        """Transcribe every audio file under `folder` (a path the portal's user can read) into a mirror tree under
        `out`; `options` are Pilotfish's (tier, time, partition, engine_args). OpenAI's batch object."""
        body = {"folder": os.path.abspath(str(folder)), "model": model, "out": os.path.abspath(str(out)),
                "format": response_format, "task": task, "completion_window": completion_window}
        if language:
            body["language"] = language
        metadata = {key: " ".join(value) if isinstance(value, (list, tuple)) else str(value)
                    for key, value in options.items() if value is not None}
        if metadata:
            body["metadata"] = metadata
        return self.request("POST", "/api/batches/folders", json=body, timeout=max(self.timeout, 300)).json()

    def batches(self, limit: Optional[int] = None, after: Optional[str] = None) -> List[dict]:
        """Batches, newest first."""
        return self.get("/v1/batches", limit=limit, after=after)["data"]

    def batch(self, batch_id: str) -> dict:
        """A batch, with its shards and events under `pilotfish`."""
        return self.get(f"/v1/batches/{batch_id}")

    def batch_cancel(self, batch_id: str) -> dict:
        return self.request("POST", f"/v1/batches/{batch_id}/cancel").json()
