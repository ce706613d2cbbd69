"""A folder on this node's own memory or disk for what only this node's processes share and what need not outlive the
node: the rates of named keys (portal/rate_limits.py), read and written under a lock on every request of a limited key.

Not PILOTFISH_HOME: on a cluster that is a network file system (NFS, GPFS, Lustre), where each lock is a round trip to
a server, a file mapped by processes of two nodes is not kept coherent, and some mounts refuse locks altogether.

The first of these that is (or can be made) a folder of this user alone (a real folder, not a link; owned by this
user; no access for group or others), with one sub-folder per PILOTFISH_HOME (its resolved path's hash, so two
portals of one user on one node keep apart):

1. `$XDG_RUNTIME_DIR/pilotfish` (the login's own tmpfs, when the environment has one);
2. `/dev/shm/pilotfish-<uid>` (memory: gone with the node's reboot or, on sites that give jobs a private /dev/shm, with
   the job);
3. `<the temporary folder>/pilotfish-<uid>`;
4. else PILOTFISH_HOME itself.

A folder that another user made first (or a link planted in its place) is passed over, never used or changed.
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional

log = logging.getLogger(__name__)


def candidates() -> List[Path]:
    """The folders tried, in order (see the module's docstring)."""
    uid = os.getuid()
    found = []
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        found.append(Path(runtime) / "pilotfish")
    found.append(Path("/dev/shm") / f"pilotfish-{uid}")
    found.append(Path(tempfile.gettempdir()) / f"pilotfish-{uid}")
    return found


def private_folder(path: Path) -> Optional[str]:
    """Make `path` (mode 0700) unless it exists; None when it is a real folder of this user alone, else why not."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        return f"cannot make it ({exc.strerror})"
    try:
        found = os.lstat(path)
    except OSError as exc:
        return f"cannot look at it ({exc.strerror})"
    if not stat.S_ISDIR(found.st_mode):
        return "not a folder (a link or a file is in its place)"
    if found.st_uid != os.getuid():
        return f"owned by another user (uid {found.st_uid})"
    if found.st_mode & 0o077:
        return f"open to other users (mode {stat.S_IMODE(found.st_mode):o})"
    return None


def node_local_dir(home: Path, tried: Optional[Iterable[Path]] = None) -> Path:
    """This node's folder for `home`'s shared per-node state (made 0700 on first use): see the module's docstring."""
    home = Path(home)
    name = hashlib.blake2b(str(home.resolve()).encode(), digest_size=8).hexdigest()
    for folder in (candidates() if tried is None else tried):
        problem = private_folder(folder)
        if problem is None:
            problem = private_folder(folder / name)
            if problem is None:
                return folder / name
        log.warning("node-local state: %s is not used: %s", folder, problem)
    return home
