"""Warming: filling the node's cache ahead of the reads that will want it.

A warm caches exactly what a read of the same URL would (the whole object, or the
pinned version), but keeps nothing in this process's memory tier: a DataLoader's main
process warms for its workers, and the node-wide disk tier is what they share. A copy
the node already holds costs one index lookup (no blob is read, nothing is fetched)
and counts as a use of it, so the warm keeps it from eviction as a read would.
"""

from __future__ import annotations

from mlstore._engine.cached import CachedReads
from mlstore._engine.replicas import Resolved

__all__ = ["end_plan", "schedule", "warm"]


def warm(reads: CachedReads, where: Resolved, version: str | None = None) -> int:
    """Fill the node cache with the object at ``where`` (as of ``version`` when
    given); the bytes fetched, ``0`` when the node already held a usable copy.

    A pinned warm of an object that changed raises
    :class:`~mlstore.errors.PreconditionFailedError`, as the pinned read would.
    """
    node, policy = reads.node(where), reads.policy(where)
    if version is None:
        if reads.cache.has(node, policy):
            return 0
        data = reads.whole(where, policy, keep_in_memory=False)
    else:
        if reads.cache.has(node, policy, version):
            return 0
        data = reads.pinned(where, version, keep_in_memory=False)
    reads.metrics.add("prefetched", "cache")
    reads.metrics.add("prefetched_bytes", "cache", len(data))
    return len(data)


def schedule(
    reads: CachedReads, plan: str, cursor: int, uses: list[tuple[Resolved, int | None]]
) -> None:
    """Tell the node's disk tier where reader ``plan`` stands and when it will next
    read each object of ``uses`` (see :mod:`mlstore.cache._plans`)."""
    disk = reads.cache.disk
    if disk is not None:
        disk.schedule(plan, cursor, [(reads.node(where), due) for where, due in uses])


def end_plan(reads: CachedReads, plan: str) -> None:
    if reads.cache.disk is not None:
        reads.cache.disk.end_plan(plan)
