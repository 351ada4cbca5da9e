"""One process's engine: the parts of :mod:`mlstore._engine` wired together.

A Store keeps its :class:`Runtime` in a :class:`~mlstore._util.process.PerProcess`, so a
forked DataLoader worker builds its own (its own clients, metrics, breaker and cache
handles) the first time it uses the Store, and never touches its parent's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from mlstore._engine.cached import CACHED_PROTOCOLS, CachedReads
from mlstore._engine.calls import Calls
from mlstore._engine.identity import Identity
from mlstore._engine.listing import Listing
from mlstore._engine.multipart import PartPlan
from mlstore._engine.reader import Reader
from mlstore._engine.replicas import CircuitBreaker, Replicas, Resolved, resolve
from mlstore._engine.warming import end_plan, schedule, warm
from mlstore._engine.writer import Made, Writer
from mlstore.backends.base import ObjectInfo
from mlstore.cache.tiered import TieredCache
from mlstore.config import StoreConfig
from mlstore.errors import NotFoundError
from mlstore.metrics import Metrics
from mlstore.url import URL, parse_url

__all__ = ["Runtime"]


class Runtime:
    """Everything a Store needs in one process.

    Args:
        config: the Store's configuration.
        clock: monotonic seconds for retries and the breaker (wall-clock seconds for the
            cache's ``checked`` times when given); injectable so tests need no waiting.
        sleep: waits between retry attempts.
    """

    def __init__(
        self,
        config: StoreConfig,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self.metrics = Metrics()
        self.calls = Calls(
            config, self.metrics, clock=clock or time.monotonic, sleep=sleep or time.sleep
        )
        breaker = CircuitBreaker(
            threshold=config.replica_failures,
            cooldown=config.replica_cooldown,
            clock=clock or time.monotonic,
        )
        self.replicas = Replicas(self.calls, breaker)
        self.reader = Reader(self.calls, self.replicas)
        # Mount prefixes parsed once, not on every resolve.
        self.mounts = {
            name: tuple(parse_url(p) for p in prefixes) for name, prefixes in config.mounts.items()
        }
        self.listing = Listing(self.calls, self.replicas, self.resolve, self.exists)
        self.writer = Writer(
            calls=self.calls,
            reader=self.reader,
            resolve=self.resolve,
            locate=self.locate,
            invalidate=self.invalidate,
            block_size=config.cache.block_size,
            plan=PartPlan.of(config),
            copy_pool=(config.max_workers, lambda: self.pool("copy")),
            dedupe_from=config.dedupe_writes,
        )
        self.identity = Identity(config)
        #: The cached read path, once something needed it (``None`` before).
        self.cached: CachedReads | None = None
        #: Node keys of URL strings read through the cache, for the memory-hit path.
        #: URL strings read before: their node keys and the keys their policies go by.
        self.node_keys: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._pools: dict[str, ThreadPoolExecutor] = {}

    def resolve(self, url: URL) -> Resolved:
        return resolve(url, self.mounts)

    # ------------------------------------------------------------------ the cache

    def cache_reads(self) -> CachedReads:
        """The cached read path (built on first use: it opens the node's disk tier)."""
        cached = self.cached
        if cached is None:
            with self._lock:
                cached = self.cached
                if cached is None:
                    tiered = TieredCache(
                        self.config.cache, self.metrics, clock=self._clock or time.time
                    )
                    workers = self.config.max_workers
                    cached = CachedReads(self.reader, tiered, self.metrics, workers, self.identity)
                    self.cached = cached
        return cached

    def cached_for(self, where: Resolved) -> CachedReads | None:
        """The cached read path for ``where``, or ``None`` when it is read directly."""
        if not self.config.cache.enabled or where.primary.protocol not in CACHED_PROTOCOLS:
            return None
        return self.cache_reads()

    def remember(self, url: str, where: Resolved) -> None:
        """Note the node key of the URL string ``url``, so its next hit needs no
        parsing (bounded: the notes start over past 65,536 URLs)."""
        if len(self.node_keys) >= 65536:
            self.node_keys.clear()
        self.node_keys[url] = (self.identity.key(where.primary), where.key)

    def warm(self, where: Resolved, version: str | None = None) -> int:
        """Fill the node cache with ``where`` (see :mod:`.warming`); bytes fetched.
        An object that is not cached (local, memory, or the cache off) is not read."""
        reads = self.cached_for(where)
        return 0 if reads is None else warm(reads, where, version)

    def plan_reads(
        self, plan: str, position: int | None, uses: list[tuple[Resolved, int | None]]
    ) -> None:
        """Share reader ``plan``'s position and next uses with the node's eviction
        (``position`` ``None``: the plan ended); nothing without a disk tier."""
        if not self.config.cache.enabled:
            return
        reads = self.cache_reads()
        if position is None:
            end_plan(reads, plan)
        else:
            cached = [(w, due) for w, due in uses if self.cached_for(w) is not None]
            schedule(reads, plan, position, cached)

    def pool(self, kind: str) -> ThreadPoolExecutor:
        """This process's pool of ``max_workers`` threads for ``kind`` of work
        (``"read"``: ``read_many``; ``"prefetch"``: background warms; ``"copy"``: the
        objects of recursive copies), made on first use and kept: threads, and their
        index connections, are not made per call."""
        pool = self._pools.get(kind)
        if pool is None:
            with self._lock:
                pool = self._pools.get(kind)
                if pool is None:
                    workers = self.config.max_workers
                    pool = ThreadPoolExecutor(workers, thread_name_prefix=f"mlstore-{kind}")
                    self._pools[kind] = pool
        return pool

    def locate(self, where: Resolved) -> tuple[URL, ObjectInfo]:
        """The answering replica and the object's info, through the metadata cache."""
        reads = self.cached_for(where)
        return reads.located_info(where) if reads is not None else self.reader.locate(where)

    def exists(self, where: Resolved) -> bool:
        try:
            self.locate(where)
        except NotFoundError:
            return False
        return True

    def invalidate(
        self, where: Resolved, made: Made | None = None, data: bytes | memoryview | None = None
    ) -> None:
        """Forget what is cached of ``where`` and of the physical URLs behind it, here
        and in the node's index, even if this process has read nothing yet: the next
        reader on the node, in any process, must see this Store's write. What the write
        ``made`` (versions and content hashes) is recorded as proven; with
        ``write_through``, the written ``data`` is kept on disk as those versions."""
        if not self.config.cache.enabled:
            return
        if not any(r.protocol in CACHED_PROTOCOLS for r in where.replicas):
            return
        cached = self.cache_reads()
        cached.invalidate(where, made)
        if data is not None and made and self.config.cache.write_through:
            self._keep_written(cached, made, data)

    def _keep_written(self, cached: CachedReads, made: Made, data: bytes | memoryview) -> None:
        """The written bytes on the node's disk as each version the write made, stamped
        never checked: a pinned read of that version is served with no request, and any
        other read asks the store for the current version first (one HEAD, no GET), so
        a later write from elsewhere is still seen. A copy that cannot be kept (no
        room, the disk tier failing) is simply not kept."""
        disk = cached.cache.disk
        if disk is None:
            return
        payload = data if type(data) is bytes else bytes(data)
        for physical, (version, digest) in made.items():
            if physical.protocol not in CACHED_PROTOCOLS:
                continue
            try:
                disk.put(self.identity.key(physical), version, payload, digest, checked=0.0)
            except OSError:  # DiskFullError, DiskNoRoomError, DiskUnavailableError
                self.metrics.add("write_through_skipped", "disk")
            else:
                self.metrics.add("written_through", "disk")

    def close(self) -> None:
        """Release clients, connections and cache handles (they are rebuilt on use)."""
        with self._lock:
            pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        self.calls.close()
        with self._lock:
            cached, self.cached = self.cached, None
        if cached is not None:
            cached.close()
