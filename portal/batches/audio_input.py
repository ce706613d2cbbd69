"""What an audio batch may read, checked when it is created: each line's `file` (a path the portal's user can read,
or a Files API file the caller sees) and, for a named key, the rule that keeps it from making the portal read the
owner's files: a named key names only files it uploaded, or paths under the site's `key_audio_folders` (none unless
the site lists some); the owner names any path the portal's user can read. The same rule holds for folders
(portal/batches/folders.py): a named key's input and output folders must lie under `key_audio_folders`.
docs/security.md states it. Which models answer audio: portal/batches/validation.py's model_problem."""
from __future__ import annotations

from typing import Dict, List, Optional

from ..errors import NotFoundError
from .audio import AudioFileError, body_problem, is_file_id, readable_file
from .files import OUTPUT_PURPOSE, get_file


def key_roots(principal: str, config) -> Optional[List[str]]:
    """The folders whose files `principal` may name by path: None (any) for the owner, the site's key_audio_folders
    for a named key (empty: none)."""
    if principal == "owner":
        return None
    return [str(folder) for folder in config.key_audio_folders]


def audio_checker(principal: str, config) -> tuple:
    """(check_body for portal/batches/validation.check_input, the files it met: id -> {path, filename}). A line's
    file is checked as far as it can be before anything runs: a path exists, is a file and is readable (and, for a
    named key, lies under key_audio_folders); an id is a file the caller sees."""
    roots = key_roots(principal, config)
    files: Dict[str, dict] = {}

    def check_body(body: dict) -> Optional[str]:
        problem = body_problem(body)
        if problem:
            return problem
        name = body["file"]
        if is_file_id(name):
            if name in files:
                return None
            try:
                record = get_file(name, principal)
            except NotFoundError:
                return f"body.file: no file {name!r} (a named key names only files it uploaded)"
            if record.purpose == OUTPUT_PURPOSE:
                return f"body.file: {name} is a batch's output, not audio"
            files[name] = {"path": record.path, "filename": record.filename}
            return None
        if roots is not None and not roots:
            return ("body.file: a named key may not name paths (the site lists no key_audio_folders): upload the "
                    "audio and name its file id")
        try:
            readable_file(name, roots)
        except AudioFileError as exc:
            return f"body.file: {exc}"
        return None

    return check_body, files
