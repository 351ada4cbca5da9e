"""The cache heals itself, and deletes only what it made.

The cache only holds copies: a damaged index, a full disk or a directory removed under
a running job must cost a miss, never a failed read. And since mlstore deletes files in
its directory (dead fillers' temp files, unindexed blobs), it must be sure they are its
own: not a user's files in a directory named by mistake, not a live filler's in-flight
fill in another container sharing the directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import mlstore
from mlstore import Store
from mlstore.cache.disk import DiskTier
from mlstore.hashing import content_hash

pytestmark = pytest.mark.s3

KiB = 1024
MiB = 1024 * KiB
#: Larger than any pid Linux hands out (pid_max is at most 2**22): the pid a filler in
#: another PID namespace may carry, which names no process in this one.
FOREIGN_PID = 99_999_999


@pytest.fixture
def cache_dir(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


def make_store(options: dict[str, object], cache_dir: str, **cache: Any) -> Store:
    return Store(options={"s3": options}, cache={"disk_dir": cache_dir, **cache})


def upload(options: dict[str, object], url: str, data: bytes) -> None:
    with Store(options={"s3": options}, cache={"enabled": False}) as writer:
        writer.write_bytes(url, data)


def cache_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("mlstore") and r.levelno >= logging.WARNING
    ]


# ---------------------------------------------------------------- item 7: healing


def test_an_index_overwritten_with_garbage_is_set_aside_and_reads_go_on(
    s3_options: dict[str, object],
    s3_bucket: str,
    cache_dir: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    objects = {f"s3://{s3_bucket}/torn/{i}.bin": os.urandom(20 * KiB) for i in range(3)}
    for url, data in objects.items():
        upload(s3_options, url, data)
    with make_store(s3_options, cache_dir, memory_bytes=0) as store:
        for url, data in objects.items():
            assert store.read_bytes(url) == data
    index = Path(cache_dir) / "index.sqlite"
    index.write_bytes(os.urandom(64 * KiB))  # torn by a power loss, or half copied
    with (
        caplog.at_level(logging.WARNING, logger="mlstore"),
        make_store(s3_options, cache_dir, memory_bytes=0) as store,
    ):
        for _ in range(3):
            for url, data in objects.items():
                assert store.read_bytes(url) == data
        stats = store.stats()
        assert stats.get("cache_errors", "disk") >= 1
        assert stats.get("hits", "disk") == 2 * len(objects)  # caching again at once
    assert len(cache_warnings(caplog)) == 1, cache_warnings(caplog)
    assert "damaged" in cache_warnings(caplog)[0]
    aside = [p.name for p in Path(cache_dir).iterdir() if p.name.startswith("index.sqlite.")]
    assert len(aside) == 1 and aside[0].startswith("index.sqlite.corrupt-"), aside


#: A fresh process opening the node cache: what its disk tier took back at start.
_OPENS = """
import json, sys
import mlstore

cache = {"disk_dir": sys.argv[1], "memory_bytes": 0, **json.loads(sys.argv[2])}
with mlstore.Store(cache=cache) as store:
    size = store.cache.size()  # opens the disk tier
    adopted = store.stats().get("disk_adopted", "disk")
print(json.dumps({"size": size, "adopted": adopted}))
"""


def open_fresh(cache_dir: str, **cache: Any) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", _OPENS, cache_dir, json.dumps(cache)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found: dict[str, int] = json.loads(done.stdout)
    return found


def cached_then_index_lost(
    s3_options: dict[str, object], prefix: str, cache_dir: str
) -> dict[str, bytes]:
    """Four objects of 20 KiB below ``prefix``, read into the cache, whose index is then
    deleted (as a damaged one is set aside); returns them by URL."""
    objects = {f"{prefix}/{i}.bin": os.urandom(20 * KiB) for i in range(4)}
    for url, data in objects.items():
        upload(s3_options, url, data)
    with make_store(s3_options, cache_dir, memory_bytes=0) as store:
        for url in objects:
            store.read_bytes(url)
    for index in Path(cache_dir).glob("index.sqlite*"):
        index.unlink()
    return objects


@pytest.mark.parametrize("verify", ["always", "never"])
def test_blobs_of_a_lost_index_are_taken_back_at_the_next_start(
    s3_options: dict[str, object], s3_bucket: str, cache_dir: str, verify: str
) -> None:
    """A pod restarted over a cache whose index was lost (damaged and set aside, or
    deleted) counts the blob files again, so the budget holds and eviction frees them;
    a torn file is never taken back when nothing would check it on read."""
    objects = cached_then_index_lost(s3_options, f"s3://{s3_bucket}/lost", cache_dir)
    torn = Path(cache_dir, "blobs").glob("*/*").__next__()
    torn.write_bytes(torn.read_bytes()[: 10 * KiB])  # as a power loss may leave one

    found = open_fresh(cache_dir, verify=verify)
    if verify == "never":  # hashed before it was adopted: the torn one is gone
        assert found == {"size": 3 * 20 * KiB, "adopted": 3}
        assert not torn.exists()
    else:  # checked on read as every blob is
        assert found == {"size": 3 * 20 * KiB + 10 * KiB, "adopted": 4}
    assert open_fresh(cache_dir, verify=verify)["adopted"] == 0  # once only

    with make_store(s3_options, cache_dir, memory_bytes=0, verify=verify) as store:
        for url, data in objects.items():
            assert store.read_bytes(url) == data  # never the torn bytes


def test_blobs_taken_back_beyond_the_budget_are_evicted(
    s3_options: dict[str, object], s3_bucket: str, cache_dir: str
) -> None:
    cached_then_index_lost(s3_options, f"s3://{s3_bucket}/over", cache_dir)
    found = open_fresh(cache_dir, disk_bytes=50 * KiB)
    assert found["adopted"] == 4 and found["size"] == 2 * 20 * KiB
    assert len(list(Path(cache_dir, "blobs").glob("*/*"))) == 2


def test_a_cache_directory_removed_while_in_use_is_recreated(
    s3_options: dict[str, object],
    s3_bucket: str,
    cache_dir: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    objects = {f"s3://{s3_bucket}/gone/{i}.bin": os.urandom(10 * KiB) for i in range(4)}
    for url, data in objects.items():
        upload(s3_options, url, data)
    urls = list(objects)
    with (
        caplog.at_level(logging.WARNING, logger="mlstore"),
        make_store(s3_options, cache_dir, memory_bytes=0) as store,
    ):
        assert store.read_bytes(urls[0]) == objects[urls[0]]
        shutil.rmtree(cache_dir)  # a tmp cleaner, a job epilogue
        for _ in range(3):
            for url, data in objects.items():
                assert store.read_bytes(url) == data  # never "no such object"
        stats = store.stats()
        assert stats.get("cache_errors", "disk") >= 1
        assert stats.get("hits", "disk") >= len(objects)  # caching again
    assert len(cache_warnings(caplog)) == 1, cache_warnings(caplog)
    assert "removed" in cache_warnings(caplog)[0]
    assert (Path(cache_dir) / ".mlstore-cache").is_file()
    assert os.stat(cache_dir).st_mode & 0o777 == 0o700
    with make_store(s3_options, cache_dir, memory_bytes=0) as store:  # another process's view
        assert store.read_bytes(urls[1]) == objects[urls[1]]
        assert store.stats().get("hits", "disk") == 1


def _fill_up(path: Path) -> None:
    """Write ``path`` until its file system has not a byte left."""
    with open(path, "wb", buffering=0) as fh:
        for chunk in (64 * KiB, 4 * KiB, 1):
            try:
                while True:
                    fh.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == 28  # ENOSPC


def test_a_disk_full_at_the_index_write_still_returns_the_bytes(
    s3_options: dict[str, object],
    s3_bucket: str,
    small_disk: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = os.urandom(100 * KiB)
    first, copy = f"s3://{s3_bucket}/full/a.bin", f"s3://{s3_bucket}/full/copy.bin"
    upload(s3_options, first, data)
    upload(s3_options, copy, data)  # same bytes: its fill writes no blob, only the index
    cache = str(small_disk / "cache")
    with (
        caplog.at_level(logging.WARNING, logger="mlstore"),
        make_store(s3_options, cache, memory_bytes=0) as store,
    ):
        assert store.read_bytes(first) == data
        ballast = small_disk / "ballast"
        _fill_up(ballast)
        for _ in range(3):
            assert store.read_bytes(copy) == data
        assert store.stats().get("disk_full", "disk") >= 1
        hits = store.stats().get("hits", "disk")
        ballast.unlink()  # space freed: the disk tier takes entries again
        assert store.read_bytes(copy) == data
        assert store.read_bytes(copy) == data
        assert store.stats().get("hits", "disk") == hits + 1
    warnings = cache_warnings(caplog)
    assert len(warnings) == 1 and "full" in warnings[0], warnings


# ---------------------------------------------------------------- item 8: only its own files


USER_FILES = ["notes.txt", "run-1.log", "data.csv", "model.pt", ".hidden", "12345-draft"]


def test_a_directory_with_someone_elses_files_is_refused(
    s3_options: dict[str, object], s3_bucket: str, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"  # /scratch/$USER, named as the cache by mistake
    (scratch / "tmp").mkdir(parents=True)
    scratch.chmod(0o700)
    for name in USER_FILES:
        (scratch / "tmp" / name).write_text(f"the user's {name}")
    url = f"s3://{s3_bucket}/refused.bin"
    upload(s3_options, url, b"r" * 100)
    with (
        pytest.raises(mlstore.ConfigError, match="not empty") as exc,
        make_store(s3_options, str(scratch)) as store,
    ):
        store.read_bytes(url)
    assert str(scratch) in str(exc.value) and ".mlstore-cache" in str(exc.value)
    assert sorted(os.listdir(scratch / "tmp")) == sorted(USER_FILES)
    for name in USER_FILES:
        assert (scratch / "tmp" / name).read_text() == f"the user's {name}"


def test_files_mlstore_did_not_make_survive_open_and_verify(
    s3_options: dict[str, object], s3_bucket: str, cache_dir: str
) -> None:
    url, data = f"s3://{s3_bucket}/own.bin", os.urandom(10 * KiB)
    upload(s3_options, url, data)
    with make_store(s3_options, cache_dir) as store:
        assert store.read_bytes(url) == data
    root = Path(cache_dir)
    for name in USER_FILES:
        (root / "tmp" / name).write_text(name)
    digest = content_hash(data)
    fan = root / "blobs" / digest[:2]
    planted = [root / "blobs" / "notes.txt", fan / "notes.txt", fan / (digest[:2] + "x" * 30)]
    for path in planted:
        path.write_text("planted")
    unindexed = content_hash(b"a blob mlstore wrote but never indexed")
    (root / "blobs" / unindexed[:2]).mkdir(exist_ok=True)
    (root / "blobs" / unindexed[:2] / unindexed).write_bytes(b"orphan")
    with make_store(s3_options, cache_dir) as store:
        assert store.read_bytes(url) == data
        assert store.cache.verify() == {"checked": 1, "dropped": 0}
    assert sorted(os.listdir(root / "tmp")) == sorted(USER_FILES)
    assert all(path.read_text() == "planted" for path in planted)
    assert not (root / "blobs" / unindexed[:2] / unindexed).exists()  # its own: cleaned


def test_a_symlinked_cache_directory_is_refused(
    s3_options: dict[str, object], s3_bucket: str, tmp_path: Path
) -> None:
    target = tmp_path / "real"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    with (
        pytest.raises(mlstore.ConfigError, match="symbolic link") as exc,
        make_store(s3_options, str(link)) as store,
    ):
        store.read_bytes(f"s3://{s3_bucket}/x")
    assert str(link) in str(exc.value) and str(target) in str(exc.value)
    assert os.listdir(target) == []


def test_a_symlink_inside_the_cache_directory_is_never_followed(
    s3_options: dict[str, object], s3_bucket: str, cache_dir: str, tmp_path: Path
) -> None:
    DiskTier(cache_dir, MiB).close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "1-abc").write_text("not the cache's")  # named like an old temp file
    shutil.rmtree(Path(cache_dir) / "tmp")
    (Path(cache_dir) / "tmp").symlink_to(elsewhere)
    with (
        pytest.raises(mlstore.ConfigError, match="not a directory"),
        make_store(s3_options, cache_dir) as store,
    ):
        store.read_bytes(f"s3://{s3_bucket}/x")
    assert os.listdir(elsewhere) == ["1-abc"]


# ---------------------------------------------------------------- item 9: liveness by lock


_FOREIGN_FILLER = """
import fcntl, os, sys
from mlstore.cache.disk import DiskTier
from mlstore.hashing import content_hash

root, key = sys.argv[1], sys.argv[2]
data = sys.stdin.buffer.read(int(sys.argv[3]))
tier = DiskTier(root, 1 << 30)
# A filler in another PID namespace: its pid names no process here. It holds the flock
# on its temp file for the fill's life, as every mlstore filler does.
tmp = os.path.join(root, "tmp", "%d-%s.mlstore-tmp" % (int(sys.argv[4]), os.urandom(6).hex()))
fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, data[: len(data) // 2])
print(tmp, flush=True)
sys.stdin.readline()  # the parent opens a Store (and its cleanup) meanwhile
os.write(fd, data[len(data) // 2 :])
digest = content_hash(data)
os.makedirs(os.path.dirname(tier.blob_path(digest)), exist_ok=True)
os.replace(tmp, tier.blob_path(digest))
os.close(fd)
tier.put(key, None, data, digest)
print("done", flush=True)
"""


def _start_foreign_filler(
    cache_dir: str, key: str, data: bytes
) -> tuple[subprocess.Popen[bytes], Path]:
    child = subprocess.Popen(
        [sys.executable, "-c", _FOREIGN_FILLER, cache_dir, key, str(len(data)), str(FOREIGN_PID)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(data)
    child.stdin.flush()
    temp = Path(child.stdout.readline().decode().strip())  # it is mid-fill now
    assert temp.exists(), "the filler did not start"
    return child, temp


def test_a_fill_in_another_pid_namespace_survives_a_new_stores_cleanup(
    s3_options: dict[str, object], cache_dir: str
) -> None:
    data, key = os.urandom(256 * KiB), "s3://bucket/in-flight"
    child, temp = _start_foreign_filler(cache_dir, key, data)
    try:
        with make_store(s3_options, cache_dir) as store:
            store.cache.size()  # opens the disk tier, which cleans up orphans
        assert temp.exists(), "a live filler's in-flight fill was deleted"
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(b"go on\n")
        child.stdin.flush()
        assert child.stdout.readline() == b"done\n"
    finally:
        child.kill()
        child.communicate()
    tier = DiskTier(cache_dir, MiB)
    entry = tier.lookup(key)
    assert entry is not None and tier.read_blob(entry.hash, entry.size) == data


def test_a_fill_whose_holder_was_killed_is_cleaned(
    s3_options: dict[str, object], cache_dir: str
) -> None:
    child, temp = _start_foreign_filler(cache_dir, "s3://bucket/killed", os.urandom(64 * KiB))
    os.kill(child.pid, signal.SIGKILL)
    child.communicate()
    assert temp.exists()
    with make_store(s3_options, cache_dir) as store:
        store.cache.size()
    assert not temp.exists()
    assert os.listdir(Path(cache_dir) / "tmp") == []


def test_mlstores_own_fills_hold_the_lock_the_cleanup_respects(cache_dir: str) -> None:
    from mlstore.cache.disk import _create_temp

    DiskTier(cache_dir, MiB).close()
    fd, temp = _create_temp(os.path.join(cache_dir, "tmp"), tag=FOREIGN_PID)
    try:
        DiskTier(cache_dir, MiB).close()  # its cleanup cannot take the lock
        assert os.path.exists(temp)
    finally:
        os.close(fd)  # the filler is gone (a SIGKILL closes it the same way)
    DiskTier(cache_dir, MiB).close()
    assert not os.path.exists(temp)
