"""How a :class:`~mlstore.cache.tiered.TieredCache` shows itself: text and a notebook table.

A mixin, so that the cache's own module keeps to reading and filling. The figures are
read when shown (the disk tier's from its index, which every process on the node
shares); a disk tier that cannot answer shows as unavailable rather than raising from
a ``repr``.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

from mlstore._util.html import Markup, human_size, table

if TYPE_CHECKING:
    from mlstore.cache.disk import DiskTier
    from mlstore.cache.memory import MemoryTier
    from mlstore.config import CacheConfig

__all__ = ["CacheDisplay", "cache_summary"]


def _disk_usage(disk: DiskTier) -> tuple[int | None, int | None]:
    try:
        return disk.size(), disk.count()
    except (sqlite3.Error, OSError):
        return None, None


def cache_summary(
    config: CacheConfig, memory: MemoryTier[Any] | None, disk: DiskTier | None
) -> list[tuple[str, str, str, str]]:
    """One ``(tier, used, budget, entries)`` row per tier, then the directory and the
    policy: what both views show. ``memory``/``disk`` are ``None`` before the cache is
    built (budgets only)."""
    rows: list[tuple[str, str, str, str]] = []
    if memory is not None:
        used, entries = human_size(memory.size()), f"{len(memory):,}"
    else:
        used = entries = "-"
    budget = human_size(config.memory_bytes) if config.memory_bytes else "off"
    rows.append(("memory (this process)", used, budget, entries))
    if disk is not None:
        size, count = _disk_usage(disk)
        used = human_size(size) if size is not None else "unavailable"
        entries = f"{count:,}" if count is not None else "unavailable"
    else:
        used = entries = "-"
    budget = human_size(config.disk_bytes) if config.disk_bytes else "off"
    rows.append(("disk (this node)", used, budget, entries))
    return rows


def _policy(config: CacheConfig) -> str:
    if config.validate == "ttl":
        return f"validate=ttl ({config.ttl:g} s), verify={config.verify}"
    return f"validate={config.validate}, verify={config.verify}"


def cache_html(
    config: CacheConfig, memory: MemoryTier[Any] | None, disk: DiskTier | None
) -> Markup:
    """The notebook table of a cache (or of its configuration, before it is built)."""
    rows = [list(r) for r in cache_summary(config, memory, disk)]
    caption = f"Cache in {config.resolved_disk_dir} ({_policy(config)})"
    if not config.enabled:
        caption += ": reads are not cached"
    return table(rows, header=["tier", "used", "budget", "entries"], caption=caption)


class CacheDisplay:
    """``repr`` and ``_repr_html_`` of a cache with ``config``, ``memory`` and ``disk``."""

    config: CacheConfig
    memory: MemoryTier[Any]
    disk: DiskTier | None

    def __repr__(self) -> str:
        parts = [f"dir={self.config.resolved_disk_dir!r}"]
        for tier, used, budget, entries in cache_summary(self.config, self.memory, self.disk):
            name = tier.split()[0]
            parts.append(f"{name}={used} of {budget} ({entries} entries)")
        return f"{type(self).__name__}({', '.join(parts)})"

    def _repr_html_(self) -> str:
        return cache_html(self.config, self.memory, self.disk)
