"""What the engine integrations share: the task a node runs to warm its share, and the
cluster's report.

``mlstore.dask`` and ``mlstore.ray`` differ only in how they find the nodes and pin one
task to each; what a task does on its node and how the answers add up is written here,
once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from mlstore.cli_warm import Item, _from_manifest, _listed, warm_objects
from mlstore.cluster import plan
from mlstore.manifest import Manifest

if TYPE_CHECKING:
    from mlstore import Store

__all__ = ["ClusterWarm", "NodeWarm", "items", "shares", "warm_here"]


@dataclass
class NodeWarm:
    """What one node's warm task did."""

    #: Where the task ran: a Dask worker's address, or a Ray node's ID.
    worker: str
    #: The objects of this node's share.
    objects: int = 0
    #: Objects fetched from the store, and their bytes.
    fetched: int = 0
    fetched_bytes: int = 0
    #: Objects the node's cache held already (cache hits).
    cached: int = 0
    #: GET requests the node's Store sent while the task ran.
    gets: int = 0
    #: ``(url, message)`` of each object that could not be warmed.
    failures: list[tuple[str, str]] = field(default_factory=list)
    #: Why the task gave no report (it raised, its node died, or the timeout passed).
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failures

    def take(self, result: dict[str, Any]) -> None:
        """Fill in the counts a :func:`warm_here` task returned."""
        for name in ("fetched", "fetched_bytes", "cached", "gets"):
            setattr(self, name, int(result[name]))
        self.failures = [(str(u), str(m)) for u, m in result["failures"]]


@dataclass
class ClusterWarm:
    """A cluster's warm-up, node by node (keyed by :func:`mlstore.node_key`)."""

    nodes: dict[str, NodeWarm]

    @property
    def ok(self) -> bool:
        return all(n.ok for n in self.nodes.values())

    @property
    def fetched(self) -> int:
        """Objects fetched from the store, over every node."""
        return sum(n.fetched for n in self.nodes.values())

    @property
    def failed(self) -> dict[str, NodeWarm]:
        """The nodes whose task gave no report or could not warm every object."""
        return {name: n for name, n in self.nodes.items() if not n.ok}

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (what ``mlstore warm --json`` prints)."""
        return {
            "ok": self.ok,
            "fetched": self.fetched,
            "nodes": {
                name: {
                    **asdict(n),
                    "ok": n.ok,
                    "failures": [{"url": u, "error": e} for u, e in n.failures],
                }
                for name, n in sorted(self.nodes.items())
            },
        }

    def lines(self) -> list[str]:
        """One line a node, then the cluster's total (what ``mlstore warm`` prints)."""
        out = []
        for name, n in sorted(self.nodes.items()):
            line = (
                f"node {name}: {n.objects} objects, {n.fetched} fetched "
                f"({n.fetched_bytes:,} bytes, {n.gets} GETs), {n.cached} already cached, "
                f"{len(n.failures)} failed"
            )
            out.append(line + (f"; no report: {n.error}" if n.error else ""))
        objects = sum(n.objects for n in self.nodes.values())
        out.append(
            f"warmed {len(self.nodes)} nodes: {objects} objects in all, {self.fetched} "
            f"fetched, {len(self.failed)} node(s) with failures"
        )
        return out

    def __repr__(self) -> str:
        parts = []
        for name, n in sorted(self.nodes.items()):
            part = f"{name}: {n.fetched} of {n.objects} fetched"
            if n.failures:
                _, message = n.failures[0]
                part += f", {len(n.failures)} failed (first: {message})"
            parts.append(part + (f" ({n.error})" if n.error else ""))
        return f"ClusterWarm(ok={self.ok}, {'; '.join(parts)})"


def warm_here(share: list[Item], jobs: int) -> dict[str, Any]:
    """The task on one node: warm ``share`` into this node's disk cache through the
    process's default Store, and count what it took."""
    import mlstore

    store = mlstore.default_store()
    before = store.stats()["get_requests"]
    done = warm_objects(store, share, jobs=jobs, progress=False)
    return {
        "fetched": done.fetched,
        "fetched_bytes": done.fetched_bytes,
        "cached": done.cached,
        "gets": store.stats()["get_requests"] - before,
        "failures": done.failures,
    }


def items(urls: Iterable[str] | Manifest | str, store: Store | None) -> list[Item]:
    """The objects to warm: a Manifest's entries pinned to their versions, a saved
    manifest (``.jsonl``), or what each prefix or object lists to (once, here)."""
    import mlstore

    store = store or mlstore.default_store()
    if isinstance(urls, Manifest):
        return [(e.url, e.version, e.size) for e in urls]
    if isinstance(urls, str):
        urls = [urls]
    found: list[Item] = []
    for url in urls:
        found += _from_manifest(store, url) if url.endswith(".jsonl") else _listed(store, url)
    return found


def shares(found: list[Item], nodes: list[str], *, replicate: bool) -> dict[str, list[Item]]:
    """Each node's objects: everything (``replicate``), or its :func:`mlstore.plan` share."""
    if replicate:
        return {node: found for node in nodes}
    by_url = {it[0]: it for it in found}
    return {node: [by_url[u] for u in urls] for node, urls in plan(list(by_url), nodes).items()}
