"""Audio batch lines (`/v1/audio/transcriptions`, `/v1/audio/translations`): what a line's body holds, the audio file
it names found at run time, and the multipart request the runner sends the Whisper server for it.

A line's body: `model`, `file` (an absolute path, or the id of a file uploaded through the Files API), and Whisper's
own fields `language`, `prompt`, `response_format` (json, text, verbose_json, srt, vtt) and `temperature` (0 to 1).
A batch started by a named key carries `audio_roots` in its settings: a path must then lie under one of them once
its links are resolved (checked when the batch is created and again when the line runs, then of the file opened: the
file sent is the one checked).

Standard library only: the runner (portal/batches/runner.py) imports it inside a job.
"""
from __future__ import annotations

import os
import secrets
import stat
from typing import Iterator, List, Optional, Sequence, Tuple

AUDIO_ENDPOINTS = ("/v1/audio/transcriptions", "/v1/audio/translations")
BODY_FIELDS = ("model", "file", "language", "prompt", "response_format", "temperature")
RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
FILE_ID_PREFIX = "file-"
CHUNK = 1 << 20


class AudioFileError(Exception):
    """The audio file a line names cannot be read (missing, not a file, unreadable, not allowed); the reason."""


def body_problem(body: dict) -> Optional[str]:
    """What is wrong with an audio line's body apart from its model and the file's existence ("body.<field>: ..."),
    or None."""
    unknown = sorted(set(body) - set(BODY_FIELDS))
    if unknown:
        return f"body.{unknown[0]}: not a field of an audio line (it holds {', '.join(BODY_FIELDS)})"
    name = body.get("file")
    if not isinstance(name, str) or not name:
        return "body.file: missing (an absolute path of the audio file, or the id of an uploaded file, file-...)"
    if not name.startswith(FILE_ID_PREFIX) and not os.path.isabs(name):
        return f"body.file: {name!r} is neither an absolute path nor a file id (file-...)"
    if "\x00" in name:
        return "body.file: a path cannot hold a NUL character"
    for field, limit in (("language", 16), ("prompt", 4000)):
        if field in body and (not isinstance(body[field], str) or len(body[field]) > limit):
            return f"body.{field}: expected a string of at most {limit} characters"
    if "response_format" in body and body["response_format"] not in RESPONSE_FORMATS:
        return f"body.response_format: expected one of {', '.join(RESPONSE_FORMATS)}, got {body['response_format']!r}"
    temperature = body.get("temperature", 0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 1:
        return f"body.temperature: expected a number from 0 to 1, got {temperature!r}"
    return None


def under(path: str, roots: Sequence[str]) -> bool:
    """Whether `path`, its links resolved, lies in one of the folders `roots` (themselves resolved)."""
    real = os.path.realpath(path)
    for root in roots:
        base = os.path.realpath(root)
        if real == base or real.startswith(base.rstrip(os.sep) + os.sep):
            return True
    return False


def opened_under(fd: int, path: str, roots: Sequence[str]) -> bool:
    """Whether the file open as `fd` is the one `path` names once its links are resolved (the same device and inode),
    and that lies in one of the folders `roots`: checked after the open, so a link swapped in between shows."""
    real = os.path.realpath(path)
    try:
        named, opened = os.stat(real), os.fstat(fd)
    except OSError:
        return False
    return under(real, roots) and (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def open_audio(path: str, roots: Optional[Sequence[str]] = None) -> int:
    """A descriptor of the regular file at `path`, opened for reading (and, with `roots`, lying under one of them);
    else AudioFileError with the reason. The checks are of the file opened, not of its name: a link swapped between
    a check and the open cannot lead elsewhere, and a named pipe or device is never waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise AudioFileError(f"{path}: no such file") from None
    except PermissionError:
        raise AudioFileError(f"{path}: not readable (permission denied)") from None
    except OSError as exc:
        raise AudioFileError(f"{path}: cannot read it ({exc.strerror})") from None
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise AudioFileError(f"{path}: not a file")
        if roots is not None and not opened_under(fd, path, roots):
            raise AudioFileError(f"{path} is not under the folders a named key may read (the site's "
                                 f"key_audio_folders)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def readable_file(path: str, roots: Optional[Sequence[str]] = None) -> str:
    """The path if it is a regular file this process can read (and, with `roots`, lies under one of them); else
    AudioFileError with the reason."""
    os.close(open_audio(path, roots))
    return path


def is_file_id(name: str) -> bool:
    """Whether a line's `file` names an uploaded file (file-...) rather than a path."""
    return name.startswith(FILE_ID_PREFIX) and not os.path.isabs(name)


def resolve(name: str, files: dict, roots: Optional[Sequence[str]]) -> Tuple[int, str]:
    """(an open descriptor, file name to send) of a line's `file`: an uploaded file's stored path (`files`: id ->
    {path, filename}, written when the batch was created), or the path itself. The caller closes the descriptor."""
    if is_file_id(name):
        stored = files.get(name)
        if stored is None:
            raise AudioFileError(f"{name}: not a file of this batch's owner")
        try:
            return open_audio(stored["path"]), stored["filename"]
        except AudioFileError:
            raise AudioFileError(f"{name}: the uploaded file is gone (deleted?)") from None
    return open_audio(name, roots), os.path.basename(name)


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def multipart(body: dict, fd: int, filename: str) -> Tuple[str, int, Iterator[bytes]]:
    """(content type, length, the parts) of the multipart request for an audio line: its fields, then the open file
    `fd` read from its start in chunks as it is sent (never whole in memory; sent again from the start on a retry)."""
    boundary = f"pilotfish-{secrets.token_hex(16)}"
    head: List[bytes] = []
    for field in BODY_FIELDS:
        if field == "file" or body.get(field) is None:
            continue
        head.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n{body[field]}\r\n'
                    .encode())
    head.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{_quoted(filename)}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n".encode())
    preamble, tail = b"".join(head), f"\r\n--{boundary}--\r\n".encode()
    size = os.fstat(fd).st_size

    def parts() -> Iterator[bytes]:
        yield preamble
        offset = 0
        while offset < size:
            chunk = os.pread(fd, min(CHUNK, size - offset), offset)
            if not chunk:
                raise OSError(f"{filename} shrank while it was sent")
            offset += len(chunk)
            yield chunk
        yield tail

    return f"multipart/form-data; boundary={boundary}", len(preamble) + size + len(tail), parts()


def is_audio_endpoint(endpoint: str) -> bool:
    return endpoint in AUDIO_ENDPOINTS
