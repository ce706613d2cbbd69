"""The rates of named API keys (requests and tokens per minute), kept across every process of the portal on this node.

The rule, per key, is a token bucket (in its "theoretical arrival time" form, GCRA):

- requests: a key of N requests per minute may send N at once after a quiet minute, then one every 60/N seconds; in
  any span of t seconds it gets at most N + N·t/60 requests (N within a minute from a standstill, never 2N in a
  minute at a steady pace beyond the first burst);
- tokens: a key of M tokens per minute has a bucket of M tokens that refills at M per minute; each answer's tokens
  (prompt and completion, counted once it is known: `spend`) are taken from it, and a request is admitted while the
  bucket is not empty. One large answer can take it below zero: the key then waits until it has refilled above zero.

`admit(name, rpm, tpm)` answers 0.0 (admitted, and the request counted) or the seconds until the key would be admitted
(the `Retry-After` of a 429, rounded up). A refused request is not counted.

Every worker maps the same small file, `rate_limits` (0600) in the node's own folder for this PILOTFISH_HOME
(portal/node_local.py: memory or local disk, not the network file system a home is on): a header and SLOTS fixed slots of
(a 64-bit hash of the key's name, its requests' arrival time, its tokens' arrival time, seconds per token). A key's
slot is found by its hash (linear probing over at most PROBE slots); each admit or spend is one read-modify-write of
its slot under an exclusive `flock` of the file (and a thread lock within the process): no database, no file
rewritten, a few microseconds (`benchmarks/rate_limits.py`). A slot whose times are past holds nothing a fresh slot
would not, so it is taken over by whichever key needs it; SLOTS keys limited at the same moment fit. Times are the
wall clock (`time.time()`), shared by every process and kept across restarts. Keys without a rate never come here
(portal.keys.KeyGrant.rate_limited).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import struct
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

FILE_NAME = "rate_limits"
MAGIC = b"PFRATE01"
HEADER = struct.Struct("<8sII")  # magic, slot count, slot size
HEADER_SIZE = 64
SLOT = struct.Struct("<Qddd")  # name hash (0: free), requests' arrival time, tokens' arrival time, seconds per token
SLOTS = 4096
PROBE = 32  # slots looked at for a key before the least busy of them is taken over
WINDOW = 60.0  # seconds: the rates are per minute
SLACK = 1e-6  # rounding of sums of 60/N


def name_hash(name: str) -> int:
    """A hash of a key's name that every process computes alike (Python's own hash() differs per process)."""
    value = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return value or 1  # 0 marks a free slot


class RateLimits:
    """The rates of named keys on this node, shared by the portal's processes through `folder`/rate_limits."""

    def __init__(self, folder):
        self.path = Path(folder) / FILE_NAME
        self._thread_lock = threading.Lock()
        self._open_lock = threading.Lock()
        self._pid: Optional[int] = None  # the process that opened the file (a forked child opens its own)
        self._fd = -1
        self._map: Optional[mmap.mmap] = None
        self._slots: Dict[str, Tuple[int, int]] = {}  # name -> (hash, first slot to look at)

    # --- the two calls ---------------------------------------------------------------------------------------

    def admit(self, name: str, requests_per_minute: Optional[int], tokens_per_minute: Optional[int]) -> float:
        """0.0 if a request of key `name` may go now (and it is counted), else the seconds until it may."""
        if not requests_per_minute and not tokens_per_minute:
            return 0.0
        now = time.time()
        with self._locked() as slots:
            offset = self._slot(slots, name, now)
            key, request_tat, token_tat, per_token = SLOT.unpack_from(slots, offset)
            wait = 0.0
            if requests_per_minute:
                request_tat = max(request_tat, now) + WINDOW / requests_per_minute
                wait = request_tat - WINDOW - now
                if wait <= SLACK:
                    wait = 0.0
            if tokens_per_minute:
                per_token = WINDOW / tokens_per_minute
                owed = token_tat - now - WINDOW  # >= 0: the bucket is empty for that long
                if owed >= 0:
                    wait = max(wait, owed + 0.001)
            else:
                per_token = 0.0
            if wait == 0.0:
                SLOT.pack_into(slots, offset, key, max(request_tat, now), max(token_tat, now), per_token)
            return wait

    def spend(self, name: str, tokens: int) -> None:
        """Count the tokens of an answer of key `name` (admitted earlier with a tokens_per_minute; else nothing)."""
        if tokens <= 0:
            return
        now = time.time()
        with self._locked() as slots:
            offset = self._slot(slots, name, now, claim=False)
            if offset is None:
                return
            key, request_tat, token_tat, per_token = SLOT.unpack_from(slots, offset)
            if per_token:
                SLOT.pack_into(slots, offset, key, request_tat, max(token_tat, now) + tokens * per_token, per_token)

    @contextlib.contextmanager
    def _locked(self):
        """The shared slots, held by this thread and this process alone (the file opened anew after a fork)."""
        if self._pid != os.getpid():
            self._open()
        fd = self._fd
        self._thread_lock.acquire()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield self._map
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            self._thread_lock.release()

    # --- the shared file -------------------------------------------------------------------------------------

    def _slot(self, slots, name: str, now: float, claim: bool = True) -> Optional[int]:
        """The offset of `name`'s slot: its own, else (with `claim`) a free or idle one of its probe range, else the
        least busy of them (whose key loses what it had spent)."""
        found = self._slots.get(name)
        if found is None:
            if len(self._slots) > 100_000:
                self._slots.clear()
            key = name_hash(name)
            found = self._slots[name] = (key, key % SLOTS)
        key, first = found
        spare, spare_busy = None, None
        for step in range(PROBE):
            offset = HEADER_SIZE + ((first + step) % SLOTS) * SLOT.size
            held, request_tat, token_tat, _ = SLOT.unpack_from(slots, offset)
            if held == key:
                return offset
            busy = max(request_tat, token_tat) - now if held else -1.0
            if spare is None or busy < spare_busy:
                spare, spare_busy = offset, busy
            if held == 0:
                break  # keys are placed at the first free slot of their range: none lies beyond one
        if not claim:
            return None
        SLOT.pack_into(slots, spare, key, now, now, 0.0)
        return spare

    def _open(self) -> None:
        """Map the file (made on first use), in this process: a forked child maps it anew, with locks of its own
        (flock is shared by processes that share an open file)."""
        with self._open_lock:
            if self._pid == os.getpid():
                return
            if self._pid is not None:  # a forked child: the parent's locks are not its own
                self._thread_lock = threading.Lock()
            self.close()
            size = HEADER_SIZE + SLOTS * SLOT.size
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    header = os.pread(fd, HEADER.size, 0)
                    if os.fstat(fd).st_size != size or header != HEADER.pack(MAGIC, SLOTS, SLOT.size):
                        os.ftruncate(fd, 0)  # new, or of another layout: start afresh
                        os.ftruncate(fd, size)
                        os.pwrite(fd, HEADER.pack(MAGIC, SLOTS, SLOT.size), 0)
                    os.fchmod(fd, 0o600)
                    mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            except BaseException:
                os.close(fd)
                raise
            self._fd, self._map, self._pid = fd, mapped, os.getpid()

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            os.close(self._fd)
        self._map, self._fd, self._pid = None, -1, None
