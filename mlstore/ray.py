"""mlstore on a Ray cluster: node warm-ups with one pinned task a node, and the
filesystem Ray Data reads through.

mlstore's disk cache belongs to the node, so a warm-up is one task per *node*, named by
:func:`mlstore.node_key` on the node itself (``MLSTORE_NODE_ID``, ``NODE_NAME``, the host
name) and pinned there with a hard ``NodeAffinitySchedulingStrategy``. The tasks ask for
no CPU (``num_cpus=0``), so they run beside a job that holds every core::

    import ray, mlstore, mlstore.ray

    ray.init(address="auto")
    report = mlstore.ray.warm(["s3://bucket/train/"], timeout=600)
    assert report.ok, report  # ClusterWarm(ok=True, node-a: 150 of 150 fetched; ...)

    ds = ray.data.read_parquet("s3://bucket/train/", filesystem=mlstore.filesystem("s3"))

By default each node warms its share of the objects (:func:`mlstore.plan`), so the
cluster fetches every object once; ``replicate=True`` puts everything on every node,
which is what a Ray Data read needs to be served from the cache wherever its tasks land.

**Retries.** A warm task is never retried by Ray (``max_retries=0``): mlstore retries
each request itself, and a node that dies is reported, not warmed twice. Ray Data
retries a read task when its *worker or node* dies, which re-reads through the node
cache, and retries an I/O error only when its message matches
``DataContext.retried_io_errors`` (Amazon SDK error names such as ``AWS Error
SLOW_DOWN``). mlstore's errors never carry those names: a request that mlstore's retry
layer gave up on fails the read once, instead of starting mlstore's retries again up to
ten times over.

Needs ``ray`` (``pip install "mlstore[ray]"``); ``import mlstore`` never imports it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from mlstore._nodewarm import ClusterWarm, NodeWarm, items, shares, warm_here
from mlstore.cli_warm import Item
from mlstore.cluster import node_key
from mlstore.errors import ConfigError
from mlstore.manifest import Manifest

if TYPE_CHECKING:
    from mlstore import Store

__all__ = ["ClusterWarm", "NodeWarm", "nodes", "warm", "warm_items"]

#: One task a node: no CPU asked for, never retried by Ray (mlstore retries requests).
_TASK = {"num_cpus": 0, "max_retries": 0}
_node_key = ray.remote(**_TASK)(node_key)
_warm_here = ray.remote(**_TASK)(warm_here)


def _pinned(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def _connect(address: str | None) -> None:
    if not ray.is_initialized():
        ray.init(address=address)


def _why(exc: BaseException) -> str:
    """One line for a task that gave no answer (Ray's own messages run to pages)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200] if lines else 'no message'}"


def nodes(*, address: str | None = None, timeout: float = 60.0) -> dict[str, str]:
    """Each node of the Ray cluster by its :func:`~mlstore.node_key`, with the Ray node ID
    a warm task is pinned to. Two Ray nodes with one key (two raylets on one host) are
    one node: the first ID in sorted order is used.

    Raises:
        ConfigError: no node answered within ``timeout`` seconds.
    """
    _connect(address)
    alive = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    refs = {nid: _node_key.options(scheduling_strategy=_pinned(nid)).remote() for nid in alive}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
    answered = set(ready)
    by_key: dict[str, str] = {}
    for nid, ref in refs.items():
        if ref in answered:
            try:
                by_key.setdefault(ray.get(ref), nid)
            except Exception:  # noqa: BLE001 - a node that cannot answer is left out
                continue
        else:
            ray.cancel(ref, force=True)
    if not by_key:
        raise ConfigError(
            f"the Ray cluster has no node that answered within {timeout:g} s "
            f"({len(alive)} listed alive)"
        )
    return by_key


def warm(
    urls: Iterable[str] | Manifest | str,
    *,
    replicate: bool = False,
    jobs: int = 32,
    timeout: float | None = None,
    store: Store | None = None,
    address: str | None = None,
) -> ClusterWarm:
    """Warm the disk cache of every node of the Ray cluster, one pinned task a node.

    Args:
        urls: prefixes or objects to list (here, once), a saved manifest's path
            (``.jsonl``), or a :class:`~mlstore.Manifest` (each object pinned to its
            recorded version).
        replicate: every node warms every object (default: each node its share by
            :func:`mlstore.plan`, so the cluster fetches each object once).
        jobs: objects fetched at once on each node.
        timeout: seconds to wait for the tasks; a node whose task has not finished by
            then is reported with ``error="timed out"`` and its task is cancelled.
        store: the Store that lists ``urls`` here (default: the default Store); the
            nodes warm through their own default Store, built from their environment.
        address: the cluster to connect to when Ray is not initialized yet (as
            ``ray.init(address=...)``).

    Returns:
        A :class:`ClusterWarm` keyed by node: for each node the Ray node
        ID, the objects of its share, how many were fetched (bytes, GETs) and how many
        the node held already, and the failures. It never raises for a failed node:
        check ``.ok`` and ``.failed``. Running it again fetches only what is missing.
    """
    _connect(address)
    return warm_items(items(urls, store), replicate=replicate, jobs=jobs, timeout=timeout)


def warm_items(
    found: list[Item], *, replicate: bool = False, jobs: int = 32, timeout: float | None = None
) -> ClusterWarm:
    """:func:`warm` of objects listed already: ``(url, version or None, size)`` each."""
    by_node = nodes(timeout=60.0 if timeout is None else timeout)
    todo = shares(found, list(by_node), replicate=replicate)
    refs = {
        node: _warm_here.options(scheduling_strategy=_pinned(nid)).remote(todo[node], jobs)
        for node, nid in by_node.items()
    }
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
    finished = set(ready)
    report: dict[str, NodeWarm] = {}
    for node, ref in refs.items():
        entry = NodeWarm(worker=by_node[node], objects=len(todo[node]))
        if ref in finished:
            try:
                entry.take(ray.get(ref))
            except Exception as exc:  # noqa: BLE001 - reported, never raised
                entry.error = _why(exc)
        else:
            entry.error = "timed out"
            ray.cancel(ref, force=True)
        report[node] = entry
    return ClusterWarm(report)
