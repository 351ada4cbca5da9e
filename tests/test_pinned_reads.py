"""Reads pinned to a version (``read_bytes(url, version=...)``, what a manifest does)
through the node cache, against a real S3 (moto_server) behind the counting proxy: a
copy of the version is served with no request whatever its age, in this process and
the next; a miss is one pinned GET; a pinned copy grants no trust to reads that are
not pinned."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mlstore
from mlstore import Store
from tests.conftest import run_child
from tests.emulators import ServerProcess
from tests.servers import proxy

pytestmark = pytest.mark.s3

DAY = 86_400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def via_proxy(s3_proxy: ServerProcess) -> Iterator[str]:
    proxy.reset(s3_proxy.endpoint)
    yield s3_proxy.endpoint


@pytest.fixture
def cache_dir(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


def make_store(endpoint: str, cache_dir: str, clock: Any = None, **cache: Any) -> Store:
    settings = {"disk_dir": cache_dir, "validate": "ttl", "ttl": 60, **cache}
    return Store(options={"s3": {"endpoint_url": endpoint}}, cache=settings, clock=clock)


def upload(endpoint: str, url: str, data: bytes) -> str:
    """Write with a cache-less Store (another tool, for the node cache); the version."""
    with Store(options={"s3": {"endpoint_url": endpoint}}, cache={"enabled": False}) as s:
        s.write_bytes(url, data)
        version = s.info(url).version
    assert version is not None
    return version


def counts(endpoint: str) -> tuple[int, int]:
    return proxy.requests(endpoint, "HEAD"), proxy.requests(endpoint, "GET")


def test_a_pinned_read_is_served_from_the_cache_with_no_request_however_old(
    via_proxy: str, s3_bucket: str, cache_dir: str
) -> None:
    clock = Clock()
    url = f"s3://{s3_bucket}/pinned/sample.bin"
    version = upload(via_proxy, url, b"sample one")
    with make_store(via_proxy, cache_dir, clock) as store:
        proxy.reset(via_proxy)
        assert store.read_bytes(url, version=version) == b"sample one"
        assert counts(via_proxy) == (0, 1), "a miss: one GET pinned to the version"
        clock.now += 10 * DAY  # far past the ttl and the stale window
        proxy.reset(via_proxy)
        assert store.read_bytes(url, version=version) == b"sample one"
        assert proxy.counts(via_proxy)["total"] == 0
    code = f"""
        import json
        from mlstore import Store
        store = Store(options={{"s3": {{"endpoint_url": {via_proxy!r}}}}},
                      cache={{"disk_dir": {cache_dir!r}}})
        print(json.dumps(store.read_bytes({url!r}, version={version!r}).decode()))
    """
    proxy.reset(via_proxy)
    assert run_child(code, {}) == "sample one"
    assert proxy.counts(via_proxy)["total"] == 0, "the node's copy, in a fresh process"


def test_a_pinned_read_of_a_replaced_object_raises_naming_the_url(
    via_proxy: str, s3_bucket: str, cache_dir: str
) -> None:
    url = f"s3://{s3_bucket}/pinned/replaced.bin"
    old = upload(via_proxy, url, b"version one")
    upload(via_proxy, url, b"version two")
    with make_store(via_proxy, cache_dir) as store:
        with pytest.raises(mlstore.PreconditionFailedError, match=r"replaced\.bin"):
            store.read_bytes(url, version=old)
        assert store.read_bytes(url) == b"version two", "nothing of the failed read kept"


def test_a_cached_copy_of_the_pinned_version_is_served_after_the_object_changed(
    via_proxy: str, s3_bucket: str, cache_dir: str
) -> None:
    # The bytes of a version never change: a pinned read served from the node's copy is
    # the object as it was recorded, and asks the store nothing.
    url = f"s3://{s3_bucket}/pinned/recorded.bin"
    recorded = upload(via_proxy, url, b"as recorded")
    with make_store(via_proxy, cache_dir) as store:
        store.read_bytes(url, version=recorded)
        upload(via_proxy, url, b"rewritten!!")
        proxy.reset(via_proxy)
        assert store.read_bytes(url, version=recorded) == b"as recorded"
        assert proxy.counts(via_proxy)["total"] == 0


def test_a_pinned_copy_grants_no_trust_to_a_read_that_is_not_pinned(
    via_proxy: str, s3_bucket: str, cache_dir: str
) -> None:
    same, changed = (f"s3://{s3_bucket}/pinned/{n}.bin" for n in ("same", "changed"))
    versions = {u: upload(via_proxy, u, b"version one") for u in (same, changed)}
    with make_store(via_proxy, cache_dir) as store:
        for url, version in versions.items():
            store.read_bytes(url, version=version)
        upload(via_proxy, changed, b"version two")
    with make_store(via_proxy, cache_dir) as reader:  # another process, reads unpinned
        proxy.reset(via_proxy)
        assert reader.read_bytes(same) == b"version one"
        assert counts(via_proxy) == (1, 0), "checked first, then served from the cache"
        proxy.reset(via_proxy)
        assert reader.read_bytes(changed) == b"version two"
        assert counts(via_proxy) == (1, 1)


@pytest.mark.parametrize("blocks", [False, True], ids=["whole", "blocks"])
def test_a_pinned_open_is_cached_for_the_next_process_and_refuses_a_changed_object(
    blocks: bool, s3_bucket: str, via_proxy: str, cache_dir: str
) -> None:
    """``open(url, version=v)`` (what a ShardDataset over a manifest does) fills the
    node cache: another process opens the same version with no request. Once the
    object changed, a pinned open that finds no copy raises, naming the URL."""
    url = f"s3://{s3_bucket}/shard-0.tar"
    data = bytes(range(256)) * 1024  # 256 KiB
    version = upload(via_proxy, url, data)
    small = {"block_size": 64 * 1024, "block_threshold": 128 * 1024} if blocks else {}
    with make_store(via_proxy, cache_dir, **small) as store, store.open(url, version=version) as f:
        assert f.read() == data
    proxy.reset(via_proxy)
    out = run_child(
        f"""
        import json, mlstore
        store = mlstore.Store(options={{"s3": {{"endpoint_url": {via_proxy!r}}}}},
                              cache={{"disk_dir": {cache_dir!r}, **{small!r}}})
        with store.open({url!r}, version={version!r}) as f:
            data = f.read()
        print(json.dumps([len(data), store.stats()["requests"]]))
        """,
        {},
    )
    assert out == [len(data), 0]
    assert counts(via_proxy) == (0, 0)
    upload(via_proxy, url, b"rewritten")
    other = make_store(via_proxy, cache_dir + "-other", **small)
    with pytest.raises(mlstore.PreconditionFailedError) as err:
        other.open(url, version=version).read()
    assert url in str(err.value)
    other.close()
