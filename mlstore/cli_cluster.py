"""``mlstore warm --ray [ADDRESS]`` and ``--dask SCHEDULER``: warm every node of a
cluster from one command, one task a node (see :mod:`mlstore.ray` and
:mod:`mlstore.dask`).

The objects are listed here, once; each node warms its share (``--replicate``:
everything) through its own Store and environment. It prints a line a node and the
cluster's total (``--json``: the whole report), and exits 0 only when every node warmed
every object of its share.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING

from mlstore.errors import ConfigError

if TYPE_CHECKING:
    from mlstore import Store
    from mlstore._nodewarm import ClusterWarm
    from mlstore.cli_warm import Item

__all__ = ["warm_cluster"]

#: Warms the objects it is given on every node of the connected cluster.
Warm = Callable[[list["Item"]], "ClusterWarm"]


@contextlib.contextmanager
def _ray(address: str, args: argparse.Namespace) -> Iterator[Warm]:
    try:
        import ray

        import mlstore.ray
    except ImportError as exc:
        raise ConfigError(
            f"warm --ray needs Ray ({exc}); install it with: pip install 'mlstore[ray]'"
        ) from exc
    ray.init(address=address, log_to_driver=False)
    try:
        yield lambda found: mlstore.ray.warm_items(
            found, replicate=args.replicate, jobs=args.jobs or 32, timeout=args.timeout
        )
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _dask(scheduler: str, args: argparse.Namespace) -> Iterator[Warm]:
    try:
        import distributed

        import mlstore.dask
    except ImportError as exc:
        raise ConfigError(
            f"warm --dask needs Dask ({exc}); install it with: pip install 'mlstore[dask]'"
        ) from exc
    try:
        client = distributed.Client(scheduler, timeout=min(30.0, args.timeout or 30.0))
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"warm --dask: cannot reach the scheduler {scheduler} ({exc})") from exc
    with client:
        yield lambda found: mlstore.dask.warm_items(
            client, found, replicate=args.replicate, jobs=args.jobs or 32, timeout=args.timeout
        )


def warm_cluster(store: Store, args: argparse.Namespace, out: IO[str]) -> int:
    """Run ``mlstore warm`` on a Ray or Dask cluster; the exit status."""
    from mlstore.cli_warm import _wanted

    if args.node_shard is not None or args.nodes_from is not None:
        raise ConfigError(
            "warm: --node-shard and --nodes-from are for one node; with --ray or --dask "
            "the cluster's nodes are found and planned for you"
        )
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError(f"warm --timeout: must be more than 0 seconds, got {args.timeout}")
    engine = _ray(args.ray, args) if args.ray is not None else _dask(args.dask, args)
    with engine as warm:  # connected before anything is listed
        report = warm(_wanted(store, args))
    if args.json:
        out.write(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
        out.write("\n".join(report.lines()) + "\n")
    return 0 if report.ok else 1
