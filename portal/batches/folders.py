"""A folder of audio transcribed by a Whisper model as a batch: `transcribe_folder` checks the request (the folder
exists and is readable, the output folder is not inside it and can be written, the model is a speech-recognition
model the portal has, the format is known; a named key's folders lie under the site's key_audio_folders) and starts
a batch of one task whose runner lists the folder's audio files as it finds them (portal/batches/runner.py,
FolderRunner) and writes each transcript into a mirror tree of the output folder. What the API
(`POST /api/batches/folders`), and through it the CLI (`pilotfish batch transcribe`), call; the batch is listed,
shown and cancelled as any other."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..errors import ValidationError
from ..models import Batch
from .audio import body_problem, under
from .audio_input import key_roots
from .batches import find_model, parse_options, parse_window, plan_for, settings, start_batch
from .validation import model_problem
from .folder_files import FORMATS
from .lines import shard_path

TASKS = {"transcribe": "/v1/audio/transcriptions", "translate": "/v1/audio/translations"}


def _folder(field: str, value: str, roots) -> str:
    if not isinstance(value, str) or not value or not os.path.isabs(value) or "\x00" in value:
        raise ValidationError(field, f"expected an absolute path of a folder, got {value!r}")
    if roots is not None and not under(value, roots):
        raise ValidationError(field, f"{value} is not under the folders a named key may use (the site's "
                                     f"key_audio_folders{': ' + ', '.join(roots) if roots else ', which lists none'})")
    return os.path.normpath(value)


def check_source(value: str, roots) -> str:
    folder = _folder("folder", value, roots)
    if not os.path.exists(folder):
        raise ValidationError("folder", f"{folder}: no such folder")
    if not os.path.isdir(folder):
        raise ValidationError("folder", f"{folder}: not a folder")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise ValidationError("folder", f"{folder}: not readable (permission denied)")
    return folder


def check_output(value: str, source: str, roots) -> str:
    """The output folder, made if missing: never the input folder or inside it."""
    out = _folder("out", value, roots)
    real_out, real_source = os.path.realpath(out), os.path.realpath(source)
    if real_out == real_source or real_out.startswith(real_source.rstrip(os.sep) + os.sep):
        raise ValidationError("out", f"{out} is inside the input folder {source}: give a folder outside it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValidationError("out", f"{out}: not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ValidationError("out", f"{out}: cannot make it ({exc.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValidationError("out", f"{out}: not writable (permission denied)")
    return out


def transcribe_folder(folder: str, model: str, out: str, principal: str, response: str = "txt",
                      task: str = "transcribe", language: Optional[str] = None, prompt: Optional[str] = None,
                      temperature: Optional[float] = None, completion_window: str = "24h",
                      metadata: Optional[dict] = None) -> Batch:
    """Start the transcription of every audio file under `folder` into a mirror tree under `out` (`response`: srt,
    vtt, json or txt), skipping files whose transcript exists and picking up files added while it runs. Bad input is
    a 400 naming its field, checked before anything is made (but the output folder)."""
    config = settings()
    if response not in FORMATS:
        raise ValidationError("format", f"expected one of {', '.join(FORMATS)}, got {response!r}")
    if task not in TASKS:
        raise ValidationError("task", f"expected one of {', '.join(TASKS)}, got {task!r}")
    window = parse_window(completion_window)
    options = parse_options(metadata)
    roots = key_roots(principal, config)
    source = check_source(folder, roots)
    try:
        revision = find_model(model, principal)
    except ValidationError as exc:
        raise ValidationError("model", exc.problem) from None
    problem = model_problem(model, revision.kind, revision.kinds, TASKS[task])
    if problem:
        raise ValidationError("model", problem)
    plan = plan_for("speech-recognition", revision.repo_id, options, principal)
    output = check_output(out, source, roots)
    response_format, extension = FORMATS[response]
    body = {"response_format": response_format}
    body.update({name: value for name, value in (("language", language), ("prompt", prompt),
                                                 ("temperature", temperature)) if value is not None})
    problem = body_problem(dict(body, model=model, file=source))
    if problem:
        field, _, words = problem.partition(": ")
        raise ValidationError(field.removeprefix("body."), words)
    spec = {"source": source, "output": output, "format": response, "extension": extension, "body": body}

    def empty_shard(batch_folder: Path) -> list:
        shard_path(batch_folder, 0).touch(mode=0o600)
        return [0]

    return start_batch(principal, TASKS[task], revision.repo_id, plan, options, completion_window, window, metadata,
                       "", 0, 1, empty_shard, {"folder": spec, "audio_roots": roots},
                       description=f"the audio files of {source} into {output} as {response}")
