"""Clients streaming chat completions through a portal's gateway with the official `openai` client, back to back
until stopped: each stream's start, time to first token, length, whether it came whole, and which job answered (the
stand-in service names its job in each answer's id). Used by the renewal test and benchmarks/renewal.py."""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional

from openai import OpenAI


@dataclass
class Stream:
    started: float  # time.time() when the request was sent
    ttft: Optional[float]  # seconds to the first content
    seconds: float  # to the end of the answer (or of the failure)
    whole: bool
    job: Optional[str]  # the job that answered
    error: Optional[str] = None


class StreamingLoad:
    """`clients` threads, each streaming `tokens` tokens of `model` at a time; a context manager."""

    def __init__(self, base_url: str, token: str, clients: int = 16, tokens: int = 20, model: str = "test/tiny"):
        self.client = OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=60)
        self.tokens, self.model = tokens, model
        self.expected = "".join(f"tok{i} " for i in range(tokens))  # what the stand-in answers
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.streams: List[Stream] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _one(self) -> Stream:
        started = time.time()
        ttft, text, answer_id = None, "", None
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": "hi"}], max_tokens=self.tokens, stream=True)
            for chunk in stream:
                answer_id = chunk.id
                for choice in chunk.choices:
                    if choice.delta.content and ttft is None:
                        ttft = time.time() - started
                    text += choice.delta.content or ""
        except Exception as exc:  # every failure is counted, none ends the load
            return Stream(started, ttft, time.time() - started, False, None, repr(exc)[:300])
        job = answer_id.removeprefix("cmpl-") if answer_id else None
        return Stream(started, ttft, time.time() - started, text == self.expected, job)

    def _run(self):
        while not self.stop.is_set():
            result = self._one()
            with self.lock:
                self.streams.append(result)

    @property
    def failed(self) -> List[str]:
        return [stream.error for stream in self.streams if stream.error]

    @property
    def cut(self) -> List[Stream]:
        return [stream for stream in self.streams if not stream.error and not stream.whole]

    @property
    def complete(self) -> int:
        return sum(stream.whole for stream in self.streams)

    @property
    def by_job(self) -> Counter:
        return Counter(stream.job for stream in self.streams if stream.whole)

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=90)
