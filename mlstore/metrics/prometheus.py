"""The node's totals for Prometheus: an HTTP exporter and a textfile writer.

What is exported are the *node-wide* totals of a cache directory (:mod:`._node`), read
afresh at each scrape, so the counters of every process on the node (every DataLoader
worker, every job) add up whichever process serves them, and a worker that has exited
still counts. That is mlstore's multiprocess mode: prometheus_client's own
(``PROMETHEUS_MULTIPROC_DIR``, one mmap file per process, merged at scrape) is for
metrics made with its ``Counter`` classes, which mlstore does not use; the variable
may be set for an application's own metrics and changes nothing here.

Names follow Prometheus' conventions (``mlstore_cache_hits_total{tier="memory"}``,
``mlstore_requests_total{backend="s3",op="get"}``,
``mlstore_request_duration_seconds_bucket{...,le="0.01"}``). Label values come from
closed sets only: a tier (:data:`~mlstore.metrics.TIERS`), a built-in backend protocol
(anything else is ``other``), an operation (:data:`~mlstore.metrics.OPERATIONS`). Never
a URL, key or credential.

``prometheus_client`` is imported here only (``pip install 'mlstore[prometheus]'``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlstore.errors import ConfigError
from mlstore.metrics._counters import METRICS
from mlstore.metrics._stats import OPERATIONS, TIERS, Stats

if TYPE_CHECKING:
    import threading
    from wsgiref.simple_server import WSGIServer

__all__ = ["BACKENDS", "Exporter", "NodeCollector", "families", "serve", "write_textfile"]

#: Backend label values (built-in protocols); others are reported as ``other``.
BACKENDS = frozenset({"s3", "gs", "az", "http", "https", "file", "memory", "unknown"})

#: Counters whose exported name is not ``mlstore_[cache_]<name>_total`` (units last).
_RENAMED = {
    "errors": "request_errors",
    "bytes_served": "served_bytes",
    "bytes_fetched": "fetched_bytes",
    "dedupe_bytes_saved": "dedupe_saved_bytes",
    "copy_bytes_skipped": "copy_skipped_bytes",
    "dedupe_bytes_skipped": "dedupe_skipped_bytes",
}
_OP_COUNTERS = {f"{op}_requests": op for op in OPERATIONS}
_SAFE = re.compile(r"[^a-zA-Z0-9_]")


def _backend(label: str) -> str:
    return label if label in BACKENDS else "other"


def exported_name(name: str, label: str) -> tuple[str, str]:
    """The Prometheus family (without ``_total``) of counter ``name`` labelled
    ``label``, and its label name (``tier`` or ``backend``)."""
    base = _SAFE.sub("_", _RENAMED.get(name, name))
    if label in TIERS and not (label == "memory" and name in _BACKEND_ONLY):
        return f"mlstore_cache_{base}", "tier"
    return f"mlstore_{base}", "backend"


#: Counters only ever labelled by a backend (``memory`` is then ``memory://``).
_BACKEND_ONLY = frozenset(
    {"requests", "errors", "bytes_read", "bytes_written", *_OP_COUNTERS}
    | {m for m, doc in METRICS.items() if doc.startswith("P:")}
)


def families(stats: Stats) -> Iterator[Any]:
    """``stats`` as prometheus_client metric families."""
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    requests = CounterMetricFamily(
        "mlstore_requests", "Requests to storage backends, by operation", labels=["backend", "op"]
    )
    by_op: dict[tuple[str, str], int] = {}
    totals: dict[str, int] = {}
    found: dict[str, tuple[CounterMetricFamily, dict[str, int]]] = {}
    for (name, label), value in sorted(stats.counters.items()):
        if name == "requests":
            totals[_backend(label)] = totals.get(_backend(label), 0) + value
            continue
        if name in _OP_COUNTERS:
            key = (_backend(label), _OP_COUNTERS[name])
            by_op[key] = by_op.get(key, 0) + value
            continue
        family, label_name = exported_name(name, label)
        value_label = label if label_name == "tier" else _backend(label)
        if family not in found:
            doc = METRICS.get(name, name).split(": ", 1)[-1]
            found[family] = (CounterMetricFamily(family, doc, labels=[label_name]), {})
        values = found[family][1]
        values[value_label] = values.get(value_label, 0) + value
    for backend, total in totals.items():  # requests counted without an operation
        rest = total - sum(v for (b, _), v in by_op.items() if b == backend)
        if rest > 0:
            by_op[(backend, "other")] = rest
    for (backend, op), value in sorted(by_op.items()):
        requests.add_metric([backend, op], value)
    yield requests
    for counter, values in found.values():
        for label, value in sorted(values.items()):
            counter.add_metric([label], value)
        yield counter
    latency = HistogramMetricFamily(
        "mlstore_request_duration_seconds",
        "Durations of requests to storage backends (each attempt)",
        labels=["backend", "op"],
    )
    merged: dict[tuple[str, str], Any] = {}
    for (op, proto), hist in sorted(stats.latency.items()):
        key = (_backend(proto), op if op in OPERATIONS else "other")
        merged[key] = merged[key] + hist if key in merged else hist
    for (backend, op), hist in sorted(merged.items()):
        cumulative, buckets = 0, []
        for bound, n in zip((*hist.bounds, float("inf")), hist.counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        latency.add_metric([backend, op], buckets, sum_value=hist.sum)
    yield latency


class NodeCollector:
    """A prometheus_client collector of the node's totals in ``cache_dir``, read at
    each scrape (register it in a registry of your own to serve it with yours)."""

    def __init__(self, cache_dir: str) -> None:
        self.cache_dir = cache_dir

    def collect(self) -> Iterator[Any]:
        from mlstore.metrics import _node

        yield from families(_node.read(self.cache_dir))

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only


def _registry(cache_dir: str) -> Any:
    try:
        from prometheus_client import CollectorRegistry
    except ImportError as exc:
        raise ConfigError(
            "exporting metrics needs prometheus-client: pip install 'mlstore[prometheus]'"
        ) from exc
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(cache_dir))
    return registry


@dataclass
class Exporter:
    """A running exporter: scrape ``http://{addr}:{port}/metrics``."""

    addr: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def serve(port: int, addr: str, cache_dir: str) -> Exporter:
    """Serve the totals of ``cache_dir`` on ``addr:port`` (``0``: any free port) from a
    daemon thread."""
    registry = _registry(cache_dir)
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr, registry=registry)
    return Exporter(addr, int(server.server_address[1]), server, thread)


def write_textfile(path: str, cache_dir: str) -> None:
    """Write the totals of ``cache_dir`` to ``path`` (a temporary file beside it, then
    renamed over it: node-exporter never reads half a file)."""
    registry = _registry(cache_dir)
    from prometheus_client import write_to_textfile

    write_to_textfile(str(path), registry)
