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
from typing import TYPE_CHECKING, Any

from distributed import Client, WorkerPlugin, wait

from mlstore._nodewarm import ClusterWarm, NodeWarm, items, shares, warm_here
from mlstore.cli_warm import Item
from mlstore.cluster import node_key
from mlstore.errors import ConfigError
from mlstore.manifest import Manifest

if TYPE_CHECKING:
    from mlstore import Store

__all__ = ["ClusterWarm", "MlstorePlugin", "NodeWarm", "hosts", "warm", "warm_items"]


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
    return warm_items(client, items(urls, store), replicate=replicate, jobs=jobs, timeout=timeout)


def warm_items(
    client: Client,
    found: list[Item],
    *,
    replicate: bool = False,
    jobs: int = 32,
    timeout: float | None = None,
) -> ClusterWarm:
    """:func:`warm` of objects listed already: ``(url, version or None, size)`` each."""
    by_node = hosts(client)
    todo = shares(found, list(by_node), replicate=replicate)
    run = uuid.uuid4().hex[:8]
    futures = {
        node: client.submit(
            warm_here,
            todo[node],
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
        entry = NodeWarm(worker=by_node[node], objects=len(todo[node]))
        if future.status == "finished":
            entry.take(future.result())
        elif future.status == "error":
            entry.error = f"{type(future.exception()).__name__}: {future.exception()}"
        else:
            entry.error = "timed out"
            future.cancel()
        report[node] = entry
    return ClusterWarm(report)
