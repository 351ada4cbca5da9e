"""The tiered cache against a real S3 (moto_server) behind a counting proxy: hits,
single-flight across real processes, integrity, eviction, dedupe, policies, SIGKILLed
fillers, a full disk, objects past 2 GiB, and the cache directory's safety rules."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import pickle
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mlstore
from mlstore import Store
from mlstore.cache import MemoryTier
from mlstore.cache.disk import DiskTier
from mlstore.cache.tiered import Fetched, TieredCache
from mlstore.config import CacheConfig
from mlstore.hashing import Hasher, content_hash
from mlstore.metrics import Metrics
from tests.emulators import ServerProcess
from tests.servers import proxy

pytestmark = pytest.mark.s3

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def gets(endpoint: str) -> int:
    return proxy.requests(endpoint, "GET")


def heads(endpoint: str) -> int:
    return proxy.requests(endpoint, "HEAD")


@pytest.fixture
def cache_dir(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


@pytest.fixture
def via_proxy(s3_proxy: ServerProcess) -> Iterator[str]:
    proxy.reset(s3_proxy.endpoint)
    yield s3_proxy.endpoint


@pytest.fixture
def bucket(s3_bucket: str) -> str:
    return s3_bucket


def make_store(endpoint: str, cache_dir: str, **cache: Any) -> Store:
    settings: dict[str, Any] = {"disk_dir": cache_dir, **cache}
    clock = settings.pop("clock", None)
    return Store(options={"s3": {"endpoint_url": endpoint}}, cache=settings, clock=clock)


_uploaders: dict[str, Store] = {}


def upload(endpoint: str, url: str, data: bytes) -> None:
    """Write through a cache-less Store, so the writer's cache plays no part."""
    if endpoint not in _uploaders:
        _uploaders[endpoint] = Store(
            options={"s3": {"endpoint_url": endpoint}}, cache={"enabled": False}
        )
    _uploaders[endpoint].write_bytes(url, data)


# ---------------------------------------------------------------- memory tier


def test_memory_tier_keeps_its_budget_and_evicts_least_recently_used() -> None:
    tier: MemoryTier[None] = MemoryTier(10 * KiB)
    for i in range(20):
        tier.put(f"k{i}", None, bytes(KiB))
        assert tier.size() <= 10 * KiB
    assert tier.get("k0") is None and tier.get("k19") is not None
    tier.get("k10")  # used: survives the next insertions
    for i in range(20, 29):
        tier.put(f"k{i}", None, bytes(KiB))
    assert tier.get("k10") is not None and tier.get("k11") is None
    tier.put("huge", None, bytes(11 * KiB))  # larger than the whole budget: not kept
    assert tier.get("huge") is None


def test_memory_hit_returns_the_same_bytes_object(
    via_proxy: str, bucket: str, cache_dir: str
) -> None:
    url = f"s3://{bucket}/same.bin"
    upload(via_proxy, url, os.urandom(4096))
    with make_store(via_proxy, cache_dir) as store:
        first = store.read_bytes(url)
        assert store.read_bytes(url) is first  # no copy
        assert store.read_bytes(url, 10, 20) == first[10:20]
        stats = store.stats()
    assert stats.get("hits", "memory") == 2
    assert gets(via_proxy) == 1


# ---------------------------------------------------------------- disk tier


def test_a_fresh_process_reads_from_the_disk_tier_without_the_network(
    via_proxy: str, bucket: str, cache_dir: str
) -> None:
    data = os.urandom(256 * KiB)
    url = f"s3://{bucket}/warm.bin"
    upload(via_proxy, url, data)
    with make_store(via_proxy, cache_dir) as store:
        assert store.read_bytes(url) == data
    before = proxy.counts(via_proxy)["total"]
    code = (
        "import mlstore, sys\n"
        f"s = mlstore.Store(options={{'s3': {{'endpoint_url': {via_proxy!r}}}}}, "
        f"cache={{'disk_dir': {cache_dir!r}}})\n"
        f"d = s.read_bytes({url!r})\n"
        "st = s.stats()\n"
        "print(mlstore.hashing.content_hash(d), st.get('hits', 'disk'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [content_hash(data), "1"]
    assert proxy.counts(via_proxy)["total"] == before, "a disk hit sends no request"


def _cold_read(args: tuple[str, str, list[str]]) -> list[str]:
    endpoint, cache_dir, urls = args
    store = make_store(endpoint, cache_dir)
    random.Random(os.getpid()).shuffle(urls)
    return sorted(content_hash(store.read_bytes(u)) for u in urls)


@pytest.mark.slow
def test_eight_processes_cold_reading_the_same_objects_fetch_each_once(
    via_proxy: str, bucket: str, cache_dir: str
) -> None:
    urls = [f"s3://{bucket}/shared/{i:03d}.bin" for i in range(200)]
    expected = []
    for i, url in enumerate(urls):
        data = os.urandom(8 * KiB + i)
        upload(via_proxy, url, data)
        expected.append(content_hash(data))
    proxy.reset(via_proxy)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(8) as pool:
        results = pool.map(_cold_read, [(via_proxy, cache_dir, list(urls)) for _ in range(8)])
    assert all(r == sorted(expected) for r in results)
    assert gets(via_proxy) == 200, "one GET per object per node"


def test_a_tampered_blob_is_detected_evicted_and_refetched(
    via_proxy: str, bucket: str, cache_dir: str
) -> None:
    data = os.urandom(64 * KiB)
    url = f"s3://{bucket}/tamper.bin"
    upload(via_proxy, url, data)
    with make_store(via_proxy, cache_dir) as store:
        store.read_bytes(url)
    blob = Path(cache_dir) / "blobs" / content_hash(data)[:2] / content_hash(data)
    raw = bytearray(blob.read_bytes())
    raw[1000] ^= 0xFF
    blob.write_bytes(bytes(raw))
    proxy.reset(via_proxy)
    with make_store(via_proxy, cache_dir) as store:
        assert store.read_bytes(url) == data
        assert store.stats().get("integrity_failures", "disk") == 1
    assert gets(via_proxy) == 1, "the corrupt copy was replaced by a fresh fetch"
    with make_store(via_proxy, cache_dir) as store:
        assert store.read_bytes(url) == data
        assert store.cache.verify() == {"checked": 1, "dropped": 0}


def test_a_planted_pickle_is_never_unpickled(
    via_proxy: str, bucket: str, cache_dir: str, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Exploit())
    data = os.urandom(32 * KiB)
    url = f"s3://{bucket}/pickle.bin"
    upload(via_proxy, url, data)
    with make_store(via_proxy, cache_dir) as store:
        store.read_bytes(url)
    digest = content_hash(data)
    (Path(cache_dir) / "blobs" / digest[:2] / digest).write_bytes(payload)
    planted = Path(cache_dir) / "blobs" / "00" / ("0" * 32)
    planted.parent.mkdir(exist_ok=True)
    planted.write_bytes(payload)
    with make_store(via_proxy, cache_dir) as store:
        assert store.read_bytes(url) == data
        store.cache.verify()
    assert not marker.exists()


def test_the_disk_budget_holds_and_eviction_is_least_recently_used(
    via_proxy: str, bucket: str, cache_dir: str
) -> None:
    size, budget = 100 * KiB, 1 * MiB
    urls = [f"s3://{bucket}/lru/{i:02d}.bin" for i in range(20)]
    for url in urls:
        upload(via_proxy, url, os.urandom(size))
    with make_store(via_proxy, cache_dir, memory_bytes=0, disk_bytes=budget) as store:
        for i, url in enumerate(urls):
            store.read_bytes(url)
            if i == 3:
                store.cache.disk.flush_access_times()  # type: ignore[union-attr]
            assert store.cache.size() <= budget + size
            if i > 3:
                store.read_bytes(urls[0])  # keep the first one warm
        assert store.stats().get("evictions", "disk") > 0
        proxy.reset(via_proxy)
        store.read_bytes(urls[0])
        store.read_bytes(urls[-1])
        assert gets(via_proxy) == 0, "recently used objects survived"
        store.read_bytes(urls[1])
        assert gets(via_proxy) == 1, "a long unused object was evicted"


def test_identical_content_in_two_buckets_is_stored_once(
    via_proxy: str, s3_bucket: str, cache_dir: str
) -> None:
    other = f"t-{uuid.uuid4().hex[:16]}"
    data = os.urandom(128 * KiB)
    with Store(options={"s3": {"endpoint_url": via_proxy}}, cache={"enabled": False}) as s:
        s.mkdir(f"s3://{other}")
    upload(via_proxy, f"s3://{s3_bucket}/a.bin", data)
    upload(via_proxy, f"s3://{other}/copy-of-a.bin", data)
    with make_store(via_proxy, cache_dir) as store:
        assert store.read_bytes(f"s3://{s3_bucket}/a.bin") == data
        assert store.read_bytes(f"s3://{other}/copy-of-a.bin") == data
        assert store.cache.disk.count() == 1  # type: ignore[union-attr]
        assert store.cache.size() == len(data)
        assert store.stats().get("dedupe_bytes_saved", "disk") == len(data)


def test_known_content_hash_serves_a_new_url_without_a_get(
    via_proxy: str, bucket: str, cache_dir: str
) -> None:
    data = os.urandom(96 * KiB)
    with make_store(via_proxy, cache_dir) as writer:  # a writer on this node: proven
        writer.write_bytes(f"s3://{bucket}/original.bin", data)
        writer.write_bytes(f"s3://{bucket}/renamed.bin", data)  # mlstore records the hash
    with make_store(via_proxy, cache_dir) as store:
        store.read_bytes(f"s3://{bucket}/original.bin")
        assert store.info(f"s3://{bucket}/renamed.bin").content_hash == content_hash(data)
        proxy.reset(via_proxy)
        assert store.read_bytes(f"s3://{bucket}/renamed.bin") == data
        assert gets(via_proxy) == 0
        assert store.stats().get("dedupe_hits", "cache") == 1


def test_concurrent_reads_of_known_duplicates_fetch_the_content_once(
    via_proxy: str, bucket: str, cache_dir: str
) -> None:
    data = os.urandom(64 * KiB)
    urls = [f"s3://{bucket}/copies/{i}.bin" for i in range(16)]
    with make_store(via_proxy, cache_dir) as writer:  # written on this node: proven
        for url in urls:
            writer.write_bytes(url, data)
    with make_store(via_proxy, cache_dir, memory_bytes=0) as store:
        for url in urls:
            store.info(url)  # the metadata names the content
        proxy.reset(via_proxy)
        assert store.read_many(urls, max_workers=16) == [data] * 16
        assert gets(via_proxy) == 1, "one GET for sixteen URLs of one content"
        assert store.stats().get("dedupe_hits", "cache") == 15


# ---------------------------------------------------------------- policies


def test_ttl_policy_serves_cached_data_until_the_ttl_then_revalidates(
    via_proxy: str, bucket: str, cache_dir: str
) -> None:
    clock = Clock()
    url = f"s3://{bucket}/ttl.bin"
    upload(via_proxy, url, b"version one")
    # No stale window: past the ttl a copy is checked before it is served (the
    # window's own behaviour is in test_stale_while_revalidate.py).
    with make_store(
        via_proxy, cache_dir, validate="ttl", ttl=10, stale_while_revalidate=0, clock=clock
    ) as store:
        assert store.read_bytes(url) == b"version one"
        upload(via_proxy, url, b"version two")
        clock.now += 9
        assert store.read_bytes(url) == b"version one", "within the ttl: no request"
        clock.now += 2
        proxy.reset(via_proxy)
        assert store.read_bytes(url) == b"version two"
        assert heads(via_proxy) == 1 and gets(via_proxy) == 1
        clock.now += 11
        proxy.reset(via_proxy)
        assert store.read_bytes(url) == b"version two"
        assert heads(via_proxy) == 1 and gets(via_proxy) == 0, "unchanged: HEAD only"


def test_an_entry_stamped_in_the_future_is_revalidated(
    via_proxy: str, bucket: str, cache_dir: str
) -> None:
    # A filler whose clock ran an hour ahead stamps its entries an hour ahead; without a
    # check they would be trusted for that hour plus the ttl.
    ahead, clock = Clock(), Clock()
    ahead.now += 3600
    changed, unchanged, opened = (f"s3://{bucket}/ahead-{n}.bin" for n in range(3))
    for url in (changed, unchanged, opened):
        upload(via_proxy, url, b"version one")
    with make_store(via_proxy, cache_dir, validate="ttl", ttl=10, clock=ahead) as filler:
        for url in (changed, unchanged, opened):
            filler.read_bytes(url)
    upload(via_proxy, changed, b"version two")
    upload(via_proxy, opened, b"version two")
    with make_store(via_proxy, cache_dir, validate="ttl", ttl=10, clock=clock) as store:
        proxy.reset(via_proxy)
        assert store.read_bytes(changed) == b"version two"
        assert heads(via_proxy) == 1 and gets(via_proxy) == 1
        proxy.reset(via_proxy)
        assert store.read_bytes(unchanged) == b"version one"
        assert heads(via_proxy) == 1 and gets(via_proxy) == 0, "same version: HEAD only"
        with store.open(opened) as fh:
            assert fh.read() == b"version two"
        proxy.reset(via_proxy)
        clock.now += 5  # restamped with this clock at the HEAD: trusted for the ttl
        assert [store.read_bytes(u) for u in (changed, unchanged)] == [
            b"version two",
            b"version one",
        ]
        assert proxy.counts(via_proxy)["total"] == 0


def test_a_stamp_a_little_ahead_is_still_trusted(
    via_proxy: str, bucket: str, cache_dir: str
) -> None:
    ahead, clock = Clock(), Clock()
    ahead.now += 0.5  # ordinary skew between the processes of one node
    url = f"s3://{bucket}/nearly.bin"
    upload(via_proxy, url, b"shard")
    with make_store(via_proxy, cache_dir, validate="ttl", ttl=10, clock=ahead) as filler:
        filler.read_bytes(url)
    with make_store(via_proxy, cache_dir, validate="ttl", ttl=10, clock=clock) as store:
        proxy.reset(via_proxy)
        assert store.read_bytes(url) == b"shard"
    assert proxy.counts(via_proxy)["total"] == 0


def test_never_policy_trusts_the_cache(via_proxy: str, bucket: str, cache_dir: str) -> None:
    clock = Clock()
    url = f"s3://{bucket}/never.bin"
    upload(via_proxy, url, b"immutable shard")
    with make_store(via_proxy, cache_dir, validate="never", clock=clock) as store:
        store.read_bytes(url)
        proxy.reset(via_proxy)
        clock.now += 10**6
        assert store.read_bytes(url) == b"immutable shard"
    assert proxy.counts(via_proxy)["total"] == 0


def test_always_policy_checks_every_read(via_proxy: str, bucket: str, cache_dir: str) -> None:
    url = f"s3://{bucket}/always.bin"
    upload(via_proxy, url, b"first")
    with make_store(via_proxy, cache_dir, validate="always") as store:
        assert store.read_bytes(url) == b"first"
        proxy.reset(via_proxy)
        assert store.read_bytes(url) == b"first"
        assert heads(via_proxy) == 1 and gets(via_proxy) == 0
        upload(via_proxy, url, b"second")
        assert store.read_bytes(url) == b"second"


def test_writes_through_the_store_are_seen_at_once(
    via_proxy: str, bucket: str, cache_dir: str
) -> None:
    url = f"s3://{bucket}/rw.bin"
    with make_store(via_proxy, cache_dir, validate="never") as store:
        store.write_bytes(url, b"one")
        assert store.read_bytes(url) == b"one"
        store.write_bytes(url, b"two")
        assert store.read_bytes(url) == b"two"
        assert store.info(url).size == 3
        with store.open(url, "wb") as fh:
            fh.write(b"three")
        assert store.read_bytes(url) == b"three"
        store.rm(url)
        with pytest.raises(mlstore.NotFoundError):
            store.read_bytes(url)


# ---------------------------------------------------------------- large objects


def test_large_objects_are_cached_as_blocks(via_proxy: str, bucket: str, cache_dir: str) -> None:
    data = os.urandom(4 * MiB + 123)
    url = f"s3://{bucket}/large.bin"
    upload(via_proxy, url, data)
    with make_store(via_proxy, cache_dir, block_threshold=1 * MiB, block_size=256 * KiB) as store:
        proxy.reset(via_proxy)
        with store.open(url) as fh:
            fh.seek(3 * MiB + 5)
            assert fh.read(10) == data[3 * MiB + 5 : 3 * MiB + 15]
        assert gets(via_proxy) == 1, "only the block touched was fetched"
        assert store.read_bytes(url, 100, 200) == data[100:200]
        rng = random.Random(7)
        for _ in range(50):
            lo = rng.randrange(len(data))
            hi = min(len(data), lo + rng.randrange(1, 700 * KiB))
            assert store.read_bytes(url, lo, hi) == data[lo:hi]
        with store.open(url) as fh:
            assert fh.read() == data
        blocks = -(-len(data) // (256 * KiB))
        assert gets(via_proxy) == blocks, "every block fetched once, never twice"


# ---------------------------------------------------------------- faults


def _fill_then_exit(endpoint: str, cache_dir: str, url: str) -> None:
    make_store(endpoint, cache_dir).read_bytes(url)


@pytest.mark.slow
def test_fillers_killed_mid_fill_never_leave_a_servable_partial_entry(
    via_proxy: str, bucket: str, cache_dir: str, s3_options: dict[str, object]
) -> None:
    direct = str(s3_options["endpoint_url"])  # moto itself, past the throttled proxy
    size, rate = 2 * MiB, 8 * MiB  # bytes/s: every fill takes at least a quarter second
    data = os.urandom(size)
    url = f"s3://{bucket}/killed.bin"
    upload(via_proxy, url, data)
    rng = random.Random(11)
    ctx = multiprocessing.get_context("fork")
    shortest = size / rate
    proxy.set_rate(via_proxy, rate)
    try:
        for _ in range(50):
            child = ctx.Process(target=_fill_then_exit, args=(via_proxy, cache_dir, url))
            child.start()
            # The child cannot finish before `shortest`: it dies mid-fill, holding the
            # single-flight lock, at a random point of its download.
            child.join(timeout=rng.uniform(0.05, 0.9) * shortest)
            assert child.is_alive(), "the filler finished before it could be killed"
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
            child.join()
            with make_store(direct, cache_dir, memory_bytes=0) as store:
                assert store.read_bytes(url) == data  # never a partial entry; never blocked
                store.cache.clear()
    finally:
        proxy.set_rate(via_proxy, 0)
    with make_store(via_proxy, cache_dir) as store:  # a new start removes dead fillers' temps
        assert store.read_bytes(url) == data
        assert os.listdir(Path(cache_dir) / "tmp") == []
        assert store.cache.verify()["dropped"] == 0


def test_a_full_disk_still_returns_correct_bytes_with_one_warning(
    via_proxy: str, bucket: str, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    small = small_disk
    objects = {f"s3://{bucket}/big-{i}.bin": os.urandom(700 * KiB) for i in range(3)}
    for url, data in objects.items():
        upload(via_proxy, url, data)
    with (
        caplog.at_level(logging.WARNING, logger="mlstore"),
        make_store(via_proxy, str(small), memory_bytes=0, disk_bytes=10 * MiB) as s,
    ):
        for url, data in objects.items():
            assert s.read_bytes(url) == data
            assert s.read_bytes(url) == data
        assert s.stats().get("disk_full", "disk") >= 1
    warnings = [r for r in caplog.records if "full" in r.getMessage()]
    assert len(warnings) == 1
    assert os.listdir(small / "tmp") == []


# ---------------------------------------------------------------- the directory


def test_the_cache_directory_is_private(via_proxy: str, bucket: str, cache_dir: str) -> None:
    url = f"s3://{bucket}/private.bin"
    upload(via_proxy, url, b"x" * 100)
    with make_store(via_proxy, cache_dir) as store:
        store.read_bytes(url)
    assert os.stat(cache_dir).st_mode & 0o777 == 0o700
    digest = content_hash(b"x" * 100)
    assert os.stat(Path(cache_dir) / "blobs" / digest[:2] / digest).st_mode & 0o777 == 0o600


def test_a_world_writable_cache_directory_is_refused(
    via_proxy: str, bucket: str, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(mlstore.ConfigError, match="writable by other users") as exc:
        make_store(via_proxy, str(shared)).read_bytes(f"s3://{bucket}/x")
    assert str(shared) in str(exc.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
def test_a_cache_directory_owned_by_someone_else_is_refused(
    via_proxy: str, bucket: str, tmp_path: Path
) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(mlstore.ConfigError, match="another user"):
        make_store(via_proxy, str(theirs)).read_bytes(f"s3://{bucket}/x")


def test_temp_files_of_dead_fillers_are_removed_at_start(cache_dir: str) -> None:
    DiskTier(cache_dir, MiB)
    tmp = Path(cache_dir) / "tmp"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp / f"{dead.pid}-abc").write_bytes(b"half a blob")
    (tmp / f"{os.getpid()}-def").write_bytes(b"a live filler's blob")
    DiskTier(cache_dir, MiB)
    assert sorted(os.listdir(tmp)) == [f"{os.getpid()}-def"]


def test_cache_management(via_proxy: str, bucket: str, cache_dir: str) -> None:
    urls = [f"s3://{bucket}/m/{i}.bin" for i in range(5)]
    for url in urls:
        upload(via_proxy, url, os.urandom(50 * KiB))
    with make_store(via_proxy, cache_dir) as store:
        store.read_many(urls)
        assert store.cache.size() == 5 * 50 * KiB
        freed = store.cache.prune(120 * KiB)
        assert freed >= 3 * 50 * KiB and store.cache.size() <= 120 * KiB
        assert store.cache.verify()["dropped"] == 0
        store.cache.clear()
        assert store.cache.size() == 0
        proxy.reset(via_proxy)
        store.read_bytes(urls[0])
        assert gets(via_proxy) == 1


def test_stats_name_every_tier(via_proxy: str, bucket: str, cache_dir: str) -> None:
    url = f"s3://{bucket}/stats.bin"
    upload(via_proxy, url, b"s" * 1000)
    with make_store(via_proxy, cache_dir) as store:
        store.read_bytes(url)
        store.read_bytes(url)
        stats = store.stats()
    assert stats.get("misses", "cache") == 1
    assert stats.get("hits", "memory") == 1
    assert stats.get("bytes_fetched", "cache") == 1000
    assert "memory" in stats.table() and "cache" in stats.table()


def test_a_cache_on_another_disk_can_be_moved(cache_dir: str, tmp_path: Path) -> None:
    """A cache directory is self-contained: copied elsewhere, it still serves."""
    tier = DiskTier(cache_dir, MiB)
    tier.put("s3://b/k", '"v1"', b"portable")
    moved = tmp_path / "moved"
    shutil.copytree(cache_dir, moved)
    other = DiskTier(str(moved), MiB)
    entry = other.lookup("s3://b/k")
    assert entry is not None and other.read_blob(entry.hash, entry.size) == b"portable"


def _read_in_child(args: tuple[Store, list[str]]) -> list[str]:
    store, urls = args
    return [content_hash(store.read_bytes(u)) for u in urls]


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_warm_store_works_in_child_processes(
    via_proxy: str, bucket: str, cache_dir: str, method: str
) -> None:
    urls = [f"s3://{bucket}/child/{i}.bin" for i in range(6)]
    blobs = [os.urandom(10 * KiB + i) for i in range(6)]
    for url, data in zip(urls, blobs, strict=True):
        upload(via_proxy, url, data)
    with make_store(via_proxy, cache_dir) as store:
        for url in urls[:3]:
            store.read_bytes(url)  # warm: memory and disk
        proxy.reset(via_proxy)
        with multiprocessing.get_context(method).Pool(2) as pool:
            results = pool.map(_read_in_child, [(store, urls[:3]), (store, urls[3:])])
        assert [h for r in results for h in r] == [content_hash(b) for b in blobs]
        assert gets(via_proxy) == 3, "the warm objects came from the shared disk tier"
        assert store.read_bytes(urls[0]) == blobs[0]  # the parent still works


def test_policies_apply_per_url_prefix(via_proxy: str, bucket: str, cache_dir: str) -> None:
    clock = Clock()
    frozen, live = f"s3://{bucket}/frozen/a.bin", f"s3://{bucket}/live/a.bin"
    upload(via_proxy, frozen, b"frozen v1")
    upload(via_proxy, live, b"live v1")
    policies = {f"s3://{bucket}/frozen/": {"validate": "never"}}
    with make_store(
        via_proxy, cache_dir, validate="always", policies=policies, clock=clock
    ) as store:
        store.read_bytes(frozen)
        store.read_bytes(live)
        upload(via_proxy, frozen, b"frozen v2")
        upload(via_proxy, live, b"live v2")
        assert store.read_bytes(frozen) == b"frozen v1", "immutable prefix: never checked"
        assert store.read_bytes(live) == b"live v2", "everything else: checked every read"


def test_a_bad_policy_is_a_config_error_naming_the_prefix() -> None:
    with pytest.raises(mlstore.ConfigError, match="s3://b/x/"):
        mlstore.CacheConfig(policies={"s3://b/x/": {"validate": "sometimes"}})


def test_listings_are_cached_under_the_policy(via_proxy: str, bucket: str, cache_dir: str) -> None:
    clock = Clock()
    upload(via_proxy, f"s3://{bucket}/dir/a.bin", b"a")
    with make_store(via_proxy, cache_dir, validate="ttl", ttl=30, clock=clock) as store:
        assert store.ls(f"s3://{bucket}/dir") == [f"s3://{bucket}/dir/a.bin"]
        upload(via_proxy, f"s3://{bucket}/dir/b.bin", b"b")  # by someone else
        proxy.reset(via_proxy)
        assert len(store.ls(f"s3://{bucket}/dir")) == 1, "within the ttl: the cached listing"
        assert proxy.counts(via_proxy)["total"] == 0
        clock.now += 31
        assert len(store.ls(f"s3://{bucket}/dir")) == 2
        store.write_bytes(f"s3://{bucket}/dir/c.bin", b"c")  # by this Store: seen at once
        assert len(store.ls(f"s3://{bucket}/dir")) == 3


def test_steady_reads_do_not_stretch_the_ttl(via_proxy: str, bucket: str, cache_dir: str) -> None:
    clock = Clock()
    url = f"s3://{bucket}/steady.bin"
    upload(via_proxy, url, b"v1")
    with make_store(
        via_proxy, cache_dir, validate="ttl", ttl=10, stale_while_revalidate=0, clock=clock
    ) as store:
        store.read_bytes(mlstore.parse_url(url))  # a URL object: the slow path each time
        upload(via_proxy, url, b"v2")
        for _ in range(4):
            clock.now += 3  # reads at 3, 6, 9 are within the ttl; 12 is not
            latest = store.read_bytes(mlstore.parse_url(url))
        assert latest == b"v2"


def test_streaming_a_large_object_does_not_fill_the_memory_tier(
    via_proxy: str, bucket: str, cache_dir: str
) -> None:
    data = os.urandom(3 * MiB)
    url = f"s3://{bucket}/stream.bin"
    upload(via_proxy, url, data)
    with make_store(via_proxy, cache_dir, block_threshold=MiB, block_size=256 * KiB) as store:
        with store.open(url) as fh:
            assert fh.read() == data
        assert store.cache.memory.size() == 0, "streamed blocks went to the disk tier only"
        assert store.cache.size() == len(data)
        proxy.reset(via_proxy)
        with store.open(url) as fh:
            assert fh.read() == data
        assert gets(via_proxy) == 0


def test_a_disk_hit_enters_the_memory_tier_on_its_second_read(
    via_proxy: str, bucket: str, cache_dir: str
) -> None:
    data = os.urandom(64 * KiB)
    url = f"s3://{bucket}/twice.bin"
    upload(via_proxy, url, data)
    with make_store(via_proxy, cache_dir) as store:
        store.read_bytes(url)
    with make_store(via_proxy, cache_dir) as store:
        assert store.read_bytes(url) == data
        assert store.cache.memory.size() == 0, "read once: no memory copy (an epoch streams)"
        assert store.read_bytes(url) == data
        assert store.cache.memory.size() == len(data), "read twice: worth keeping"
        assert store.read_bytes(url) == data
        stats = store.stats()
        assert (stats.get("hits", "disk"), stats.get("hits", "memory")) == (2, 1)


def _large_cached(via_proxy: str, bucket: str, cache_dir: str, name: str) -> tuple[str, bytes]:
    data = os.urandom(5 * MiB + 123)
    url = f"s3://{bucket}/{name}"
    upload(via_proxy, url, data)
    with make_store(via_proxy, cache_dir) as store:
        assert store.read_bytes(url) == data
    proxy.reset(via_proxy)
    return url, data


@pytest.mark.parametrize("how", ["readinto", "read-pieces", "seek"])
def test_opening_a_large_cached_object_reads_its_blob_with_no_request(
    via_proxy: str, bucket: str, cache_dir: str, how: str
) -> None:
    url, data = _large_cached(via_proxy, bucket, cache_dir, f"big-{how}.bin")
    with make_store(via_proxy, cache_dir) as store, store.open(url) as fh:
        if how == "readinto":
            buf = bytearray(len(data) + 10)
            assert fh.readinto(buf) == len(data)
            assert bytes(buf[: len(data)]) == data
        elif how == "read-pieces":
            got = b"".join(iter(lambda: fh.read(100_000), b""))
            assert got == data
        else:
            fh.seek(-1000, os.SEEK_END)
            assert fh.read() == data[-1000:]
            fh.seek(10)
            assert fh.read(5) == data[10:15]
        assert store.stats().get("hits", "disk") == 1
        assert store.cache.memory.size() == 0
    assert proxy.counts(via_proxy)["total"] == 0, "no HEAD, no GET"


@pytest.mark.parametrize("how", ["readinto", "read-pieces"])
def test_a_tampered_large_blob_is_never_served_through_open(
    via_proxy: str, bucket: str, cache_dir: str, how: str
) -> None:
    url, data = _large_cached(via_proxy, bucket, cache_dir, f"tampered-{how}.bin")
    digest = content_hash(data)
    blob = Path(cache_dir) / "blobs" / digest[:2] / digest
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    blob.write_bytes(bytes(raw))
    with make_store(via_proxy, cache_dir) as store, store.open(url) as fh:
        if how == "readinto":
            buf = bytearray(len(data))
            assert fh.readinto(buf) == len(data)
            got = bytes(buf)
        else:
            got = b"".join(iter(lambda: fh.read(1 << 20), b""))
        assert got == data
        assert store.stats().get("integrity_failures", "disk") == 1
    assert gets(via_proxy) == 1, "refetched once"
    with make_store(via_proxy, cache_dir) as store:
        assert store.cache.verify() == {"checked": 1, "dropped": 0}


# ---------------------------------------------------------------- objects past 2 GiB

# Linux returns at most 0x7ffff000 bytes from one read(): a blob larger than that must be
# read in several calls, or it looks truncated, is dropped as corrupt and is refetched.
HUGE = 2 * GiB + MiB


@functools.cache
def _zeros_digest(size: int) -> str:
    h, zeros = Hasher(), memoryview(bytes(64 * MiB))
    for offset in range(0, size, len(zeros)):
        h.update(zeros[: min(len(zeros), size - offset)])
    return h.hexdigest()


def _huge_sparse_entry(cache_dir: str, key: str) -> tuple[TieredCache, Metrics, str]:
    """A cache whose disk tier holds ``key`` as HUGE zero bytes, left the way a filler
    leaves an entry (blob renamed into place, then its index rows), but as a sparse
    file: it costs no disk to speak of and reads at memory speed."""
    if shutil.disk_usage(os.path.dirname(cache_dir)).free < GiB:
        pytest.skip("needs some free disk for the sparse blob's metadata")
    metrics = Metrics()
    config = CacheConfig(disk_dir=cache_dir, memory_bytes=0, disk_bytes=4 * GiB, validate="never")
    cache = TieredCache(config, metrics)
    assert cache.disk is not None
    digest = _zeros_digest(HUGE)
    sparse = os.path.join(os.path.dirname(cache_dir), "sparse.blob")
    fd = os.open(sparse, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, HUGE)
    finally:
        os.close(fd)
    final = cache.disk.blob_path(digest)
    os.makedirs(os.path.dirname(final), mode=0o700, exist_ok=True)
    os.replace(sparse, final)
    db = sqlite3.connect(os.path.join(cache_dir, "index.sqlite"), isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO blobs VALUES (?, ?, ?)", (digest, HUGE, 0.0))
        db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?)", (key, "v1", digest, HUGE, 0.0))
        db.execute("UPDATE meta SET value = value + ? WHERE name = 'bytes'", (HUGE,))
        db.execute("COMMIT")
    finally:
        db.close()
    return cache, metrics, digest


def _no_fetch() -> Fetched:
    raise AssertionError("fetched: the cached blob was not served")


def _no_refetch() -> bytes:
    raise AssertionError("refetched: the cached blob was not served")


@pytest.mark.slow
def test_an_object_past_2_gib_is_served_from_the_disk_tier(cache_dir: str) -> None:
    key = "s3://bucket/huge.bin"
    cache, metrics, digest = _huge_sparse_entry(cache_dir, key)
    try:
        for _ in range(2):  # and again: the blob was not dropped
            data = cache.get(key, _no_fetch)
            assert len(data) == HUGE and content_hash(data) == digest
            del data
        assert cache.verify() == {"checked": 1, "dropped": 0}
    finally:
        cache.close()
    stats = metrics.snapshot()
    assert (stats.get("hits", "disk"), stats.get("integrity_failures", "disk")) == (2, 0)


@pytest.mark.slow
def test_an_object_past_2_gib_opens_over_its_blob_and_reads_whole_twice(cache_dir: str) -> None:
    key = "s3://bucket/huge-open.bin"
    cache, metrics, digest = _huge_sparse_entry(cache_dir, key)
    try:
        fh = cache.open_fresh(key, ("never", 0.0), _no_refetch)
        assert fh is not None
        with fh:
            assert content_hash(fh.read()) == digest  # hashed while it is read
            fh.seek(0)
            assert content_hash(fh.read()) == digest  # verified: served as it stands
            fh.seek(HUGE - 10)
            assert fh.read() == bytes(10)
    finally:
        cache.close()
    assert metrics.snapshot().get("integrity_failures", "disk") == 0


def test_single_flight_keeps_a_bounded_number_of_lock_files_open(tmp_path: Path) -> None:
    from mlstore.cache.flight import SingleFlight

    flight = SingleFlight(str(tmp_path))
    before = len(os.listdir("/proc/self/fd"))
    for i in range(1000):
        with flight.hold(f"s3://b/key-{i}"):
            pass
    assert len(os.listdir("/proc/self/fd")) - before <= 128
    flight.close()
    assert len(os.listdir("/proc/self/fd")) <= before


def test_a_forked_child_does_not_share_its_parents_flight_locks(tmp_path: Path) -> None:
    from mlstore.cache.flight import SingleFlight

    flight = SingleFlight(str(tmp_path), timeout=0.0)
    with flight.hold("s3://b/shared"):  # the parent's stripe file is open and locked
        pass
    with flight.hold("s3://b/shared"):
        pid = os.fork()
        if pid == 0:  # the child must see the parent's lock as someone else's
            with flight.hold("s3://b/shared") as waited:
                os._exit(0 if waited else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _read_exactly(fd: int, n: int) -> bytes:
    got = b""
    while len(got) < n:
        more = os.read(fd, n - len(got))
        assert more, "a process died before it was ready"
        got += more
    return got


def test_a_killed_fillers_lock_is_freed_while_a_child_it_forked_lives(tmp_path: Path) -> None:
    """A worker forked while its parent held a lock file, and that never takes a lock
    itself, keeps no copy of that file open: were it to, the parent's flock would outlive
    the parent's SIGKILL for as long as the worker lives."""
    from mlstore.cache.flight import SingleFlight

    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    filler = os.fork()
    if filler == 0:
        try:
            flight = SingleFlight(str(tmp_path), timeout=0.0)
            with flight.hold("s3://b/k"):
                if os.fork() == 0:  # the worker: it never touches the cache
                    os.close(release_w)
                    os.write(ready_w, b"w")
                    os.read(release_r, 1)  # returns when the test closes its end
                    os._exit(0)
                os.write(ready_w, b"f")
                os.read(release_r, 1)  # never returns: the test kills this process
        finally:
            os._exit(1)
    os.close(ready_w)
    os.close(release_r)
    flight = SingleFlight(str(tmp_path), timeout=0.0)
    try:
        assert sorted(_read_exactly(ready_r, 2)) == sorted(b"fw")
        os.kill(filler, signal.SIGKILL)  # the filler dies holding the lock
        assert _exit_code(filler) == -signal.SIGKILL
        with flight.hold("s3://b/k") as waited:
            assert not waited, "the dead filler's lock was freed though its worker lives"
    finally:
        flight.close()
        os.close(release_w)  # the worker exits
        os.close(ready_r)


def test_a_child_forked_while_a_parent_thread_builds_does_not_wait_for_it() -> None:
    """The fork rule's holder gives the child a lock of its own: the parent's may be held
    by a thread that does not exist in the child."""
    from mlstore._util.process import PerProcess

    parent = os.getpid()
    building, finish = threading.Event(), threading.Event()

    def build() -> str:
        if os.getpid() != parent:
            return "child's"
        building.set()
        finish.wait()
        return "parent's"

    holder = PerProcess(build)
    builder = threading.Thread(target=holder.get)
    builder.start()
    try:
        building.wait()  # the builder holds the holder's lock until `finish`
        pid = os.fork()
        if pid == 0:
            signal.alarm(30)  # were the child to wait for the builder: SIGALRM, not a hang
            os._exit(0 if holder.get() == "child's" else 1)
    finally:
        finish.set()
        builder.join()
    assert _exit_code(pid) == 0
    assert holder.get() == "parent's"


def test_a_childs_threads_let_go_of_an_inherited_value_once() -> None:
    from mlstore._util.process import PerProcess

    let_go: list[object] = []
    holder = PerProcess(object, on_fork=let_go.append)
    inherited = holder.get()
    pid = os.fork()
    if pid == 0:
        signal.alarm(30)
        start = threading.Barrier(8)
        got: list[object] = []

        def first_use() -> None:
            start.wait()
            got.append(holder.get())

        threads = [threading.Thread(target=first_use) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        once = let_go == [inherited] and len({id(v) for v in got}) == 1
        os._exit(0 if once and got[0] is not inherited else 1)
    assert _exit_code(pid) == 0
    assert holder.get() is inherited and let_go == []


def test_a_disk_tier_used_across_a_fork_works_in_both_processes(tmp_path: Path) -> None:
    """The child reads, writes and closes through index connections of its own; the
    parent's keep working after the child closed."""
    tier = DiskTier(str(tmp_path / "cache"), MiB)
    tier.put("s3://b/parent", None, b"from the parent")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(30)
            entry = tier.lookup("s3://b/parent")
            seen = entry is not None and tier.read_blob(entry.hash, entry.size)
            tier.put("s3://b/child", None, b"from the child")
            tier.close()
            code = 0 if seen == b"from the parent" else 2
        finally:
            os._exit(code)
    assert _exit_code(pid) == 0
    entry = tier.lookup("s3://b/child")
    assert entry is not None and tier.read_blob(entry.hash, entry.size) == b"from the child"
    tier.close()


def test_threads_that_ended_leave_no_index_connection_open(tmp_path: Path) -> None:
    """Each thread reads the index through a connection of its own; one made by a
    thread that has ended is closed when the next thread connects, so a pool made per
    batch (as a DataLoader worker's reads make) does not run out of descriptors."""
    tier = DiskTier(str(tmp_path / "cache"), MiB)
    tier.put("k", "v1", b"data")
    assert tier.lookup("k") is not None

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def look() -> None:
        assert tier.lookup("k") is not None

    def one_thread() -> None:
        thread = threading.Thread(target=look)
        thread.start()
        thread.join()

    one_thread()
    before = fds()
    for _ in range(40):
        one_thread()
    assert fds() <= before + 3
    tier.close()
