"""When a cached copy may be served without asking the store, and the revalidations
that keep it so.

Under ``validate="ttl"`` a copy checked less than ``ttl`` seconds ago is served as it is.
Past the ttl, for ``stale_while_revalidate`` seconds more, it is still served at once,
and one process on the node checks it with the store in the background
(:class:`Revalidations`): the same version restamps the node's entry, so every process
trusts it for another ttl; another version (or none) drops the entry, so the next read
fetches. Past that window the copy is checked before it is served, as it always is
when the window is ``0``.

"One process on the node" is a claim in the disk index (``DiskTier.claim``): taken by
exactly one process while the entry still carries the stamp it saw, lapsing by itself
if its holder dies. A process that loses the claim serves the copy and leaves the check
to the holder, so a node pays one conditional request per object per ttl, however many
of its processes read the object.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mlstore._util.process import PerProcess
from mlstore._util.redact import redact_url
from mlstore.errors import NotFoundError

if TYPE_CHECKING:
    from mlstore.cache.disk import DiskTier
    from mlstore.cache.memory import MemoryTier
    from mlstore.config import CacheConfig
    from mlstore.metrics import Metrics

__all__ = ["CLOCK_SKEW", "Freshness", "Revalidations", "servable_stale", "trusted"]

log = logging.getLogger("mlstore.cache")

#: Seconds a ``checked`` stamp may lie ahead of this process's clock and still be
#: trusted (the ordinary skew between processes); a stamp further ahead is revalidated.
CLOCK_SKEW = 1.0
#: Seconds a claim on a revalidation lasts if its holder never releases it (it died).
_CLAIM = 60.0
#: Seconds a process leaves a key alone after another process claimed its revalidation
#: (it reads the restamped entry meanwhile; asking again would only contend the index).
_ELSEWHERE = 2.0
#: Revalidations waiting in one process; past this a stale hit schedules none (a later
#: hit will, and the window bounds the staleness anyway).
_QUEUE = 1024


def trusted(validate: str, ttl: float, checked: float, now: float, absent: bool = False) -> bool:
    """Whether a copy (or a metadata answer) last checked at ``checked`` is given at
    ``now`` without asking the store.

    Under ``"ttl"`` a stamp later than ``now`` by more than :data:`CLOCK_SKEW` is not
    trusted: it was written by a clock that ran ahead (a filler on a skewed clock, NTP
    stepping back after a VM resume), and trusting it would stretch the ttl by the whole
    skew. Such a copy is revalidated, which restamps it with this clock. An ``absent``
    answer (nothing there) is trusted for ``ttl`` even under ``"never"``: that policy
    says objects do not change, not that none will appear (a job waiting for a
    checkpoint).
    """
    if validate == "always":
        return False
    if validate == "never" and not absent:
        return True
    return -CLOCK_SKEW <= now - checked < ttl


def servable_stale(validate: str, ttl: float, window: float, checked: float, now: float) -> bool:
    """Whether an untrusted copy may still be served while it is revalidated in the
    background: under ``"ttl"``, past the ttl by less than ``window`` seconds. A ttl of
    0 asks for a check on every read: no window then."""
    if validate != "ttl" or window <= 0 or ttl <= 0:
        return False
    return ttl <= now - checked < ttl + window


class _Worker:
    """One process's background thread and its queue of revalidations."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[tuple[str, Callable[[], None]] | None] = queue.SimpleQueue()
        self.pending: set[str] = set()
        self.elsewhere: dict[str, float] = {}
        self.lock = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="mlstore-revalidate", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.jobs.get()
            if item is None:
                return
            key, job = item
            failed = False
            try:
                job()
            except Exception:  # a failed check leaves the copy stale: never a failed read
                failed = True
                log.debug("background revalidation of %s failed", redact_url(key), exc_info=True)
            finally:
                with self.lock:
                    self.pending.discard(key)
                    if failed:  # not again at once: the store is failing (and retried)
                        self.elsewhere[key] = time.monotonic() + _ELSEWHERE
                    self.lock.notify_all()


class Revalidations:
    """Revalidations run in the background, one per key per node at a time.

    Args:
        claim: ``claim(key, seen_stamp, until)`` takes the node's revalidation of
            ``key`` (the disk tier's :meth:`~mlstore.cache.disk.DiskTier.claim`), or
            ``None`` with no disk tier (then each process checks its own copies).
        release: gives a claim back.
        clock: wall-clock seconds (the stamps' clock).
    """

    def __init__(
        self,
        claim: Callable[[str, float, float], bool] | None,
        release: Callable[[str], None] | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._claim = claim
        self._release = release
        self._clock = clock
        self._worker: PerProcess[_Worker] = PerProcess(_Worker)
        self._closed = False

    def schedule(self, key: str, seen: float, check: Callable[[], None]) -> bool:
        """Run ``check()`` in the background unless this process already runs one for
        ``key`` or another process on the node holds its claim. ``seen`` is the stamp
        of the copy being served. True if this process took the revalidation."""
        if self._closed:
            return False
        worker = self._worker.get()
        now = time.monotonic()
        with worker.lock:
            if key in worker.pending or len(worker.pending) >= _QUEUE:
                return False
            if worker.elsewhere.get(key, 0.0) > now:
                return False
            worker.pending.add(key)
        if self._claim is not None and not self._claim(key, seen, self._clock() + _CLAIM):
            with worker.lock:
                worker.pending.discard(key)
                worker.elsewhere[key] = now + _ELSEWHERE
                if len(worker.elsewhere) > _QUEUE:
                    worker.elsewhere = {k: t for k, t in worker.elsewhere.items() if t > now}
                worker.lock.notify_all()
            return False
        worker.jobs.put((key, self._released(key, check)))
        return True

    def _released(self, key: str, check: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                if not self._closed:
                    check()
            finally:
                if self._release is not None and not self._closed:
                    self._release(key)

        return run

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until this process's background revalidations are done (or ``timeout``
        seconds pass): True if none is left."""
        worker = self._worker.peek()
        if worker is None:
            return True
        with worker.lock:
            return worker.lock.wait_for(lambda: not worker.pending, timeout)

    def close(self) -> None:
        """Run no more revalidations in this process (one under way finishes its request,
        and its result is dropped)."""
        self._closed = True
        worker = self._worker.peek()
        if worker is not None:
            worker.jobs.put(None)


class Freshness:
    """Judges cached copies by the consistency policy, and revalidates them (in line, or
    in the background within the stale window).

    Args:
        config: the cache configuration (``stale_while_revalidate``).
        metrics: where revalidations and stale copies are counted (label ``cache``).
        clock: wall-clock seconds (the stamps' clock, shared across processes).
        memory: the memory tier (a background check restamps or drops its copy).
        disk: the disk tier, or ``None``: its entries' stamps are the node's, and its
            index holds the claims on revalidations.
    """

    def __init__(
        self,
        config: CacheConfig,
        metrics: Metrics,
        clock: Callable[[], float],
        memory: MemoryTier[Any],
        disk: DiskTier | None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.memory = memory
        self.disk = disk
        self.revalidations = Revalidations(
            disk.claim if disk is not None else None,
            disk.release if disk is not None else None,
            clock,
        )

    def fresh(
        self,
        key: str,
        version: str | None,
        checked: float,
        revalidate: Callable[[], str | None] | None,
        immutable: bool,
        policy: tuple[str, float],
        *,
        in_memory: bool = False,
    ) -> float | None:
        """When the cached ``version`` was last known current, or None if it is stale:
        ``checked`` itself while the policy trusts it (or, within the stale window, while
        it is checked in the background); the node's newer stamp of the same version
        (another process checked it); now, after a successful HEAD."""
        now = self.clock()
        if immutable or revalidate is None or trusted(*policy, checked, now):
            return checked
        if in_memory and self.disk is not None:  # this copy's stamp, or the node's?
            entry = self.disk.lookup(key)
            if entry is not None and entry.version == version and entry.checked > checked:
                checked = entry.checked
                if trusted(*policy, checked, now):
                    return checked
        if self.stale_served(key, version, checked, revalidate, policy, now):
            return checked
        self.metrics.add("revalidations", "cache")
        current = revalidate()
        if current is not None and current == version:
            if self.disk is not None:
                self.disk.touch_entry(key)
            return self.clock()
        self.metrics.add("stale", "cache")
        return None

    def stale_served(
        self,
        key: str,
        version: str | None,
        checked: float,
        revalidate: Callable[[], str | None],
        policy: tuple[str, float],
        now: float,
    ) -> bool:
        """Whether the untrusted copy (of ``version``, stamped ``checked``) is within
        the stale window: then it is served, and checked in the background."""
        if version is None:  # no version: no check can prove the copy current
            return False
        if not servable_stale(*policy, self.config.stale_while_revalidate, checked, now):
            return False
        self.metrics.add("stale_served", "cache")
        check = functools.partial(self._check, key, version, revalidate)
        self.revalidations.schedule(key, checked, check)
        return True

    def _check(self, key: str, version: str | None, revalidate: Callable[[], str | None]) -> None:
        """A background revalidation of the copy of ``version`` of ``key``: restamped
        (on the node and here) if the store still has it, dropped if not."""
        self.metrics.add("revalidations", "cache")
        try:
            current = revalidate()
        except NotFoundError:
            current = None
        if current is not None and current == version:
            stamp = self.clock()
            if self.disk is not None:
                self.disk.touch_entry(key)
            item = self.memory.get(key)
            if item is not None and item[0].version == version:
                self.memory.update_meta(key, dataclasses.replace(item[0], checked=stamp))
            return
        self.metrics.add("stale", "cache")
        self.memory.discard(key)
        if self.disk is not None:
            self.disk.forget(key)

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until this process's background revalidations are done."""
        return self.revalidations.settle(timeout)

    def close(self) -> None:
        self.revalidations.close()
