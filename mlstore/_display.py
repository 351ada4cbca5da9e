"""How a :class:`~mlstore.Store` shows itself: a one-line ``repr`` and a notebook view.

Kept out of ``store.py`` (the facade stays about reads and writes): the Store's two
methods call :func:`store_repr` and :func:`store_html`. Showing a Store never builds
anything: before its first read it shows the cache's configuration, afterwards the
cache's figures and this process's counters. Credentials never appear: mount URLs go
through :func:`~mlstore._util.redact.redact_url`, backend options are listed by
protocol only (:class:`~mlstore.config.StoreConfig` shows their names).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from mlstore._util.html import Markup, fields, human_size
from mlstore._util.redact import redact_url
from mlstore.cache.display import cache_html, cache_summary

if TYPE_CHECKING:
    from mlstore.cache.tiered import TieredCache
    from mlstore.config import StoreConfig
    from mlstore.metrics import Metrics

__all__ = ["store_html", "store_repr"]


class _Cached(Protocol):
    @property
    def cache(self) -> TieredCache: ...


class Runtime(Protocol):
    """What is shown of a Store's per-process engine: its counters and, once built, its
    cached read path (the engine's ``Runtime``; named by shape so that this module
    needs nothing of the engine)."""

    @property
    def metrics(self) -> Metrics: ...

    @property
    def cached(self) -> _Cached | None: ...


def _cache_of(runtime: Runtime | None) -> TieredCache | None:
    cached = runtime.cached if runtime is not None else None
    return cached.cache if cached is not None else None


def store_repr(config: StoreConfig, runtime: Runtime | None) -> str:
    """``Store(cache=..., mounts=[...], options for [...], transport=...)``."""
    cache = _cache_of(runtime)
    tiers = cache_summary(
        config.cache,
        cache.memory if cache is not None else None,
        cache.disk if cache is not None else None,
    )
    shown = [
        f"{tier.split()[0]} {budget}" if used == "-" else f"{tier.split()[0]} {used}/{budget}"
        for tier, used, budget, _entries in tiers
    ]
    where = config.cache.resolved_disk_dir if config.cache.enabled else "off"
    return (
        f"Store(cache={where!r} ({', '.join(shown)}), mounts={sorted(config.mounts)}, "
        f"options for {sorted(config.options)}, transport={config.transport!r})"
    )


def store_html(config: StoreConfig, runtime: Runtime | None) -> Markup:
    """The notebook view: the Store's settings in brief, its cache, its counters."""
    mounts = [
        (f"mount {name}", ", ".join(redact_url(u) for u in urls))
        for name, urls in sorted(config.mounts.items())
    ]
    summary: list[tuple[str, object]] = [
        ("transport", config.transport),
        *mounts,
        ("backend options for", ", ".join(sorted(config.options)) or "(none)"),
        ("workers", config.max_workers),
        ("multipart above", human_size(config.multipart_threshold)),
        ("retries", f"{config.retry.max_attempts} attempts within {config.retry.deadline:g} s"),
    ]
    cache = _cache_of(runtime)
    summary.append(
        (
            "cache",
            cache_html(
                config.cache,
                cache.memory if cache is not None else None,
                cache.disk if cache is not None else None,
            ),
        )
    )
    if runtime is not None:
        stats = runtime.metrics.snapshot()
        if stats.counters:
            summary.append(("this process's counters", Markup(stats._repr_html_())))
    return fields(summary, caption="mlstore Store")
