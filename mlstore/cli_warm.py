"""``mlstore warm``: fill the node's disk cache before the job that reads it starts.

Made for a Kubernetes initContainer (or a step before ``torchrun``): it lists the
prefixes it is given (or reads a manifest, and then warms each object pinned to the
version the manifest recorded), fetches ``-j`` objects at a time through
:meth:`Store.warm <mlstore.Store.warm>`, and ends with one line on stdout::

    warmed 2000 objects, 7.8 MiB in 3.2 s (1990 fetched, 10 already cached, 0 failed)

Each failure is one line on stderr naming its URL; the other objects are still warmed.
The exit status is 0 only if nothing failed, so a pod does not start its trainers on a
half-warmed node without saying so. ``--json`` prints the summary as one JSON object.

With ``--node-shard NODE --nodes-from FILE`` (a DaemonSet or an initContainer on every
node of a cluster) it warms only the objects :func:`mlstore.plan` gives to ``NODE``: every
node lists the same objects and computes the same plan, so the shares are disjoint and
together cover everything, and the cluster downloads each object once::

    warmed 100 of 300 objects (node b, 1 of 3 shares), 400.0 KiB in 0.9 s (...)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from concurrent.futures import TimeoutError as DeadlinePassed
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from mlstore._util.redact import redact_url, scrub
from mlstore.cli import human
from mlstore.errors import ConfigError, MlstoreError, NotFoundError

if TYPE_CHECKING:
    from mlstore import Store

__all__ = ["Warmed", "add_parser", "warm_objects"]

#: Protocols read directly, never through the node cache (see ``mlstore._engine.identity``):
#: warming them would read nothing, so they are counted as skipped.
_DIRECT = frozenset({"file", "memory"})


def _jobs(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return n


def add_parser(sub: Any) -> None:
    """Add ``warm`` to the ``mlstore`` sub-command parsers ``sub``."""
    warm = sub.add_parser("warm", help="prefetch a prefix or a manifest into the node's disk cache")
    warm.add_argument("urls", nargs="*", metavar="URL", help="objects or prefixes to warm")
    warm.add_argument(
        "--manifest", metavar="FILE", help="warm every object of a saved manifest, pinned"
    )
    warm.add_argument(
        "-j",
        "--jobs",
        type=_jobs,
        default=None,
        metavar="N",
        help="parallel downloads (default: the Store's max_workers)",
    )
    warm.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )
    warm.add_argument(
        "--node-shard",
        metavar="NODE",
        help="warm only the share of the objects that mlstore.plan gives NODE "
        "('auto': this node, as mlstore.node_key() names it); needs --nodes-from",
    )
    warm.add_argument(
        "--nodes-from",
        metavar="FILE",
        help="the cluster's nodes, one name a line ('#' comments; '-' reads stdin)",
    )
    engines = warm.add_mutually_exclusive_group()
    engines.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help="warm every node of a Ray cluster, one task a node (default address: auto)",
    )
    engines.add_argument(
        "--dask",
        metavar="SCHEDULER",
        help="warm every node of a Dask cluster, one task a node (e.g. tcp://host:8786)",
    )
    warm.add_argument(
        "--replicate",
        action="store_true",
        help="with --ray or --dask: every node warms everything (default: its share)",
    )
    warm.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="with --ray or --dask: seconds to wait for the nodes (default: no limit)",
    )
    warm.add_argument("--json", action="store_true", help="print the summary as JSON")
    warm.set_defaults(func=_cmd_warm)


@dataclass
class Warmed:
    """What a warm did (``objects``/``bytes``: what the cache now holds of the request)."""

    seconds: float = 0.0
    fetched: int = 0
    fetched_bytes: int = 0
    cached: int = 0
    cached_bytes: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    #: With a node shard: the node, how many nodes share the objects, and the objects
    #: of this node's share and of all shares.
    node: str | None = None
    nodes: int = 0
    share_objects: int = 0
    total_objects: int = 0

    @property
    def objects(self) -> int:
        return self.fetched + self.cached

    @property
    def bytes(self) -> int:
        return self.fetched_bytes + self.cached_bytes

    @property
    def ok(self) -> bool:
        return not self.failures

    def line(self) -> str:
        skipped = f", {self.skipped} skipped (local or memory://, never cached)"
        what = f"{self.objects} objects"
        if self.node is not None:
            what = (
                f"{self.objects} of {self.total_objects} objects "
                f"(node {self.node}, 1 of {self.nodes} shares)"
            )
        return (
            f"warmed {what}, {human(self.bytes)} in {self.seconds:.1f} s "
            f"({self.fetched} fetched, {self.cached} already cached, "
            f"{len(self.failures)} failed{skipped if self.skipped else ''})"
        )

    def as_dict(self) -> dict[str, Any]:
        shard: dict[str, Any] = {}
        if self.node is not None:
            shard = {
                "node": self.node,
                "nodes": self.nodes,
                "share_objects": self.share_objects,
                "total_objects": self.total_objects,
            }
        return {
            "objects": self.objects,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "fetched": self.fetched,
            "fetched_bytes": self.fetched_bytes,
            "cached": self.cached,
            "skipped": self.skipped,
            "failed": len(self.failures),
            "failures": [{"url": u, "error": e} for u, e in self.failures],
            "ok": self.ok,
            **shard,
        }


#: One object to warm: URL, version to pin (or ``None``), size as listed.
Item = tuple[str, "str | None", int]


def _listed(store: Store, url: str) -> list[Item]:
    found: list[Item] = [
        (str(e.url), None, e.size) for e in store.find(url, detail=True) if not e.is_dir
    ]
    if found:
        return found
    info = store.info(url)  # an object, or the one-line "no such object" error
    if info.is_dir:
        raise NotFoundError(
            "nothing to warm: no object below this prefix", url=url, operation="warm"
        )
    return [(str(info.url), None, info.size)]


def _from_manifest(store: Store, path: str) -> list[Item]:
    from mlstore.manifest import Manifest

    return [(e.url, e.version, e.size) for e in Manifest.load(path, store=store)]


def _read_nodes(path: str) -> list[str]:
    """The node names in ``path`` (``-``: standard input): one a line, blank lines and
    ``#`` comments ignored. Raises :class:`ConfigError` naming the line of a bad or
    repeated name, or the file if it names no node."""
    from mlstore.cluster import check_node_name

    if path == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"--nodes-from {path}: cannot read it ({exc.strerror})") from exc
    names: dict[str, None] = {}  # in file order
    for number, line in enumerate(text.splitlines(), start=1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        where = f"--nodes-from {path} line {number}"
        check_node_name(name, where)
        if name in names:
            raise ConfigError(f"{where}: node {name!r} is listed twice")
        names[name] = None
    if not names:
        raise ConfigError(f"--nodes-from {path}: names no node (one node name a line)")
    return list(names)


def _shard_of(args: argparse.Namespace) -> tuple[str, list[str]] | None:
    """The node whose share to warm and every node, checked before anything is listed;
    ``None`` to warm everything."""
    from mlstore.cluster import node_key

    if args.node_shard is None and args.nodes_from is None:
        return None
    if args.node_shard is None or args.nodes_from is None:
        raise ConfigError("warm: --node-shard NODE and --nodes-from FILE go together")
    nodes = _read_nodes(args.nodes_from)
    node = node_key() if args.node_shard == "auto" else args.node_shard
    if node not in nodes:
        raise ConfigError(
            f"warm --node-shard: node {node!r} is not in --nodes-from {args.nodes_from} "
            f"({len(nodes)} nodes); add it there or name a listed node"
        )
    return node, nodes


def warm_objects(
    store: Store,
    items: list[Item],
    *,
    jobs: int,
    progress: bool | None = None,
    on_failure: Any = None,
    deadline: float | None = None,
) -> Warmed:
    """Warm ``items`` with ``jobs`` threads; failures are collected (and handed to
    ``on_failure(url, message)`` as they happen, the URL as given: the caller redacts
    what it shows), never raised. With a ``deadline`` (a :func:`time.monotonic` time),
    what is not warmed by then fails as such, and its threads finish unwaited."""
    from mlstore._util.progress import progress as bar_for

    done = Warmed()
    start = time.monotonic()
    todo = [it for it in items if store.resolve(it[0])[0].protocol not in _DIRECT]
    done.skipped = len(items) - len(todo)

    def one(item: Item) -> int:
        return store.warm(item[0], version=item[1])

    def failed(url: str, message: str) -> None:
        done.failures.append((redact_url(url), message))
        if on_failure is not None:
            on_failure(url, message)

    pool = ThreadPoolExecutor(max(1, min(jobs, len(todo))), thread_name_prefix="mlstore-warm")
    try:
        with bar_for(len(todo), desc="warm", unit="obj", enabled=progress) as bar:
            futures = {pool.submit(one, item): item for item in todo}
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                for future in as_completed(futures, timeout=left):
                    url, _, size = futures.pop(future)
                    try:
                        fetched = future.result()
                    except (MlstoreError, OSError) as exc:
                        failed(url, scrub(str(exc) or type(exc).__name__))
                    else:
                        done.fetched += bool(fetched)
                        done.fetched_bytes += fetched
                        done.cached += not fetched
                        done.cached_bytes += 0 if fetched else size
                    bar.update()
            except DeadlinePassed:  # what is left fails
                for url, _, _ in futures.values():
                    failed(url, "not warmed by the deadline")
    finally:
        pool.shutdown(wait=deadline is None, cancel_futures=deadline is not None)
    done.seconds = time.monotonic() - start
    return done


def _wanted(store: Store, args: argparse.Namespace) -> list[Item]:
    """The objects the command line names: the manifest's, then what each URL lists to."""
    items: list[Item] = []
    if args.manifest:
        items += _from_manifest(store, args.manifest)
    for url in args.urls:
        items += _listed(store, url)
    return items


def _cmd_warm(store: Store, args: argparse.Namespace, out: IO[str]) -> int:
    if not args.urls and not args.manifest:
        raise ConfigError("warm: name at least one URL, or a manifest (--manifest FILE)")
    if args.ray is not None or args.dask is not None:
        from mlstore.cli_cluster import warm_cluster

        return warm_cluster(store, args, out)
    if args.replicate or args.timeout is not None:
        raise ConfigError("warm: --replicate and --timeout go with --ray or --dask")
    cache = store.config.cache
    if not cache.enabled or cache.disk_bytes <= 0:
        raise ConfigError(
            "warm: the node's disk cache is off (cache.enabled false or cache.disk_bytes 0): "
            "there is nothing to warm into"
        )
    shard = _shard_of(args)
    items = _wanted(store, args)

    def failed(url: str, message: str) -> None:
        url = redact_url(url)
        what = message if url in message else f"{url}: {message}"
        sys.stderr.write(f"mlstore: warm failed: {what}\n")

    total = len(items)
    if shard is not None:
        from mlstore.cluster import node_share

        mine = set(node_share([it[0] for it in items], *shard))
        items = [it for it in items if it[0] in mine]
    jobs = args.jobs or store.config.max_workers
    done = warm_objects(store, items, jobs=jobs, progress=args.progress, on_failure=failed)
    if shard is not None:
        done.node, done.nodes = shard[0], len(shard[1])
        done.share_objects, done.total_objects = len(items), total
    if args.json:
        out.write(json.dumps(done.as_dict(), indent=2) + "\n")
    else:
        out.write(done.line() + "\n")
    return 0 if done.ok else 1
