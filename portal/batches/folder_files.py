"""A folder of audio transcribed into a mirror tree: the formats, which files are audio, a pass over the folder (the
files not yet listed whose transcript does not exist yet) and a transcript written in its place under the output
folder (written whole, then renamed: a transcript that exists is complete).

Standard library only: the runner (portal/batches/runner.py) imports it inside a job.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Iterator, Optional, Sequence, Set, Tuple

from .audio import opened_under

# --format as users write it: (Whisper's response_format, the transcript's extension).
FORMATS = {"srt": ("srt", "srt"), "vtt": ("vtt", "vtt"), "json": ("json", "json"), "txt": ("text", "txt")}
AUDIO_SUFFIXES = frozenset({".wav", ".mp3", ".m4a", ".flac", ".ogg", ".oga", ".opus", ".webm", ".mp4", ".mpeg",
                            ".mpga", ".aac", ".wma", ".aif", ".aiff", ".amr", ".mka", ".mkv", ".mov"})


def is_audio(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in AUDIO_SUFFIXES


def transcript_path(output: str, relative: str, extension: str) -> Path:
    """Where the transcript of `relative` (a path under the input folder) goes: the same path under `output`, the
    format's extension instead of the audio's."""
    return Path(output) / Path(relative).with_suffix(f".{extension}")


def audio_files(source: str) -> Iterator[Tuple[str, str]]:
    """(relative path, absolute path) of each audio file under `source`, in name order, hidden files and folders
    left out, links to folders not followed."""
    for folder, folders, files in os.walk(source):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(files):
            if is_audio(name):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, source), path


def new_files(source: str, output: str, extension: str, listed: Set[str], skipped: Set[str],
              settled_before: Optional[float] = None, unsettled: Optional[Set[str]] = None) \
        -> Iterator[Tuple[str, str]]:
    """A pass over the folder: the audio files neither listed before nor already done (their transcript exists; those
    are added to `skipped`). With `settled_before` (epoch seconds), a file changed since then may still be being
    copied in: it is left for a later pass, and named in `unsettled`."""
    for relative, path in audio_files(source):
        if relative in listed or relative in skipped:
            continue
        if transcript_path(output, relative, extension).exists():
            skipped.add(relative)
            continue
        if settled_before is not None:
            try:
                changed = os.stat(path).st_mtime
            except OSError:
                continue  # gone since it was listed
            if changed > settled_before:
                if unsettled is not None:
                    unsettled.add(relative)
                continue
        yield relative, path


def write_transcript(output: str, relative: str, extension: str, answer, roots: Optional[Sequence[str]]) \
        -> Tuple[Path, int]:
    """Write Whisper's answer (text, or JSON) as the transcript of `relative`; (its path, bytes). OSError when it
    cannot be written (or, for a named key's batch, its folder lies outside `roots`)."""
    target = transcript_path(output, relative, extension)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:  # the folder is checked as opened, and written through that descriptor: a link swapped in leads nowhere
        if roots is not None and not opened_under(folder, str(target.parent), roots):
            raise OSError(f"{target.parent} is not under the folders a named key may write (key_audio_folders)")
        if isinstance(answer, str):
            data = answer.encode()
        else:
            data = (json.dumps(answer, ensure_ascii=False, indent=1) + "\n").encode()
        partial = f".{target.name}.{secrets.token_hex(4)}.partial"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                     dir_fd=folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(partial, target.name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            try:
                os.unlink(partial, dir_fd=folder)
            except OSError:
                pass
            raise
    finally:
        os.close(folder)
    return target, len(data)
