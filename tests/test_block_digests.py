"""Block fills (ranged GETs of large objects) are verified where a digest can be known.

An object mlstore writes carries per-block digests in its metadata (when they fit), so
a block damaged in transit is fetched again instead of being cached node-wide and served
to every later process. Blocks of objects without digests are counted as unverified
fills in ``stats()``, and stale digests (a tool rewrote the object and kept its
metadata) never fail a read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import mlstore
from mlstore.hashing import BLOCKS_KEY, BlockDigests, block_digests
from tests.servers import proxy

MiB = 1024 * 1024


@pytest.fixture
def via_proxy(s3_proxy: Any) -> str:
    proxy.reset(s3_proxy.endpoint)
    return str(s3_proxy.endpoint)


def _store(endpoint: str, cache_dir: Path) -> mlstore.Store:
    return mlstore.Store(
        options={"s3": {"endpoint_url": endpoint}},
        cache={
            "disk_dir": str(cache_dir),
            "block_threshold": MiB,
            "block_size": MiB,
            "memory_bytes": 0,
        },
    )


def _client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def test_a_byte_flipped_in_a_block_fill_is_refetched_not_cached(
    via_proxy: str, s3_bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(3 * MiB + 123)
    url = f"s3://{s3_bucket}/big/model.bin"
    with _store(via_proxy, tmp_path / "cache") as writer:
        writer.write_bytes(url, data)  # with its block digests in the metadata
    proxy.set_faults(via_proxy, {"fault": "flip", "method": "GET", "range": True, "times": 1})
    with _store(via_proxy, tmp_path / "cache") as reader:
        assert reader.read_bytes(url, 0, len(data)) == data
        assert reader.stats().get("unverified_fills", "cache") == 0
    assert proxy.counts(via_proxy)["faults"] == {"flip": 1}
    proxy.clear_faults(via_proxy)
    with _store(via_proxy, tmp_path / "cache") as fresh, fresh.open(url) as fh:
        assert fh.read() == data  # the next process on the node reads the good block


def test_block_fills_without_digests_are_counted_as_unverified(
    via_proxy: str, s3_bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(3 * MiB)
    _client(via_proxy).put_object(Bucket=s3_bucket, Key="foreign.bin", Body=data)
    with _store(via_proxy, tmp_path / "cache") as reader:
        assert reader.read_bytes(f"s3://{s3_bucket}/foreign.bin", 0, len(data)) == data
        assert reader.stats().get("unverified_fills", "cache") == 3


def test_stale_block_digests_never_fail_a_read(
    via_proxy: str, s3_bucket: str, tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/synced.bin"
    with _store(via_proxy, tmp_path / "cache") as writer:
        writer.write_bytes(url, os.urandom(3 * MiB))
    head = _client(via_proxy).head_object(Bucket=s3_bucket, Key="synced.bin")
    assert BLOCKS_KEY in head["Metadata"]
    new = os.urandom(3 * MiB)  # a sync tool's rewrite, old metadata carried over
    _client(via_proxy).put_object(
        Bucket=s3_bucket, Key="synced.bin", Body=new, Metadata=head["Metadata"]
    )
    with _store(via_proxy, tmp_path / "cache") as reader:
        assert reader.read_bytes(url, 0, len(new)) == new
        with reader.open(url) as fh:
            fh.seek(MiB + 5)
            assert fh.read(10) == new[MiB + 5 : MiB + 15]


@pytest.mark.parametrize("size", [MiB + 1, 3 * MiB, 200 * MiB + 7])
def test_block_digests_check_every_aligned_block(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    raw = block_digests(data)
    assert raw is not None and len(raw) < 1700  # fits S3's 2 KiB of user metadata
    digests = BlockDigests.parse(raw)
    assert digests is not None
    g = digests.granularity
    for lo in range(0, size, 4 * g):
        hi = min(lo + 4 * g, size)
        assert digests.check(lo, data[lo:hi], size) is True
        damaged = bytearray(data[lo:hi])
        damaged[len(damaged) // 2] ^= 0xFF
        assert digests.check(lo, bytes(damaged), size) is False
    assert digests.check(1, data[1 : 1 + g], size) is None  # not aligned: cannot tell


def test_small_objects_carry_no_block_digests() -> None:
    assert block_digests(b"x" * MiB) is None
    assert BlockDigests.parse("garbage") is None
    assert BlockDigests.parse(None) is None
