"""A cluster that downloads each object once: a cooperative warm over torch.distributed.

Every rank of the job calls :func:`cooperative_warm` (a collective, like a barrier).
The ranks learn each other's node (:func:`mlstore.node_key`), and one rank per node,
the lowest, works for its node: it fetches the node's share of the objects
(:func:`mlstore.plan` over the nodes) from the storage into the node's disk cache, then
sends each object some other node lacks to the others, in rounds of at most
``chunk_bytes`` a sender, through the job's own process group; what it receives it
verifies and keeps in its node's disk cache (:mod:`mlstore._peer`). So the storage
serves each object once, whatever the number of nodes, and afterwards every node holds
every object: reads on any node are cache hits. No server of mlstore's runs anywhere::

    import torch.distributed as dist
    from mlstore.torch import cooperative_warm

    dist.init_process_group("gloo")  # torchrun sets the rendezvous
    report = cooperative_warm(["s3://bucket/train/"])
    assert report.ok, report  # CooperativeWarm(3 nodes, 300 objects: 300 fetched ...)

A copy that arrives damaged (its size or xxh3-128 digest is not what the sending node
announced, or it is not the version a manifest pinned) is never kept: that node fetches
the object itself. An object its owner could not fetch is reported by every node, and
no node fetches it in its place.

When it pays (``benchmarks/bench_cooperative.py``; the "Running on a cluster" page has
the table): on loopback, where the nodes are no closer to each other than to the store,
three nodes warm 4 KiB to 1 MiB objects 1.4 to 3 times faster cooperatively (the store
serves a third of the requests), and objects of 8 MiB and more in the same time within
noise (every byte is copied either way). It was never clearly slower, so there is no
size switch; it pays most where the store is further than the peers (another region or
cloud, egress billed per GB, a store that throttles) and every node reads most objects.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlstore import _peer
from mlstore._util.redact import redact_url, scrub
from mlstore.cluster import node_key, plan
from mlstore.errors import ConfigError, IntegrityError, MlstoreError
from mlstore.manifest import Manifest

if TYPE_CHECKING:
    from mlstore import Store

__all__ = ["CooperativeWarm", "NodeExchange", "cooperative_warm"]

MiB = 1024 * 1024
#: One object to warm: its URL and the version to pin it to (``None``: the current one).
Item = tuple[str, "str | None"]


@dataclass
class NodeExchange:
    """What one node did in a cooperative warm (counts are objects)."""

    #: The global rank that worked for the node.
    rank: int
    #: Objects of the node's share, and of them: fetched from the storage (one GET
    #: each), or already on the node.
    share: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    cached: int = 0
    #: Objects of the node's share sent to other nodes.
    sent: int = 0
    #: Objects of other shares kept from peers' copies, and already on the node.
    received: int = 0
    held: int = 0
    #: Objects fetched here because a peer's copy failed a check.
    refetched: int = 0
    #: Exchange rounds this node took part in.
    rounds: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class CooperativeWarm:
    """A cooperative warm, node by node (every rank returns the same report)."""

    nodes: dict[str, NodeExchange]
    objects: int
    seconds: float

    @property
    def ok(self) -> bool:
        return all(n.ok for n in self.nodes.values())

    @property
    def fetched(self) -> int:
        """Objects fetched from the storage, over every node (refetches included)."""
        return sum(n.fetched + n.refetched for n in self.nodes.values())

    def __repr__(self) -> str:
        parts = [
            f"{name}: {n.fetched} fetched, {n.received} received"
            + (f", {len(n.failures)} failed" if n.failures else "")
            for name, n in sorted(self.nodes.items())
        ]
        return (
            f"CooperativeWarm(ok={self.ok}, {len(self.nodes)} nodes, {self.objects} objects "
            f"in {self.seconds:.1f} s; {'; '.join(parts)})"
        )


def cooperative_warm(
    urls: Iterable[str] | Manifest | str,
    *,
    group: Any = None,
    store: Store | None = None,
    chunk_bytes: int = 32 * MiB,
    timeout: float | None = None,
    jobs: int = 16,
) -> CooperativeWarm:
    """Fill every node's disk cache with ``urls``, each object fetched from the storage
    by one node only (see the module docstring). Called by every rank of ``group``.

    Args:
        urls: object URLs (taken as named: one that does not exist fails at its
            owner), prefixes ending in ``/`` (listed once, on the group's first rank),
            one URL string (an object or a prefix, listed), or a
            :class:`~mlstore.Manifest` (each object pinned to its recorded version).
            Local and ``memory://`` URLs are left out: no node caches them.
        group: the process group (default: the whole job). Every rank of it must call.
            With the default, the senders exchange objects in a gloo group of their
            own, so the other ranks receive nothing and the job's backend may be NCCL.
        store: the Store whose node cache is filled (default: the default Store). Give
            every rank the same settings, or the nodes cache under different names.
        chunk_bytes: most bytes a node sends in one round (a larger object goes alone),
            so memory stays bounded whatever the total.
        timeout: seconds from the call by which each node must have fetched its share;
            what is not fetched by then is reported as failed (the exchange itself is
            bounded by the process group's own timeout, which must also cover this warm).
        jobs: objects each node fetches at once.

    Returns:
        A :class:`CooperativeWarm`. It does not raise for objects that failed: check
        ``.ok`` (each failure names its URL).

    Raises:
        ConfigError: torch.distributed is not initialized, the node's disk cache is
            off, or an argument is out of range.
        MlstoreError: listing ``urls`` failed (raised on every rank).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            "cooperative_warm: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group() first, then cooperative_warm on every rank"
        )
    if chunk_bytes < 1 or jobs < 1:
        raise ConfigError("cooperative_warm: chunk_bytes and jobs must be at least 1")
    import mlstore

    store = store or mlstore.default_store()
    cache = store.config.cache
    if not cache.enabled or cache.disk_bytes <= 0:
        raise ConfigError(
            "cooperative_warm: the node's disk cache is off (cache.enabled false or "
            "cache.disk_bytes 0): there is nothing to warm into"
        )
    start = time.monotonic()
    ring = _Ring(dist, group)
    items = _listed_once(ring, store, urls)
    keys: list[str] = ring.gather(node_key())
    nodes = list(dict.fromkeys(keys))
    leaders = [ring.global_rank(keys.index(n)) for n in nodes]
    me = keys[ring.rank]
    exchange = ring.subgroup(leaders) if group is None else ring
    report = None
    if exchange.rank >= 0:  # a sender, or a rank of a given group that only listens
        leader = ring.global_rank(ring.rank) in leaders
        deadline = None if timeout is None else start + timeout
        shares = plan([u for u, _ in items], nodes) if leader else {me: []}
        node = _Node(store, items, shares, me, chunk_bytes, leader)
        done = node.run(exchange, leaders, jobs, deadline)
        report = done if leader else None
    if exchange is not ring:
        exchange.close()
    reports: list[NodeExchange | None] = ring.gather(report)
    by_node = {n: r for n, r in zip(keys, reports, strict=True) if r is not None}
    return CooperativeWarm(by_node, len(items), time.monotonic() - start)


def _listed_once(ring: _Ring, store: Store, urls: Iterable[str] | Manifest | str) -> list[Item]:
    """The objects to warm, listed on the group's first rank and sent to every rank."""
    answer: tuple[str, Any] | None = None
    error: Exception | None = None
    if ring.rank == 0:
        try:
            answer = ("ok", _items(store, urls))
        except Exception as exc:  # noqa: BLE001 - the other ranks wait to hear, then raise
            error, answer = exc, ("error", scrub(str(exc) or type(exc).__name__))
    answer = ring.broadcast(answer, ring.global_rank(0))
    assert answer is not None
    if answer[0] == "error":
        if error is not None:
            raise error
        raise MlstoreError(f"cooperative_warm: rank 0 could not list the objects: {answer[1]}")
    items: list[Item] = answer[1]
    return items


def _items(store: Store, urls: Iterable[str] | Manifest | str) -> list[Item]:
    from mlstore.cli_warm import _listed

    if isinstance(urls, Manifest):
        found = [(e.url, e.version) for e in urls]
    elif isinstance(urls, str):
        found = [(u, v) for u, v, _ in _listed(store, urls)]
    else:  # a prefix ("/" at the end) is listed; an object is taken as named, unasked
        found = []
        for url in urls:
            found += (
                [(u, v) for u, v, _ in _listed(store, url)] if url.endswith("/") else [(url, None)]
            )
    unique = dict(found)  # one entry an object (the last pin wins), in order
    return [(u, v) for u, v in unique.items() if _peer.cached(store, u)]


class _Node:
    """The work of one node's leading rank: fetch the share, send it, take the rest."""

    def __init__(
        self,
        store: Store,
        items: list[Item],
        shares: dict[str, list[str]],
        me: str,
        chunk_bytes: int,
        leader: bool,
    ) -> None:
        self.store = store
        self.items = items
        self.index = {u: i for i, (u, _) in enumerate(items)}
        self.mine = [self.index[u] for u in shares[me]]
        self.chunk_bytes = chunk_bytes
        self.leader = leader
        mine = set(self.mine)
        self.others = [i for i in range(len(items)) if i not in mine] if leader else []

    def run(
        self,
        ring: _Ring,
        leaders: list[int],
        jobs: int,
        deadline: float | None,
    ) -> NodeExchange:
        store, items = self.store, self.items
        report = NodeExchange(rank=ring.global_rank(ring.rank), share=len(self.mine))
        lacking = {i for i in self.others if not _peer.holds(store, *items[i])}
        report.held = len(self.others) - len(lacking)
        wanted: set[int] = set().union(*ring.gather(sorted(lacking)))
        failed = self._fetch_share(report, jobs, deadline)
        outbox = _Outbox(
            store, [items[i] for i in self.mine if i in wanted], failed, self.chunk_bytes
        )
        refetch: list[int] = []
        senders = leaders
        while senders:
            report.rounds += 1
            still = []
            for src in senders:
                mail = outbox.batch() if src == report.rank else None
                records, notes, more = ring.broadcast(mail, src)
                if src == report.rank:
                    report.sent += len(records)
                elif self.leader:
                    self._take(report, records, notes, lacking, refetch)
                if more:
                    still.append(src)
            senders = still
        for i in refetch:
            self._refetch(report, i)
        for i in sorted(lacking):  # no peer sent it, nor said why
            report.failures.append((redact_url(items[i][0]), "no peer sent it"))
        return report

    def _fetch_share(
        self, report: NodeExchange, jobs: int, deadline: float | None
    ) -> dict[str, str]:
        """Warm the node's share; the failures, by URL."""
        from mlstore.cli_warm import warm_objects

        failed: dict[str, str] = {}
        share = [(url, version, 0) for url, version in (self.items[i] for i in self.mine)]
        if share:
            done = warm_objects(
                self.store,
                share,
                jobs=jobs,
                progress=False,
                on_failure=failed.__setitem__,
                deadline=deadline,
            )
            report.fetched += done.fetched
            report.fetched_bytes += done.fetched_bytes
            report.cached += done.cached
            report.failures += done.failures
        return failed

    def _take(
        self,
        report: NodeExchange,
        records: list[_peer.Record],
        notes: list[tuple[str, str]],
        lacking: set[int],
        refetch: list[int],
    ) -> None:
        """Keep the records this node lacks (verified), note its owner's failures."""
        for rec in records:
            i = self.index.get(rec.url)
            if i is None or i not in lacking:
                continue
            lacking.discard(i)
            try:
                _peer.ingest(self.store, rec, self.items[i][1])
            except IntegrityError:
                refetch.append(i)
            except (MlstoreError, OSError) as exc:
                report.failures.append((redact_url(rec.url), scrub(str(exc))))
            else:
                report.received += 1
        for url, message in notes:
            i = self.index.get(url)
            if i is not None and i in lacking:
                lacking.discard(i)
                report.failures.append((redact_url(url), f"its owner node failed: {message}"))

    def _refetch(self, report: NodeExchange, i: int) -> None:
        url, version = self.items[i]
        try:
            self.store.warm(url, version=version)
        except (MlstoreError, OSError) as exc:
            report.failures.append((redact_url(url), scrub(str(exc))))
        else:
            report.refetched += 1


class _Outbox:
    """A node's records for its peers, handed out in batches of at most ``chunk_bytes``
    (or one larger object), read from the node's cache only when their batch is due."""

    def __init__(
        self, store: Store, items: list[Item], failed: dict[str, str], chunk_bytes: int
    ) -> None:
        self.store = store
        self.todo = collections.deque(it for it in items if it[0] not in failed)
        self.notes = [(u, m) for u, m in failed.items()]
        self.chunk_bytes = chunk_bytes
        self.carry: _peer.Record | None = None

    def batch(self) -> tuple[list[_peer.Record], list[tuple[str, str]], bool]:
        """The next records, the failures not yet told, and whether more will follow."""
        records: list[_peer.Record] = []
        size = 0
        while self.carry is not None or self.todo:
            rec, self.carry = self.carry or self._read(), None
            if rec is None:
                continue
            if records and size + rec.size > self.chunk_bytes:
                self.carry = rec
                break
            records.append(rec)
            size += rec.size
        notes, self.notes = self.notes, []
        return records, notes, self.carry is not None or bool(self.todo)

    def _read(self) -> _peer.Record | None:
        url, version = self.todo.popleft()
        try:
            return _peer.record(self.store, url, version)
        except (MlstoreError, OSError) as exc:
            self.notes.append((url, scrub(str(exc) or type(exc).__name__)))
            return None


class _Ring:
    """The collectives of one process group that a cooperative warm uses."""

    def __init__(self, dist: Any, group: Any) -> None:
        self.dist = dist
        self.group = group
        self.rank: int = dist.get_rank(group)
        self.size: int = dist.get_world_size(group)

    def global_rank(self, rank: int) -> int:
        if self.group is None:
            return rank
        return int(self.dist.get_global_rank(self.group, rank))

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any, src: int) -> Any:
        """``obj`` of the rank whose global rank is ``src``, on every rank."""
        box = [obj]
        self.dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def subgroup(self, ranks: list[int]) -> _Ring:
        """A gloo group of the global ``ranks`` (every rank of the job must call)."""
        sub = self.dist.new_group(ranks=sorted(ranks), backend="gloo")
        ring = _Ring.__new__(_Ring)
        ring.dist, ring.group = self.dist, sub
        member = self.dist.get_rank() in ranks
        ring.rank = self.dist.get_rank(sub) if member else -1
        ring.size = len(ranks)
        return ring

    def close(self) -> None:
        if self.rank >= 0:
            self.dist.destroy_process_group(self.group)
