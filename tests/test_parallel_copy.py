"""Recursive copies in parallel, and copies that skip what the destination holds already
(``Store.copy(..., max_workers=, skip_existing=)``; see ``mlstore._engine.copying``).

The S3 tests run against moto through the counting, fault-injecting proxy, which shows
what was sent: how many requests were in flight at once, which PUTs were made.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from mlstore import PermissionDeniedError, Store
from tests.emulators import ServerProcess
from tests.servers import proxy

N = 96  # objects of the tree


def tree(n: int = N) -> dict[str, bytes]:
    """``n`` small objects under two levels of folders, of varied sizes (some empty)."""
    return {
        f"d{i % 7}/sub{i % 3}/k{i:04d}.bin": hashlib.sha256(str(i).encode()).digest() * (i % 5)
        for i in range(n)
    }


def write_local(root: pathlib.Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def read_local(root: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def read_s3(store: Store, prefix: str) -> dict[str, bytes]:
    urls = store.find(prefix)
    return {u[len(prefix) + 1 :]: data for u, data in zip(urls, store.read_many(urls), strict=True)}


def puts(endpoint: str) -> list[str]:
    return [r["path"] for r in proxy.request_log(endpoint) if r["method"] == "PUT"]


@pytest.fixture
def s3(s3_bucket: str, s3_fault_proxy: ServerProcess, tmp_path: pathlib.Path) -> Iterator[Any]:
    """A Store through the proxy (its own node cache), the proxy's endpoint, the bucket."""
    with Store(
        options={"s3": {"endpoint_url": s3_fault_proxy.endpoint}},
        cache={"disk_dir": str(tmp_path / "cache")},
    ) as store:
        yield store, s3_fault_proxy.endpoint, f"s3://{s3_bucket}"
        proxy.clear_faults(s3_fault_proxy.endpoint)
        for top in store.ls(f"s3://{s3_bucket}"):  # in bulk: the bucket's fixture rm's one by one
            store.rm(top, recursive=True)


def slow_puts(endpoint: str) -> None:
    """Every request waits 50 ms at the proxy (a remote store's round trip), so copies
    made at once are seen in flight at once."""
    proxy.set_faults(endpoint, {"fault": "latency", "seconds": 0.05})


# ------------------------------------------------------------------ byte-exact, in parallel


@pytest.mark.s3
def test_a_tree_goes_local_to_s3_to_s3_to_local_byte_exact_and_in_parallel(
    s3: Any, tmp_path: pathlib.Path
) -> None:
    store, endpoint, bucket = s3
    files = tree()
    write_local(tmp_path / "src", files)
    slow_puts(endpoint)
    proxy.reset(endpoint)

    up = store.copy(tmp_path / "src", f"{bucket}/up", recursive=True)
    assert proxy.counts(endpoint)["peak_in_flight"] > 1
    assert len(puts(endpoint)) == N  # one PUT an object: small ones go up whole
    assert sorted(up) == sorted(f"{bucket}/up/{k}" for k in files)
    assert up.skipped == [] and up.copied_bytes == sum(map(len, files.values()))

    proxy.reset(endpoint)
    within = store.copy(f"{bucket}/up", f"{bucket}/again", recursive=True)
    assert len(within) == N
    log = proxy.request_log(endpoint)
    assert not [r for r in log if r["method"] == "GET" and not r["query"]]  # server side
    assert proxy.counts(endpoint)["peak_in_flight"] > 1

    proxy.reset(endpoint)
    store.copy(f"{bucket}/again", tmp_path / "down", recursive=True)
    assert proxy.counts(endpoint)["peak_in_flight"] > 1
    assert read_local(tmp_path / "down") == files
    assert read_s3(store, f"{bucket}/up") == files == read_s3(store, f"{bucket}/again")


@pytest.mark.s3
def test_max_workers_one_copies_one_object_at_a_time(s3: Any, tmp_path: pathlib.Path) -> None:
    store, endpoint, bucket = s3
    write_local(tmp_path / "src", tree(20))
    slow_puts(endpoint)
    proxy.reset(endpoint)
    store.copy(tmp_path / "src", f"{bucket}/serial", recursive=True, max_workers=1)
    assert proxy.counts(endpoint)["peak_in_flight"] == 1
    assert len(puts(endpoint)) == 20


# ------------------------------------------------------------------ failures


@pytest.mark.s3
@pytest.mark.parametrize("workers", [8, 1])
def test_a_refused_object_is_named_and_the_rest_stay_consistent(
    s3: Any, tmp_path: pathlib.Path, workers: int
) -> None:
    store, endpoint, bucket = s3
    files = tree()
    write_local(tmp_path / "src", files)
    keys = sorted(files)
    bad = keys[5]
    proxy.set_faults(
        endpoint,
        {"fault": "status", "status": 403, "method": "PUT", "path": bad.replace(".", r"\.")},
        {"fault": "latency", "seconds": 0.05},
    )
    with pytest.raises(PermissionDeniedError) as info:
        store.copy(tmp_path / "src", f"{bucket}/dst", recursive=True, max_workers=workers)
    assert info.value.url == f"{bucket}/dst/{bad}"
    assert f"{bucket}/dst/{bad}" in str(info.value)
    proxy.clear_faults(endpoint)
    there = read_s3(store, f"{bucket}/dst")
    assert bad not in there
    assert all(data == files[k] for k, data in there.items())  # whole, never a part
    assert len(there) < N - 1  # after the failure, no further object was started
    if workers == 1:
        assert sorted(there) == keys[:5]
    # finishing the job: only what is missing goes up
    proxy.reset(endpoint)
    done = store.copy(tmp_path / "src", f"{bucket}/dst", recursive=True, skip_existing=True)
    assert sorted(done.skipped) == sorted(f"{bucket}/dst/{k}" for k in there)
    assert len(puts(endpoint)) == N - len(there)
    assert read_s3(store, f"{bucket}/dst") == files


# ------------------------------------------------------------------ skipping what is there


@pytest.mark.s3
def test_a_second_copy_up_skips_unchanged_objects_and_copies_a_changed_one(
    s3: Any, tmp_path: pathlib.Path
) -> None:
    store, endpoint, bucket = s3
    files = tree()
    src = tmp_path / "src"
    write_local(src, files)
    store.copy(src, f"{bucket}/dst", recursive=True, skip_existing=True)  # nothing there yet
    proxy.reset(endpoint)
    before = store.stats()
    again = store.copy(src, f"{bucket}/dst", recursive=True, skip_existing=True)
    assert puts(endpoint) == []
    assert list(again) == [] and len(again.skipped) == N
    assert again.skipped_bytes == sum(map(len, files.values()))
    diff = store.stats() - before
    assert diff.get("copies_skipped", "s3") == N
    assert diff.get("copy_bytes_skipped", "s3") == again.skipped_bytes

    # one file changes, keeping its size: size alone must not decide
    changed = sorted(k for k, v in files.items() if v)[0]
    (src / changed).write_bytes(bytes(b ^ 0xFF for b in files[changed]))
    proxy.reset(endpoint)
    third = store.copy(src, f"{bucket}/dst", recursive=True, skip_existing=True)
    assert list(third) == [f"{bucket}/dst/{changed}"]
    assert len(puts(endpoint)) == 1
    assert store.read_bytes(f"{bucket}/dst/{changed}") == (src / changed).read_bytes()


@pytest.mark.s3
def test_skipping_within_s3_compares_etags_and_sends_no_copy(
    s3: Any, tmp_path: pathlib.Path
) -> None:
    store, endpoint, bucket = s3
    files = tree(40)
    for k, v in files.items():
        store.write_bytes(f"{bucket}/a/{k}", v)
    store.copy(f"{bucket}/a", f"{bucket}/b", recursive=True)
    changed = sorted(k for k, v in files.items() if v)[0]
    store.write_bytes(f"{bucket}/a/{changed}", files[changed][::-1])  # same size
    proxy.reset(endpoint)
    again = store.copy(f"{bucket}/a", f"{bucket}/b", recursive=True, skip_existing=True)
    assert list(again) == [f"{bucket}/b/{changed}"]
    assert len(puts(endpoint)) == 1  # the one CopyObject
    roots = {f"/{bucket[len('s3://') :]}/{side}" for side in "ab"}  # a write below `a`
    heads = {r["path"] for r in proxy.request_log(endpoint) if r["method"] == "HEAD"} - roots
    assert all(h.endswith(changed) for h in heads), heads  # the ETags of the others sufficed
    assert read_s3(store, f"{bucket}/b") == read_s3(store, f"{bucket}/a")


@pytest.mark.s3
def test_a_second_copy_down_leaves_unchanged_local_files_alone(
    s3: Any, tmp_path: pathlib.Path
) -> None:
    store, endpoint, bucket = s3
    files = tree(40)
    for k, v in files.items():
        store.write_bytes(f"{bucket}/a/{k}", v)
    down = tmp_path / "down"
    store.copy(f"{bucket}/a", down, recursive=True)
    stamps = {p: p.stat().st_mtime_ns for p in down.rglob("*") if p.is_file()}
    changed = sorted(k for k, v in files.items() if v)[0]
    (down / changed).write_bytes(files[changed][::-1])  # damaged locally, same size
    proxy.reset(endpoint)
    again = store.copy(f"{bucket}/a", down, recursive=True, skip_existing=True)
    assert list(again) == [f"file://{down}/{changed}"]
    gets = [r for r in proxy.request_log(endpoint) if r["method"] == "GET" and not r["query"]]
    assert len(gets) == 1  # only the damaged file's bytes came down
    assert read_local(down) == files
    assert {p: p.stat().st_mtime_ns for p in stamps if p != down / changed} == {
        p: t for p, t in stamps.items() if p != down / changed
    }


@pytest.mark.s3
def test_an_object_written_by_another_tool_is_compared_by_md5(
    s3: Any, tmp_path: pathlib.Path
) -> None:
    import boto3

    store, endpoint, bucket = s3
    client = boto3.client("s3", endpoint_url=endpoint)
    name = bucket.removeprefix("s3://")
    (tmp_path / "same.bin").write_bytes(b"same content")
    (tmp_path / "other.bin").write_bytes(b"mine content")
    client.put_object(Bucket=name, Key="x/same.bin", Body=b"same content")  # no mlstore hash
    client.put_object(Bucket=name, Key="x/other.bin", Body=b"your content")  # same size
    proxy.reset(endpoint)
    got = store.copy(tmp_path / "same.bin", f"{bucket}/x/same.bin", skip_existing=True)
    assert got.skipped == [f"{bucket}/x/same.bin"] and puts(endpoint) == []
    got = store.copy(tmp_path / "other.bin", f"{bucket}/x/other.bin", skip_existing=True)
    assert list(got) == [f"{bucket}/x/other.bin"]
    assert store.read_bytes(f"{bucket}/x/other.bin") == b"mine content"


def test_same_size_local_files_are_never_skipped_on_size_alone(
    store: Store, tmp_path: pathlib.Path
) -> None:
    write_local(tmp_path / "a", {"f": b"abc", "g": b"same"})
    write_local(tmp_path / "b", {"f": b"xyz", "g": b"same"})
    got = store.copy(tmp_path / "a", tmp_path / "b", recursive=True, skip_existing=True)
    assert list(got) == [f"file://{tmp_path}/b/f"]
    assert got.skipped == [f"file://{tmp_path}/b/g"]
    assert (tmp_path / "b" / "f").read_bytes() == b"abc"


# ------------------------------------------------------------------ progress, cache, safety


@pytest.mark.s3
@pytest.mark.parametrize("skip", [False, True])
def test_progress_is_serial_monotonic_and_ends_at_the_total(
    s3: Any, tmp_path: pathlib.Path, skip: bool
) -> None:
    store, _, bucket = s3
    files = tree()
    write_local(tmp_path / "src", files)
    if skip:
        store.copy(tmp_path / "src", f"{bucket}/p", recursive=True)
    calls: list[tuple[int, int]] = []
    inside = [0]
    overlapped = []
    lock = threading.Lock()

    def progress(done: int, total: int) -> None:
        with lock:
            inside[0] += 1
            overlapped.append(inside[0] > 1)
        calls.append((done, total))
        with lock:
            inside[0] -= 1

    store.copy(tmp_path / "src", f"{bucket}/p", recursive=True, progress=progress,
               skip_existing=skip)  # fmt: skip
    total = sum(map(len, files.values()))
    assert not any(overlapped)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert {t for _, t in calls} == {total}
    assert calls[-1] == (total, total)


@pytest.mark.s3
def test_every_destination_is_invalidated_in_the_node_cache(
    s3: Any, tmp_path: pathlib.Path
) -> None:
    store, _, bucket = s3
    files = tree(50)
    for k in files:
        store.write_bytes(f"{bucket}/dst/{k}", b"old " + k.encode())
        store.read_bytes(f"{bucket}/dst/{k}")  # cached, in memory and on disk
    write_local(tmp_path / "src", files)
    store.copy(tmp_path / "src", f"{bucket}/dst", recursive=True)
    assert {k: store.read_bytes(f"{bucket}/dst/{k}") for k in files} == files
    with Store(options=store.config.options, cache=store.config.cache) as other:
        assert {k: other.read_bytes(f"{bucket}/dst/{k}") for k in files} == files


def test_an_escaping_key_among_many_is_refused_before_anything_is_written(
    store: Store, tmp_path: pathlib.Path
) -> None:
    src = f"memory://t-{uuid.uuid4().hex[:12]}"
    try:
        for i in range(100):
            store.write_bytes(f"{src}/k{i:03d}", b"x")
        store.write_bytes(f"{src}/z/../../evil", b"evil")
        with pytest.raises(PermissionDeniedError, match=r"z/\.\./\.\./evil"):
            store.copy(src, tmp_path / "dst", recursive=True, max_workers=8)
        assert not os.path.exists(tmp_path / "dst")
        assert not os.path.exists(tmp_path / "evil")
    finally:
        store.rm(src, recursive=True)


def test_max_workers_must_be_positive(store: Store, tmp_path: pathlib.Path) -> None:
    from mlstore import ConfigError

    (tmp_path / "a").write_bytes(b"a")
    with pytest.raises(ConfigError, match="max_workers"):
        store.copy(tmp_path / "a", tmp_path / "b", max_workers=0)
