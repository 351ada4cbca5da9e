"""A content hash in an object's metadata is a claim, not a proof.

mlstore records the xxh3 of what it writes in the object's metadata, and uses it to
serve a second URL of known content from the node cache without a GET. Anyone who can
write an object can also write its metadata, and tools that rewrite an object often keep
the old metadata. So the hash from metadata picks a cached blob only once mlstore has
proven it for the object's current version (it wrote that version itself on this node,
or it hashed that version's bytes), and a download that disagrees with the metadata is
either damage in transit (fetched again) or stale metadata (the bytes are served).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import mlstore
from mlstore.hashing import METADATA_KEY, content_hash
from tests.servers import proxy

KiB = 1024


def _client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def _gets(endpoint: str) -> int:
    return proxy.requests(endpoint, "GET")


@pytest.fixture
def via_proxy(s3_proxy: Any) -> str:
    proxy.reset(s3_proxy.endpoint)
    return str(s3_proxy.endpoint)


def _store(endpoint: str, cache_dir: Path, **cache: Any) -> mlstore.Store:
    return mlstore.Store(
        options={"s3": {"endpoint_url": endpoint}},
        cache={"disk_dir": str(cache_dir), **cache},
    )


def test_metadata_naming_another_objects_hash_is_served_its_own_bytes(
    via_proxy: str, s3_bucket: str, tmp_path: Path
) -> None:
    secret = f"s3://{s3_bucket}/tenant-a/weights.bin"
    with _store(via_proxy, tmp_path / "cache") as owner:
        owner.write_bytes(secret, b"tenant A's weights" * 100)
        assert owner.read_bytes(secret).startswith(b"tenant A")  # on the node's disk
    # Another tenant plants an object whose metadata claims that content.
    claimed = content_hash(b"tenant A's weights" * 100)
    _client(via_proxy).put_object(
        Bucket=s3_bucket, Key="tenant-b/probe.bin", Body=b"probe", Metadata={METADATA_KEY: claimed}
    )
    probe = f"s3://{s3_bucket}/tenant-b/probe.bin"
    for validate in ("ttl", "never"):
        with _store(via_proxy, tmp_path / "cache", validate=validate) as reader:
            assert reader.info(probe).size == 5  # the metadata, hash and all, is known
            assert reader.read_bytes(probe) == b"probe"
            with reader.open(probe) as fh:
                assert fh.read() == b"probe"
            assert reader.stats().get("dedupe_hits", "cache") == 0


@pytest.mark.parametrize("cached", [True, False], ids=["node-cache", "no-cache"])
def test_an_object_rewritten_with_its_old_metadata_reads_its_new_bytes(
    cached: bool, via_proxy: str, s3_bucket: str, tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/synced/model.bin"
    old = b"old model" * 50
    with _store(via_proxy, tmp_path / "cache") as writer:
        writer.write_bytes(url, old)
        assert writer.read_bytes(url) == old  # the old bytes are on the node's disk
    # A sync tool replaces the bytes and carries the old metadata over.
    head = _client(via_proxy).head_object(Bucket=s3_bucket, Key="synced/model.bin")
    assert head["Metadata"][METADATA_KEY] == content_hash(old)
    new = b"new model, retrained" * 50
    _client(via_proxy).put_object(
        Bucket=s3_bucket, Key="synced/model.bin", Body=new, Metadata=head["Metadata"]
    )
    cache: dict[str, Any] = {} if cached else {"enabled": False}
    with _store(via_proxy, tmp_path / "cache", **cache) as reader:
        assert reader.info(url).size == len(new)
        assert reader.read_bytes(url) == new  # neither the old bytes nor an error
        with reader.open(url) as fh:
            assert fh.read() == new
    with _store(via_proxy, tmp_path / "cache", **cache) as fresh:  # a fresh process's read
        assert fresh.read_bytes(url) == new


def test_content_written_through_mlstore_on_the_node_is_served_without_a_get(
    via_proxy: str, s3_bucket: str, tmp_path: Path
) -> None:
    data = b"one shard, four copies" * (4 * KiB)
    urls = [f"s3://{s3_bucket}/copies/{i}.bin" for i in range(4)]
    with _store(via_proxy, tmp_path / "cache") as writer:
        for url in urls:
            writer.write_bytes(url, data)  # mlstore wrote each version: proven
    with _store(via_proxy, tmp_path / "cache", memory_bytes=0) as reader:
        for url in urls:
            reader.info(url)
        proxy.reset(via_proxy)
        assert [reader.read_bytes(url) for url in urls] == [data] * 4
        assert _gets(via_proxy) == 1, "the first copy is fetched, the other three proven"
        assert reader.stats().get("dedupe_hits", "cache") == 3
