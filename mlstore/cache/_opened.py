"""Opening a cached object as a file, for :class:`~mlstore.cache.tiered.TieredCache`
(a mixin): the bytes in memory, or a large disk entry's blob as a verified file."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

from mlstore._util.redact import redact_url
from mlstore.cache.blobfile import BlobFile
from mlstore.cache.freshness import trusted

if TYPE_CHECKING:
    from mlstore.cache.disk import DiskEntry, DiskTier
    from mlstore.cache.freshness import Freshness
    from mlstore.metrics import Metrics

__all__ = ["OpenedHits"]

#: Disk entries at least this large are opened as files over their blob, not loaded.
_FILE_MIN = 4 * 1024 * 1024


class OpenedHits:
    """Files over cached bytes (the attributes below are the tiered cache's)."""

    disk: DiskTier | None
    metrics: Metrics
    freshness: Freshness
    clock: Callable[[], float]

    if TYPE_CHECKING:

        def peek(self, key: str, expect_version: str | None = None) -> bytes | None: ...

        def _disk_hit(
            self,
            key: str,
            entry: DiskEntry,
            checked: float,
            policy: tuple[str, float],
            *,
            keep_in_memory: bool,
        ) -> bytes | None: ...

    def open_fresh(
        self,
        key: str,
        policy: tuple[str, float],
        refetch: Callable[[], bytes],
        *,
        name: str | None = None,
        expect_version: str | None = None,
        revalidate: Callable[[], str | None] | None = None,
    ) -> IO[bytes] | None:
        """A file over the cached bytes of ``key`` if ``policy`` trusts them without a
        request to the store; ``None`` otherwise (the caller takes the usual path). The
        file is named ``name`` (default: the key). With ``revalidate``, a copy within
        the stale window is served too, and checked in the background.

        A large disk entry is served from its blob file (verified before any byte is
        returned; ``refetch`` gets the object anew if it fails), not loaded into memory.
        """
        label = key if name is None else name
        data = self.peek(key, expect_version)
        if data is not None:
            return _named(io.BytesIO(data), label)
        if self.disk is None:
            return None
        entry = self.disk.lookup(key)
        if entry is None or _other_version(entry.version, expect_version):
            return None
        now = self.clock()
        if not trusted(*policy, entry.checked, now) and not (
            revalidate is not None
            and self.freshness.stale_served(
                key, entry.version, entry.checked, revalidate, policy, now
            )
        ):
            return None
        if entry.size < _FILE_MIN:
            found = self._disk_hit(key, entry, entry.checked, policy, keep_in_memory=True)
            return _named(io.BytesIO(found), label) if found is not None else None
        disk = self.disk

        def corrupt() -> None:
            self.metrics.add("integrity_failures", "disk")
            disk.drop_blob(entry.hash)

        try:
            fh = BlobFile(
                disk.blob_path(entry.hash),
                entry.hash,
                entry.size,
                name=redact_url(label),
                on_corrupt=corrupt,
                refetch=refetch,
            )
        except FileNotFoundError:
            return None
        disk.touch_blob(entry.hash)
        self.metrics.served("disk", entry.size, key)
        return io.BufferedReader(fh, buffer_size=256 * 1024)


def _other_version(cached: str | None, expected: str | None) -> bool:
    """Whether a copy of version ``cached`` is not the ``expected`` one (when known)."""
    return expected is not None and cached != expected


def _named(fh: io.BytesIO, key: str) -> io.BytesIO:
    fh.name = redact_url(key)  # a file's name is shown: never the URL's credentials
    return fh
