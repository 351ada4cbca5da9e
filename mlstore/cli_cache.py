"""``mlstore cache``: see and steer the node's disk cache.

- ``cache path``: the cache directory in force (argument > environment > config file >
  default), and whether it exists yet. Builds no Store.
- ``cache prune [--to SIZE]``: evict least recently used blobs until the tier is under
  its budget (or ``SIZE``); reports the bytes freed.
- ``cache clear [--yes]``: drop every entry and blob. It goes through the tier's own
  eviction, inside the index's transactions, so processes reading the cache meanwhile
  see misses, never half-deleted entries (an ``rm -rf`` under a live index leaves rows
  pointing at nothing and a byte count that no longer adds up). Asks first on a
  terminal; elsewhere it needs ``--yes``.
- ``cache verify``: re-hash every blob against the xxh3-128 it is named by and list the
  bad ones with the URLs they hold; exit 1 if any. Changes nothing.
- ``cache serve``: serve the node's metrics for Prometheus and prune on a schedule,
  until stopped (:mod:`mlstore.cli_serve`; a node-cache DaemonSet's container).
- ``cache scrub``: verify, then heal: each bad blob is dropped and the objects it held
  are fetched again, pinned to the version the cache recorded, when this Store can reach
  them (same endpoint and credentials); the rest are only dropped.

The work is done by :mod:`mlstore.cache.scrub` and the disk tier's own methods; this
module parses arguments and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import IO, TYPE_CHECKING, Any

from mlstore.cli import human
from mlstore.cli_serve import add_parser as add_serve_parser
from mlstore.cli_stats import add_parser as add_stats_parser
from mlstore.errors import ConfigError, MlstoreError

if TYPE_CHECKING:
    from mlstore import Store
    from mlstore.cache.disk import DiskTier
    from mlstore.cache.scrub import Verified

__all__ = ["add_parser"]


def _progress_flag(p: Any) -> None:
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )


def add_parser(sub: Any) -> Any:
    """Add the ``cache`` group to the ``mlstore`` sub-command parsers ``sub``; returns
    the group's own sub-command parsers (where ``cache stats`` is added)."""
    cache = sub.add_parser("cache", help="inspect, verify, prune and clear the node's disk cache")
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="COMMAND", required=True)

    path = cache_sub.add_parser("path", help="the cache directory in force")
    path.add_argument("--json", action="store_true", help="print one JSON object")
    path.set_defaults(func=_cmd_path, needs_store=False)

    prune = cache_sub.add_parser("prune", help="evict least recently used data to a size")
    prune.add_argument(
        "--to",
        metavar="SIZE",
        default=None,
        help="evict until at most SIZE remains (512MiB, 10GB; default: the budget)",
    )
    prune.add_argument("--json", action="store_true", help="print one JSON object")
    prune.set_defaults(func=_cmd_prune)

    clear = cache_sub.add_parser("clear", help="drop every entry of the disk cache")
    clear.add_argument("-y", "--yes", action="store_true", help="do not ask")
    clear.add_argument("--json", action="store_true", help="print one JSON object")
    clear.set_defaults(func=_cmd_clear)

    verify = cache_sub.add_parser("verify", help="re-hash every blob; exit 1 if any is bad")
    verify.add_argument("--json", action="store_true", help="print one JSON report")
    _progress_flag(verify)
    verify.set_defaults(func=_cmd_verify)

    scrub = cache_sub.add_parser(
        "scrub", help="verify, then drop bad blobs and fetch their objects again"
    )
    scrub.add_argument("--json", action="store_true", help="print one JSON report")
    _progress_flag(scrub)
    scrub.set_defaults(func=_cmd_scrub)

    add_stats_parser(cache_sub)  # cache stats (mlstore.cli_stats)
    add_serve_parser(cache_sub)  # cache serve (mlstore.cli_serve)
    return cache_sub


def _disk(store: Store) -> DiskTier:
    disk = store.cache.disk
    if disk is None:
        raise ConfigError(
            f"the node cache at {store.config.cache.resolved_disk_dir} has no disk tier "
            "(cache.disk_bytes is 0)"
        )
    return disk


def _emit(out: IO[str], record: dict[str, Any]) -> None:
    out.write(json.dumps(record, indent=2) + "\n")


# ------------------------------------------------------------------------ path


def _cmd_path(args: argparse.Namespace, out: IO[str]) -> int:
    from mlstore.config import StoreConfig

    cache = StoreConfig().cache
    path = cache.resolved_disk_dir
    if args.json:
        _emit(
            out,
            {
                "path": path,
                "exists": os.path.isdir(path),
                "disk_bytes": cache.disk_bytes,
                "enabled": cache.enabled,
            },
        )
    else:
        out.write(path + "\n")
    return 0


# ------------------------------------------------------------------- prune, clear


def _cmd_prune(store: Store, args: argparse.Namespace, out: IO[str]) -> int:
    from mlstore.cache.tenancy import prunes_every_tenant
    from mlstore.config import parse_size

    to = None if args.to is None else parse_size(args.to, name="--to")
    disk = _disk(store)
    if prunes_every_tenant(store.config.cache):  # root under a tenancy: the whole node
        return _prune_tenants(store, to, args.json, out)
    before, blobs = disk.size(), disk.count()
    freed = disk.evict(to)
    after = disk.size()
    evicted = blobs - disk.count()
    if args.json:
        record = {"freed": freed, "evicted": evicted, "before": before, "after": after}
        _emit(out, {**record, "limit": disk.budget if to is None else to})
    else:
        limit = human(disk.budget if to is None else to)
        out.write(
            f"freed {human(freed)} ({evicted} blobs); the cache holds {human(after)} "
            f"(limit {limit})\n"
        )
    return 0


def _prune_tenants(store: Store, to: int | None, as_json: bool, out: IO[str]) -> int:
    """Cut every tenant of the node cache to its fair share of the node's budget."""
    from mlstore.cache.tenancy import prune_tenants

    cache = store.config.cache
    limit = cache.disk_bytes if to is None else to
    reports = prune_tenants(cache.tenants_dir, limit, cache.caps_all)
    if as_json:
        _emit(out, {"tenants": reports, "limit": limit})
    for r in [] if as_json else reports:
        out.write(f"{r['tenant']}: freed {human(r['freed'])}, holds {human(r['after'])}\n")
    return 0


def _confirmed(disk: DiskTier, blobs: int, size: int) -> bool:
    if not sys.stdin.isatty():
        raise ConfigError(
            f"cache clear would drop {blobs} blobs ({human(size)}) from {disk.root}; "
            "add --yes to do it without a terminal to ask on"
        )
    sys.stderr.write(f"drop {blobs} blobs ({human(size)}) from {disk.root}? [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _cmd_clear(store: Store, args: argparse.Namespace, out: IO[str]) -> int:
    disk = _disk(store)
    size, blobs = disk.size(), disk.count()
    if not args.yes and not _confirmed(disk, blobs, size):
        sys.stderr.write("mlstore: cache clear: nothing dropped\n")
        return 1
    store.cache.clear()
    left = disk.size()
    if args.json:
        _emit(out, {"path": disk.root, "dropped": blobs, "freed": size - left, "left": left})
    else:
        out.write(f"cleared {disk.root}: {blobs} blobs, {human(size - left)} freed\n")
    return 0


# ------------------------------------------------------------------ verify, scrub


def _bad_records(found: Verified) -> list[dict[str, Any]]:
    return [
        {"hash": b.hash, "size": b.size, "problem": b.problem, "urls": b.urls} for b in found.bad
    ]


def _report_bad(found: Verified, out: IO[str]) -> None:
    for bad in found.bad:
        urls = ", ".join(bad.urls) or "(no entry)"
        out.write(f"BAD  {bad.hash}  {bad.problem}, {human(bad.size)}: {urls}\n")


def _count_bar(disk: DiskTier, desc: str, enabled: bool | None) -> Any:
    from mlstore._util.progress import progress

    return progress(disk.size(), desc=desc, unit="B", enabled=enabled)


def _cmd_verify(store: Store, args: argparse.Namespace, out: IO[str]) -> int:
    from mlstore.cache.scrub import verify

    disk = _disk(store)
    with _count_bar(disk, "verify", args.progress) as bar:
        found = verify(disk, on_blob=bar.update)
    if args.json:
        record = {"path": disk.root, "checked": found.checked, "bytes": found.bytes}
        _emit(out, {**record, "bad": _bad_records(found), "ok": found.ok})
        return 0 if found.ok else 1
    _report_bad(found, out)
    summary = f"checked {found.checked} blobs ({human(found.bytes)}) in {disk.root}: "
    if found.ok:
        out.write(summary + "all good\n")
        return 0
    out.write(summary + f"{len(found.bad)} bad; 'mlstore cache scrub' drops and refetches them\n")
    return 1


def _refetcher(store: Store, disk: DiskTier) -> Any:
    """``refetch(key, version)`` for :func:`mlstore.cache.scrub.scrub`: warm the key's
    URL through ``store`` and say whether the entry is back.

    An entry comes back only if this Store's node key for the URL is the entry's key:
    the same endpoint and credentials that filled it. Another scope is learnt from the
    first entry that does not come back, and its other entries are not fetched."""
    foreign: set[str] = set()

    def refetch(key: str, version: str | None) -> bool:
        url, _, scope = key.rpartition("#")
        if scope in foreign:
            return False
        try:
            store.warm(url, version=version)
        except (MlstoreError, OSError):
            return False
        if disk.lookup(key) is not None:
            return True
        foreign.add(scope)
        return False

    return refetch


def _cmd_scrub(store: Store, args: argparse.Namespace, out: IO[str]) -> int:
    from mlstore.cache.scrub import scrub

    disk = _disk(store)
    with _count_bar(disk, "scrub", args.progress) as bar:
        done = scrub(disk, _refetcher(store, disk), on_blob=bar.update)
    if args.json:
        record = {"path": disk.root, "checked": done.checked, "bytes": done.bytes}
        record |= {"bad": _bad_records(done), "healed": done.healed, "dropped": done.dropped}
        _emit(out, record)
        return 0
    _report_bad(done, out)
    for url in done.healed:
        out.write(f"healed   {url}\n")
    for url in done.dropped:
        out.write(f"dropped  {url}\n")
    out.write(
        f"checked {done.checked} blobs ({human(done.bytes)}) in {disk.root}: "
        f"{len(done.bad)} bad, {len(done.healed)} healed, {len(done.dropped)} dropped\n"
    )
    return 0
