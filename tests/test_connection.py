"""portal.connection, the one owner of connection.json: written 0600 and atomically, read back, removed only by the
portal it describes, and read leniently where a missing or odd file just means "no URL"."""
import json
import os
import stat

import pytest

from portal.connection import (FILE_NAME, connection_path, portal_url, read_connection, remove_connection,
                               write_connection)


def test_written_private_read_back_and_removed_by_its_own_portal_only(tmp_path):
    path = write_connection(tmp_path, "node7", 8765, "secret", "/node/node7/8765", pid=4242)
    assert path == tmp_path / FILE_NAME == connection_path(tmp_path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [entry.name for entry in tmp_path.iterdir()] == [FILE_NAME]  # no temporary file left behind
    data = read_connection(tmp_path)
    assert data["url"] == "http://node7:8765/node/node7/8765" and data["token"] == "secret" and data["pid"] == 4242
    assert portal_url(tmp_path) == "http://node7:8765/node/node7/8765"
    remove_connection(tmp_path, pid=1)  # another portal's exit: the file stays
    assert path.exists()
    remove_connection(tmp_path, pid=4242)
    assert not path.exists()
    remove_connection(tmp_path, pid=4242)  # nothing to remove: no error


def test_the_default_home_is_pilotfish_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PILOTFISH_HOME", str(tmp_path))
    assert connection_path() == tmp_path / FILE_NAME


@pytest.mark.parametrize("content", [None, "not json", "[1, 2]", '{"token": "t"}', '{"url": 7}', '{"url": ""}'])
def test_no_url_without_a_readable_file_that_names_one(tmp_path, content):
    if content is not None:
        (tmp_path / FILE_NAME).write_text(content)
    assert portal_url(tmp_path) is None


def test_reading_says_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_connection(tmp_path)
    (tmp_path / FILE_NAME).write_text(json.dumps(["url"]))
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_connection(tmp_path)
