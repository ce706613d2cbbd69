"""Change marks: files in PILOTFISH_HOME that grow by a byte each time something changed, so every process of the
portal notices a change with one stat, without a database query or a socket between workers.

Used for the service directory (routes.changed, after a committed state change), login sessions (sessions.changed,
after a logout) and the reconciler (reconciler.wake, a wake from a worker that does not lead). A mark's state
differs after every `move`: the size changes even when two moves fall in one tick of the file clock, and the time
changes when the file is cut back to keep it small.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
MAX_SIZE = 4096  # the file is cut back to nothing past this
RECONCILER_WAKE = "reconciler.wake"  # in PILOTFISH_HOME: moved to wake the reconciler from any process


def move(path: Path) -> None:
    """Mark a change (best effort: a failure is logged, never raised)."""
    try:
        with open(path, "ab") as mark:
            if mark.tell() >= MAX_SIZE:
                mark.truncate(0)
            mark.write(b".")
    except OSError:
        log.exception("could not mark a change in %s", path)


def state(path: Path) -> tuple:
    """The mark's state now; () while the file does not exist. Compare with an earlier state to see a change."""
    try:
        found = os.stat(path)
    except OSError:
        return ()
    return found.st_ino, found.st_size, found.st_mtime_ns
