"""What mlstore counts, and where to see it.

A Store counts requests, bytes, retries and cache hits (:class:`Metrics`), and times
every request to a backend; ``store.stats()`` is a :class:`Stats` snapshot of them.
Subtracting two snapshots gives what happened in between::

    before = store.stats()
    ...
    print(store.stats() - before)

Every process that shares a cache directory (a job's DataLoader workers, every job on
the node) also adds its counts to the node's totals in that directory, a few seconds
after the fact and at exit: :func:`node_stats` (or ``store.stats(node=True)``, or
``mlstore cache stats``) reads them, :func:`serve` exports them to Prometheus, and
:func:`write_textfile` writes them for node-exporter's textfile collector.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlstore.metrics._counters import METRICS, Metrics
from mlstore.metrics._stats import LATENCY_BOUNDS, OPERATIONS, TIERS, Histogram, Stats

if TYPE_CHECKING:
    from mlstore.metrics.prometheus import Exporter

__all__ = [
    "LATENCY_BOUNDS",
    "METRICS",
    "OPERATIONS",
    "TIERS",
    "Histogram",
    "Metrics",
    "Stats",
    "flush_node_stats",
    "node_stats",
    "node_stats_since",
    "reset_node_stats",
    "serve",
    "write_textfile",
]


def _root(cache_dir: str | None) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    from mlstore.config import CacheConfig

    return CacheConfig().resolved_disk_dir


def node_stats(cache_dir: str | None = None) -> Stats:
    """The totals of every process that used the cache directory ``cache_dir``
    (default: the configured one), this process's latest counts included. Empty if
    no process has written any there yet."""
    from mlstore.metrics import _node

    return _node.read(_root(cache_dir))


def node_stats_since(cache_dir: str | None = None) -> float | None:
    """When the node's totals in ``cache_dir`` started (a Unix time: their first write
    since the last reset), or ``None`` if there are none."""
    from mlstore.metrics import _node

    return _node.since(_root(cache_dir))


def reset_node_stats(cache_dir: str | None = None) -> None:
    """Start the node's totals in ``cache_dir`` (default: the configured one) from
    zero. Processes running on keep counting from there."""
    from mlstore.metrics import _node

    _node.reset(_root(cache_dir))


def flush_node_stats() -> None:
    """Add this process's counts to the node's totals now, rather than within a few
    seconds (done at exit anyway)."""
    from mlstore.metrics import _node

    _node.flush()


def serve(port: int, addr: str = "127.0.0.1", cache_dir: str | None = None) -> Exporter:
    """Serve the node's totals in ``cache_dir`` for Prometheus on ``addr:port``
    (``/metrics``) from a background thread; returns the exporter (``.port``,
    ``.close()``). Needs ``prometheus-client`` (``pip install 'mlstore[prometheus]'``)."""
    from mlstore.metrics.prometheus import serve as _serve

    return _serve(port, addr, _root(cache_dir))


def write_textfile(path: str, cache_dir: str | None = None) -> None:
    """Write the node's totals in ``cache_dir`` to ``path`` in the Prometheus text
    format, atomically, for node-exporter's textfile collector."""
    from mlstore.metrics.prometheus import write_textfile as _write

    _write(path, _root(cache_dir))
