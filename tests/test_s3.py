"""The S3 backend against a real moto_server process: errors, metadata, processes."""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Iterator

import pytest

import mlstore
from mlstore import Store
from mlstore.hashing import content_hash
from mlstore.url import parse_url
from tests.emulators import ServerProcess

pytestmark = [pytest.mark.s3, pytest.mark.usefixtures("backend_only")]


@pytest.fixture
def store(s3_options: dict[str, object]) -> Iterator[Store]:
    with Store(options={"s3": s3_options}) as s:
        yield s


def test_missing_bucket_and_key_are_not_found(store: Store, s3_bucket: str) -> None:
    with pytest.raises(mlstore.NotFoundError, match="no such bucket") as exc:
        store.read_bytes("s3://no-such-bucket-here/key")
    assert exc.value.url == "s3://no-such-bucket-here/key"
    assert exc.value.operation == "read"
    with pytest.raises(mlstore.NotFoundError, match="no such object"):
        store.info(f"s3://{s3_bucket}/missing")


def test_bucket_and_prefixes_are_directories(store: Store, s3_bucket: str) -> None:
    store.write_bytes(f"s3://{s3_bucket}/a/b/c.bin", b"x")
    for url in (f"s3://{s3_bucket}", f"s3://{s3_bucket}/a", f"s3://{s3_bucket}/a/"):
        info = store.info(url)
        assert info.type == "directory" and info.size == 0 and info.version is None, url
    assert str(store.info(f"s3://{s3_bucket}/a/").url) == f"s3://{s3_bucket}/a"
    with pytest.raises(mlstore.NotFoundError, match="no such bucket"):
        store.info("s3://no-such-bucket-here")
    with pytest.raises(mlstore.NotFoundError, match="no such object or directory"):
        store.info(f"s3://{s3_bucket}/a/nothing/")


def test_directory_urls_are_neither_read_nor_written(store: Store, s3_bucket: str) -> None:
    store.write_bytes(f"s3://{s3_bucket}/dir/x.bin", b"x")
    for url in (f"s3://{s3_bucket}", f"s3://{s3_bucket}/dir/"):
        with pytest.raises(IsADirectoryError, match="use ls") as exc:
            store.read_bytes(url)
        assert isinstance(exc.value, mlstore.MlstoreError)
        assert exc.value.url == url and exc.value.operation == "read"
        with pytest.raises(IsADirectoryError, match="cannot write a file over it"):
            store.write_bytes(url, b"y")
    assert store.find(f"s3://{s3_bucket}") == [f"s3://{s3_bucket}/dir/x.bin"]


@pytest.mark.parametrize(
    ("value", "seconds"), [("4", 4.0), ("0.5", 0.5), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)]
)
def test_retry_after_in_seconds_or_as_a_date(
    s3_fault_proxy: ServerProcess,
    s3_fault_options: dict[str, object],
    store: Store,
    s3_bucket: str,
    value: str,
    seconds: float,
) -> None:
    from tests.servers import proxy

    url = f"s3://{s3_bucket}/throttled.bin"
    store.write_bytes(url, b"x")
    rule = {"fault": "status", "status": 503, "headers": {"Retry-After": value}}
    proxy.set_faults(s3_fault_proxy.endpoint, rule)
    with (
        Store(options={"s3": s3_fault_options}) as s,
        pytest.raises(mlstore.ThrottledError, match="SlowDown") as exc,
    ):
        s.backend("s3").read(parse_url(url))
    assert exc.value.retry_after == seconds  # a date in the past: no wait
    assert proxy.counts(s3_fault_proxy.endpoint)["total"] == 1


def test_writes_record_the_content_hash(store: Store, s3_bucket: str) -> None:
    data = b"some training shard" * 100
    store.write_bytes(f"s3://{s3_bucket}/shard.bin", data)
    info = store.info(f"s3://{s3_bucket}/shard.bin")
    assert info.content_hash == content_hash(data)
    assert info.checksums["md5"]  # single-part upload: the ETag is the MD5
    with store.open(f"s3://{s3_bucket}/streamed.bin", "wb") as fh:
        fh.write(data)
    assert store.info(f"s3://{s3_bucket}/streamed.bin").content_hash == content_hash(data)


def test_endpoint_from_environment(
    s3_options: dict[str, object], s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLSTORE_S3_ENDPOINT_URL", str(s3_options["endpoint_url"]))
    with Store() as s:
        s.write_bytes(f"s3://{s3_bucket}/env.bin", b"via env")
        assert s.read_bytes(f"s3://{s3_bucket}/env.bin") == b"via env"


def test_client_is_created_lazily(store: Store, s3_bucket: str) -> None:
    assert "s3" not in store._runtime.get().calls.built
    store.exists(f"s3://{s3_bucket}/x")
    assert "s3" in store._runtime.get().calls.built


def test_unknown_option_is_a_config_error(s3_bucket: str) -> None:
    with Store(options={"s3": {"not_an_option": 1}}) as s, pytest.raises(mlstore.ConfigError):
        s.read_bytes(f"s3://{s3_bucket}/x")


def _read_hashes(args: tuple[Store, list[str]]) -> list[str]:
    store, urls = args
    return [content_hash(store.read_bytes(u)) for u in urls]


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_store_made_in_parent_works_in_children(store: Store, s3_bucket: str, method: str) -> None:
    urls = [f"s3://{s3_bucket}/obj-{i}.bin" for i in range(8)]
    expected = []
    for i, url in enumerate(urls):
        data = bytes([i]) * (10_000 + i)
        store.write_bytes(url, data)
        expected.append(content_hash(data))
    store.read_bytes(urls[0])  # the parent's client exists (and its event loop runs)
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(4) as pool:
        results = pool.map(_read_hashes, [(store, urls[i::4]) for i in range(4)])
    got = {h for part in results for h in part}
    assert got == set(expected)


def test_pickled_store_carries_no_credentials(s3_options: dict[str, object]) -> None:
    store = Store(
        options={"s3": {**s3_options, "key": "AKIACANARY0001", "secret": "CANARY-SECRET-0002"}}
    )
    blob = pickle.dumps(store)
    assert b"AKIACANARY0001" not in blob and b"CANARY-SECRET-0002" not in blob
    assert str(s3_options["endpoint_url"]).encode() in blob
    assert "CANARY" not in repr(store)
    clone = pickle.loads(blob)
    assert "key" not in clone.config.options["s3"]
