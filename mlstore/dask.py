"""mlstore on a Dask cluster: the same settings on every worker, and node warm-ups with
one task per host.

Dask places work on workers, several of which often share a host (``--nworkers``, or
several workers a pod). mlstore's disk cache belongs to the host, so a warm-up is one
task per *node*, named by :func:`mlstore.node_key` on the workers themselves
(``MLSTORE_NODE_ID``, ``NODE_NAME``, the host name), pinned to one worker of that node::

    from distributed import Client
    import mlstore.dask

    client = Client("tcp://scheduler:8786")
    client.register_plugin(mlstore.dask.MlstorePlugin(cache={"disk_bytes": "200GiB"}))
    report = mlstore.dask.warm(client, ["s3://bucket/train/"])
    assert report.ok, report  # ClusterWarm(ok=True, node-a: 150 of 150 fetched; ...)

By default each node warms its share of the objects (:func:`mlstore.plan`): the cluster
fetches every object once, whatever the number of nodes, which pays when each node then
reads its own share. ``replicate=True`` puts everything on every node. Reading through
mlstore needs nothing of this module: ``dd.read_parquet("mlstore::s3://bucket/t/")``
works on any cluster whose workers have mlstore installed.

Needs ``distributed`` (``pip install "dask[distributed]"``); ``import mlstore`` never
imports it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distributed import Client, WorkerPlugin, wait

from mlstore.cli_warm import Item, _from_manifest, _listed, warm_objects
from mlstore.cluster import node_key, plan
from mlstore.errors import ConfigError
from mlstore.manifest import Manifest

if TYPE_CHECKING:
    from mlstore import Store

__all__ = ["ClusterWarm", "MlstorePlugin", "NodeWarm", "warm"]


class MlstorePlugin(WorkerPlugin):  # type: ignore[misc]
    """Make a :class:`~mlstore.Store` built from ``settings`` the default Store of every
    worker, now and as workers join: ``client.register_plugin(MlstorePlugin(...))``.

    ``settings`` are the keyword arguments of :class:`~mlstore.Store` (``cache=``,
    ``mounts=``, ``options=`` ...). They travel to the workers in a pickle, so leave
    credentials out: the workers find theirs in their own environment, as any mlstore
    process does.
    """

    name = "mlstore"

    def __init__(self, **settings: Any) -> None:
        self.settings = settings

    def setup(self, worker: Any) -> None:
        import mlstore

        mlstore.set_default_store(mlstore.Store(**self.settings))

    def teardown(self, worker: Any) -> None:
        import mlstore

        mlstore.set_default_store(None)


@dataclass
class NodeWarm:
    """What one node's warm task did."""

    worker: str
    objects: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    cached: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    #: Why the task gave no report (it raised, its worker died, or the timeout passed).
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failures


@dataclass
class ClusterWarm:
    """A cluster's warm-up, node by node."""

    nodes: dict[str, NodeWarm]

    @property
    def ok(self) -> bool:
        return all(n.ok for n in self.nodes.values())

    @property
    def fetched(self) -> int:
        """Objects fetched from the store, over every node."""
        return sum(n.fetched for n in self.nodes.values())

    def __repr__(self) -> str:
        parts = []
        for name, n in sorted(self.nodes.items()):
            part = f"{name}: {n.fetched} of {n.objects} fetched"
            if n.failures:
                _, message = n.failures[0]
                part += f", {len(n.failures)} failed (first: {message})"
            parts.append(part + (f" ({n.error})" if n.error else ""))
        return f"ClusterWarm(ok={self.ok}, {'; '.join(parts)})"


def _warm_here(items: list[Item], jobs: int) -> dict[str, Any]:
    """The task on one node: warm ``items`` into this node's cache."""
    import mlstore

    done = warm_objects(mlstore.default_store(), items, jobs=jobs, progress=False)
    return {
        "objects": len(items),
        "fetched": done.fetched,
        "fetched_bytes": done.fetched_bytes,
        "cached": done.cached,
        "failures": done.failures,
    }


def _items(urls: Iterable[str] | Manifest | str, store: Store | None) -> list[Item]:
    import mlstore

    store = store or mlstore.default_store()
    if isinstance(urls, Manifest):
        return [(e.url, e.version, e.size) for e in urls]
    if isinstance(urls, str):
        urls = [urls]
    items: list[Item] = []
    for url in urls:
        items += _from_manifest(store, url) if url.endswith(".jsonl") else _listed(store, url)
    return items


def hosts(client: Client) -> dict[str, str]:
    """One worker address per node of ``client``'s cluster, by the workers' own
    :func:`~mlstore.node_key` (the first address of each node, in sorted order)."""
    keys: dict[str, str] = client.run(node_key)
    if not keys:
        raise ConfigError("client: the Dask cluster has no workers")
    by_node: dict[str, str] = {}
    for address in sorted(keys):
        by_node.setdefault(keys[address], address)
    return by_node


def warm(
    client: Client,
    urls: Iterable[str] | Manifest | str,
    *,
    replicate: bool = False,
    jobs: int = 32,
    timeout: float | None = None,
    store: Store | None = None,
) -> ClusterWarm:
    """Warm the disk cache of every node of ``client``'s cluster, one pinned task a node.

    Args:
        client: a connected :class:`distributed.Client`.
        urls: prefixes or objects to list (on the client, once), a saved manifest's
            path (``.jsonl``), or a :class:`~mlstore.Manifest` (each object pinned to
            its recorded version).
        replicate: every node warms every object (default: each node its share by
            :func:`mlstore.plan`, so the cluster fetches each object once).
        jobs: objects fetched at once on each node.
        timeout: seconds to wait for the tasks; a node whose task has not finished by
            then is reported with ``error="timed out"`` (its task is cancelled).
        store: the Store that lists ``urls`` here, on the client (default: the default
            Store); the workers warm through their own default Store.

    Returns:
        A :class:`ClusterWarm`: for each node the worker used, the objects of its
        share, how many were fetched and how many were on the node already, and the
        failures. It never raises for a failed node: check ``.ok``.
    """
    items = _items(urls, store)
    by_node = hosts(client)
    shares = {node: items for node in by_node} if replicate else _shares(items, list(by_node))
    run = uuid.uuid4().hex[:8]
    futures = {
        node: client.submit(
            _warm_here,
            shares[node],
            jobs,
            key=f"mlstore-warm-{node}-{run}",
            workers=[address],
            allow_other_workers=False,
            pure=False,
        )
        for node, address in by_node.items()
    }
    try:
        wait(list(futures.values()), timeout=timeout)
    except TimeoutError:
        pass  # the unfinished ones are reported as timed out, below
    report: dict[str, NodeWarm] = {}
    for node, future in futures.items():
        entry = NodeWarm(worker=by_node[node], objects=len(shares[node]))
        if future.status == "finished":
            result = future.result()
            entry.fetched = result["fetched"]
            entry.fetched_bytes = result["fetched_bytes"]
            entry.cached = result["cached"]
            entry.failures = [(str(u), str(m)) for u, m in result["failures"]]
        elif future.status == "error":
            entry.error = f"{type(future.exception()).__name__}: {future.exception()}"
        else:
            entry.error = "timed out"
            future.cancel()
        report[node] = entry
    return ClusterWarm(report)


def _shares(items: list[Item], nodes: list[str]) -> dict[str, list[Item]]:
    by_url = {it[0]: it for it in items}
    return {node: [by_url[u] for u in urls] for node, urls in plan(list(by_url), nodes).items()}
