"""The live counters of one Store (:class:`Metrics`), and what each counter means.

Counters are plain integers behind one lock, keyed by a metric name and a label: a
backend protocol (``s3``) or a cache tier (``memory``). Never a URL: no key or secret
reaches a label. Request latencies go to fixed-bucket histograms keyed by operation and
protocol.

Besides the totals that :meth:`Metrics.snapshot` returns, a :class:`Metrics` remembers
how much of them it has already handed to the node's totals (:mod:`._node`), so that
each flush writes only the change since the last one.
"""

from __future__ import annotations

import bisect
import os
import threading
import weakref
from collections import Counter

from mlstore.metrics._stats import LATENCY_BOUNDS, OPERATIONS, Histogram, Stats

__all__ = ["METRICS", "Metrics", "protocol_of_key"]

#: Metric names and what they count (label: ``P`` a backend protocol, ``T`` a cache tier).
METRICS: dict[str, str] = {
    "requests": "P: requests made to a storage backend (attempts: a retry is another)",
    **{f"{op}_requests": f"P: {op} requests (part of requests)" for op in OPERATIONS},
    "errors": "P: requests that failed",
    "bytes_read": "P: bytes received from a storage backend",
    "bytes_written": "P: bytes sent to a storage backend",
    "retries": "P: attempts retried after a transient error",
    "throttles": "P: retries after the backend asked to slow down (503 SlowDown, 429)",
    "give_ups": "P: requests that failed after their last attempt",
    "resumes": "P: bodies that broke off and were resumed where they stopped",
    "restarts": "P: resumed reads that had to start over (the object changed)",
    "hedges": "P: hedged reads started (a second request for a slow one)",
    "hedge_wins": "P: hedged reads that answered first",
    "failovers": "P: reads that went on to the next replica of a mount",
    "saved_requests": "P: reads served by the cache without a GET (any tier, dedupe too)",
    "saved_bytes": "P: bytes of the reads the cache served without a GET",
    "copies_skipped": "P: copies skipped: the destination held the same content",
    "copy_bytes_skipped": "P: bytes of the copies skipped",
    "dedupe_uploads_skipped": "P: uploads skipped: the destination held the same content",
    "dedupe_bytes_skipped": "P: bytes of the uploads skipped",
    "integrity_failures": "P/T: bodies or cached blobs that failed their hash check",
    "hits": "T: reads served by a tier (memory, disk) or metadata answers cached",
    "bytes_served": "T: bytes served by a tier",
    "misses": "T (cache): reads that fetched from the storage",
    "bytes_fetched": "T (cache): bytes fetched from the storage on misses",
    "evictions": "T: entries (memory) or blobs (disk) evicted to stay within the budget",
    "disk_skips": "T (disk): fills not cached: no room could be made in the budget",
    "dedupe_hits": "T (cache): misses served by a blob of the same content (no GET)",
    "dedupe_bytes_saved": "T: bytes stored or fetched once for two keys of one content",
    "single_flight_waits": "T (cache): reads that waited for another fill of the same key",
    "revalidations": "T (cache): cached copies checked with the store (a HEAD)",
    "stale": "T (cache): cached copies found out of date",
    "stale_served": "T (cache): stale copies served while checked in the background",
    "prefetched": "T (cache): objects warmed into the cache",
    "prefetched_bytes": "T (cache): bytes warmed into the cache",
    "unverified_fills": "T (cache): fills whose content hash the store could not confirm",
    "written_through": "T (disk): writes kept on the node's disk as the version they made",
    "write_through_skipped": "T (disk): writes that could not be kept (no room, disk failing)",
    "disk_full": "T (disk): fills that found the cache's file system full",
    "cache_errors": "T (disk): index or directory failures, repaired (reads went on)",
    "disk_adopted": "T (disk): blob files a new index took back at start (its old one lost)",
}

# Every Metrics of this process, for the fork hook (weakly: a Metrics lives as its Store).
_ALL: weakref.WeakSet[Metrics] = weakref.WeakSet()


def protocol_of_key(key: str) -> str:
    """The protocol a cache key's URL names (``"s3"`` of ``"s3://b/k#scope"``), or
    ``"unknown"``: a metrics label, never more of the key."""
    i = key.find("://")
    proto = key[:i]
    return proto if 0 < i <= 16 and proto.isalnum() else "unknown"


class _Latency:
    """One histogram being filled (mutable; :meth:`frozen` makes a :class:`Histogram`)."""

    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BOUNDS) + 1)
        self.sum = 0.0
        self.count = 0

    def frozen(self) -> Histogram:
        return Histogram(LATENCY_BOUNDS, tuple(self.counts), self.sum, self.count)


class Metrics:
    """Thread-safe counters. One per Store and process.

    Every method takes the lock once: a cache hit costs one acquisition (``served``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()
        #: Hits by (tier, protocol of the key): [hits, bytes]. One dict lookup per hit;
        #: ``hits``, ``bytes_served``, ``saved_requests`` and ``saved_bytes`` are made of
        #: them when a snapshot is taken.
        self._served: dict[tuple[str, str], list[int]] = {}
        self._latency: dict[tuple[str, str], _Latency] = {}
        #: What the node's totals already hold of these counts (see ``_node``): a box,
        #: so that the finalizer that hands the rest over when this object is dropped
        #: (:func:`pending_of`) reads it without a reference to the object itself.
        self._handed: list[Stats] = [Stats()]
        _ALL.add(self)

    def add(self, name: str, protocol: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[(name, protocol)] += amount

    def served(self, tier: str, nbytes: int, key: str) -> None:
        """One hit of ``tier`` that served ``nbytes`` of cache key ``key``: ``hits`` and
        ``bytes_served`` of the tier, ``saved_requests`` and ``saved_bytes`` of the key's
        protocol, counted together (the hot path takes the lock once)."""
        where = (tier, protocol_of_key(key))
        with self._lock:
            cell = self._served.get(where)
            if cell is None:
                self._served[where] = [1, nbytes]
            else:
                cell[0] += 1
                cell[1] += nbytes

    def deduped(self, nbytes: int, key: str) -> None:
        """A miss of cache key ``key`` served without a GET by a cached blob of the
        same content: ``dedupe_hits`` and ``dedupe_bytes_saved`` of the cache,
        ``saved_requests`` and ``saved_bytes`` of the key's protocol."""
        proto = protocol_of_key(key)
        with self._lock:
            counts = self._counts
            counts[("dedupe_hits", "cache")] += 1
            counts[("dedupe_bytes_saved", "cache")] += nbytes
            counts[("saved_requests", proto)] += 1
            counts[("saved_bytes", proto)] += nbytes

    def request(self, op: str, protocol: str, seconds: float, *, failed: bool = False) -> None:
        """One request of ``op`` to ``protocol`` that took ``seconds`` (failed or not):
        ``requests``, ``{op}_requests`` (and ``errors``), and its latency bucket."""
        bucket = bisect.bisect_left(LATENCY_BOUNDS, seconds)
        with self._lock:
            counts = self._counts
            counts[("requests", protocol)] += 1
            counts[(f"{op}_requests", protocol)] += 1
            if failed:
                counts[("errors", protocol)] += 1
            hist = self._latency.get((op, protocol))
            if hist is None:
                hist = self._latency[(op, protocol)] = _Latency()
            hist.counts[bucket] += 1
            hist.sum += seconds
            hist.count += 1

    def _stats(self) -> Stats:  # under the lock
        return _frozen(self._counts, self._served, self._latency)

    def snapshot(self) -> Stats:
        with self._lock:
            return self._stats()

    def reset(self) -> None:
        """Start this Store's counters from zero (what the node has not been handed yet
        is still handed at the next flush)."""
        with self._lock:
            pending = self._stats() - self._handed[0]
            self._counts.clear()
            self._served.clear()
            self._latency.clear()
            self._handed[0] = Stats() - pending

    # ------------------------------------------------------------------ node totals

    def take_pending(self) -> Stats:
        """What changed since the last flush, marked as handed to the node (give it
        back with :meth:`give_back` if writing it failed)."""
        with self._lock:
            now = self._stats()
            pending, self._handed[0] = now - self._handed[0], now
        return pending

    def give_back(self, pending: Stats) -> None:
        """Mark ``pending`` (from :meth:`take_pending`) as not handed after all."""
        with self._lock:
            self._handed[0] = self._handed[0] - pending

    def attach(self, cache_dir: str) -> None:
        """Add these counts to the node's totals in ``cache_dir`` (a directory the
        caller made), every few seconds and at exit (see :mod:`._node`)."""
        from mlstore.metrics import _node

        _node.attach(self, cache_dir)

    def detach(self, cache_dir: str) -> None:
        """Hand what is pending to ``cache_dir``'s totals, and stop (at a close)."""
        from mlstore.metrics import _node

        _node.detach(self, cache_dir)

    def _forked(self) -> None:
        """In a forked child: a new lock (a parent thread may have held this one), and
        nothing pending: what was counted before the fork is the parent's to hand."""
        self._lock = threading.Lock()
        self._handed[0] = self._stats()


def _frozen(
    counts: Counter[tuple[str, str]],
    served: dict[tuple[str, str], list[int]],
    latency: dict[tuple[str, str], _Latency],
) -> Stats:
    out = Counter(counts)
    for (tier, proto), (hits, nbytes) in served.items():
        out[("hits", tier)] += hits
        out[("bytes_served", tier)] += nbytes
        out[("saved_requests", proto)] += hits
        out[("saved_bytes", proto)] += nbytes
    return Stats(dict(out), {k: h.frozen() for k, h in latency.items()})


def pending_of(
    counts: Counter[tuple[str, str]],
    served: dict[tuple[str, str], list[int]],
    latency: dict[tuple[str, str], _Latency],
    handed: list[Stats],
) -> Stats:
    """What a dropped :class:`Metrics` (its parts, passed by a finalizer) had not handed
    to the node yet. No lock: nothing else can reach a dropped object's parts."""
    pending = _frozen(counts, served, latency) - handed[0]
    handed[0] = handed[0] + pending
    return pending


def _in_forked_child() -> None:
    for metrics in list(_ALL):
        metrics._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_forked_child)
