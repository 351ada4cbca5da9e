"""``mlstore cp`` and ``mlstore sync``: copies of trees, in parallel, resumable, with a
progress bar on a terminal and one summary line at the end.

``cp -r --skip-existing`` and ``sync`` leave alone what the destination provably holds
already (see :meth:`mlstore.Store.sync`), so either can be run again after a failure to
finish the job. ``sync --delete`` also removes what the source no longer has; ``sync
--dry-run`` only says what would be done.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import IO, TYPE_CHECKING, Any

from mlstore._util.progress import Transfer
from mlstore._util.units import human_size

if TYPE_CHECKING:
    from mlstore.store import CopyResult, Store

__all__ = ["add_parsers", "run_cp", "run_sync"]


def add_parsers(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``cp`` and ``sync`` on the command line's sub-commands."""
    cp = sub.add_parser("cp", help="copy between any two URLs (trees with -r, in parallel)")
    cp.add_argument("src", metavar="SRC")
    cp.add_argument("dst", metavar="DST")
    cp.add_argument("-r", "--recursive", action="store_true", help="copy a directory tree")
    cp.add_argument(
        "--skip-existing",
        action="store_true",
        help="leave alone objects the destination already holds (same content, proven "
        "by hash): run again to finish an interrupted copy",
    )
    _common(cp)
    cp.set_defaults(func=run_cp)

    sync = sub.add_parser(
        "sync",
        help="make DST hold what SRC holds, sending only what differs (resumable)",
        description="Copy every object below SRC to DST unless DST provably holds the same "
        "content already (mlstore content hash, S3 ETag or MD5; never size or time alone). "
        "Run it again after a failure: only what is still missing is sent.",
    )
    sync.add_argument("src", metavar="SRC")
    sync.add_argument("dst", metavar="DST")
    sync.add_argument(
        "--delete", action="store_true", help="delete objects below DST that SRC does not have"
    )
    sync.add_argument(
        "--dry-run", action="store_true", help="write and delete nothing; say what would be done"
    )
    _common(sync)
    sync.set_defaults(func=run_sync)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="objects copied at once (default: the Store's max_workers, 32)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="print each URL written")
    p.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: on a terminal or in Jupyter)",
    )


def _into_directory(src: str, dst: str, recursive: bool) -> str:
    """``cp file dir/`` puts the file inside the directory, like cp(1)."""
    local_dir = ("://" not in dst or dst.startswith("file://")) and os.path.isdir(
        dst.removeprefix("file://")
    )
    if not recursive and (dst.endswith("/") or local_dir):
        return dst.rstrip("/") + "/" + src.rstrip("/").rsplit("/", 1)[-1]
    return dst


def run_cp(store: Store, args: argparse.Namespace, out: IO[str]) -> int:
    dst = _into_directory(args.src, args.dst, args.recursive)
    with Transfer(f"cp {args.src}", enabled=args.progress) as bar:
        result = store.copy(
            args.src,
            dst,
            recursive=args.recursive,
            progress=bar,
            skip_existing=args.skip_existing,
            max_workers=args.jobs,
        )
    _report(result, args, out, summary=_copy_summary(result))
    return 0


def run_sync(store: Store, args: argparse.Namespace, out: IO[str]) -> int:
    with Transfer(f"sync {args.src}", enabled=args.progress) as bar:
        result = store.sync(
            args.src,
            args.dst,
            delete=args.delete,
            dry_run=args.dry_run,
            progress=bar,
            max_workers=args.jobs,
        )
    if args.verbose and not args.json:
        for url in result.deleted:
            out.write(f"deleted {url}\n")
    _report(result, args, out, summary=result.summary(), deleted=result.deleted)
    return 0


def _copy_summary(result: CopyResult) -> str:
    line = f"copied {len(result)} objects ({human_size(result.copied_bytes)})"
    if result.skipped:
        line += f", {len(result.skipped)} already there ({human_size(result.skipped_bytes)})"
    return line


def _report(
    result: CopyResult,
    args: argparse.Namespace,
    out: IO[str],
    *,
    summary: str,
    deleted: list[str] | None = None,
) -> None:
    if args.json:
        body: dict[str, Any] = {
            "copied": list(result),
            "copied_bytes": result.copied_bytes,
            "skipped": len(result.skipped),
            "skipped_bytes": result.skipped_bytes,
        }
        if deleted is not None:
            body["deleted"] = deleted
            body["dry_run"] = bool(getattr(args, "dry_run", False))
        out.write(json.dumps(body, indent=2) + "\n")
        return
    if args.verbose:
        for url in result:
            out.write(url + "\n")
    out.write(summary + "\n")
