"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

import mlstore


@pytest.fixture(autouse=True)
def _isolated_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Each test sees no MLSTORE_* settings from the machine, a private cache dir, and
    a fresh default Store."""
    for name in list(os.environ):
        if name.startswith("MLSTORE_") and name != "MLSTORE_REQUIRE_EMULATORS":
            monkeypatch.delenv(name)
    monkeypatch.setenv("MLSTORE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    mlstore.set_default_store(None)
    yield
    mlstore.set_default_store(None)


@pytest.fixture
def store() -> Iterator[mlstore.Store]:
    with mlstore.Store() as s:
        yield s


@pytest.fixture
def mem_root() -> Iterator[str]:
    """A fresh ``memory://`` prefix, emptied afterwards."""
    root = f"memory://t-{uuid.uuid4().hex[:12]}"
    yield root
    s = mlstore.Store()
    if s.exists(root):
        s.rm(root, recursive=True)
