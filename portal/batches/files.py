"""The Files API's files: uploads (a multipart body read as it arrives, straight into a 0600 file of the files
folder, never whole in memory, refused above batch_max_file_mb), the files a batch produces, listing, reading and
deleting them. A named key sees and deletes only the files it uploaded (or its batches produced); the portal owner
sees every file."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import List, Optional

from flask import current_app
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import MultiPartParser
from werkzeug.http import parse_options_header

from ..db import db
from ..errors import NotFoundError, PortalError, ValidationError
from ..models import StoredFile, utcnow

PURPOSES = ("batch", "user_data")  # an upload's (user_data: audio that batch lines name); batch_output is the portal's
OUTPUT_PURPOSE = "batch_output"
FILENAME_MAX = 255
CHUNK = 64 * 1024
FIELD_MAX = 1024 * 1024


class FileTooLarge(PortalError):
    status = 413

    def __init__(self, limit_mb: float):
        super().__init__(f"file: too large: at most {limit_mb:g} MB (the site's batch_max_file_mb)",
                         field="file", code="file_too_large")


def settings():
    return current_app.config["PILOTFISH"]


def files_dir() -> Path:
    folder = settings().files_dir
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def visible(owner: str, principal: str) -> bool:
    """Whether `principal` sees what `owner` made: the owner of the portal sees everything, a key its own."""
    return principal == "owner" or owner == principal


class _Capped:
    """A request body read through a byte limit: FileTooLarge once more than `limit` bytes came."""

    def __init__(self, stream, limit: int, limit_mb: float):
        self.stream, self.limit, self.limit_mb, self.read_bytes = stream, limit, limit_mb, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size if size and size > 0 else CHUNK)
        self.read_bytes += len(data)
        if self.read_bytes > self.limit:
            raise FileTooLarge(self.limit_mb)
        return data


def receive_upload(environ, principal: str) -> StoredFile:
    """Store the multipart upload of a request (`file` and `purpose`, as OpenAI's POST /v1/files takes them): the file
    part written as it arrives into the files folder; 413 above batch_max_file_mb (at once when Content-Length says
    so), 400 naming the field for anything else; nothing is kept from a refused upload."""
    config = settings()
    limit = int(config.batch_max_file_mb * 1024 * 1024)
    mimetype, options = parse_options_header(environ.get("CONTENT_TYPE", ""))
    if mimetype != "multipart/form-data" or not options.get("boundary"):
        raise ValidationError("file", "expected a multipart/form-data upload with `file` and `purpose`")
    length = environ.get("CONTENT_LENGTH")
    length = int(length) if length and length.isdigit() else None
    slack = 64 * 1024  # the form's own bytes around the file
    if length is not None and length > limit + slack:
        raise FileTooLarge(config.batch_max_file_mb)
    folder = files_dir()
    created: List[Path] = []

    def stream_factory(total_content_length=None, content_type=None, filename=None, content_length=None):
        path = folder / f".upload-{secrets.token_hex(8)}"
        created.append(path)
        return os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), "wb+")

    # A form field (purpose) is held in memory up to FIELD_MAX; the file part streams to its file (the parser's
    # buffer holds a read block and what is left of the last, so the bound is larger than a block).
    parser = MultiPartParser(stream_factory, max_form_memory_size=FIELD_MAX, max_form_parts=10, buffer_size=CHUNK)
    stream = _Capped(environ["wsgi.input"], limit + slack, config.batch_max_file_mb)
    try:
        try:
            form, files = parser.parse(stream, options["boundary"].encode(), length)
        except RequestEntityTooLarge:
            raise ValidationError("purpose", f"a form field is over {FIELD_MAX >> 10} KiB")
        except ValueError as exc:
            raise ValidationError("file", f"the upload is not a complete multipart form ({exc})")
        try:
            upload = files.get("file")
            if upload is None:
                raise ValidationError("file", "missing: send the file as the form's `file` part")
            if len(created) != 1:
                raise ValidationError("file", "more than one file part: send one `file`")
            purpose = form.get("purpose")
            if purpose not in PURPOSES:
                raise ValidationError("purpose", f"expected {' or '.join(PURPOSES)}, got {purpose!r}")
            filename = os.path.basename(upload.filename or "") or "upload.jsonl"
            upload.stream.flush()
            size = os.fstat(upload.stream.fileno()).st_size
            if size > limit:
                raise FileTooLarge(config.batch_max_file_mb)
            path = created[0]
        finally:
            for part in files.values():
                part.stream.close()
        record = register(path, filename, purpose, principal, size)
        created.remove(path)
        return record
    finally:
        for leftover in created:
            leftover.unlink(missing_ok=True)


def register(path: Path, filename: str, purpose: str, owner: str, size: Optional[int] = None) -> StoredFile:
    """Record a file already written (it moves into the files folder as <id>); committed."""
    file_id = new_file_id()
    target = files_dir() / file_id
    os.replace(path, target)
    os.chmod(target, 0o600)
    record = StoredFile(id=file_id, owner=owner, filename=filename[:FILENAME_MAX], purpose=purpose,
                        bytes=target.stat().st_size if size is None else size, path=str(target), created_at=utcnow())
    db.session.add(record)
    db.session.commit()
    return record


def get_file(file_id: str, principal: str) -> StoredFile:
    record = db.session.get(StoredFile, file_id) if isinstance(file_id, str) and len(file_id) <= 40 else None
    if record is None or not visible(record.owner, principal):
        raise NotFoundError(f"no file {file_id!r}", code="file_not_found")
    return record


def list_files(principal: str, purpose: Optional[str] = None, limit: int = 10000, after: Optional[str] = None,
               order: str = "desc") -> tuple:
    """(files, has_more): newest first (`order` asc: oldest first), after the file `after`, at most `limit`."""
    query = StoredFile.query
    if principal != "owner":
        query = query.filter(StoredFile.owner == principal)
    if purpose:
        query = query.filter(StoredFile.purpose == purpose)
    ascending = order == "asc"
    ordering = (StoredFile.created_at.asc(), StoredFile.id.asc()) if ascending else \
        (StoredFile.created_at.desc(), StoredFile.id.desc())
    if after:
        anchor = db.session.get(StoredFile, after)
        if anchor is not None:
            if ascending:
                query = query.filter((StoredFile.created_at > anchor.created_at) | (
                    (StoredFile.created_at == anchor.created_at) & (StoredFile.id > anchor.id)))
            else:
                query = query.filter((StoredFile.created_at < anchor.created_at) | (
                    (StoredFile.created_at == anchor.created_at) & (StoredFile.id < anchor.id)))
    found = query.order_by(*ordering).limit(limit + 1).all()
    return found[:limit], len(found) > limit


def delete_file(file_id: str, principal: str) -> str:
    record = get_file(file_id, principal)
    Path(record.path).unlink(missing_ok=True)
    db.session.delete(record)
    db.session.commit()
    return file_id
