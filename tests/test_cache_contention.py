"""Processes that share the node cache do not queue behind each other on a hit.

A disk hit reads the index (SQLite in WAL mode: readers never wait for a writer) and the
blob. The only write a hit causes, its access time, is batched per process and written
by a background thread, in one transaction, so a hit never waits for the index's write
lock, which fillers and other processes' batches take.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import mlstore
import mlstore.cache.disk

# Holds the index's write lock until its stdin closes (another process's long write).
_HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
db.execute("BEGIN IMMEDIATE")
print("held", flush=True)
sys.stdin.read()
db.execute("ROLLBACK")
"""


def _atimes(index: str) -> dict[str, float]:
    db = sqlite3.connect(index)
    try:
        return {h: float(t) for h, t in db.execute("SELECT hash, atime FROM blobs")}
    finally:
        db.close()


def test_a_disk_hit_never_waits_for_the_index_write_lock(
    s3_options: dict[str, object],
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mlstore.cache.disk, "_TOUCH_EVERY", 0.0)  # every hit's batch is due
    cache: dict[str, Any] = {"disk_dir": str(tmp_path / "cache"), "memory_bytes": 0}
    urls = [f"s3://{s3_bucket}/hits/{i}.bin" for i in range(3)]
    with mlstore.Store(options={"s3": s3_options}, cache=cache) as store:
        for i, url in enumerate(urls):
            store.write_bytes(url, os.urandom(4096 + i))
            store.read_bytes(url)  # now on the node's disk
        index = str(tmp_path / "cache" / "index.sqlite")
        before = _atimes(index)
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, index],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            served: list[bytes] = []
            reader = threading.Thread(
                target=lambda: served.extend(store.read_bytes(u) for u in urls * 5), daemon=True
            )
            reader.start()
            reader.join(timeout=30)  # a hang guard: the index's busy timeout is 60 s
            assert not reader.is_alive(), "a disk hit waited for another process's write lock"
            assert len(served) == 15
            assert store.stats().get("hits", "disk") == 15
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(timeout=30)
            assert holder.stdout is not None
            holder.stdout.close()
        # The holder's last connection closed: it must have seen this process's
        # connections (new threads' included) and left their write-ahead log alone.
        assert os.path.exists(index + "-wal"), "another process deleted the log in use"
        assert [store.read_bytes(u) for u in urls] == served[:3]
        disk = store.cache.disk
        assert disk is not None
        batches = disk._index.get()
        deadline = time.monotonic() + 60  # the index's busy timeout
        while batches.flushing and time.monotonic() < deadline:  # a batch that waited
            time.sleep(0.01)  # for the lock finishes once the lock is free
        assert not batches.flushing, "the background batch never got the freed lock"
        disk.flush_access_times()  # and the uses still batched reach the index
        after = _atimes(index)
        assert all(after[h] >= before[h] for h in before)
        assert sum(after[h] > before[h] for h in before) >= 1


def _open_cache_at_once(directory: str, barrier: Any, results: Any) -> None:
    from mlstore.cache.tiered import TieredCache
    from mlstore.config import CacheConfig
    from mlstore.metrics import Metrics

    barrier.wait()
    try:
        TieredCache(CacheConfig(disk_dir=directory), Metrics()).close()
        results.put("ok")
    except Exception as exc:  # reported to the parent
        results.put(repr(exc))


def test_workers_opening_a_brand_new_cache_at_once_all_get_it(tmp_path: Path) -> None:
    """DataLoader workers started together on a fresh node all open the new index: the
    switch to WAL mode that each asks for is not refused as "database is locked"."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    outcomes: list[str] = []
    for trial in range(15):
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [
            ctx.Process(
                target=_open_cache_at_once, args=(str(tmp_path / f"c{trial}"), barrier, results)
            )
            for _ in range(4)
        ]
        for p in procs:
            p.start()
        outcomes += [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
    assert outcomes == ["ok"] * 60
