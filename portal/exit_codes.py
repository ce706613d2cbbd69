"""What a process's exit code means, in words a researcher can act on (one place for the portal, the installer's
engine check and the demo)."""
from __future__ import annotations

import signal
from typing import Optional

SIGNAL_WORDS = {
    signal.SIGSEGV: "segmentation fault",
    signal.SIGILL: "illegal instruction (built for another CPU?)",
    signal.SIGBUS: "bus error",
    signal.SIGFPE: "arithmetic error",
    signal.SIGABRT: "aborted",
    signal.SIGKILL: "killed (out of memory, or by an administrator)",
    signal.SIGTERM: "terminated",
    signal.SIGINT: "interrupted",
}


def signal_of(code: Optional[int]) -> Optional[int]:
    """The signal that ended a process, from its exit code as a shell reports it (128 + N) or as Python's
    subprocess does (-N); None for a normal exit."""
    if code is None:
        return None
    if code < 0:
        return -code
    if 128 < code < 128 + 65:
        return code - 128
    return None


def describe_exit(code: Optional[int]) -> str:
    """'the server crashed: segmentation fault (signal 11, SIGSEGV; exit code 139)'; 'the server exited with code 1'."""
    number = signal_of(code)
    if number is None:
        return f"the server exited with code {code}"
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    words = SIGNAL_WORDS.get(number, name)
    verb = "was stopped" if number in (signal.SIGTERM, signal.SIGINT) else "crashed"
    shown = code if code >= 0 else 128 + number
    return f"the server {verb}: {words} (signal {number}, {name}; exit code {shown})"
