"""``mlstore cache serve``: look after the node's disk cache for as long as it runs.

Made for the container of a node-cache DaemonSet (see ``examples/kubernetes/``): it
serves the node-wide totals of every process that shares the cache for Prometheus on
``/metrics`` (the same as :func:`mlstore.metrics.serve`), and every ``--prune-every``
seconds evicts least recently used blobs until the tier is within its budget, one line
on stdout each time it freed something. It starts with one line saying where it serves
and ends, on SIGTERM or Ctrl-C, with exit status 0 after the exporter is closed::

    serving the node totals of /var/cache/mlstore on http://0.0.0.0:9464/metrics; \
    pruning to 200.0 GiB every 600 s
    pruned 1.2 GiB (310 blobs); the cache holds 199.8 GiB
    stopped

Needs ``prometheus-client`` (``pip install 'mlstore[prometheus]'``) unless ``--port``
is ``off``.
"""

from __future__ import annotations

import argparse
import signal
import threading
from typing import IO, TYPE_CHECKING, Any

from mlstore.cli import human
from mlstore.errors import ConfigError

if TYPE_CHECKING:
    from mlstore import Store

__all__ = ["add_parser"]

DEFAULT_PORT = 9464  # the port registered for exporters of this kind, unused by others


def _port(text: str) -> int | None:
    if text == "off":
        return None
    if text.isdigit() and int(text) < 65536:
        return int(text)
    raise argparse.ArgumentTypeError(
        f"must be a port number (0: any free one) or 'off', got {text!r}"
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more, got {text!r}")
    return value


def add_parser(cache_sub: Any) -> None:
    """Add ``serve`` to the ``mlstore cache`` sub-command parsers ``cache_sub``."""
    serve = cache_sub.add_parser(
        "serve",
        help="serve the node's metrics for Prometheus and prune the cache, until stopped",
    )
    serve.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help=f"port of /metrics (default: {DEFAULT_PORT}; 0: any free port; off: no exporter)",
    )
    serve.add_argument(
        "--addr",
        default="0.0.0.0",  # a DaemonSet's exporter is scraped from outside the pod
        help="address to listen on (default: 0.0.0.0, every interface)",
    )
    serve.add_argument(
        "--prune-every",
        type=_seconds,
        default=600.0,
        metavar="SECONDS",
        help="evict to the cache's budget this often (default: 600; 0: never)",
    )
    serve.set_defaults(func=_cmd_serve)


def _cmd_serve(store: Store, args: argparse.Namespace, out: IO[str]) -> int:
    disk = store.cache.disk
    if disk is None:
        raise ConfigError(
            f"the node cache at {store.config.cache.resolved_disk_dir} has no disk tier "
            "(cache.disk_bytes is 0): there is nothing to serve or prune"
        )
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    exporter = None
    try:
        where = "no exporter"
        if args.port is not None:
            from mlstore import metrics

            exporter = metrics.serve(args.port, args.addr, store.config.cache.resolved_disk_dir)
            where = f"http://{args.addr}:{exporter.port}/metrics"
        from mlstore.cache.tenancy import prune_tenants, prunes_every_tenant

        cache = store.config.cache
        every_tenant = prunes_every_tenant(cache)  # root under a tenancy: the whole node
        every = args.prune_every
        if every_tenant:
            limit = f"every tenant to {human(cache.disk_bytes)}"
        else:
            limit = f"to {human(disk.budget)}"
        pruning = f"pruning {limit} every {every:g} s" if every else "no pruning"
        out.write(f"serving the node totals of {cache.resolved_disk_dir} on {where}; {pruning}\n")
        out.flush()
        while not stop.wait(every or None):
            if every_tenant:
                for r in prune_tenants(cache.tenants_dir, cache.disk_bytes, cache.caps_all):
                    out.write(f"pruned {human(r['freed'])} of {r['tenant']}\n")
                out.flush()
                continue
            before = disk.count()
            freed = disk.evict(None)
            if freed:
                out.write(
                    f"pruned {human(freed)} ({before - disk.count()} blobs); "
                    f"the cache holds {human(disk.size())}\n"
                )
                out.flush()
    finally:
        if exporter is not None:
            exporter.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    out.write("stopped\n")
    return 0
