"""OpenAI's Files and Batches API under /v1 (portal/asgi.py hands these paths to Flask, not the proxy; an upload's
body streams into its file): routes only, calling portal/batches/. Errors come in OpenAI's shape (portal/app.py does
that for every /v1 path). A named key sees only its own files and batches."""
from __future__ import annotations

from flask import g, jsonify, request, send_file

from ..batches import batches, files, folders
from . import batch_schemas as schemas
from .blueprint import bp, json_body, query
from .openapi import described

OPENAI = {"tag": "batches", "openai": True}
FILE_ID = {"path_patterns": {"file_id": r"^file-[0-9a-f]{1,36}$"}}
BATCH_ID = {"path_patterns": {"batch_id": r"^batch_[0-9a-f]{1,34}$"}}


def principal() -> str:
    return g.principal


def _list(items, has_more: bool) -> dict:
    return {"object": "list", "data": items, "has_more": has_more,
            "first_id": items[0]["id"] if items else None, "last_id": items[-1]["id"] if items else None}


@bp.post("/v1/files")
@described("Upload a file (OpenAI's API: multipart `file` and `purpose` batch), at most the site's batch_max_file_mb",
           body=schemas.FileUpload, body_content="multipart/form-data", answers={200: schemas.FileObject},
           errors=(400, 413), **OPENAI)
def upload_file():
    return jsonify(files.receive_upload(request.environ, principal()).to_dict())


@bp.get("/v1/files")
@described("Files (OpenAI's list): a key's own, or every file for the portal owner", query=schemas.FilesQuery,
           answers={200: schemas.FileList}, errors=(400,), **OPENAI)
def list_files():
    params = query(schemas.FilesQuery)
    found, has_more = files.list_files(principal(), params.purpose, params.limit, params.after, params.order)
    return jsonify(_list([record.to_dict() for record in found], has_more))


@bp.get("/v1/files/<file_id>")
@described("A file (OpenAI's file object)", answers={200: schemas.FileObject}, errors=(404,), **FILE_ID, **OPENAI)
def get_file(file_id):
    return jsonify(files.get_file(file_id, principal()).to_dict())


@bp.get("/v1/files/<file_id>/content")
@described("A file's bytes (a batch's output or errors: JSONL)", answers={200: "file"}, errors=(404,), **FILE_ID,
           **OPENAI)
def file_content(file_id):
    record = files.get_file(file_id, principal())
    return send_file(record.path, mimetype="application/octet-stream", download_name=record.filename, max_age=0)


@bp.delete("/v1/files/<file_id>")
@described("Delete a file", answers={200: schemas.FileDeleted}, errors=(404,), **FILE_ID, **OPENAI)
def delete_file(file_id):
    return jsonify(id=files.delete_file(file_id, principal()), object="file", deleted=True)


@bp.post("/v1/batches")
@described("Start a batch (OpenAI's API): the input checked line by line (a 400 names the line), split into shards "
           "run as a Slurm job array", body=schemas.BatchBody, answers={200: schemas.BatchObject},
           errors=(400, 404, 422, 503), **OPENAI)
def create_batch():
    body = json_body(schemas.BatchBody, example='{"input_file_id": "file-...", "endpoint": "/v1/chat/completions", '
                                               '"completion_window": "24h"}')
    batch = batches.create_batch(body.input_file_id, body.endpoint, body.completion_window, body.metadata,
                                 principal())
    return jsonify(batches.batch_object(batch))


@bp.get("/v1/batches")
@described("Batches (OpenAI's list), newest first: a key's own, or every batch for the portal owner",
           query=schemas.ListQuery, answers={200: schemas.BatchList}, errors=(400,), **OPENAI)
def list_batches():
    params = query(schemas.ListQuery)
    found, has_more = batches.list_batches(principal(), params.limit, params.after)
    return jsonify(_list([batches.batch_object(batch) for batch in found], has_more))


@bp.get("/v1/batches/<batch_id>")
@described("A batch (OpenAI's batch object; its shards and events under `pilotfish`)",
           answers={200: schemas.BatchObject}, errors=(404,), **BATCH_ID, **OPENAI)
def get_batch(batch_id):
    return jsonify(batches.batch_object(batches.get_batch(batch_id, principal()), detail=True))


@bp.post("/v1/batches/<batch_id>/cancel")
@described("Cancel a batch: its tasks are cancelled, what was done is kept (output and error files)",
           answers={200: schemas.BatchObject}, errors=(404, 409), **BATCH_ID, **OPENAI)
def cancel_batch(batch_id):
    return jsonify(batches.batch_object(batches.cancel_batch(batch_id, principal())))


@bp.post("/api/batches/folders")
@described("Transcribe every audio file under a folder into a mirror tree of `out` (srt, vtt, json or txt), as a "
           "batch of one Slurm task: files whose transcript exists are skipped, files added while it runs are picked "
           "up; listed, shown and cancelled under /v1/batches", body=schemas.FolderBody,
           answers={200: schemas.BatchObject}, errors=(400, 403, 422, 503), tag="batches")
def transcribe_folder():
    body = json_body(schemas.FolderBody, example='{"folder": "/data/interviews", "model": "org/whisper", '
                                                 '"out": "/data/transcripts", "format": "srt"}')
    batch = folders.transcribe_folder(body.folder, body.model, body.out, principal(), body.format, body.task,
                                      body.language, body.prompt, body.temperature, body.completion_window,
                                      body.metadata)
    return jsonify(batches.batch_object(batch))
