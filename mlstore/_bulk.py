"""The Store's reads of many objects and its cache warming (a mixin of
:class:`~mlstore.store.Store`, kept apart so each module reads in one sitting).

``read_many`` serves what the cache already holds in the calling thread, with no
thread hand-off (a batch of hits costs what the hits cost), and hands only the rest to
this process's pool of ``max_workers`` threads, kept from one call to the next: a
pool made per call starts its threads again for every batch, and each new thread opens
its own connection to the node's cache index.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from mlstore._engine.replicas import Resolved
from mlstore._engine.runtime import Runtime
from mlstore._util.process import PerProcess
from mlstore.errors import ConfigError
from mlstore.url import URL, parse_url

if TYPE_CHECKING:
    from mlstore.config import StoreConfig

__all__ = ["BulkReads", "hot_hit"]

UrlLike = str | os.PathLike[str] | URL


def hot_hit(runtime: Runtime, url: str) -> bytes | None:
    """The bytes of the URL string ``url`` if it was read before and a trusted copy is
    cached (memory first, then disk); ``None`` otherwise. Parses nothing."""
    cached = runtime.cached
    if cached is None:
        return None
    named = runtime.node_keys.get(url)
    if named is None:
        return None
    hit = cached.cache.peek(named[0])
    return hit if hit is not None else cached.hit(*named)


def _pins(items: list[UrlLike], versions: Iterable[str | None] | None) -> list[str | None]:
    pins: list[str | None] = list(versions) if versions is not None else [None] * len(items)
    if len(pins) != len(items):
        raise ConfigError(f"got {len(items)} URLs but {len(pins)} versions")
    return pins


class BulkReads:
    """``read_many``, ``warm``, ``prefetch`` and ``plan_reads`` (see the Store)."""

    config: StoreConfig
    _runtime: PerProcess[Runtime]

    if TYPE_CHECKING:

        def read_bytes(
            self,
            url: UrlLike,
            start: int | None = None,
            end: int | None = None,
            *,
            version: str | None = None,
        ) -> bytes: ...

        def _where(self, url: UrlLike) -> tuple[Runtime, Resolved]: ...

    def read_many(
        self,
        urls: Iterable[UrlLike],
        *,
        versions: Iterable[str | None] | None = None,
        max_workers: int | None = None,
    ) -> list[bytes]:
        """Read many whole objects concurrently; results come back in input order.

        Args:
            versions: pin each read to the matching version, as ``read_bytes(url,
                version=...)`` does (``None`` entries read unpinned).
            max_workers: threads for this call (default: the Store's ``max_workers``,
                whose pool is kept between calls).

        Copies the cache holds are served in the calling thread; the rest are
        fetched concurrently. The first failure is raised (after the reads already
        started finish).
        """
        items = list(urls)
        pins = _pins(items, versions)
        runtime = self._runtime.get()
        out: list[bytes | None] = [None] * len(items)
        todo: list[int] = []
        for i, (url, pin) in enumerate(zip(items, pins, strict=True)):
            hit = self._cached(runtime, url, pin)
            if hit is None:
                todo.append(i)
            else:
                out[i] = hit
        workers = min(max_workers or self.config.max_workers, len(todo))
        if workers <= 1 or threading.current_thread().name.startswith("mlstore-read"):
            for i in todo:  # (a read_many inside the pool's own threads runs serially)
                out[i] = self.read_bytes(items[i], version=pins[i])
            return out  # type: ignore[return-value]
        own = None
        if max_workers is not None and max_workers != self.config.max_workers:
            own = ThreadPoolExecutor(workers, thread_name_prefix="mlstore-read")
        pool = own or runtime.pool("read")
        try:
            futures = {i: pool.submit(self.read_bytes, items[i], version=pins[i]) for i in todo}
            wait(futures.values())
        finally:
            if own is not None:
                own.shutdown(wait=False)
        for i, future in futures.items():
            out[i] = future.result()  # the first failure, in input order
        return out  # type: ignore[return-value]

    def _cached(self, runtime: Runtime, url: UrlLike, version: str | None) -> bytes | None:
        """A copy the cache serves with no request, or ``None`` (no request made)."""
        if version is None:
            return hot_hit(runtime, url) if type(url) is str else None
        if runtime.cached is None:
            return None
        where = runtime.resolve(parse_url(url))
        reads = runtime.cached_for(where)
        return reads.pinned_hit(where, version) if reads is not None else None

    def warm(self, url: UrlLike, *, version: str | None = None) -> int:
        """Fill the node cache with ``url`` without returning it; the bytes fetched
        (``0`` when the node already held a copy a read would serve).

        Caches exactly what ``read_bytes(url, version=version)`` would, for every
        process on the node, but keeps nothing in this process's memory tier: a
        DataLoader's main process warms what its workers will read. Objects that are
        not cached (local files, ``memory://``, or the cache turned off) are not read.
        A pinned warm of an object that changed raises
        :class:`~mlstore.errors.PreconditionFailedError`, as the read would.
        """
        runtime, where = self._where(url)
        return runtime.warm(where, version)

    def prefetch(
        self, urls: Iterable[UrlLike], *, versions: Iterable[str | None] | None = None
    ) -> Future[int]:
        """Warm ``urls`` in the background (see :meth:`warm`), each pinned to the
        matching entry of ``versions`` when given; returns at once.

        The returned future gives the total bytes fetched once every warm has finished,
        or the first error (the other warms still run; a failed warm leaves the later
        read to fetch, retry and report as usual). Ignore it to warm and forget.

        Examples:
            >>> from mlstore import Store
            >>> store = Store()
            >>> store.write_bytes("memory://docs/warm.txt", b"w")
            >>> store.prefetch(["memory://docs/warm.txt"]).result()
            0
        """
        items = list(urls)
        pins = _pins(items, versions)
        pool = self._runtime.get().pool("prefetch")
        futures = [pool.submit(self.warm, u, version=v) for u, v in zip(items, pins, strict=True)]
        done: Future[int] = Future()
        left = [len(futures)]
        lock = threading.Lock()

        def finished(_: Future[int]) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            errors = [f.exception() for f in futures if not f.cancelled() and f.exception()]
            if errors:
                done.set_exception(errors[0])
            else:
                done.set_result(sum(f.result() for f in futures if not f.cancelled()))

        if not futures:
            done.set_result(0)
        for f in futures:
            f.add_done_callback(finished)
        return done

    def plan_reads(
        self,
        plan: str,
        position: int | None,
        upcoming: Iterable[tuple[UrlLike, int | None]] = (),
    ) -> None:
        """Tell the node cache the order a reader will read in, so that eviction keeps
        what is wanted soonest (Belady's rule) rather than what was read last.

        Args:
            plan: names the reader (one per sampler; any string unique on the node).
            position: how many reads the reader has made so far, over its whole life
                (``None``: the reader is done; its plan is forgotten).
            upcoming: ``(url, due)``: the position of the next read of ``url``, or
                ``None`` if the reader will not read it again, as far as it knows.

        URLs the cache does not hold (local files, ``memory://``) are ignored. Blobs
        no live plan will read again are evicted first, by least recent use; then the
        planned ones, furthest next use first. A plan not renewed for 10 minutes
        lapses. :class:`mlstore.torch.PrefetchSampler` does this for a DataLoader.
        """
        runtime = self._runtime.get()
        resolved = [(runtime.resolve(parse_url(url)), due) for url, due in upcoming]
        runtime.plan_reads(plan, position, resolved)
