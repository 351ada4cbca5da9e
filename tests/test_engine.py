"""The engine under the Store: work a cold call repeats is done once, per-process
metadata stays bounded, and a buffered write is retried as a whole."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import mlstore
import mlstore.url
from mlstore._engine import cached
from tests.emulators import ServerProcess
from tests.servers import proxy


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every string ``parse_url`` parses from now on (a URL object costs nothing)."""
    seen: list[str] = []
    for name in ("_parse", "_parse_remote"):
        original: Callable[[Any], mlstore.URL] = getattr(mlstore.url, name)

        def counted(url: Any, _original: Callable[[Any], mlstore.URL] = original) -> mlstore.URL:
            seen.append(str(url))
            return _original(url)

        monkeypatch.setattr(mlstore.url, name, counted)
    yield seen


def test_a_read_through_a_mount_parses_its_url_once(parses: list[str]) -> None:
    root = f"memory://engine-{uuid.uuid4().hex[:8]}"
    mounts = {"data": [f"{root}/a", f"{root}/b"]}
    with mlstore.Store(mounts=mounts) as store:
        store.write_bytes(f"{root}/a/x.bin", b"primary")
        store.read_bytes("mlstore://data/x.bin")  # builds this process's engine
        parses.clear()
        assert store.read_bytes("mlstore://data/x.bin") == b"primary"
        assert store.info("mlstore://data/x.bin").size == 7
    assert parses == ["mlstore://data/x.bin", "mlstore://data/x.bin"]  # one per call


def test_a_cold_cached_read_parses_its_url_once(
    parses: list[str], s3_options: dict[str, object], s3_bucket: str
) -> None:
    url = f"s3://{s3_bucket}/cold.bin"
    with mlstore.Store(options={"s3": s3_options}) as store:
        store.write_bytes(url, b"x" * 1000)
        parses.clear()
        assert store.read_bytes(url, 10, 20) == b"x" * 10  # a HEAD, then a GET, cached
        with store.open(f"s3://{s3_bucket}/cold.bin") as fh:  # served from the cache
            assert fh.read() == b"x" * 1000
    assert parses == [url, url]


def test_metadata_kept_per_process_is_bounded(
    monkeypatch: pytest.MonkeyPatch, s3_options: dict[str, object], s3_bucket: str
) -> None:
    monkeypatch.setattr(cached, "INFO_ENTRIES", 3)
    urls = [f"s3://{s3_bucket}/meta-{i}" for i in range(5)]
    # No node-wide tier (metadata_bytes=0): the process front alone answers.
    cache = {"validate": "never", "metadata_bytes": 0}
    with mlstore.Store(options={"s3": s3_options}, cache=cache) as store:
        for url in urls:
            store.write_bytes(url, b"m")
        for url in urls:
            store.info(url)  # 5 HEADs; only the last 3 answers are kept
        before = store.stats()
        for url in reversed(urls[2:]):
            store.info(url)
        kept = store.stats() - before
        assert kept["requests"] == 0 and kept.get("hits", "metadata") == 3
        store.info(urls[0])  # dropped: asked again
        assert (store.stats() - before)["requests"] == 1


def test_an_open_for_write_is_retried_as_one_whole_write(
    s3_fault_proxy: ServerProcess, s3_fault_options: dict[str, object], s3_bucket: str
) -> None:
    proxy.set_faults(
        s3_fault_proxy.endpoint, {"fault": "status", "status": 503, "method": "PUT", "times": 2}
    )
    url = f"s3://{s3_bucket}/written.bin"
    with mlstore.Store(options={"s3": s3_fault_options}, retry={"backoff_base": 0.001}) as s:
        with s.open(url, "wb") as fh:
            fh.write(b"part one, ")
            fh.write(b"part two")
        stats = s.stats()
        assert s.read_bytes(url) == b"part one, part two"
    assert stats.get("retries", "s3") == 2
    puts = [r for r in proxy.request_log(s3_fault_proxy.endpoint) if r["method"] == "PUT"]
    assert len(puts) == 3
