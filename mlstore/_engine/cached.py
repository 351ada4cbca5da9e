"""The cached read path: reads through the tiered cache, handed a :class:`Reader`.

Remote objects (s3, gs, az, http) are cached; local files and ``memory://`` are read
directly (caching them would only copy bytes that are already local).

- Objects up to ``CacheConfig.block_threshold`` are cached whole: one GET fills them,
  and ranged reads slice the cached bytes.
- Larger objects are cached as aligned blocks of ``block_size``, each keyed by the
  object's version, so only the blocks a reader touches are fetched, and a block can
  never mix two versions. Sequential reads through ``open()`` fetch the next blocks in
  the background (readahead). An object without a version (http without a strong ETag)
  has no blocks: ``open()`` reads it whole, and a range of it is read uncached.
- Metadata (``info``, ``exists`` and ``ls`` answers, negative ones included) is cached
  under the same consistency policy as data: in a small LRU per process, in front of the
  node-wide metadata tier (:mod:`mlstore.cache.metadata`). A write or delete through
  mlstore drops what the node holds of the URL, so the next process sees it.

This module knows the cache and a :class:`Source` (the narrow seam through which a miss
reaches the storage: a :class:`~mlstore._engine.reader.Reader`), never the Store.
"""

from __future__ import annotations

import functools
import io
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, Protocol, TypeVar

from mlstore._engine.answers import (
    decode_listing,
    decode_located,
    directories,
    encode_listing,
    encode_located,
)
from mlstore._engine.identity import CACHED_PROTOCOLS, Identity
from mlstore._engine.replicas import Resolved
from mlstore._engine.writer import Made
from mlstore._util.files import SeekableRaw
from mlstore._util.redact import redact_url
from mlstore.backends.base import ObjectInfo
from mlstore.cache.metadata import ABSENT, NodeMetadata, Remembered
from mlstore.cache.tiered import Fetched, TieredCache
from mlstore.errors import CorruptBodyError, IsADirectoryError_, NotFoundError
from mlstore.hashing import BlockDigests, stale_metadata
from mlstore.metrics import Metrics
from mlstore.url import URL

__all__ = ["CACHED_PROTOCOLS", "INFO_ENTRIES", "LISTING_ENTRIES", "CachedReads"]

#: ``info`` answers kept in each process's front (about 0.5 KiB each); the node tier
#: behind it holds many more, bounded by ``CacheConfig.metadata_bytes``.
INFO_ENTRIES = 4096
#: Listings kept in each process's front (a listing may hold many entries: fewer).
LISTING_ENTRIES = 64
_READAHEAD_BLOCKS = 2
#: Fetches of one block that fails its digests before the read fails.
_BLOCK_ATTEMPTS = 3
_BUFFER = 256 * 1024

Policy = tuple[str, float]
T = TypeVar("T")


class Source(Protocol):
    """The narrow seam through which a miss reaches the storage (in practice a
    :class:`~mlstore._engine.reader.Reader`): three kinds of read, nothing else."""

    def locate(self, where: Resolved) -> tuple[URL, ObjectInfo]:
        """The replica that answers for ``where`` and the object's info there."""

    def fetch_whole(self, where: Resolved, version: str | None = None) -> tuple[bytes, str | None]:
        """The whole object and the version those bytes are (pinned to ``version``)."""

    def read_pinned(self, target: URL, start: int, end: int, version: str | None) -> bytes:
        """Bytes ``[start, end)`` of one physical URL, pinned to ``version``."""


class CachedReads:
    """Cached reads in one process.

    Args:
        reader: reads from the storage on a miss (a :class:`Source`).
        cache: the tiered cache.
        metrics: where metadata hits are counted.
        workers: threads that fetch the blocks of one read in parallel (2 to 8).
        identity: names objects on the node (their node keys).

    Data and metadata are kept under node keys (:mod:`.identity`): the physical object,
    in the scope of this Store's endpoint and credentials. Consistency policies are
    looked up by the URL as the caller named it.
    """

    def __init__(
        self,
        reader: Source,
        cache: TieredCache,
        metrics: Metrics,
        workers: int,
        identity: Identity,
    ) -> None:
        self.reader = reader
        self.identity = identity
        self.cache = cache
        self.config = cache.config
        self.metrics = metrics
        self._workers = max(2, min(8, workers))
        node = None
        if cache.disk is not None and self.config.metadata_bytes > 0:
            node = NodeMetadata(
                self.config.resolved_disk_dir,
                self.config.metadata_bytes,
                lambda name, n: metrics.add(name, "metadata", n),
            )
        self._info: Remembered[tuple[URL, ObjectInfo]] = Remembered(
            "info", INFO_ENTRIES, node, encode_located, decode_located
        )
        self._listings: Remembered[list[ObjectInfo]] = Remembered(
            "ls", LISTING_ENTRIES, node, encode_listing, decode_listing
        )
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def policy(self, where: Resolved) -> Policy:
        """The consistency policy (``validate``, ``ttl``) for ``where``."""
        return self.config.policy_for(where.key)

    def known(self, where: Resolved, node: str | None = None) -> ObjectInfo | None:
        """The info this process last reported for ``where`` (whose node key is
        ``node``, when the caller has it), if it still has it: the cached bytes it
        serves must be of that version."""
        return self._known(node if node is not None else self.node(where))

    def _known(self, node: str) -> ObjectInfo | None:
        remembered = self._info.get(node)
        answer = remembered[0] if remembered is not None else None
        return answer[1] if isinstance(answer, tuple) else None

    def hit(self, node: str, name: str) -> bytes | None:
        """A trusted hit of the object whose node key is ``node``, read as the URL
        ``name`` (its policy's), or ``None``: then the usual path decides."""
        known = self._known(node)
        version = known.version if known is not None else None
        return self.cache.hit(node, self.config.policy_for(name), version)

    def node(self, where: Resolved) -> str:
        """The node key of ``where`` (its primary replica's object, in this scope)."""
        return self.identity.key(where.primary)

    # ------------------------------------------------------------------ metadata

    def located_info(self, where: Resolved, policy: Policy | None = None) -> tuple[URL, ObjectInfo]:
        """The physical replica that answered and the object's info, cached per policy
        (an object found missing is remembered as missing, and raises again).

        When the store reports a version that this process holds other bytes of in
        memory, those bytes are dropped: what is served must be of the reported version.
        """
        node = self.node(where)

        def locate() -> tuple[URL, ObjectInfo]:
            target, info = self.reader.locate(where)
            held = self.cache.memory.get(node)
            if held is not None and held[0].version != info.version:
                self.cache.memory.discard(node)
            return target, info

        return self._remembered(self._info, node, policy or self.policy(where), locate, where)

    def listing(self, where: Resolved, fetch: Callable[[], list[ObjectInfo]]) -> list[ObjectInfo]:
        """``ls`` entries of ``where``, cached under the consistency policy (keyed by the
        primary replica's node key: two endpoints never share a listing)."""
        return self._remembered(self._listings, self.node(where), self.policy(where), fetch)

    def _remembered(
        self,
        memo: Remembered[T],
        key: str,
        policy: Policy,
        fetch: Callable[[], T],
        where: Resolved | None = None,
    ) -> T:
        """``fetch()``, or what it returned before while the policy still trusts that.
        With ``where``, a :class:`NotFoundError` is remembered too (and raised again)."""
        validate, ttl = policy
        now = self.cache.clock()
        hit = memo.lookup(key, validate, ttl, now)
        if hit is not None:
            self.metrics.add("hits", "metadata")
            if hit is ABSENT:
                assert where is not None  # only info answers are ever absent
                raise NotFoundError("no such object or directory", url=where.key, operation="info")
            return hit  # type: ignore[return-value]
        since = time.time()  # before asking: a write after this fences off the answer
        try:
            value = fetch()
        except NotFoundError:
            if where is not None:
                memo.put(key, ABSENT, validate, ttl, now, since)
            raise
        memo.put(key, value, validate, ttl, now, since)
        return value

    def invalidate(self, where: Resolved, made: Made | None = None) -> None:
        """Forget what this process and the node hold of ``where`` (written or deleted
        here), its replicas and every directory above them (a prefix remembered as
        missing exists once written below); record the versions a write ``made``."""
        self._listings.front.clear()  # any listing may have shown it
        dropped: list[str] = []
        for physical in where.replicas:
            node = self.identity.key(physical)
            above = [self.identity.key(d) for d in directories(physical)]
            for key in (node, *above):
                self._info.front.pop(key)
            self.cache.memory.discard(node)
            if self.cache.disk is not None:
                self.cache.disk.forget(node)
                if made and physical in made:
                    self.cache.disk.prove(node, *made[physical])
            dropped += self._info.node_keys([node, *above])
            dropped += self._listings.node_keys(above)
        if self._info.node is not None:
            self._info.node.drop(dropped)

    # ------------------------------------------------------------------ reads

    def read(self, where: Resolved, start: int | None, end: int | None) -> bytes:
        if start is None and end is None:
            return self.whole(where)
        node = self.node(where)
        known = self.known(where, node)
        data = self.cache.peek(node, known.version if known is not None else None)
        if data is not None:
            return data[start:end]
        policy = self.policy(where)
        target, info = self.located_info(where, policy)
        if info.is_dir:
            raise IsADirectoryError_.at(where.key, "read")
        if info.size <= self.config.block_threshold:
            return self.whole(where, policy)[start:end]
        lo, hi, _ = slice(start, end).indices(info.size)
        if hi <= lo:
            return b""
        if info.version is None:  # no version to key blocks by: one request, not cached
            return self.reader.read_pinned(target, lo, hi, None)
        return self._blocks(target, info, lo, hi)

    def whole(
        self, where: Resolved, policy: Policy | None = None, *, keep_in_memory: bool = True
    ) -> bytes:
        key = self.node(where)
        policy = policy or self.policy(where)
        # If this object's metadata is already known and names its content (mlstore
        # wrote it), identical content cached under any other URL serves it: no GET.
        known = self.known(where, key)
        found = self.cache.hit(key, policy, known.version if known is not None else None)
        if found is not None:
            return found

        def fetch() -> Fetched:
            data, version = self.reader.fetch_whole(where)
            return Fetched(data, version)

        revalidate = functools.partial(self._current_version, where, key, policy)
        return self.cache.get(
            key,
            fetch,
            revalidate=revalidate,
            known_hash=known.content_hash if known is not None else None,
            known_version=known.version if known is not None else None,
            policy=policy,
            keep_in_memory=keep_in_memory,
            expect_version=known.version if known is not None else None,
        )

    def _current_version(self, where: Resolved, key: str, policy: Policy) -> str | None:
        """The store's current version of ``where`` (node key ``key``): one HEAD, whose
        answer replaces what is remembered of it."""
        self._info.pop(key)
        return self.located_info(where, policy)[1].version

    def pinned_hit(self, where: Resolved, version: str) -> bytes | None:
        """A cached copy of ``version`` of ``where``, or ``None`` (no request made)."""
        return self.cache.pinned_hit(self.node(where), version, self.policy(where))

    def pinned(self, where: Resolved, version: str, *, keep_in_memory: bool = True) -> bytes:
        """The whole object at ``where`` as of ``version``: from the cache if a copy of
        that version is there (never revalidated), else one GET pinned to it (a changed
        object raises :class:`~mlstore.errors.PreconditionFailedError`)."""

        def fetch() -> Fetched:
            return Fetched(*self.reader.fetch_whole(where, version))

        node, policy = self.node(where), self.policy(where)
        return self.cache.pinned(node, version, fetch, policy, keep_in_memory=keep_in_memory)

    def open(self, where: Resolved) -> IO[bytes]:
        key = where.key
        policy = self.policy(where)  # looked up once for the whole open
        # Cached and trusted under the policy: no request at all (not even the HEAD
        # that would tell whole-object from blocks).
        refetch = functools.partial(self.whole, where, policy)
        node = self.node(where)
        known = self.known(where, node)
        fh = self.cache.open_fresh(
            node,
            policy,
            refetch,
            name=key,
            expect_version=known.version if known is not None else None,
            revalidate=functools.partial(self._current_version, where, node, policy),
        )
        if fh is not None:
            return fh
        target, info = self.located_info(where, policy)
        if info.is_dir:
            raise IsADirectoryError_.at(key, "open")
        if info.size > self.config.block_threshold and info.version is not None:
            return self._block_file(target, info)  # an unversioned object is read whole
        whole = io.BytesIO(self.whole(where, policy))  # shares the bytes; never written
        whole.name = redact_url(key)  # shown by repr(): never the URL's credentials
        return whole

    def open_pinned(self, where: Resolved, version: str) -> IO[bytes] | None:
        """``version`` of the object at ``where`` as a file, through the cache: a
        whole copy of that version if the node holds one (no request), else cached as
        a read of the current object would be, when that is still ``version``;
        ``None`` when it is not (the caller reads the old version uncached, or fails)."""
        node, policy = self.node(where), self.policy(where)
        if not self.cache.has(node, policy, version):
            target, info = self.located_info(where, policy)
            if info.is_dir or info.version != version:
                return None
            if info.size > self.config.block_threshold:
                return self._block_file(target, info)
        whole = io.BytesIO(self.pinned(where, version))
        whole.name = redact_url(where.key)
        return whole

    # ------------------------------------------------------------------ blocks

    def _block(
        self, target: URL, info: ObjectInfo, index: int, *, streaming: bool = False
    ) -> bytes:
        size = self.config.block_size
        lo = index * size
        hi = min(lo + size, info.size)
        key = f"{self.identity.key(target)}\x00{info.version}\x00{size}:{index}"

        def fetch() -> Fetched:
            return Fetched(self._checked_block(target, info, lo, hi), info.version)

        return self.cache.get(key, fetch, immutable=True, keep_in_memory=not streaming)

    def _checked_block(self, target: URL, info: ObjectInfo, lo: int, hi: int) -> bytes:
        """Bytes ``[lo, hi)`` of a pinned version, checked against the block digests
        mlstore recorded when it wrote the object, before they are cached node-wide.

        Without digests that cover the block (an object mlstore did not write, or a block
        size that is not a multiple of the digests' block) the fill is counted as
        ``unverified_fills``. A block that fails its digests is fetched again: other
        bytes that pass were damaged in transit the first time; the same bytes twice
        mean the digests are stale (a tool rewrote the object and kept its metadata),
        and those bytes, which the store holds, are served.
        """
        data = self.reader.read_pinned(target, lo, hi, info.version)
        digests = BlockDigests.parse(info.block_digests)
        verdict = digests.check(lo, data, info.size) if digests is not None else None
        if verdict is None:
            self.metrics.add("unverified_fills", "cache")
            return data
        assert digests is not None
        attempts = 1
        while not verdict:
            self.metrics.add("integrity_failures", "cache")
            if attempts >= _BLOCK_ATTEMPTS:
                raise CorruptBodyError(
                    f"bytes {lo}-{hi} failed their recorded digest {attempts} times",
                    url=redact_url(str(target)),
                    operation="read",
                )
            again = self.reader.read_pinned(target, lo, hi, info.version)
            attempts += 1
            if again == data:
                stale_metadata(target, "block digests")
                return again
            data = again
            verdict = digests.check(lo, data, info.size)
        return data

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
                        self._workers,
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
        if self._info.node is not None:
            self._info.node.close()
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
        self.name = redact_url(str(target))
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
