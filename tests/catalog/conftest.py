"""Fixtures of the catalog tests: an isolated Hugging Face environment, cache/home folders and a fake Hub."""
from __future__ import annotations

import pytest

from tests.support.fake_hub import FakeHub


@pytest.fixture(autouse=True)
def hf_environment(tmp_path, monkeypatch):
    """No stored token, endpoint or offline flag of the machine leaks into a test."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for name in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_HUB_DISABLE_XET",
                 "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def dirs(tmp_path):
    """(cache_dir, home_dir), both empty."""
    cache, home = tmp_path / "cache", tmp_path / "home"
    (cache / "models").mkdir(parents=True)
    (home / "models").mkdir(parents=True)
    return cache, home


@pytest.fixture
def hub():
    with FakeHub() as server:
        yield server
