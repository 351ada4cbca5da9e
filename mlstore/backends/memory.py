"""``memory://``: objects held in this process's memory (fsspec's memory filesystem).

Handy for tests and notebooks. Contents are per process and vanish with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlstore.backends._fsspec import FsspecBackend
from mlstore.url import URL

__all__ = ["MemoryBackend"]


class MemoryBackend(FsspecBackend):
    protocol = "memory"

    def _make_fs(self) -> Any:
        from fsspec.implementations.memory import MemoryFileSystem

        return MemoryFileSystem()

    def _path(self, url: URL) -> str:
        return "/" + url.path.rstrip("/")

    def _url(self, path: str) -> URL:
        return URL("memory", "", path.lstrip("/"))

    def _version(self, raw: Mapping[str, Any]) -> str | None:
        created = raw.get("created")
        stamp = created.timestamp() if hasattr(created, "timestamp") else created
        return f"{stamp}-{raw.get('size')}"
