"""The metadata tier against the per-process dict it replaces (issue 14), in one run:

    python benchmarks/metadata.py [--n 20000]

- hits/s of the old per-process LRU (65,536 entries, the policy check of the old path);
- hits/s of the new process front (a hit that never reaches the node tier);
- hits/s of the node tier, warm, from a fresh process (a diskcache lookup plus the JSON
  decode, every lookup missing the front), in one process and in four at once; and, as
  the alternative, a bare SQLite SELECT on the same file;
- entries and bytes on disk after N answers, and the memory the old dict held for the
  same N (tracemalloc), beside the new front's.

No store is involved: the answers are S3-shaped ``ObjectInfo`` records (ETag, mtime),
encoded by the engine's own codec. Output: the table on stdout, and
``benchmarks/results/metadata.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import sqlite3
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlstore._engine import cached  # noqa: E402
from mlstore._util.lru import LRU  # noqa: E402
from mlstore.backends.base import ObjectInfo  # noqa: E402
from mlstore.cache._layout import claim_cache_dir  # noqa: E402
from mlstore.cache.metadata import NodeMetadata, Remembered  # noqa: E402
from mlstore.url import URL  # noqa: E402

SCOPE = "0123456789abcdef"
LIMIT = 64 * 1024 * 1024  # the default metadata_bytes


def key(i: int) -> str:
    return f"s3://datasets/imagenet/train/shard-{i // 1000:03d}/img-{i:08d}.jpg#{SCOPE}"


def answer(i: int) -> tuple[URL, ObjectInfo]:
    url = URL("s3", "datasets", f"imagenet/train/shard-{i // 1000:03d}/img-{i:08d}.jpg")
    info = ObjectInfo(url, 110_000 + i, version=f'"{i:032x}"', mtime=1.7e9 + i)
    return url, info


def remembered(root: str, entries: int) -> Remembered[tuple[URL, ObjectInfo]]:
    node = NodeMetadata(root, LIMIT, lambda name, n: None)
    return Remembered(
        "info",
        entries,
        node,
        cached._encode_located,  # the engine's own codec
        cached._decode_located,
    )


def rate(fn: Any, keys: list[str]) -> float:
    start = time.perf_counter()
    for k in keys:
        fn(k)
    return len(keys) / (time.perf_counter() - start)


def old_lru_hits(n: int) -> tuple[float, int]:
    """The old path: an LRU of 65,536 (answer, stamp) and its policy check; and the
    bytes those ``n`` answers held."""
    tracemalloc.start()
    memo: LRU[str, tuple[tuple[URL, ObjectInfo], float]] = LRU(65536)
    for i in range(n):
        memo.put(key(i), (answer(i), 1.0))
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    keys = [key(i) for i in range(n)]
    random.Random(1).shuffle(keys)

    def hit(k: str) -> Any:
        found = memo.get(k)
        assert found is not None and 2.0 - found[1] < 300
        return found[0]

    return rate(hit, keys), held


def front_hits(root: str, n: int) -> tuple[float, int]:
    """The new front (INFO_ENTRIES answers) on hits; and the bytes it holds when full."""
    memo = remembered(root, cached.INFO_ENTRIES)
    memo.node = None  # the front alone
    tracemalloc.start()
    for i in range(cached.INFO_ENTRIES):
        memo.put(key(i), answer(i), "ttl", 300, 1.0, 0.0)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    keys = [key(i) for i in range(cached.INFO_ENTRIES)] * max(1, n // cached.INFO_ENTRIES)
    random.Random(2).shuffle(keys)
    return rate(lambda k: memo.lookup(k, "ttl", 300, 2.0), keys), held


def fill(root: str, n: int) -> dict[str, int]:
    memo = remembered(root, 1)
    for i in range(n):
        memo.put(key(i), answer(i), "ttl", 300, time.time(), 0.0)
    assert memo.node is not None
    entries, volume = memo.node.usage()
    memo.node.close()
    files = {p.name: p.stat().st_size for p in (Path(root) / "meta").iterdir()}
    return {"entries": entries, "volume": volume, **files}


def node_hits(args: tuple[str, int, int]) -> dict[str, float]:
    """In a fresh process: lookups that all miss the front and hit the node."""
    root, n, seed = args
    memo = remembered(root, 1)
    keys = [key(i) for i in range(n)]
    random.Random(seed).shuffle(keys)
    now = time.time()

    def lookup(k: str) -> Any:
        memo.front.clear()
        found = memo.lookup(k, "ttl", 300, now)
        assert found is not None
        return found

    through_tier = rate(lookup, keys)
    assert memo.node is not None
    cache = memo.node._handle.get().cache
    get = rate(lambda k: cache.get(f"info\x00{k}"), keys)
    db = sqlite3.connect(os.path.join(root, "meta", "cache.db"))
    select = "SELECT value FROM Cache WHERE key = ? AND raw = 1"
    bare = rate(lambda k: db.execute(select, (f"info\x00{k}",)).fetchone(), keys)
    db.close()
    return {"tier": through_tier, "diskcache_get": get, "bare_select": bare}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    n = parser.parse_args().n
    root = tempfile.mkdtemp(prefix="mlstore-meta-bench-")
    os.chmod(root, 0o700)
    claim_cache_dir(root)
    old_rate, old_bytes = old_lru_hits(n)
    new_rate, front_bytes = front_hits(root, n)
    disk = fill(root, n)
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(1) as pool:
        one = pool.map(node_hits, [(root, n, 3)])[0]
    with spawn.Pool(4) as pool:
        four = pool.map(node_hits, [(root, n, s) for s in range(4)])
    result = {
        "n": n,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "old_lru_hits_per_s": old_rate,
        "old_lru_bytes": old_bytes,
        "front_hits_per_s": new_rate,
        "front_entries": cached.INFO_ENTRIES,
        "front_bytes": front_bytes,
        "node_hits_per_s_1_process": one["tier"],
        "diskcache_get_per_s_1_process": one["diskcache_get"],
        "bare_select_per_s_1_process": one["bare_select"],
        "node_hits_per_s_4_processes": sum(r["tier"] for r in four),
        "node": disk,
    }
    out = REPO / "benchmarks" / "results" / "metadata.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    on_disk = sum(v for k, v in disk.items() if k.startswith("cache.db"))
    print(f"metadata, {n} answers ({result['machine']})")
    print(f"  old per-process LRU : {old_rate:>10,.0f} hits/s  {n:>6} entries  {old_bytes:>11,} B")
    print(
        f"  new process front   : {new_rate:>10,.0f} hits/s  {cached.INFO_ENTRIES:>6} entries"
        f"  {front_bytes:>11,} B"
    )
    print(
        f"  node tier (diskcache): {one['tier']:>9,.0f} hits/s  {disk['entries']:>6} entries"
        f"  {on_disk:>11,} B on disk (db {disk.get('cache.db', 0):,}, wal "
        f"{disk.get('cache.db-wal', 0):,})"
    )
    print(f"  node tier, 4 procs  : {result['node_hits_per_s_4_processes']:>10,.0f} hits/s")
    print(f"  diskcache.get alone : {one['diskcache_get']:>10,.0f} lookups/s (no JSON decode)")
    print(f"  bare SQLite SELECT  : {one['bare_select']:>10,.0f} lookups/s (no decode)")


if __name__ == "__main__":
    main()
