"""The lines of a batch's files: OpenAI's output and error lines, what a shard's answers and errors files already hold
(the custom_ids a resumed runner skips, a last line cut short by a kill), how many lines they grew by, and the merge
of every shard's files into one output and one error file in input order.

Standard library only: the runner (portal/batches/runner.py) imports it inside a job.
"""
from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Set, Tuple

SHARD_NAME = "shard-{:04d}.jsonl"
OUTPUT_NAME = "shard-{:04d}.output.jsonl"
ERRORS_NAME = "shard-{:04d}.errors.jsonl"


def shard_path(folder: Path, index: int) -> Path:
    return Path(folder) / SHARD_NAME.format(index)


def output_path(folder: Path, index: int) -> Path:
    return Path(folder) / OUTPUT_NAME.format(index)


def errors_path(folder: Path, index: int) -> Path:
    return Path(folder) / ERRORS_NAME.format(index)


def request_id() -> str:
    return f"batch_req_{secrets.token_hex(12)}"


def output_line(custom_id: str, status: int, request_id_: str, body) -> bytes:
    """OpenAI's batch output line for an answer."""
    return _encoded({"id": request_id(), "custom_id": custom_id,
                     "response": {"status_code": status, "request_id": request_id_, "body": body}, "error": None})


def error_line(custom_id: str, code: str, message: str, status: Optional[int] = None, body=None,
               request_id_: str = "") -> bytes:
    """OpenAI's batch error line: the answer when there was one (a non-2xx status), and what went wrong."""
    response = None if status is None else {"status_code": status, "request_id": request_id_, "body": body}
    return _encoded({"id": request_id(), "custom_id": custom_id, "response": response,
                     "error": {"code": code, "message": message}})


def _encoded(line: dict) -> bytes:
    """One line of JSON. ASCII only: a model's text may hold characters that some readers also take for line ends
    (U+2028, U+0085, ...: Python's str.splitlines), escaped here, so a newline is the only line end."""
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def complete_lines(path: Path) -> Iterator[bytes]:
    """The whole lines of a file (each ending in a newline); a last line without one (cut short) is not read."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return
    with handle:
        for line in handle:
            if line.endswith(b"\n"):
                yield line


def trim_partial_line(path: Path) -> int:
    """Cut a last line left without its newline (a writer killed mid-line) off the file; the bytes cut."""
    try:
        with open(path, "rb+") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size == 0:
                return 0
            keep = size
            block = 65536
            while keep > 0:
                start = max(0, keep - block)
                handle.seek(start)
                chunk = handle.read(keep - start)
                if keep == size and chunk.endswith(b"\n"):
                    return 0
                newline = chunk.rfind(b"\n")
                if newline >= 0:
                    keep = start + newline + 1
                    break
                keep = start
            handle.truncate(keep)
            return size - keep
    except FileNotFoundError:
        return 0


def custom_id_of(line: bytes) -> Optional[str]:
    """The custom_id of an output or error line, None if the line is not one (not JSON, no custom_id)."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    custom_id = value.get("custom_id") if isinstance(value, dict) else None
    return custom_id if isinstance(custom_id, str) else None


def answered_ids(*paths: Path) -> Set[str]:
    """The custom_ids the given answers and errors files hold, once each file's cut-short last line is trimmed."""
    found: Set[str] = set()
    for path in paths:
        trim_partial_line(path)
        for line in complete_lines(path):
            custom_id = custom_id_of(line)
            if custom_id is not None:
                found.add(custom_id)
    return found


@dataclass
class Growth:
    """What a shard's file grew by since it was last counted: the offset after its last whole line, its new whole
    lines, and the tokens their answers reported (`usage` of each line's response body; 0 when none)."""
    end: int
    lines: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _add_tokens(growth: Growth, line: bytes) -> None:
    try:
        usage = json.loads(line)["response"]["body"]["usage"]
        growth.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        growth.completion_tokens += int(usage.get("completion_tokens") or 0)
    except (ValueError, KeyError, TypeError, AttributeError):
        pass  # an error line, or an answer without usage (a transcription)


def count_new_lines(path: Path, offset: int, tokens: bool = False) -> Growth:
    """What a file grew by past `offset` (a line still being written counts next time); with `tokens`, the usage its
    new lines' answers reported, summed."""
    growth = Growth(end=offset)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return growth
    with handle:
        handle.seek(offset)
        position, partial = offset, b""
        while True:
            chunk = handle.read(1 << 20)
            if not chunk:
                break
            count = chunk.count(b"\n")
            if count:
                growth.lines += count
                growth.end = position + chunk.rfind(b"\n") + 1
                if tokens:
                    whole, _, rest = (partial + chunk).rpartition(b"\n")
                    for line in whole.split(b"\n"):
                        _add_tokens(growth, line)
                    partial = rest
            elif tokens:
                partial += chunk
            position += len(chunk)
        return growth


def input_ids(path: Path) -> Iterator[str]:
    """The custom_ids of an input (shard) file, in order (its lines were checked at creation)."""
    for line in complete_lines(path):
        yield json.loads(line)["custom_id"]


def merge_shards(shards: Iterable[Tuple[Path, Path, Path]], output: Path, errors: Path,
                 unanswered: Optional[Tuple[str, str]] = None) -> Tuple[int, int]:
    """Merge (input, answers, errors) of each shard, in shard order, into `output` and `errors`, each line in its input
    line's place and each custom_id once (a duplicate, which a runner never writes, is dropped). With
    `unanswered_reason`, a line answered nowhere gets an error line with it; else it is left out. Returns (lines in
    output, lines in errors)."""
    written_output = written_errors = 0
    with open(output, "wb") as out, open(errors, "wb") as err:
        for input_file, answers_file, errors_file in shards:
            answers = _by_custom_id(answers_file)
            failures = _by_custom_id(errors_file)
            for custom_id in input_ids(input_file):
                if custom_id in answers:
                    out.write(answers.pop(custom_id))
                    failures.pop(custom_id, None)
                    written_output += 1
                elif custom_id in failures:
                    err.write(failures.pop(custom_id))
                    written_errors += 1
                elif unanswered:
                    err.write(error_line(custom_id, *unanswered))
                    written_errors += 1
    return written_output, written_errors


def _by_custom_id(path: Path) -> Dict[str, bytes]:
    found: Dict[str, bytes] = {}
    for line in complete_lines(path):
        custom_id = custom_id_of(line)
        if custom_id is not None and custom_id not in found:
            found[custom_id] = line
    return found


def append_lines(path: Path, lines: Iterable[bytes]) -> None:
    """Append whole lines (one write each, so a kill cuts at most the one being written)."""
    trim_partial_line(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        for line in lines:
            os.write(fd, line)
    finally:
        os.close(fd)
