"""``PrefetchSampler``: warms the node cache in the order the sampler will ask.

A DataLoader's sampler runs in the main process and knows, before any worker does,
which samples come next. Wrapping it lets the main process warm the node-wide disk
cache with the next ``lookahead`` samples of that order while the workers read the
current batches: the workers then find their samples on disk. The number of requests in
flight is ``concurrency`` whatever the number of workers, so two workers hide a
store's latency as well as many would.

Bounds: at most ``lookahead`` samples ahead of the sampler's position, at most
``concurrency`` warms at a time and at most ``max_bytes`` of them in flight (their
bytes sit in memory between the response and the disk). A sample the node already holds
costs one index lookup. Prefetching stops with the epoch: nothing of the next epoch is
fetched before the sampler is iterated again, and a loop that breaks early cancels the
warms not yet started. A warm that fails is counted and dropped: the worker's own read
fetches, retries and reports as usual.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import threading
import uuid
from collections.abc import Iterator, Sized
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch.utils.data

from mlstore.errors import ConfigError
from mlstore.store import Store, default_store
from mlstore.torch._plan import Plan, flat

__all__ = ["PrefetchSampler"]

log = logging.getLogger("mlstore.torch")
MiB = 1 << 20
#: Bytes assumed for a sample whose size is not known before its first warm.
_GUESS = MiB


class Addressed(Protocol):
    """What the sampler needs of a dataset: each sample's URL and pinned version
    (:class:`~mlstore.torch.MapDataset` has both)."""

    def url(self, i: int) -> str: ...

    def version(self, i: int) -> str | None: ...


class PrefetchSampler(torch.utils.data.Sampler[Any]):  # type: ignore[misc,unused-ignore]
    """``sampler``'s order, unchanged, with the next samples warmed in the node cache.

    Args:
        sampler: any sampler or iterable of indices (``RandomSampler``,
            ``DistributedSampler``, a user's), or of lists of indices (a batch sampler:
            pass the result as ``batch_sampler=``). ``set_epoch`` is passed on.
        dataset: the dataset the indices address: it must have ``url(i)`` and
            ``version(i)`` (:class:`~mlstore.torch.MapDataset` does).
        lookahead: how many samples ahead of the sampler's position to warm.
        concurrency: warms in flight at most (threads of the main process).
        max_bytes: bytes of warms in flight at most (sizes from the manifest when the
            dataset has one, else the mean of the samples seen so far).
        store: the Store to warm through (default: the dataset's, else the default).
        plan: share the order with the node cache, so that when the dataset does not
            fit, eviction keeps the samples wanted soonest (Belady) rather than the
            ones read last (LRU); see :mod:`mlstore.torch._plan`.

    Examples:
        >>> import mlstore
        >>> from torch.utils.data import DataLoader, SequentialSampler
        >>> from mlstore.torch import MapDataset, PrefetchSampler
        >>> for i in range(4):
        ...     mlstore.write_bytes(f"memory://prefetch-doc/{i}.bin", bytes([i]))
        >>> ds = MapDataset("memory://prefetch-doc/")
        >>> sampler = PrefetchSampler(SequentialSampler(ds), ds, lookahead=2)
        >>> [b"".join(batch) for batch in DataLoader(ds, sampler=sampler, batch_size=2)]
        [b'\\x00\\x01', b'\\x02\\x03']
    """

    def __init__(
        self,
        sampler: Any,
        dataset: Addressed,
        *,
        lookahead: int = 256,
        concurrency: int = 16,
        max_bytes: int = 256 * MiB,
        store: Store | None = None,
        plan: bool = True,
    ) -> None:
        for name, value in (("lookahead", lookahead), ("concurrency", concurrency)):
            if value < 1:
                raise ConfigError(f"PrefetchSampler {name} must be at least 1, got {value}")
        if max_bytes < 1:
            raise ConfigError(f"PrefetchSampler max_bytes must be positive, got {max_bytes}")
        if not (callable(getattr(dataset, "url", None)) and hasattr(dataset, "version")):
            raise ConfigError(
                "PrefetchSampler needs a dataset with url(i) and version(i), such as "
                f"mlstore.torch.MapDataset; got {type(dataset).__name__}"
            )
        self.sampler = sampler
        self.dataset = dataset
        self.lookahead = lookahead
        self.concurrency = concurrency
        self.max_bytes = max_bytes
        self.store = store
        self.plan = plan
        self.plan_name = uuid.uuid4().hex
        self._base = 0  # samples handed out in the epochs before this one
        #: Counts over this sampler's life: ``warmed`` (samples fetched into the node
        #: cache), ``held`` (already there), ``bytes`` fetched, ``failed`` warms,
        #: ``late`` (dropped: the consumer was handed the sample before its warm began).
        self.counts: collections.Counter[str] = collections.Counter()
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._run: _Run | None = None

    def __len__(self) -> int:
        if not isinstance(self.sampler, Sized):
            raise TypeError(f"{type(self.sampler).__name__} has no len()")
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        """Pass ``epoch`` on to the wrapped sampler (``DistributedSampler`` needs it)."""
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pool"], state["_lock"], state["_run"] = None, None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _store(self) -> Store:
        if self.store is not None:
            return self.store
        own = getattr(self.dataset, "store", None)
        return own if isinstance(own, Store) else default_store()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.concurrency, thread_name_prefix="mlstore-sampler"
                )
            return self._pool

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until the warms already started have finished (at most ``timeout``
        seconds); whether they all did."""
        run = self._run
        if run is None:
            return True
        with run.lock:
            pending = list(run.pending)
        return not concurrent.futures.wait(pending, timeout).not_done

    def close(self) -> None:
        """Forget this sampler's plan on the node now (it would lapse in 10 minutes)."""
        if self.plan:
            self._store().plan_reads(self.plan_name, None)

    def __iter__(self) -> Iterator[Any]:
        run = self._run = _Run(self, self._store(), self._executor())
        try:
            for item in run.order:
                run.advance(item)
                yield item
        finally:
            run.stop()


class _Run:
    """One epoch's prefetching: the sampler's order read ahead into a window."""

    def __init__(self, owner: PrefetchSampler, store: Store, pool: ThreadPoolExecutor) -> None:
        self.owner = owner
        self.store = store
        self.pool = pool
        self.source = iter(owner.sampler)
        self.window: collections.deque[Any] = collections.deque()  # items read ahead
        self.pending: set[Future[int]] = set()
        self.in_flight = 0  # bytes reserved by pending warms
        #: (index, position in this epoch) to warm, in the sampler's order
        self.queued: collections.deque[tuple[int, int]] = collections.deque()
        self.read = 0  # positions read ahead from the sampler this epoch
        self.taken = 0  # positions handed to the consumer this epoch
        self.plan = (
            Plan(store, owner.dataset, owner.plan_name, owner._base, lag=owner.lookahead)
            if owner.plan
            else None
        )
        self.sizes = getattr(getattr(owner.dataset, "manifest", None), "_sizes", None)
        self.lock = threading.Lock()
        self.exhausted = False

    @property
    def order(self) -> Iterator[Any]:
        """The sampler's items, in its order (read ahead of the consumer)."""
        while True:
            if not self.window:
                self._read_ahead(1)
                if not self.window:
                    return
            yield self.window.popleft()

    def _read_ahead(self, count: int) -> None:
        while not self.exhausted and len(self.window) < count:
            try:
                item = next(self.source)
            except StopIteration:
                self.exhausted = True
                return
            self.window.append(item)
            for i in flat(item):
                self.queued.append((i, self.read))
                self.read += 1
                if self.plan is not None:
                    self.plan.ahead(i)

    def advance(self, item: Any) -> None:
        """The consumer takes ``item``: read ahead and start the warms that fit."""
        indices = flat(item)
        self.taken += len(indices)
        if self.plan is not None:
            self.plan.handed_out(indices, self.owner.sampler)
        self._read_ahead(max(1, self.owner.lookahead // max(1, len(indices))))
        if self.plan is not None:
            self.plan.flush()
        while self.queued and self.queued[0][1] < self.taken:
            # Warms fell behind the consumer: it reads this sample itself. Warming it
            # now would fetch a sample already read (evicted since, under a plan).
            self.queued.popleft()
            with self.lock:
                self.owner.counts["late"] += 1
        while self.queued and len(self.pending) < self.owner.concurrency:
            i = self.queued[0][0]
            size = self._size(i)
            with self.lock:
                if self.pending and self.in_flight + size > self.owner.max_bytes:
                    return
                self.in_flight += size
            self.queued.popleft()
            future = self.pool.submit(self._warm, i)
            with self.lock:
                self.pending.add(future)
            future.add_done_callback(functools.partial(self._done, size=size))

    def _size(self, i: int) -> int:
        if self.sizes is not None:
            return max(1, int(self.sizes[i]))
        counts = self.owner.counts
        return counts["bytes"] // counts["warmed"] if counts["warmed"] else _GUESS

    def _warm(self, i: int) -> int:
        dataset = self.owner.dataset
        return self.store.warm(dataset.url(i), version=dataset.version(i))

    def _done(self, future: Future[int], size: int) -> None:
        counts = self.owner.counts
        with self.lock:
            self.pending.discard(future)
            self.in_flight -= size
            if future.cancelled():
                return
            error = future.exception()
            if error is not None:
                counts["failed"] += 1
            elif future.result():
                counts["warmed"] += 1
                counts["bytes"] += future.result()
            else:
                counts["held"] += 1
        if error is not None:
            log.debug("prefetch failed (the read will report it): %s", error)

    def stop(self) -> None:
        """The epoch ended or the loop broke: start nothing more."""
        self.queued.clear()
        with self.lock:
            pending = list(self.pending)
        for future in pending:
            future.cancel()
        if self.plan is not None:
            self.owner._base = self.plan.finish()
