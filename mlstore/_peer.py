"""Objects handed from one node's cache to another's: records out, verified records in.

A cooperative warm (:func:`mlstore.torch.cooperative_warm`) has each node fetch only
its share of the objects from the storage and take the rest from its peers over a
transport the job already runs (torch.distributed collectives today; Ray's object store
could carry the same records). This module is the part that knows no transport:

- :func:`record` turns an object this node caches into a :class:`Record`: the URL, the
  version the bytes are, their size and xxh3-128 digest, when that version was last
  known current, and the bytes, read back from the node's disk tier (fetched into it
  first when the node does not hold it);
- :func:`ingest` checks a record that came from a peer (size, digest, and the version
  the caller asked for) and only then keeps it in the node's disk tier, keyed by that
  version, through the same ``DiskTier.put`` that ``write_through`` uses. A record that
  fails a check raises :class:`~mlstore.errors.IntegrityError` and leaves the cache as
  it was: the caller fetches the object itself, never keeps a wrong entry.

What the checks prove: that the bytes arrived as the sending node held them. That they
are the version the record names is the sending node's word, which a cooperative warm
takes because the sender is a process of the same job, reading with the same settings.
Peers of another trust domain must not feed :func:`ingest`.

The stamp travels with the record: a copy fetched without a pin is stamped with the
time its version was last known current on the sending node, so the consistency policy
(``CacheConfig.validate``/``ttl``) counts from then on the receiving node too (a clock
that runs ahead makes a stamp from the future, which is checked at once); a copy known
only by its pin is stamped never checked, as a pinned read stores it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from mlstore._engine.cached import CACHED_PROTOCOLS, CachedReads
from mlstore._engine.replicas import Resolved
from mlstore._engine.runtime import Runtime
from mlstore._util.process import PerProcess
from mlstore.errors import ConfigError, IntegrityError
from mlstore.hashing import content_hash
from mlstore.url import parse_url

__all__ = ["Record", "cached", "holds", "ingest", "record"]


class _Owner(Protocol):
    """A :class:`~mlstore.Store` (only its per-process engine is used)."""

    _runtime: PerProcess[Runtime]


@dataclass(frozen=True)
class Record:
    """One object as a node holds it, ready to travel to a peer.

    Attributes:
        url: the URL as the job names it.
        version: the version the bytes are (``None``: the store names none).
        size: the length of ``data``, as the sender counted it.
        digest: the xxh3-128 hex digest of ``data``, as the sender computed it.
        checked: wall-clock time the version was last known current (``0.0``: never
            checked, only pinned).
        data: the bytes.
    """

    url: str
    version: str | None
    size: int
    digest: str
    checked: float
    data: bytes

    def __repr__(self) -> str:  # never the bytes
        return (
            f"Record({self.url!r}, version={self.version!r}, size={self.size}, "
            f"digest={self.digest[:12]}...)"
        )


def _reads(store: _Owner, url: str, operation: str) -> tuple[CachedReads, Resolved]:
    runtime = store._runtime.get()
    where = runtime.resolve(parse_url(url))
    reads = runtime.cached_for(where)
    if reads is None or reads.cache.disk is None:
        raise ConfigError(
            "this object is not kept in the node's disk cache (a local or memory:// URL, "
            "or the cache or its disk tier is off): it cannot be shared with peers",
            url=url,
            operation=operation,
        )
    return reads, where


def cached(store: _Owner, url: str) -> bool:
    """Whether objects at ``url`` go to the node's disk cache (and so can be shared)."""
    runtime = store._runtime.get()
    where = runtime.resolve(parse_url(url))
    cache = runtime.config.cache
    return where.primary.protocol in CACHED_PROTOCOLS and cache.enabled and cache.disk_bytes > 0


def holds(store: _Owner, url: str, version: str | None = None) -> bool:
    """Whether the node holds a copy of ``url`` that a read would serve with no
    request: of ``version`` when given, else one its consistency policy trusts now.
    Counts as a use of the copy (a warm keeps what it found)."""
    reads, where = _reads(store, url, "peer")
    return reads.cache.has(reads.node(where), reads.policy(where), version)


def record(store: _Owner, url: str, version: str | None = None) -> Record:
    """The node's copy of ``url`` (of ``version`` when given) as a :class:`Record`,
    fetched into the node's cache first if the node does not hold it.

    Raises:
        ConfigError: ``url`` is not kept in the node's disk cache.
        MlstoreError: the fetch failed (``NotFoundError``, ``PreconditionFailedError``
            for a pinned version that is gone, ...).
    """
    reads, where = _reads(store, url, "peer")
    runtime = store._runtime.get()
    node = reads.node(where)
    disk = reads.cache.disk
    assert disk is not None  # _reads checked
    runtime.warm(where, version)
    entry = disk.lookup(node)
    if entry is not None and (version is None or entry.version == version):
        data = disk.read_blob(entry.hash, entry.size)
        if data is not None:
            return Record(url, entry.version, entry.size, entry.hash, entry.checked, data)
    # Not kept (no room in the budget, evicted meanwhile, a corrupt blob): one fetch.
    checked = 0.0 if version is not None else time.time()
    data, got = runtime.reader.fetch_whole(where, version)
    return Record(url, got, len(data), content_hash(data), checked, data)


def ingest(store: _Owner, rec: Record, version: str | None = None) -> bool:
    """Keep a peer's record in the node's disk tier, once it is proven whole.

    Args:
        store: the Store whose node cache receives it.
        rec: the record, as it arrived.
        version: the version the caller wants (a manifest's pin); ``None`` takes the
            version the record names.

    Returns:
        ``True`` if the copy was kept; ``False`` if the node already held that version,
        or a version it knew to be current later than the record's stamp.

    Raises:
        IntegrityError: the bytes are not ``rec.size`` long, do not hash to
            ``rec.digest``, are of another version than ``version``, or differ from
            the node's own copy of the same version: nothing was kept.
        ConfigError: the URL is not kept in the node's disk cache.
        OSError: the disk tier could not keep it (no room within the budget, the file
            system full or failing); nothing was kept.
    """
    problem = None
    if version is not None and rec.version != version:
        problem = f"a peer sent version {rec.version!r}, not the pinned {version!r}"
    elif len(rec.data) != rec.size:
        problem = f"a peer sent {len(rec.data)} bytes, announced as {rec.size}"
    elif content_hash(rec.data) != rec.digest:
        problem = "the bytes a peer sent do not match the digest it announced"
    if problem is not None:
        raise IntegrityError(
            f"{problem}; fetch the object from the store instead", url=rec.url, operation="peer"
        )
    reads, where = _reads(store, rec.url, "peer")
    node = reads.node(where)
    disk = reads.cache.disk
    assert disk is not None  # _reads checked
    held = disk.lookup(node)
    if held is not None:
        if held.version == rec.version:
            if held.hash != rec.digest:  # one version, two contents: keep the node's own
                raise IntegrityError(
                    f"a peer's copy of version {rec.version!r} differs from the one this "
                    "node holds; the node's copy is kept",
                    url=rec.url,
                    operation="peer",
                )
            disk.touch_blob(held.hash)
            return False
        if held.version != rec.version and held.checked >= rec.checked > 0.0:
            return False  # this node saw another version current more recently
    reads.cache.memory.discard(node)  # this process serves no other bytes from now
    disk.put(node, rec.version, rec.data, rec.digest, checked=rec.checked)
    return True
