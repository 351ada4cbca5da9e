"""The Store's read path through the tiered cache.

Remote objects (s3, gs, az, http) are cached; local files and ``memory://`` are read
directly (caching them would only copy bytes that are already local).

- Objects up to ``CacheConfig.block_threshold`` are cached whole: one GET fills them,
  and ranged reads slice the cached bytes.
- Larger objects are cached as aligned blocks of ``block_size``, each keyed by the
  object's version, so only the blocks a reader touches are fetched, and a block can
  never mix two versions. Sequential reads through ``open()`` fetch the next blocks in
  the background (readahead).
- Metadata (``info`` and ``ls``) is cached per process under the same consistency policy
  as data; this Store's own writes and deletes invalidate it.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, TYPE_CHECKING, Any

from mlstore._util.files import SeekableRaw
from mlstore.backends.base import ObjectInfo
from mlstore.cache.tiered import Fetched, TieredCache
from mlstore.errors import IsADirectoryError_
from mlstore.url import URL

if TYPE_CHECKING:
    from mlstore.store import Store

__all__ = ["CACHED_PROTOCOLS", "CachedReads"]

CACHED_PROTOCOLS = frozenset({"s3", "gs", "az", "http", "https"})
_READAHEAD_BLOCKS = 2
_BUFFER = 256 * 1024


class CachedReads:
    """Cached reads for one Store in one process."""

    def __init__(self, store: Store, cache: TieredCache) -> None:
        self.store = store
        self.cache = cache
        self.config = cache.config
        self._info: dict[str, tuple[URL, ObjectInfo, float]] = {}
        self._listings: dict[str, tuple[list[ObjectInfo], float]] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ metadata

    def located_info(self, url: URL) -> tuple[URL, ObjectInfo]:
        """The physical replica that answered and the object's info, cached per policy."""
        key = str(url)
        policy, ttl = self.config.policy_for(key)
        now = self.cache.clock()
        if policy != "always":
            with self._lock:
                hit = self._info.get(key)
            if hit is not None and (policy == "never" or now - hit[2] < ttl):
                self.store._metrics.add("hits", "metadata")
                return hit[0], hit[1]
        target, info = self.store._locate(url)
        if policy != "always":
            with self._lock:
                self._info[key] = (target, info, now)
        return target, info

    def listing(self, url: URL, fetch: Callable[[], list[ObjectInfo]]) -> list[ObjectInfo]:
        """``ls`` entries of ``url``, cached per process under the consistency policy."""
        key = str(url)
        policy, ttl = self.config.policy_for(key)
        now = self.cache.clock()
        if policy != "always":
            with self._lock:
                hit = self._listings.get(key)
            if hit is not None and (policy == "never" or now - hit[1] < ttl):
                self.store._metrics.add("hits", "metadata")
                return hit[0]
        entries = fetch()
        if policy != "always":
            with self._lock:
                self._listings[key] = (entries, now)
        return entries

    def invalidate(self, url: URL) -> None:
        """Forget what is cached of ``url`` (after this Store wrote or deleted it)."""
        key = str(url)
        with self._lock:
            self._info.pop(key, None)
            self._listings.clear()  # any listing may have shown it
        self.cache.memory.discard(key)
        if self.cache.disk is not None:
            self.cache.disk.forget(key)

    # ------------------------------------------------------------------ reads

    def read(self, url: URL, start: int | None, end: int | None) -> bytes:
        key = str(url)
        if start is None and end is None:
            return self.whole(url)
        data = self.cache.peek(key)
        if data is not None:
            return data[start:end]
        target, info = self.located_info(url)
        if info.is_dir:
            raise IsADirectoryError_(
                "this is a directory; use ls() to list it", url=key, operation="read"
            )
        if info.size <= self.config.block_threshold:
            return self.whole(url)[start:end]
        lo, hi, _ = slice(start, end).indices(info.size)
        if hi <= lo:
            return b""
        return self._blocks(target, info, lo, hi)

    def whole(self, url: URL) -> bytes:
        key = str(url)

        def fetch() -> Fetched:
            data, version = self.store._fetch_whole(url)
            return Fetched(data, version)

        def revalidate() -> str | None:
            with self._lock:
                self._info.pop(key, None)
            return self.located_info(url)[1].version

        # If this object's metadata is already known and names its content (mlstore
        # wrote it), identical content cached under any other URL serves it: no GET.
        with self._lock:
            known = self._info.get(key)
        return self.cache.get(
            key,
            fetch,
            revalidate=revalidate,
            known_hash=known[1].content_hash if known is not None else None,
            known_version=known[1].version if known is not None else None,
            policy=self.config.policy_for(key),
        )

    def open(self, url: URL) -> IO[bytes]:
        key = str(url)
        # Cached and trusted under the policy: no request at all (not even the HEAD
        # that would tell whole-object from blocks).
        fh = self.cache.open_fresh(key, self.config.policy_for(key), lambda: self.whole(url))
        if fh is not None:
            return fh
        target, info = self.located_info(url)
        if info.is_dir:
            raise IsADirectoryError_(
                "this is a directory; use ls() to list it", url=key, operation="open"
            )
        if info.size > self.config.block_threshold:
            return self._block_file(target, info)
        whole = io.BytesIO(self.whole(url))  # shares the bytes; a BytesIO never writes them
        whole.name = key
        return whole

    # ------------------------------------------------------------------ blocks

    def _block(
        self, target: URL, info: ObjectInfo, index: int, *, streaming: bool = False
    ) -> bytes:
        size = self.config.block_size
        lo = index * size
        hi = min(lo + size, info.size)
        key = f"{target}\x00{info.version}\x00{size}:{index}"

        def fetch() -> Fetched:
            return Fetched(self.store._read_pinned(target, lo, hi, info.version), info.version)

        return self.cache.get(key, fetch, immutable=True, keep_in_memory=not streaming)

    def _blocks(self, target: URL, info: ObjectInfo, lo: int, hi: int) -> bytes:
        size = self.config.block_size
        first, last = lo // size, (hi - 1) // size
        indices = range(first, last + 1)
        if len(indices) == 1:
            parts = [self._block(target, info, first)]
        else:
            parts = list(self._executor().map(lambda i: self._block(target, info, i), indices))
        joined = parts[0] if len(parts) == 1 else b"".join(parts)
        offset = first * size
        return joined[lo - offset : hi - offset]

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        max(2, min(8, self.store.config.max_workers)),
                        thread_name_prefix="mlstore-block",
                    )
        return self._pool

    def _block_file(self, target: URL, info: ObjectInfo) -> IO[bytes]:
        raw = _BlockReader(self, target, info)
        # A small buffer: a read after a seek copies little; large reads bypass it.
        return io.BufferedReader(raw, buffer_size=min(self.config.block_size, _BUFFER))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self.cache.close()


def _count(info: ObjectInfo, size: int) -> int:
    return -(-info.size // size)


class _BlockReader(SeekableRaw):
    """A raw, seekable view of a large object, served block by block from the cache.

    A read never crosses a block boundary (raw reads may be short), so touching one
    byte fetches one block. Reading forward fetches the next blocks in the background.
    """

    def __init__(self, owner: CachedReads, target: URL, info: ObjectInfo) -> None:
        super().__init__()
        self._owner = owner
        self._target = target
        self._info = info
        self._block_size = owner.config.block_size
        self._blocks = _count(info, self._block_size)
        self._pos = 0
        self._last = -1  # a reader starting at byte 0 is reading forward
        self._current: tuple[int, bytes] = (-1, b"")
        self._pending: dict[int, Future[bytes]] = {}
        self.name = str(target)
        self.size = info.size

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self.size:
            return 0
        index, offset = divmod(self._pos, self._block_size)
        block = self._get(index)
        view = memoryview(buffer).cast("B")
        n = min(len(view), len(block) - offset)
        view[:n] = block[offset : offset + n]
        self._pos += n
        return n

    def _get(self, index: int) -> bytes:
        if index == self._current[0]:
            return self._current[1]
        sequential = index == self._last + 1
        future = self._pending.pop(index, None)
        # A reader going forward streams: its blocks go to the disk tier only. A reader
        # jumping around keeps them in memory too, for the next jump back.
        block = future.result() if future is not None else self._fetch(index, sequential)
        if sequential:  # reading forward: fetch what comes next
            pool = self._owner._executor()
            for ahead in range(index + 1, min(index + 1 + _READAHEAD_BLOCKS, self._blocks)):
                if ahead not in self._pending:
                    self._pending[ahead] = pool.submit(self._fetch, ahead, True)
        self._last = index
        self._current = (index, block)
        return block

    def _fetch(self, index: int, streaming: bool) -> bytes:
        return self._owner._block(self._target, self._info, index, streaming=streaming)

    def readall(self) -> bytes:
        parts = []
        while self._pos < self.size:
            index, offset = divmod(self._pos, self._block_size)
            block = self._get(index)
            parts.append(block[offset:] if offset else block)
            self._pos += len(block) - offset
        return b"".join(parts)

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._current = (-1, b"")
        super().close()
