"""The Stats snapshot: text and HTML renderings, latency histograms and percentiles,
per-operation counts, what the cache saved, and the bookkeeping of node-wide flushes."""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser

import pytest

import mlstore
from mlstore.cache.tiered import Fetched, TieredCache
from mlstore.config import CacheConfig
from mlstore.hashing import content_hash
from mlstore.metrics import LATENCY_BOUNDS, OPERATIONS, Histogram, Metrics, Stats

LONG = {
    ("bytes_read", "s3"): 123456789012345,
    ("dedupe_bytes_saved", "cache"): 7,
    ("a_very_long_counter_name_for_the_test", "cache"): 42,
    ("hits", "a-protocol-with-a-long-name"): 3,
}


def _columns(line: str) -> list[str]:
    return re.split(r"\s+", line.strip())


def test_the_text_table_separates_every_column() -> None:
    stats = Stats(LONG)
    lines = str(stats).splitlines()
    names = sorted({name for name, _ in LONG})
    assert _columns(lines[0]) == ["protocol", *names]
    assert len(lines) == 1 + len({proto for _, proto in LONG})
    for line in lines[1:]:
        proto, *values = _columns(line)
        row = stats.by_protocol[proto]
        assert values == [str(row.get(name, 0)) for name in names]
    # columns line up: each value ends where its header ends
    ends = [m.end() for m in re.finditer(r"\S+", lines[0])]
    for line in lines[1:]:
        assert [m.end() for m in re.finditer(r"\S+", line)][1:] == ends[1:]
    assert stats.table() == str(stats)


class _Tables(HTMLParser):
    """The cells of every table, by caption."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._caption = False
        self._current: list[list[str]] = []
        self._cell = False

    def handle_starttag(self, tag: str, attrs: object) -> None:
        if tag == "table":
            self._current = []
        elif tag == "caption":
            self._caption = True
        elif tag == "tr":
            self._current.append([])
        elif tag in ("td", "th"):
            self._current[-1].append("")
            self._cell = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "caption":
            self._caption = False
        elif tag in ("td", "th"):
            self._cell = False

    def handle_data(self, data: str) -> None:
        if self._caption:
            self.tables[data] = self._current
        elif self._cell:
            self._current[-1][-1] += data


def test_the_html_groups_tiers_backends_operations_and_latency() -> None:
    stats = Stats(
        {
            ("hits", "memory"): 3,
            ("bytes_served", "memory"): 1536,
            ("hits", "disk"): 1,
            ("requests", "s3"): 5,
            ("get_requests", "s3"): 4,
            ("head_requests", "s3"): 1,
            ("bytes_read", "s3"): 3 * 1024 * 1024,
        },
        {("get", "s3"): Histogram(counts=(0,) * 10 + (4,) + (0,) * 15, sum=0.02, count=4)},
    )
    parser = _Tables()
    parser.feed(stats._repr_html_())
    tiers = parser.tables["Cache tiers"]
    assert tiers[0] == ["tier", "bytes_served", "hits"]
    assert ["memory", "1.5 KiB", "3"] in tiers and ["disk", "0 B", "1"] in tiers
    backends = parser.tables["Backends"]
    assert backends == [["backend", "bytes_read", "requests"], ["s3", "3.0 MiB", "5"]]
    assert parser.tables["Requests by operation"] == [["backend", "get", "head"], ["s3", "4", "1"]]
    latency = parser.tables["Request latency"]
    assert latency[0] == ["op", "backend", "requests", "p50", "p95", "p99"]
    assert latency[1][:3] == ["get", "s3", "4"]
    assert all(len(row) == len(table[0]) for table in parser.tables.values() for row in table)
    assert "<script" not in Stats({("hits", "<script>"): 1})._repr_html_()


def test_the_text_table_lists_latency_after_the_counters() -> None:
    hist = Histogram(counts=(0,) * 12 + (2,) + (0,) * 13, sum=0.03, count=2)
    text = str(Stats({("requests", "s3"): 2}, {("get", "s3"): hist}))
    head, _, latency = text.partition("\n\n")
    assert head.split()[:2] == ["protocol", "requests"]
    assert latency.splitlines()[0].split() == ["latency", "requests", "p50", "p95", "p99"]
    assert latency.splitlines()[1].split()[:3] == ["get", "s3", "2"]


# ------------------------------------------------------------------ histograms


def test_quantiles_interpolate_within_the_bucket() -> None:
    bounds = (1.0, 2.0, 4.0)
    hist = Histogram(bounds, (0, 10, 0, 0), 15.0, 10)  # ten in (1, 2]
    assert hist.quantile(0.5) == pytest.approx(1.5)
    assert hist.quantile(1.0) == pytest.approx(2.0)
    assert hist.quantile(0.0) == pytest.approx(1.0)
    spread = Histogram(bounds, (5, 0, 5, 0), 20.0, 10)  # five in [0, 1], five in (2, 4]
    assert spread.quantile(0.25) == pytest.approx(0.5)
    assert spread.quantile(0.7) == pytest.approx(2.8)
    slow = Histogram(bounds, (0, 0, 0, 3), 30.0, 3)  # all above the largest bound
    assert slow.quantile(0.5) == 4.0
    assert math.isnan(Histogram(bounds).quantile(0.5))
    with pytest.raises(ValueError, match="between 0 and 1"):
        hist.quantile(1.5)


def test_histograms_add_and_subtract_bucket_by_bucket() -> None:
    a = Histogram((1.0, 2.0), (1, 2, 3), 10.0, 6)
    b = Histogram((1.0, 2.0), (0, 1, 1), 4.0, 2)
    assert a + b == Histogram((1.0, 2.0), (1, 3, 4), 14.0, 8)
    assert (a + b) - b == a
    with pytest.raises(ValueError, match="different bucket bounds"):
        a + Histogram((1.0, 3.0))
    with pytest.raises(ValueError, match="3 counts"):
        Histogram((1.0, 2.0), (1, 2))


def test_a_request_lands_in_the_bucket_of_its_duration() -> None:
    metrics = Metrics()
    metrics.request("get", "s3", LATENCY_BOUNDS[3])  # on a bound: that bucket
    metrics.request("get", "s3", LATENCY_BOUNDS[3] * 1.01)  # just above: the next
    metrics.request("get", "s3", 1e6)  # slower than every bound
    metrics.request("head", "gs", 0.0, failed=True)
    stats = metrics.snapshot()
    hist = stats.latency[("get", "s3")]
    assert hist.counts[3] == 1 and hist.counts[4] == 1 and hist.counts[-1] == 1
    assert hist.count == 3 and hist.sum == pytest.approx(LATENCY_BOUNDS[3] * 2.01 + 1e6)
    assert stats.get("requests", "s3") == 3 and stats.get("get_requests", "s3") == 3
    assert stats.get("errors", "gs") == 1 and stats.get("head_requests", "gs") == 1
    assert stats.requests_by_op() == {"gs": {"head": 1}, "s3": {"get": 3}}
    assert stats.percentiles("get", "s3")["p99"] == LATENCY_BOUNDS[-1]
    assert stats.percentiles("head")["p50"] == pytest.approx(LATENCY_BOUNDS[0] / 2)
    assert all(math.isnan(v) for v in stats.percentiles("put").values())


def test_subtracting_snapshots_subtracts_latency_too() -> None:
    metrics = Metrics()
    metrics.request("get", "s3", 0.01)
    before = metrics.snapshot()
    metrics.request("get", "s3", 0.02)
    metrics.request("list", "s3", 0.5)
    diff = metrics.snapshot() - before
    assert diff.latency[("get", "s3")].count == 1
    assert diff.latency[("get", "s3")].sum == pytest.approx(0.02)
    assert diff.latency[("list", "s3")].count == 1
    assert diff.get("requests") == 2
    assert (before + diff).latency == metrics.snapshot().latency
    assert metrics.snapshot() - metrics.snapshot() == Stats()


# ------------------------------------------------------------------ savings


def test_a_hit_counts_a_saved_request_of_the_key_protocol_only() -> None:
    metrics = Metrics()
    metrics.served("memory", 10, "s3://bucket/secret-key?X-Amz-Signature=abc#0123")
    metrics.served("disk", 5, "gs://b/k#scope\x00v1\x004096:0")
    metrics.served("disk", 7, "not a url")
    stats = metrics.snapshot()
    assert stats.get("saved_requests", "s3") == 1 and stats.get("saved_bytes", "s3") == 10
    assert stats.get("saved_bytes", "gs") == 5 and stats.get("saved_bytes", "unknown") == 7
    assert stats.get("hits", "disk") == 2 and stats.get("bytes_served", "memory") == 10
    labels = {label for _, label in stats.counters}
    assert labels == {"memory", "disk", "s3", "gs", "unknown"}


def test_a_dedupe_hit_saves_a_request(tmp_path: object) -> None:
    metrics = Metrics()
    cache = TieredCache(CacheConfig(disk_dir=str(tmp_path), memory_bytes=0), metrics)
    try:
        data = b"the same content" * 100
        digest = content_hash(data)
        cache.get("s3://b/one#s", lambda: Fetched(data, "v1"))
        assert cache.disk is not None
        cache.disk.prove("s3://b/two#s", "v7", digest)  # this node wrote it

        def no_fetch() -> Fetched:
            raise AssertionError("the blob of the same content serves it")

        got = cache.get("s3://b/two#s", no_fetch, known_hash=digest, known_version="v7")
        assert got == data
        stats = metrics.snapshot()
        assert stats.get("dedupe_hits", "cache") == 1
        assert stats.get("saved_requests", "s3") == 1
        assert stats.get("saved_bytes", "s3") == len(data)
        assert stats.get("misses", "cache") == 1
    finally:
        cache.close()


def test_every_remote_request_is_counted_by_operation(
    s3_bucket: str, s3_options: dict[str, object]
) -> None:
    with mlstore.Store(options={"s3": s3_options}) as store:
        before = store.stats()
        base = f"s3://{s3_bucket}"
        store.write_bytes(f"{base}/a", b"x" * 100)
        store.info(f"{base}/a")
        store.read_bytes(f"{base}/a")
        store.read_bytes(f"{base}/a")  # a hit: no request
        store.ls(base)
        store.copy(f"{base}/a", f"{base}/b")
        store.rm(f"{base}/b")
        stats = store.stats() - before
    by_op = stats.requests_by_op()["s3"]
    assert set(by_op) <= set(OPERATIONS)
    assert by_op["put"] >= 1 and by_op["get"] >= 1 and by_op["list"] >= 1
    assert by_op["copy"] >= 1 and by_op["delete"] >= 1 and by_op["head"] >= 1
    assert sum(by_op.values()) == stats.get("requests", "s3")
    assert {op: h.count for (op, p), h in stats.latency.items() if p == "s3"} == by_op
    assert stats.get("saved_requests", "s3") >= 1
    assert stats.get("saved_bytes", "s3") == 100 * stats.get("saved_requests", "s3")
    assert all(v > 0 for v in stats.percentiles("get", "s3").values())


# ------------------------------------------------------------------ handing to the node


def test_pending_counts_are_handed_once_and_given_back_on_failure() -> None:
    metrics = Metrics()
    metrics.add("requests", "s3", 3)
    metrics.request("get", "s3", 0.01)
    first = metrics.take_pending()
    assert first.get("requests") == 4 and first.latency[("get", "s3")].count == 1
    assert metrics.take_pending() == Stats()
    metrics.add("requests", "s3")
    failed = metrics.take_pending()
    metrics.give_back(failed)  # the write failed: handed at the next flush
    assert metrics.take_pending().get("requests") == 1
    metrics.add("hits", "memory", 2)
    metrics.reset()  # the Store's own view starts over; the node still gets the 2 hits
    assert metrics.snapshot() == Stats()
    assert metrics.take_pending().get("hits") == 2
    metrics.add("hits", "memory")
    assert metrics.take_pending().get("hits") == 1


def test_every_counter_the_package_counts_is_documented() -> None:
    import pathlib

    from mlstore.metrics import METRICS

    package = pathlib.Path(mlstore.__file__).parent
    pattern = re.compile(
        r"""(?:\.add\(|\bcount\(\s*\w+,\s*|on_event\(|_event\()\s*"([a-z_]+)"|"""
        r"""partial\(\s*self\.metrics\.add,\s*"([a-z_]+)\""""
    )
    used = {
        name
        for path in package.rglob("*.py")
        for match in pattern.finditer(path.read_text())
        for name in match.groups()
        if name
    }
    assert {"evictions", "hedges", "retries", "cache_errors", "disk_skips", "bytes_read"} <= used
    assert used - set(METRICS) == set()
