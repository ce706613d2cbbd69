"""The node's own folder for per-node state (portal/node_local.py): a 0700 folder of this user's, one sub-folder per
PILOTFISH_HOME; a folder another user made first, a link planted in its place or a folder open to others is passed
over (made by a real other user: setpriv --reuid=65534); and the portal's rate limits live there, not in the home."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from portal import node_local
from portal.node_local import node_local_dir
from portal.proxy.relay import Relay

NOBODY = 65534


def as_nobody(*command: str) -> None:
    subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command], check=True,
                   timeout=30)


@pytest.fixture
def shared():
    """A folder every user may make things in (as /tmp and /dev/shm are: sticky, world-writable)."""
    folder = Path(tempfile.mkdtemp(prefix="pilotfish-shared-"))
    folder.chmod(0o1777)
    yield folder
    shutil.rmtree(folder)


def test_the_first_private_folder_is_used_one_sub_folder_per_home(shared, tmp_path):
    first, second = shared / "first", shared / "second"
    found = node_local_dir(tmp_path / "home-a", [first, second])
    assert found.parent == first and stat.S_IMODE(first.stat().st_mode) == 0o700
    assert stat.S_IMODE(found.stat().st_mode) == 0o700 and found.stat().st_uid == os.getuid()
    assert node_local_dir(tmp_path / "home-a", [first, second]) == found  # the same home, the same folder
    assert node_local_dir(tmp_path / "home-b", [first, second]) not in (found, tmp_path / "home-b")
    assert not second.exists()


def test_a_folder_another_user_made_first_a_planted_link_or_an_open_folder_is_passed_over(shared, tmp_path):
    taken, linked, opened, good = shared / "taken", shared / "linked", shared / "opened", shared / "good"
    as_nobody("mkdir", "-m", "0700", str(taken))  # another user got there first
    decoy = tmp_path / "decoy"
    decoy.mkdir(mode=0o700)
    as_nobody("ln", "-s", str(decoy), str(linked))  # a link to a folder of ours, planted by another user
    opened.mkdir()
    opened.chmod(0o777)
    found = node_local_dir(tmp_path / "home", [taken, linked, opened, good])
    assert found.parent == good
    assert list(decoy.iterdir()) == [] and stat.S_IMODE(opened.stat().st_mode) == 0o777  # nothing used or changed


def test_with_no_private_folder_the_home_is_used(shared, tmp_path):
    as_nobody("mkdir", "-m", "0700", str(shared / "taken"))
    home = tmp_path / "home"
    assert node_local_dir(home, [shared / "taken"]) == home


def test_the_default_places_are_the_runtime_folder_then_memory_then_the_temporary_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert node_local.candidates()[:2] == [tmp_path / "run" / "pilotfish", Path(f"/dev/shm/pilotfish-{os.getuid()}")]
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert node_local.candidates()[0] == Path(f"/dev/shm/pilotfish-{os.getuid()}")


def test_the_portals_rate_limits_are_kept_in_the_nodes_folder_not_the_home(app, tmp_path):
    relay = Relay(app)
    home = app.config["PILOTFISH"].home
    assert relay.rate_limits.path == node_local_dir(home) / "rate_limits"
    assert Path(home) not in relay.rate_limits.path.parents
    assert relay.rate_limits.admit("limited", 10, None) == 0.0
    assert stat.S_IMODE(relay.rate_limits.path.stat().st_mode) == 0o600
