"""``memory://``: objects held in this process's memory (fsspec's memory filesystem).

Handy for tests and notebooks. Contents are per process and vanish with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import IO, Any

from mlstore.backends._fsspec import FsspecBackend
from mlstore.errors import IsADirectoryError_
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
        created: Any = raw.get("created")
        stamp = created.timestamp() if hasattr(created, "timestamp") else created
        return f"{stamp}-{raw.get('size')}"

    def _refuse_directory(self, url: URL) -> None:
        # fsspec's memory file system would put a file beside the directory's entries,
        # and hide them; a local disk refuses, and so does this.
        if self.fs.isdir(self._path(url)):
            raise IsADirectoryError_.at(url, "write")

    def open_write(self, url: URL) -> IO[bytes]:
        self._refuse_directory(url)
        return super().open_write(url)

    def write(self, url: URL, data: bytes) -> None:
        self._refuse_directory(url)
        super().write(url, data)

    def copy(self, src: URL, dst: URL) -> None:
        self._refuse_directory(dst)
        super().copy(src, dst)
