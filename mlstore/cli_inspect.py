"""``mlstore stat`` and ``mlstore du``: what an object is, and how much lies under a prefix.

``stat`` asks for each URL's info (one HEAD on an object store) and shows its size,
modification time, version (ETag, generation) and, when the object carries one,
mlstore's own content hash. ``du`` lists a prefix once, recursively, and adds up the
bytes and objects below each immediate child (``-s``: only the total), as du(1) does
for a directory. Both print one JSON document with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import IO, TYPE_CHECKING, Any

from mlstore.cli import human

if TYPE_CHECKING:
    from mlstore import Store
    from mlstore.backends.base import ObjectInfo

__all__ = ["add_parsers", "du_totals"]


def add_parsers(sub: Any) -> None:
    """Add ``stat`` and ``du`` to the ``mlstore`` sub-command parsers ``sub``."""
    stat = sub.add_parser("stat", help="size, modification time, version and hash of objects")
    stat.add_argument("urls", nargs="+", metavar="URL")
    stat.add_argument("--json", action="store_true", help="print one JSON list, a record a URL")
    stat.set_defaults(func=_cmd_stat)

    du = sub.add_parser(
        "du", help="bytes and objects under a prefix, per child or in total", add_help=False
    )
    du.add_argument("--help", action="help", help="show this help message and exit")
    du.add_argument("url", metavar="URL")
    du.add_argument("-s", "--summarize", action="store_true", help="only the total")
    du.add_argument("-H", "-h", "--human", action="store_true", help="sizes in KiB/MiB/GiB")
    du.add_argument("--json", action="store_true", help="print one JSON object")
    du.set_defaults(func=_cmd_du)


def _when(mtime: float | None) -> str:
    if not mtime:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(mtime))


def _stat_lines(info: ObjectInfo) -> list[str]:
    checksums = ", ".join(f"{k}={v}" for k, v in sorted(info.checksums.items()))
    rows = [
        ("url", str(info.url)),
        ("type", info.type),
        ("size", f"{info.size} ({human(info.size)})"),
        ("modified", _when(info.mtime)),
        ("version", info.version or "-"),
        ("xxh3-128", info.content_hash or "- (not recorded)"),
    ]
    if checksums:
        rows.append(("checksums", checksums))
    return [f"{name:>9}: {value}" for name, value in rows]


def _cmd_stat(store: Store, args: argparse.Namespace, out: IO[str]) -> int:
    infos = [store.info(url) for url in args.urls]  # the first missing one is the error
    if args.json:
        out.write(json.dumps([i.as_dict() for i in infos], indent=2, sort_keys=True) + "\n")
        return 0
    blocks = ["\n".join(_stat_lines(info)) for info in infos]
    out.write("\n\n".join(blocks) + "\n")
    return 0


def du_totals(base: str, entries: list[ObjectInfo]) -> dict[str, list[int]]:
    """Bytes and objects of ``entries`` by the immediate child of ``base`` they lie
    under (``""``: ``base`` itself, an object): ``{child: [bytes, objects]}``.

    >>> from mlstore.backends.base import ObjectInfo
    >>> from mlstore.url import parse_url
    >>> found = [ObjectInfo(parse_url(u), n) for u, n in
    ...          [("s3://bkt/p/a/x", 3), ("s3://bkt/p/a/y/z", 4), ("s3://bkt/p/c", 5)]]
    >>> du_totals("s3://bkt/p", found)
    {'a/': [7, 2], 'c': [5, 1]}
    """
    prefix = base.rstrip("/") + "/"
    totals: dict[str, list[int]] = {}
    for entry in entries:
        name = str(entry.url)
        rel = name[len(prefix) :] if name.startswith(prefix) else ""
        head, sep, _ = rel.partition("/")
        child = head + sep
        slot = totals.setdefault(child, [0, 0])
        slot[0] += entry.size
        slot[1] += 1
    return dict(sorted(totals.items()))


def _cmd_du(store: Store, args: argparse.Namespace, out: IO[str]) -> int:
    from mlstore.url import parse_url

    base = str(parse_url(args.url)).rstrip("/")
    entries = [e for e in store.find(args.url, detail=True) if not e.is_dir]
    if not entries:
        store.info(args.url)  # nothing there at all: the one-line "no such object" error
    totals = du_totals(base, entries)
    size = sum(n for n, _ in totals.values())
    count = sum(c for _, c in totals.values())
    children = [
        {"url": f"{base}/{child}", "bytes": n, "objects": c}
        for child, (n, c) in totals.items()
        if child
    ]
    if args.json:
        record: dict[str, Any] = {"url": base, "bytes": size, "objects": count}
        if not args.summarize:
            record["children"] = children
        out.write(json.dumps(record, indent=2) + "\n")
        return 0

    def shown(n: int) -> str:
        return human(n) if args.human else str(n)

    rows = (
        []
        if args.summarize
        else [(n, c, f"{base}/{child}") for child, (n, c) in totals.items() if child]
    )
    rows.append((size, count, base))
    for n, c, url in rows:
        out.write(f"{shown(n):>12}  {c:>9} obj  {url}\n")
    return 0
