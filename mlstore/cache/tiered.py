"""The tiered cache: memory tier, then disk tier, then one single-flight fetch.

The Store hands :meth:`TieredCache.get` a key, a ``fetch`` function (one request to the
store, returning the bytes and the version they belong to) and, where the consistency
policy needs it, a ``revalidate`` function (one HEAD, returning the current version).
The cache knows no cloud.

Consistency policies (``CacheConfig.validate``):

- ``"never"``: a cached object is trusted for ever (immutable datasets);
- ``"ttl"``: trusted for ``ttl`` seconds after it was fetched or last checked, then
  checked with one HEAD: same version, trusted again; new version, refetched. For
  ``stale_while_revalidate`` seconds past the ttl the copy is served at once while one
  process on the node makes that check in the background (:mod:`.freshness`). A copy
  stamped in the future (a clock that ran ahead) is checked at once;
- ``"always"``: checked with a HEAD on every read.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from mlstore.cache._opened import OpenedHits, _other_version
from mlstore.cache.disk import (
    DiskEntry,
    DiskFullError,
    DiskTier,
    DiskUnavailableError,
    claim_cache_dir,
)
from mlstore.cache.display import CacheDisplay
from mlstore.cache.flight import SingleFlight
from mlstore.cache.freshness import Freshness, trusted
from mlstore.cache.memory import MemoryTier
from mlstore.cache.tenancy import disk_tier_class, tenant_root
from mlstore.config import CacheConfig
from mlstore.hashing import content_hash
from mlstore.metrics import Metrics

__all__ = ["Fetched", "TieredCache"]

log = logging.getLogger("mlstore.cache")

#: How many keys read once from disk are remembered, so a second read admits them to
#: the memory tier. A key read only once (an epoch over a dataset larger than memory)
#: never costs a memory-tier copy.
_SEEN_KEYS = 65536


@dataclass(frozen=True)
class Fetched:
    """What one fetch brought back: the bytes and the version they are."""

    data: bytes
    version: str | None


@dataclass(frozen=True)
class _Meta:
    version: str | None
    hash: str
    checked: float
    validate: str
    ttl: float


class TieredCache(CacheDisplay, OpenedHits):
    """Memory tier + disk tier + single-flight, with one consistency policy.

    Args:
        config: the cache configuration.
        metrics: where hits, misses and the rest are counted (labels ``memory``,
            ``disk`` and ``cache``).
        clock: wall-clock seconds (``checked`` times are shared between processes).
        sleep: used while waiting for another process's fill.
    """

    def __init__(
        self,
        config: CacheConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.memory: MemoryTier[_Meta] = MemoryTier(
            config.memory_bytes, lambda name, n: metrics.add(name, "memory", n)
        )
        self.disk: DiskTier | None = None
        self.flight: SingleFlight
        root = tenant_root(config)  # config.resolved_disk_dir, its tenants/ made
        if config.disk_bytes > 0:
            self.disk = disk_tier_class(config)(
                root,
                config.disk_bytes,
                verify=config.verify == "always",
                clock=clock,
                on_event=lambda name, n: metrics.add(name, "disk", n),
                caps_all=config.caps_all,
            )
        else:  # memory tier only: the directory still holds the single-flight locks
            self._make_lock_dir()
        self.flight = SingleFlight(
            os.path.join(root, "locks"), sleep=sleep, repair=self._repair_lock_dir
        )
        self._warned_full = False
        self._warn_lock = threading.Lock()
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._seen_lock = threading.Lock()
        self.freshness = Freshness(config, metrics, clock, self.memory, self.disk)
        metrics.attach(root)  # to the node's totals in the cache directory

    def _make_lock_dir(self) -> None:
        root = self.config.resolved_disk_dir
        claim_cache_dir(root)
        os.makedirs(os.path.join(root, "locks"), mode=0o700, exist_ok=True)

    def _repair_lock_dir(self) -> None:
        """Recreate the cache directory removed under us (the flight's lock files were
        in it): through the disk tier, which rebuilds its index too, if there is one."""
        if self.disk is not None:
            self.disk.recover(FileNotFoundError(f"{self.config.resolved_disk_dir} is gone"))
        else:
            self.metrics.add("cache_errors", "disk")
            self._make_lock_dir()

    # ------------------------------------------------------------------ lookups

    def peek(self, key: str, expect_version: str | None = None) -> bytes | None:
        """A memory-tier hit that needs no revalidation (and is of ``expect_version``,
        when given), or ``None`` (the fast path)."""
        item = self.memory.get(key)
        if item is None:
            return None
        meta, data = item
        if expect_version is not None and meta.version != expect_version:
            return None
        if trusted(meta.validate, meta.ttl, meta.checked, self.clock()):
            self.metrics.served("memory", len(data), key)
            return data
        return None

    def hit(
        self, key: str, policy: tuple[str, float], expect_version: str | None = None
    ) -> bytes | None:
        """A memory or disk hit that needs no request (trusted under ``policy``, of
        ``expect_version`` when given), or ``None``: then :meth:`get` decides (a stale
        copy, a miss). The hot path of every read: no closures, one index lookup."""
        found = self.peek(key, expect_version)
        if found is not None or self.disk is None:
            return found
        entry = self.disk.lookup(key)
        if entry is None or _other_version(entry.version, expect_version):
            return None
        if not trusted(*policy, entry.checked, self.clock()):
            return None
        return self._disk_hit(key, entry, entry.checked, policy, keep_in_memory=True)

    def has(self, key: str, policy: tuple[str, float], version: str | None = None) -> bool:
        """Whether the node holds a copy of ``key`` that a read would serve with no
        request: of ``version`` (any age) when given, else trusted under ``policy``.
        Looks at the index only (no blob is read) and counts as a use of the blob, so
        a prefetch keeps what it found. Without a disk tier, the memory tier."""
        if self.disk is None:
            item = self.memory.get(key)
            if item is None:
                return False
            meta = item[0]
            if version is not None:
                return meta.version == version
            return trusted(meta.validate, meta.ttl, meta.checked, self.clock())
        entry = self.disk.lookup(key)
        if entry is None:
            return False
        if version is not None:
            held = entry.version == version
        else:
            held = trusted(*policy, entry.checked, self.clock())
        if held:
            self.disk.touch_blob(entry.hash)
        return held

    def get(
        self,
        key: str,
        fetch: Callable[[], Fetched],
        *,
        revalidate: Callable[[], str | None] | None = None,
        known_hash: str | None = None,
        known_version: str | None = None,
        immutable: bool = False,
        policy: tuple[str, float] | None = None,
        keep_in_memory: bool = True,
        expect_version: str | None = None,
    ) -> bytes:
        """The bytes of ``key``: from memory, from disk, or fetched once per node.

        Args:
            fetch: fetches the whole value with its version.
            revalidate: returns the store's current version of ``key`` (a HEAD).
            known_hash: the content hash, if the store's metadata gave it: when this
                node has proven it for ``known_version`` (see :meth:`_proven`) and that
                content is already cached under any key, no fetch is made.
            known_version: the version that ``known_hash`` belongs to.
            immutable: the key names fixed content (a block of a pinned version):
                never revalidated.
            policy: ``(validate, ttl)`` for this key (default: the config's).
            keep_in_memory: False for data read once in a stream (the blocks of a
                large object read through ``open()``): it goes to the disk tier only,
                so streaming a large object does not fill this process's memory.
            expect_version: the version the caller already knows the object to be
                (it reported it): a copy of any other version is stale, whatever the
                policy, so the bytes always belong to the version the caller reports.
        """
        policy = policy or (self.config.validate, self.config.ttl)
        if revalidate is not None:
            revalidate = _once(revalidate)  # one HEAD per read, whichever tier asks
        found = self._lookup(key, revalidate, immutable, policy, keep_in_memory, expect_version)
        if found is not None:
            return found
        with self.flight.hold(key) as waited:
            if waited:
                self.metrics.add("single_flight_waits", "cache")
            # Look again even if the lock came at once: another filler may have finished
            # between our first look and our taking the lock.
            found = self._lookup(
                key, revalidate, immutable, policy, keep_in_memory, expect_version, after_wait=True
            )
            if found is not None:
                return found
            proven = known_hash if self._proven(key, known_hash, known_version) else None
            with self._content_lock(proven):
                return self._fill(key, fetch, proven, known_version, policy, keep_in_memory)

    def pinned(
        self,
        key: str,
        version: str,
        fetch: Callable[[], Fetched],
        policy: tuple[str, float],
        *,
        keep_in_memory: bool = True,
    ) -> bytes:
        """The bytes of ``version`` of ``key``: a cached copy of that version, whatever
        its age (the bytes of a version never change: no revalidation), else one
        ``fetch`` pinned to it, once per node.

        A pinned read proves only that the version exists, not that it is the current
        one (a GCS generation can be read after it was replaced), so its copy is stored
        as never checked: a read that is not pinned checks it with the store first.
        """
        found = self.pinned_hit(key, version, policy)
        if found is not None:
            return found
        with self.flight.hold(key) as waited:
            if waited:
                self.metrics.add("single_flight_waits", "cache")
            found = self.pinned_hit(key, version, policy)
            if found is not None:
                return found
            fetched = fetch()
            if fetched.version != version:  # a backend that could not tell: not cached
                return fetched.data
            self.metrics.add("misses", "cache")
            self.metrics.add("bytes_fetched", "cache", len(fetched.data))
            digest = content_hash(fetched.data)
            self._store(key, fetched, digest, policy, checked=0.0, keep_in_memory=keep_in_memory)
            return fetched.data

    def pinned_hit(self, key: str, version: str, policy: tuple[str, float]) -> bytes | None:
        """A copy of ``version``, in memory or on disk (kept under ``policy``'s rules
        for reads that are not pinned: its stamp is not renewed)."""
        item = self.memory.get(key)
        if item is not None and item[0].version == version:
            self.metrics.served("memory", len(item[1]), key)
            return item[1]
        if self.disk is None:
            return None
        entry = self.disk.lookup(key)
        if entry is None or entry.version != version:
            return None
        return self._disk_hit(key, entry, entry.checked, policy, keep_in_memory=True)

    def _fill(
        self,
        key: str,
        fetch: Callable[[], Fetched],
        known_hash: str | None,
        known_version: str | None,
        policy: tuple[str, float],
        keep_in_memory: bool,
    ) -> bytes:
        if known_hash is not None and self.disk is not None:  # proven for this version
            size = self.disk.blob_size(known_hash)
            data = self.disk.read_blob(known_hash, size) if size is not None else None
            if data is not None:
                self._store(key, Fetched(data, known_version), known_hash, policy, deduped=True)
                self.metrics.deduped(len(data), key)
                return data
        fetched = fetch()
        self.metrics.add("misses", "cache")
        self.metrics.add("bytes_fetched", "cache", len(fetched.data))
        self._store(key, fetched, content_hash(fetched.data), policy, keep_in_memory=keep_in_memory)
        return fetched.data

    def _proven(self, key: str, digest: str | None, version: str | None) -> bool:
        """Whether the hash the object's metadata names (``digest``) is proven to be the
        content of this ``version`` of ``key``, so a blob of it may serve the object
        without a GET. Metadata alone proves nothing: anyone who can write an object
        can write its metadata, and tools that rewrite an object keep it."""
        if digest is None or version is None or self.disk is None:
            return False
        return self.disk.proven(key, version) == digest

    def _content_lock(self, digest: str | None) -> contextlib.AbstractContextManager[object]:
        """Two URLs known to hold the same content are fetched once: the second waits
        for the first, then finds the blob. (Taken only after a key's flight lock and
        held while nothing else is locked, so it cannot deadlock.)"""
        if digest is None:
            return contextlib.nullcontext()
        return self.flight.hold_in_process(f"content:{digest}")

    def _lookup(
        self,
        key: str,
        revalidate: Callable[[], str | None] | None,
        immutable: bool,
        policy: tuple[str, float],
        keep_in_memory: bool = True,
        expect_version: str | None = None,
        *,
        after_wait: bool = False,
    ) -> bytes | None:
        item = self.memory.get(key)
        if item is not None:
            meta, data = item
            checked = (
                None
                if _other_version(meta.version, expect_version)
                else self.freshness.fresh(
                    key, meta.version, meta.checked, revalidate, immutable, policy, in_memory=True
                )
            )
            if checked is not None:
                if checked != meta.checked:  # just revalidated: trusted for another ttl
                    renewed = _Meta(meta.version, meta.hash, checked, *policy)
                    self.memory.update_meta(key, renewed)
                self.metrics.served("memory", len(data), key)
                return data
            self.memory.discard(key)
        if self.disk is None:
            return None
        entry = self.disk.lookup(key)
        if entry is None:
            return None
        # An entry a neighbour filled while we waited is as fresh as it gets.
        if _other_version(entry.version, expect_version):
            checked = None
        elif after_wait:
            checked = entry.checked
        else:
            checked = self.freshness.fresh(
                key, entry.version, entry.checked, revalidate, immutable, policy
            )
        if checked is None:
            self.disk.forget(key)
            return None
        return self._disk_hit(key, entry, checked, policy, keep_in_memory=keep_in_memory)

    def _disk_hit(
        self,
        key: str,
        entry: DiskEntry,
        checked: float,
        policy: tuple[str, float],
        *,
        keep_in_memory: bool,
    ) -> bytes | None:
        """The verified bytes of a fresh disk ``entry``, copied into the memory tier
        on a second read; ``None`` if its blob is gone or corrupt."""
        assert self.disk is not None
        blob = self.disk.read_blob(entry.hash, entry.size)
        if blob is None:  # evicted meanwhile, or corrupt (then dropped and counted)
            return None
        if keep_in_memory and self.memory.budget and self._second_touch(key):
            self.memory.put(key, _Meta(entry.version, entry.hash, checked, *policy), blob)
        self.metrics.served("disk", len(blob), key)
        return blob

    def _second_touch(self, key: str) -> bool:
        """True if ``key`` was served from disk before (recently): worth a memory copy."""
        with self._seen_lock:
            if key in self._seen:
                del self._seen[key]
                return True
            self._seen[key] = None
            if len(self._seen) > _SEEN_KEYS:
                self._seen.popitem(last=False)
            return False

    def _store(
        self,
        key: str,
        fetched: Fetched,
        digest: str,
        policy: tuple[str, float],
        *,
        deduped: bool = False,
        keep_in_memory: bool = True,
        checked: float | None = None,
    ) -> None:
        now = self.clock() if checked is None else checked
        if self.disk is not None:
            try:
                new_blob = self.disk.put(
                    key, fetched.version, fetched.data, digest, checked=checked
                )
            except DiskFullError:
                self._warn_disk_full()
                self.metrics.add("disk_full", "disk")
            except DiskUnavailableError:
                pass  # counted, logged and repaired by the disk tier: this read is a miss
            else:
                if not new_blob and not deduped:
                    # Same content already cached under another key: stored once.
                    self.metrics.add("dedupe_bytes_saved", "disk", len(fetched.data))
        if keep_in_memory or self.disk is None:
            self.memory.put(key, _Meta(fetched.version, digest, now, *policy), fetched.data)

    def _warn_disk_full(self) -> None:
        with self._warn_lock:
            if self._warned_full:
                return
            self._warned_full = True
        log.warning(
            "the cache directory %s is full: reads continue without the disk tier "
            "until space is freed (store.cache.prune() or a smaller disk_bytes)",
            self.config.resolved_disk_dir,
        )

    # ------------------------------------------------------------------ management

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until this process's background revalidations are done (at most
        ``timeout`` seconds): True if none is left. Reads never need this; it is for
        tests, benchmarks and a clean exit."""
        return self.freshness.settle(timeout)

    def close(self) -> None:
        """Release the disk tier's files (the cache stays on disk for the next user)."""
        self.freshness.close()
        self.metrics.detach(self.config.resolved_disk_dir)
        if self.disk is not None:
            self.disk.close()
        self.flight.close()

    def size(self) -> int:
        """Bytes in the disk tier (the memory tier if there is no disk tier)."""
        return self.disk.size() if self.disk is not None else self.memory.size()

    def clear(self) -> None:
        """Empty both tiers."""
        self.memory.clear()
        if self.disk is not None:
            self.disk.clear()

    def prune(self, to_bytes: int | None = None) -> int:
        """Evict least-recently-used data until the disk tier holds at most ``to_bytes``
        (default: its budget). Returns the bytes freed."""
        if self.disk is None:
            return 0
        return self.disk.evict(to_bytes)

    def verify(self) -> dict[str, int]:
        """Re-hash every disk blob, dropping bad ones: ``{"checked": n, "dropped": m}``."""
        if self.disk is None:
            return {"checked": 0, "dropped": 0}
        checked, dropped = self.disk.verify_all()
        return {"checked": checked, "dropped": dropped}


def _once(fn: Callable[[], str | None]) -> Callable[[], str | None]:
    memo: list[str | None] = []  # ``fn`` is called at most once; later calls, its answer

    def call() -> str | None:
        if not memo:
            memo.append(fn())
        return memo[0]

    return call
