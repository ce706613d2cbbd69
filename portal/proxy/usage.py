"""Token usage as OpenAI-compatible services report it, read from the answers the relay passes on.

A JSON answer to `POST /v1/...` (200, up to USAGE_BODY_LIMIT) is collected and only its `"usage"` object decoded
at the end. For a streamed completion (/v1/completions, /v1/chat/completions) whose caller set no
`stream_options`, the request is extended (bytes appended, not re-encoded) to ask for the usage event, and that
event is taken out of what the caller receives; a caller who asked gets it as sent. Stream chunks are not decoded:
only a line holding the bytes `"usage"` is, and an incomplete last line of a chunk is held back until its end
arrives (a client cannot use half an event anyway). The totals are reported once, at `data: [DONE]` (before the
caller can see the end) or when the answer ends; this module changes traffic only in those two ways.
"""
from __future__ import annotations

import json
import re
from typing import Callable, Optional, Tuple

USAGE_BODY_LIMIT = 1024 * 1024  # JSON answers (and requests) larger than this are not searched for usage
USAGE_KEY = b'"usage"'
DONE_EVENT = b"data: [DONE]"
USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
INCLUDE_USAGE = b',"stream_options":{"include_usage":true}}'
_decoder = json.JSONDecoder()


def find_usage(data: bytes) -> Optional[dict]:
    """The last `"usage": {...}` object in a JSON answer or an SSE event, decoded alone (the rest is not parsed)."""
    at = data.rfind(USAGE_KEY)
    while at >= 0:
        found = USAGE_OBJECT.match(data, at)
        if found is not None:
            try:
                usage, _ = _decoder.raw_decode(data[found.end() - 1:].decode("utf-8", "replace"))
            except ValueError:
                return None
            return usage if isinstance(usage, dict) else None
        at = data.rfind(USAGE_KEY, 0, at)
    return None


def token_counts(usage: Optional[dict]) -> Tuple[int, int]:
    """(prompt tokens, completion tokens) of a usage object; missing or odd values count as 0."""
    if not usage:
        return 0, 0
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (prompt if isinstance(prompt, int) and prompt > 0 else 0,
            completion if isinstance(completion, int) and completion > 0 else 0)


def wants_json_body(method: str, mimetype: str, length: Optional[int]) -> bool:
    """A modest JSON POST: read whole before it is sent on (so a stream can ask for usage); others stream through."""
    return method == "POST" and mimetype == "application/json" and length is not None and length <= USAGE_BODY_LIMIT


def ask_for_usage(body: bytes, payload=None) -> Optional[bytes]:
    """For a streamed completion whose caller set no `stream_options`: the same body asking for the usage event.

    None when nothing is to be added (not a stream, the caller chose stream_options, or not a JSON object).
    The bytes are extended rather than re-encoded: what the caller sent reaches the service unchanged.
    `payload` is the body already decoded, if the caller has it.
    """
    if b'"stream"' not in body:
        return None
    if payload is None:
        try:
            payload = json.loads(body)
        except ValueError:
            return None
    if not isinstance(payload, dict) or payload.get("stream") is not True or "stream_options" in payload:
        return None
    stripped = body.rstrip()
    if not stripped.endswith(b"}"):
        return None
    return stripped[:-1] + INCLUDE_USAGE


class UsageReader:
    """The usage protocol for one request: ask (the request body), expect (the answer's head), pass_on (each
    chunk), remainder (at the end of the answer), finish (once, whatever happened)."""

    __slots__ = ("report", "completion_call", "added_usage", "stream", "collected", "collected_size", "carry",
                 "prompt", "completion", "reported")

    def __init__(self, report: Callable[[int, int], None], completion_call: bool):
        self.report = report  # called once with (prompt tokens, completion tokens) when either is known
        self.completion_call = completion_call  # /v1/completions or /v1/chat/completions: may ask for usage
        self.added_usage = False  # the portal asked for the usage event: the caller does not get it
        self.stream = False
        self.collected: Optional[list] = None
        self.collected_size = 0
        self.carry = b""
        self.prompt = self.completion = 0
        self.reported = False

    def ask(self, body: bytes, payload=None) -> bytes:
        """The body to send on: a streamed completion without stream_options also asks for the usage event."""
        if self.completion_call:
            extended = ask_for_usage(body, payload)
            if extended is not None:
                self.added_usage = True
                return extended
        return body

    def expect(self, status: int, content_type: str, stream: bool, content_encoding: str,
               length: Optional[str]) -> bool:
        """Whether the answer is read (headers' values as sent, or empty): an event stream, or a JSON 200 up to
        USAGE_BODY_LIMIT, neither content-encoded."""
        if content_encoding:
            return False
        if stream:
            self.stream = True
            return True
        if (status == 200 and content_type.startswith("application/json")
                and (length is None or (length.isdigit() and int(length) <= USAGE_BODY_LIMIT))):
            self.collected = []
            return True
        return False

    def pass_on(self, data: bytes) -> bytes:
        """One chunk of the answer as the caller receives it (maybe empty)."""
        if self.stream:
            if self.carry:
                data, self.carry = self.carry + data, b""
            if not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                data, self.carry = data[:cut], data[cut:]
            if USAGE_KEY in data:
                data = self._take_usage(data)
            if data and DONE_EVENT in data:  # reported before the caller can see the end (and ask /metrics)
                self.finish()
        elif self.collected is not None:
            self.collected_size += len(data)
            if self.collected_size <= USAGE_BODY_LIMIT:
                self.collected.append(data)
            else:
                self.collected = None
        return data

    def remainder(self) -> bytes:
        """What is still held back when the answer ends (an unterminated last line)."""
        rest, self.carry = self.carry, b""
        return rest

    def _take_usage(self, data: bytes) -> bytes:
        lines = data.split(b"\n")
        kept = []
        skip_blank = False
        for line in lines:
            if skip_blank:
                skip_blank = False
                if not line.strip():
                    continue
            if line.startswith(b"data:") and USAGE_OBJECT.search(line):
                try:
                    event = json.loads(line[5:])
                except ValueError:
                    event = None
                if isinstance(event, dict) and isinstance(event.get("usage"), dict):
                    prompt, completion = token_counts(event["usage"])
                    self.prompt, self.completion = prompt, completion  # the last report is the total
                    if self.added_usage:
                        if not event.get("choices"):
                            skip_blank = True
                            continue
                        del event["usage"]
                        line = b"data: " + json.dumps(event, separators=(",", ":")).encode()
            kept.append(line)
        return b"\n".join(kept)

    def finish(self) -> None:
        """Report the totals, once (a JSON answer's usage object is decoded now)."""
        if self.reported:
            return
        self.reported = True
        if self.collected:
            self.prompt, self.completion = token_counts(find_usage(b"".join(self.collected)))
            self.collected = None
        if self.prompt or self.completion:
            self.report(self.prompt, self.completion)


def usage_reader(method: str, upstream_path: str, report: Callable[[int, int], None]) -> Optional[UsageReader]:
    """A reader for a request whose answer may hold usage (the OpenAI API's POSTs), else None."""
    if method == "POST" and upstream_path.startswith("/v1/"):
        return UsageReader(report, upstream_path.endswith("completions"))
    return None
