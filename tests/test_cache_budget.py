"""The disk tier's budget holds under concurrent fillers, not only after each fill.

A filler reserves its blob's size node-wide before it writes a byte, so the blobs plus
the fills in progress never hold more than ``disk_bytes`` (the slack is zero). A fill
that finds no room is skipped, never failed: the read returns the right bytes. These
tests read through a Store from moto S3, in real processes, and kill a real filler.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from mlstore import Store
from mlstore.cache.disk import DiskTier
from mlstore.hashing import content_hash

pytestmark = pytest.mark.s3

KiB = 1024
MiB = 1024 * KiB
#: Generous hang guard for joins and barriers (never a pass condition).
_HANG = 300.0


@pytest.fixture
def cache_dir(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


def make_store(endpoint: str, cache_dir: str, **cache: Any) -> Store:
    settings = {"disk_dir": cache_dir, "memory_bytes": 0, **cache}
    return Store(options={"s3": {"endpoint_url": endpoint}}, cache=settings)


def upload(endpoint: str, items: dict[str, bytes]) -> None:
    with Store(options={"s3": {"endpoint_url": endpoint}}, cache={"enabled": False}) as writer:
        for url, data in items.items():
            writer.write_bytes(url, data)


class Sampler(threading.Thread):
    """Watches ``blobs/`` and ``tmp/`` of a cache directory; ``peak`` is the largest
    total it can prove was on disk at one moment.

    A listing of many directories is not one moment: a blob seen early in a listing
    may be gone before one seen late was written. So each listing is compared with the
    next: a file seen under the same name and inode in both was there the whole time
    between them, so the files in both were all there together when the first listing
    ended, each at least as large as first seen (blobs never change, temp files only
    grow). ``peak`` is thus never above the truth.
    """

    def __init__(self, root: str) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.peak = 0
        self.listings = 0
        self.done = threading.Event()

    def listing(self) -> dict[tuple[str, str], tuple[int, int]]:
        """``(directory, name) -> (inode, size)`` of every temp file and blob."""
        seen: dict[tuple[str, str], tuple[int, int]] = {}
        dirs = [os.path.join(self.root, "tmp")]
        with os.scandir(os.path.join(self.root, "blobs")) as fans:
            dirs += [fan.path for fan in fans if fan.is_dir(follow_symlinks=False)]
        for path in dirs:
            with os.scandir(path) as entries:
                for entry in entries:
                    try:
                        seen[(path, entry.name)] = (entry.inode(), entry.stat().st_size)
                    except FileNotFoundError:
                        continue
        return seen

    def run(self) -> None:
        before = self.listing()
        while not self.done.is_set():
            now = self.listing()
            together = sum(
                size for name, (ino, size) in before.items() if now.get(name, (-1,))[0] == ino
            )
            self.peak = max(self.peak, together)
            self.listings += 1
            before = now


def _fill(
    endpoint: str,
    cache_dir: str,
    budget: int,
    work: list[list[tuple[str, str]]],
    start: Any,
    results: Any,
    cache: dict[str, Any] | None = None,
) -> None:
    """One process of fillers: a thread per list in ``work``, each reading its
    ``(url, expected hash)`` pairs once, through a Store with the ``cache`` settings
    given; puts what went wrong on ``results``."""
    wrong: list[str] = []
    with make_store(endpoint, cache_dir, disk_bytes=budget, **(cache or {})) as store:

        def run(items: list[tuple[str, str]]) -> None:
            try:
                start.wait(_HANG)
                for url, digest in items:
                    if content_hash(store.read_bytes(url)) != digest:
                        wrong.append(f"wrong bytes for {url}")
            except BaseException as exc:  # reported to the parent, which fails the test
                wrong.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=run, args=(items,)) for items in work]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(_HANG)
        stats = store.stats()
    results.put((wrong, stats.get("hits", "disk") + stats.get("evictions", "disk")))


@pytest.mark.slow
def test_six_processes_of_four_threads_never_hold_more_than_the_budget(
    s3_options: dict[str, object], s3_bucket: str, cache_dir: str
) -> None:
    processes, threads, each, budget = 6, 4, 3, 4 * MiB
    endpoint = str(s3_options["endpoint_url"])
    rng = random.Random(13)
    objects = {
        f"s3://{s3_bucket}/fill/{i:03d}.bin": rng.randbytes(MiB)
        for i in range(processes * threads * each)
    }
    upload(endpoint, objects)
    pairs = [(url, content_hash(data)) for url, data in objects.items()]
    DiskTier(cache_dir, budget).close()  # the directory exists before it is watched

    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(processes * threads)
    results = ctx.Queue()
    sampler = Sampler(cache_dir)
    sampler.start()
    children = []
    for p in range(processes):
        work = [pairs[(p * threads + t) * each :][:each] for t in range(threads)]
        child = ctx.Process(target=_fill, args=(endpoint, cache_dir, budget, work, start, results))
        child.start()
        children.append(child)
    try:
        outcomes = [results.get(timeout=_HANG) for _ in children]
    finally:
        for child in children:
            child.join(_HANG)
        sampler.done.set()
        sampler.join(_HANG)
    assert [wrong for wrong, _ in outcomes] == [[]] * processes, "every read got its bytes"
    assert all(child.exitcode == 0 for child in children)
    assert sampler.peak > 0 and sum(used for _, used in outcomes) > 0, "the disk tier was used"
    overshoot = sampler.peak - budget
    print(f"peak {sampler.peak / MiB:.2f} MiB over {sampler.listings} listings")
    assert overshoot <= 0, (
        f"the cache held {sampler.peak / MiB:.2f} MiB on disk, "
        f"{overshoot / MiB:.2f} MiB over its {budget / MiB:.0f} MiB budget"
    )


def on_disk(cache_dir: str) -> int:
    """Bytes in the cache's blobs and temp files (with nothing running)."""
    total = 0
    for sub in ("blobs", "tmp"):
        for parent, _, files in os.walk(os.path.join(cache_dir, sub)):
            total += sum(os.path.getsize(os.path.join(parent, name)) for name in files)
    return total


def test_an_object_larger_than_the_budget_is_read_but_not_kept_on_disk(
    s3_options: dict[str, object], s3_bucket: str, cache_dir: str
) -> None:
    endpoint, budget = str(s3_options["endpoint_url"]), 1 * MiB
    url, data = f"s3://{s3_bucket}/large.bin", os.urandom(budget + 1)
    upload(endpoint, {url: data})
    with make_store(endpoint, cache_dir, disk_bytes=budget) as store:
        assert store.read_bytes(url) == data
        assert store.read_bytes(url) == data
        stats = store.stats()
    assert stats.get("disk_skips", "disk") == 2, "each fill was skipped, and counted"
    assert stats.get("cache_errors", "disk") == 0 and stats.get("disk_full", "disk") == 0
    assert on_disk(cache_dir) <= budget


#: Plays a filler mid-fill: its temp file locked, the whole budget reserved for it. Its
#: name carries a pid no process here has, as a filler in another container's would.
_FILLER = """
import os, sys
from mlstore.cache.disk import DiskTier, _create_temp

root, budget = sys.argv[1], int(sys.argv[2])
tier = DiskTier(root, budget)
fd, tmp = _create_temp(os.path.join(root, "tmp"), tag=99_999_999)
assert tier._reserve(os.path.basename(tmp), "ab" * 16, budget)
print(tmp, flush=True)
sys.stdin.readline()
"""


def test_room_a_live_filler_reserved_is_kept_and_a_killed_fillers_is_reclaimed(
    s3_options: dict[str, object], s3_bucket: str, cache_dir: str
) -> None:
    endpoint, budget = str(s3_options["endpoint_url"]), 1 * MiB
    url, data = f"s3://{s3_bucket}/small.bin", os.urandom(256 * KiB)
    upload(endpoint, {url: data})
    child = subprocess.Popen(
        [sys.executable, "-c", _FILLER, cache_dir, str(budget)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert child.stdout is not None
        temp = Path(child.stdout.readline().decode().strip())
        assert temp.is_file(), "the filler did not start"
        with make_store(endpoint, cache_dir, disk_bytes=budget) as store:
            assert store.read_bytes(url) == data
            assert store.stats().get("disk_skips", "disk") == 1, "the live filler kept its room"
            assert store.cache.size() == 0
            os.kill(child.pid, signal.SIGKILL)
            child.wait(_HANG)
            assert store.read_bytes(url) == data
            stats = store.stats()
            assert stats.get("disk_skips", "disk") == 1, "the dead filler's room was reclaimed"
            assert store.cache.size() == len(data)
        assert not temp.exists(), "the dead filler's temp file was removed"
        assert stats.get("cache_errors", "disk") == 0
    finally:
        child.kill()
        child.communicate()


def whole_directory(cache_dir: str) -> int:
    """Bytes of every file below the cache directory (with nothing running)."""
    total = 0
    for parent, _, files in os.walk(cache_dir):
        total += sum(os.path.getsize(os.path.join(parent, name)) for name in files)
    return total


def fill_from_processes(
    endpoint: str, cache_dir: str, budget: int, pairs: list[tuple[str, str]], **cache: Any
) -> list[Any]:
    """Read ``pairs`` from two processes of two threads each; their outcomes."""
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(4), ctx.Queue()
    children = [
        ctx.Process(
            target=_fill,
            args=(endpoint, cache_dir, budget, [pairs[p::4], pairs[p + 2 :: 4]], start, results),
            kwargs={"cache": cache},
        )
        for p in range(2)
    ]
    for child in children:
        child.start()
    try:
        return [results.get(timeout=_HANG) for _ in children]
    finally:
        for child in children:
            child.join(_HANG)


def test_disk_cap_all_holds_the_index_metadata_and_stats_within_the_budget(
    s3_options: dict[str, object], s3_bucket: str, tmp_path: Path
) -> None:
    """``disk_cap="all"`` is the cap for a volume that must never fill: every file of
    the directory counts. With the default, the blobs alone fill the budget and the
    index and metadata come on top (asserted too, so the first half can fail)."""
    endpoint, budget = str(s3_options["endpoint_url"]), 1 * MiB
    rng = random.Random(5)
    objects = {f"s3://{s3_bucket}/cap/{i:03d}.bin": rng.randbytes(64 * KiB) for i in range(48)}
    upload(endpoint, objects)
    pairs = [(url, content_hash(data)) for url, data in objects.items()]

    capped, blobs_only = str(tmp_path / "all"), str(tmp_path / "blobs")
    outcomes = fill_from_processes(endpoint, capped, budget, pairs, disk_cap="all")
    assert [wrong for wrong, _ in outcomes] == [[], []], "every read got its bytes"
    index_and_meta = whole_directory(capped) - on_disk(capped)
    assert index_and_meta > 0, "the index, metadata and stats files exist"
    assert whole_directory(capped) <= budget
    assert on_disk(capped) > 0, "blobs were evicted to make room, not every fill skipped"

    fill_from_processes(endpoint, blobs_only, budget, pairs)
    assert on_disk(blobs_only) <= budget
    assert whole_directory(blobs_only) > budget
