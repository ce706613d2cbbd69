"""What the gateway needs of a large JSON request body, decoded in a helper process instead of on the event loop.

Decoding a JSON body of many megabytes takes seconds of CPU with the GIL held (json's decoder never releases it),
so in a thread it would still stop the worker's event loop and every stream on it. JsonFacts sends such a body
to a helper process (`python -m portal.json_facts`, started on first use, one per worker, standard library only)
over a pipe the event loop writes without blocking, and gets back only the top-level fields routing and the usage
protocol read (`model`, `stream`, `stream_options`), as a small dict. The protocol: an 8-byte big-endian length and
the body in; one JSON line out: {"ok": true, "facts": {...}} or {"ok": false} for a body that is not a JSON object.
"""
from __future__ import annotations

import asyncio
import json
import struct
import sys
from pathlib import Path
from typing import Optional

FACT_KEYS = ("model", "stream", "stream_options")
PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])  # where `python -m portal.json_facts` finds this module


def facts_of(body: bytes) -> Optional[dict]:
    """The top-level fields the gateway reads, or None if the body is not a JSON object."""
    try:
        payload = json.loads(body or b"{}")
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    return {key: payload[key] for key in FACT_KEYS if key in payload}


class JsonFacts:
    """One worker's helper process; requests to it take turns (large bodies are rare)."""

    def __init__(self):
        self._process: Optional[asyncio.subprocess.Process] = None
        self._lock = asyncio.Lock()

    async def facts(self, body: bytes) -> Optional[dict]:
        """facts_of(body), computed by the helper (started again if it died)."""
        async with self._lock:
            for attempt in (1, 2):
                process = self._process
                if process is None or process.returncode is not None:
                    process = self._process = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "portal.json_facts", stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE, cwd=PACKAGE_PARENT)
                try:
                    process.stdin.write(struct.pack(">Q", len(body)))
                    process.stdin.write(body)
                    await process.stdin.drain()
                    line = await process.stdout.readline()
                    if not line:
                        raise ConnectionError("the JSON helper exited")
                    answer = json.loads(line)
                    return answer["facts"] if answer["ok"] else None
                except (ConnectionError, ValueError, KeyError):
                    self.close()
                    if attempt == 2:
                        raise
                except BaseException:  # cancelled mid-exchange: the pipe is out of step, start afresh next time
                    self.close()
                    raise
        return None

    def close(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
        self._process = None


def main() -> None:
    """The helper: read a length and a body, answer one line, until stdin closes."""
    source, sink = sys.stdin.buffer, sys.stdout
    while True:
        head = source.read(8)
        if len(head) < 8:
            return
        (size,) = struct.unpack(">Q", head)
        body = source.read(size)
        facts = facts_of(body)
        try:
            line = json.dumps({"ok": facts is not None, "facts": facts})
        except (TypeError, ValueError):
            line = json.dumps({"ok": False, "facts": None})
        sink.write(line + "\n")
        sink.flush()


if __name__ == "__main__":
    main()
