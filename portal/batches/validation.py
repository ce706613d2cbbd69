"""A batch's input file checked line by line before anything is created (every line a JSON object with a unique
`custom_id`, `method` POST, `url` the batch's endpoint and a `body` whose `model` is one model the portal has, the
same on every line: a 400 naming the line and what is wrong), and its split into shards of `shard_size` lines."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ..catalog.model_kinds import SPEECH_RECOGNITION
from ..errors import ValidationError
from .lines import shard_path

# Endpoints a batch runs, and the kind of service that answers each (the model is launched as it: a causal model's
# embeddings batch pools its states).
ENDPOINT_KINDS = {"/v1/chat/completions": "text-generation", "/v1/completions": "text-generation",
                  "/v1/embeddings": "text-embedding", "/v1/audio/transcriptions": "speech-recognition",
                  "/v1/audio/translations": "speech-recognition"}
LINE_FIELDS = ("custom_id", "method", "url", "body")
CUSTOM_ID_MAX = 512
FIELD = "input_file_id"


@dataclass
class CheckedInput:
    lines: int
    model: str


def _reject(number: int, problem: str):
    raise ValidationError(FIELD, f"line {number}: {problem}", line=number)


def _constant(name):
    raise ValueError(f"{name} is not JSON")


def check_endpoint(endpoint: str) -> str:
    if endpoint not in ENDPOINT_KINDS:
        raise ValidationError("endpoint", f"expected one of {', '.join(ENDPOINT_KINDS)}, got {endpoint!r}")
    return endpoint


def model_problem(model: str, kind: Optional[str], kinds: List[str], endpoint: str) -> Optional[str]:
    """Whether `model`, of `kind` and launchable as `kinds` (catalog/model_kinds.py), answers `endpoint`'s lines: the
    problem, or None. Audio needs a speech-recognition (Whisper) model; a model of unknown kind may try the rest."""
    wanted = ENDPOINT_KINDS[endpoint]
    if wanted == SPEECH_RECOGNITION and kind != SPEECH_RECOGNITION:
        return (f"{model} is a {kind or 'model of unknown kind'} model, not a speech-recognition (Whisper) model: "
                f"audio needs one")
    if kind == SPEECH_RECOGNITION and wanted != SPEECH_RECOGNITION:
        return f"{model} is a speech-recognition model: it answers /v1/audio/transcriptions and translations only"
    if kinds and wanted not in kinds:
        return f"{model} is a {kind} model: it does not answer {endpoint} (it answers as {', '.join(kinds)})"
    return None


def check_input(path: Path, endpoint: str, check_model: Callable[[str, int], None],
                check_body: Optional[Callable[[dict], Optional[str]]] = None) -> CheckedInput:
    """Read the input file once, line by line, and refuse the first bad line (ValidationError naming `input_file_id`
    and the line's number). `check_model(model, line_number)` refuses a model the portal does not have (it is asked
    once, for the first line's model; every other line must name the same); `check_body(body)` says what else is wrong
    with a line's body (an audio line's file: portal/batches/audio_input.py), or None."""
    seen: Dict[bytes, int] = {}  # a digest of each custom_id: the line it was first on
    model = None
    number = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            text = raw.strip()
            if not text:
                _reject(number, "empty line: every line must be one JSON object")
            try:
                line = json.loads(text, parse_constant=_constant)
            except (ValueError, UnicodeDecodeError) as exc:
                _reject(number, f"not valid JSON ({str(exc).splitlines()[0][:200]})")
            if not isinstance(line, dict):
                _reject(number, "expected a JSON object with custom_id, method, url and body")
            missing = [name for name in LINE_FIELDS if name not in line]
            if missing:
                _reject(number, f"missing {', '.join(missing)}")
            unknown = sorted(set(line) - set(LINE_FIELDS))
            if unknown:
                _reject(number, f"unknown field {unknown[0]!r} (a line holds {', '.join(LINE_FIELDS)})")
            custom_id = line["custom_id"]
            if not isinstance(custom_id, str) or not custom_id or len(custom_id) > CUSTOM_ID_MAX:
                _reject(number, f"custom_id: expected a string of 1 to {CUSTOM_ID_MAX} characters")
            digest = hashlib.blake2b(custom_id.encode(), digest_size=16).digest()
            if digest in seen:
                _reject(number, f"duplicated custom_id {custom_id!r} (first on line {seen[digest]})")
            seen[digest] = number
            if line["method"] != "POST":
                _reject(number, f"method: expected POST, got {line['method']!r}")
            if line["url"] != endpoint:
                _reject(number, f"url: {line['url']!r} is not this batch's endpoint {endpoint}")
            body = line["body"]
            if not isinstance(body, dict):
                _reject(number, "body: expected a JSON object (the request's body)")
            if not isinstance(body.get("model"), str) or not body["model"]:
                _reject(number, "body.model: missing (every line names the model)")
            if body.get("stream"):
                _reject(number, "body.stream: a batch line cannot stream; leave it out")
            problem = check_body(body) if check_body is not None else None
            if problem:
                _reject(number, problem)
            if model is None:
                check_model(body["model"], number)
                model = body["model"]
            elif body["model"] != model:
                _reject(number, f"body.model: {body['model']!r} differs from line 1's {model!r} (one model per "
                                f"batch)")
    if number == 0:
        raise ValidationError(FIELD, "the file has no lines")
    return CheckedInput(lines=number, model=model)


def write_shards(path: Path, folder: Path, shard_size: int) -> List[int]:
    """Split the (checked) input into shard-NNNN.jsonl files of `folder`, `shard_size` lines each (the last one
    fewer); returns each shard's line count."""
    counts: List[int] = []
    out = None
    try:
        with open(path, "rb") as handle:
            for raw in handle:
                if not counts or counts[-1] == shard_size:
                    if out is not None:
                        out.close()
                    out = open(shard_path(folder, len(counts)), "xb")
                    counts.append(0)
                out.write(raw.strip() + b"\n")
                counts[-1] += 1
    finally:
        if out is not None:
            out.close()
    return counts
