"""mlstore.torch.MapDataset and PrefetchSampler, and the Store's warm/prefetch under
them: against moto behind the counting proxy, with real DataLoader worker processes."""

from __future__ import annotations

import collections
import pickle
from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler  # noqa: E402

from mlstore import (  # noqa: E402
    ConfigError,
    Manifest,
    NotFoundError,
    PreconditionFailedError,
    Store,
)
from mlstore.hashing import content_hash  # noqa: E402
from mlstore.torch import MapDataset, PrefetchSampler  # noqa: E402
from tests.conftest import run_child  # noqa: E402
from tests.emulators import ServerProcess  # noqa: E402
from tests.servers import proxy  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.s3]

COUNT = 24


def sample(i: int) -> bytes:
    return f"sample {i:03d} ".encode() * (50 + i)


@pytest.fixture
def dataset(s3_bucket: str, s3_proxy: ServerProcess) -> Iterator[tuple[Store, str]]:
    """COUNT samples below a prefix, and a Store that reads them through the proxy."""
    endpoint = s3_proxy.endpoint
    store = Store(options={"s3": {"endpoint_url": endpoint}})
    prefix = f"s3://{s3_bucket}/train"
    with Store(options={"s3": {"endpoint_url": endpoint}}, cache={"enabled": False}) as w:
        for i in range(COUNT):
            w.write_bytes(f"{prefix}/{i:03d}.bin", sample(i))
    proxy.reset(endpoint)
    yield store, prefix
    store.close()


def gets(endpoint: str) -> collections.Counter[str]:
    """Data GETs through the proxy since its last reset, by object key."""
    return collections.Counter(
        r["path"].rsplit("/", 1)[-1]
        for r in proxy.request_log(endpoint)
        if r["method"] == "GET" and "list-type" not in (r["query"] or "")
    )


def lists(endpoint: str) -> int:
    log = proxy.request_log(endpoint)
    return sum(1 for r in log if r["method"] == "GET" and "list-type" in (r["query"] or ""))


# ------------------------------------------------------------------ MapDataset


def test_a_prefix_is_listed_once_and_workers_read_pinned_without_listing(
    dataset: tuple[Store, str], s3_proxy: ServerProcess
) -> None:
    store, prefix = dataset
    ds = MapDataset(prefix + "/", transform=content_hash, store=store)
    assert lists(s3_proxy.endpoint) == 1 and len(ds) == COUNT
    proxy.reset(s3_proxy.endpoint)
    loader = DataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context="fork")
    seen = [h for batch in loader for h in batch]
    assert seen == [content_hash(sample(i)) for i in range(COUNT)]
    log = proxy.request_log(s3_proxy.endpoint)
    assert lists(s3_proxy.endpoint) == 0 and not any(r["method"] == "HEAD" for r in log)
    data = [r for r in log if r["method"] == "GET"]
    assert len(data) == COUNT and all(r["if_match"] for r in data), "every read is pinned"


def test_getitems_keeps_a_whole_batch_in_flight(
    dataset: tuple[Store, str], s3_proxy: ServerProcess
) -> None:
    store, prefix = dataset
    ds = MapDataset([f"{prefix}/{i:03d}.bin" for i in range(COUNT)], store=store)
    try:
        proxy.set_latency(s3_proxy.endpoint, 0.2)  # long enough for requests to overlap
        proxy.reset(s3_proxy.endpoint)
        assert ds.__getitems__(range(8)) == [sample(i) for i in range(8)]
        peak = proxy.counts(s3_proxy.endpoint)["peak_in_flight"]
    finally:
        proxy.set_latency(s3_proxy.endpoint, 0)
    assert peak >= 4, f"a batch of 8 was read {peak} at a time"


def test_a_url_list_reads_unpinned_and_a_manifest_detects_a_change(
    dataset: tuple[Store, str], s3_proxy: ServerProcess
) -> None:
    store, prefix = dataset
    urls = [f"{prefix}/{i:03d}.bin" for i in range(3)]
    plain = MapDataset(urls, store=store)
    assert [plain[i] for i in (0, -1)] == [sample(0), sample(2)]
    assert plain.url(1) == urls[1] and plain.version(1) is None
    pinned = MapDataset(Manifest.build(prefix, store=store), store=store)
    store.write_bytes(urls[0], b"rewritten")
    assert plain[0] == b"rewritten", "a write through the Store is what the next read sees"
    fresh = Store(options={"s3": {"endpoint_url": s3_proxy.endpoint}}, cache={"enabled": False})
    stale = MapDataset(pinned.manifest, store=fresh)  # type: ignore[arg-type]
    with pytest.raises(PreconditionFailedError) as err:
        stale[0]
    assert urls[0] in str(err.value)
    assert MapDataset(pinned.manifest, store=fresh, on_change="reread")[0] == b"rewritten"  # type: ignore[arg-type]


def test_bad_sources_and_indices_are_clear_errors(dataset: tuple[Store, str]) -> None:
    store, prefix = dataset
    with pytest.raises(ConfigError, match="source must be"):
        MapDataset(42, store=store)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="on_change"):
        MapDataset([], on_change="ignore")
    with pytest.raises(NotFoundError, match="nothing to put in a manifest"):
        MapDataset(prefix + "-missing/", store=store)
    ds = MapDataset([f"{prefix}/000.bin"], store=store)
    with pytest.raises(IndexError, match=r"index 1 out of range \(1 samples\)"):
        ds[1]
    assert repr(ds) == "MapDataset(1 URLs)"
    assert pickle.loads(pickle.dumps(ds))[0] == sample(0)


# ------------------------------------------------------------------ warm and prefetch


def test_a_warm_fills_the_node_cache_for_another_process_and_not_this_memory(
    dataset: tuple[Store, str], s3_proxy: ServerProcess
) -> None:
    store, prefix = dataset
    url = f"{prefix}/003.bin"
    assert store.warm(url) == len(sample(3))
    assert store.warm(url) == 0, "a copy the node holds is not fetched again"
    assert store.stats().get("hits", "memory") == 0
    assert gets(s3_proxy.endpoint) == {"003.bin": 1}
    out = run_child(
        f"""
        import json, mlstore
        store = mlstore.Store(options={{"s3": {{"endpoint_url": {s3_proxy.endpoint!r}}}}})
        data = store.read_bytes({url!r})
        print(json.dumps([len(data), store.stats()["requests"]]))
        """,
        {"MLSTORE_CACHE_DIR": store.config.cache.resolved_disk_dir},
    )
    assert out == [len(sample(3)), 0]
    assert sum(gets(s3_proxy.endpoint).values()) == 1


def test_prefetch_reports_its_bytes_and_its_first_error(
    dataset: tuple[Store, str], s3_proxy: ServerProcess
) -> None:
    store, prefix = dataset
    urls = [f"{prefix}/{i:03d}.bin" for i in range(6)]
    assert store.prefetch(urls).result(timeout=60) == sum(len(sample(i)) for i in range(6))
    with pytest.raises(NotFoundError) as err:
        store.prefetch([urls[0], prefix + "/absent.bin"]).result(timeout=60)
    assert "absent.bin" in str(err.value)
    info = store.info(urls[1])
    store.write_bytes(urls[1], b"changed")
    with pytest.raises(PreconditionFailedError):
        Store(options={"s3": {"endpoint_url": s3_proxy.endpoint}}).prefetch(
            [urls[1]], versions=[info.version]
        ).result(timeout=60)
    with pytest.raises(ConfigError, match="2 URLs but 1 versions"):
        store.prefetch(urls[:2], versions=[None])


# ------------------------------------------------------------------ PrefetchSampler


def test_the_sampler_order_is_unchanged_and_set_epoch_is_passed_on(
    dataset: tuple[Store, str],
) -> None:
    store, prefix = dataset
    ds = MapDataset(prefix, store=store)
    inner = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=1, seed=7)
    wrapped = PrefetchSampler(inner, ds, lookahead=4)
    for epoch in (0, 1):
        wrapped.set_epoch(epoch)
        reference = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=1, seed=7)
        reference.set_epoch(epoch)
        expect = list(reference)
        assert list(wrapped) == expect and len(wrapped) == len(expect)
        wrapped.settle()
    # Each epoch warms at most its own samples (a warm still queued at the epoch's end
    # is cancelled), and a sample the node holds is found, not fetched again.
    warms = wrapped.counts["warmed"] + wrapped.counts["held"]
    assert 0 < warms <= COUNT and wrapped.counts["failed"] == 0


def test_an_epoch_fetches_each_object_once_on_the_node_and_nothing_after_it(
    dataset: tuple[Store, str], s3_proxy: ServerProcess
) -> None:
    """Prefetch and the workers' own reads meet in single-flight: one GET per object,
    and the epoch's end is the end of prefetching."""
    store, prefix = dataset
    ds = MapDataset(prefix, store=store)
    proxy.reset(s3_proxy.endpoint)
    sampler = PrefetchSampler(
        RandomSampler(ds, generator=torch.Generator().manual_seed(3)), ds, lookahead=8
    )
    loader = DataLoader(
        ds, sampler=sampler, batch_size=4, num_workers=2, multiprocessing_context="fork"
    )
    got = [b for batch in loader for b in batch]
    assert sampler.settle(timeout=60)
    assert sorted(got) == sorted(sample(i) for i in range(COUNT))
    assert gets(s3_proxy.endpoint) == {f"{i:03d}.bin": 1 for i in range(COUNT)}
    assert sampler.counts["warmed"] + sampler.counts["held"] > 0


def test_samples_taken_before_their_warm_began_are_not_warmed_after(
    dataset: tuple[Store, str], s3_proxy: ServerProcess
) -> None:
    """A consumer that outruns the warms reads what it took itself: a warm that fell
    behind never fetches a sample already handed out (under a small cache that fetch
    would evict what is wanted next, and the consumer may have read it already)."""
    store, prefix = dataset
    ds = MapDataset(prefix, store=store)
    proxy.reset(s3_proxy.endpoint)
    proxy.set_latency(s3_proxy.endpoint, 0.5)
    try:
        sampler = PrefetchSampler(SequentialSampler(ds), ds, lookahead=COUNT, concurrency=1)
        order = iter(sampler)
        skipped = [next(order) for _ in range(COUNT - 4)]  # taken, never read
        rest = [ds[i] for i in order]  # each take starts the next warm once one is free
        assert sampler.settle(timeout=60)
    finally:
        proxy.set_latency(s3_proxy.endpoint, 0)
    assert rest == [sample(i) for i in range(COUNT - 4, COUNT)]
    fetched = gets(s3_proxy.endpoint)
    assert max(fetched.values()) == 1
    # Only the warm started at the first take (before the others were taken) may have
    # fetched a skipped sample; those queued behind it were dropped, not warmed late.
    assert len([i for i in skipped if fetched[f"{i:03d}.bin"]]) <= 1
    assert sampler.counts["late"] >= len(skipped) - 1


def test_a_broken_loop_cancels_the_warms_not_yet_started(
    dataset: tuple[Store, str], s3_proxy: ServerProcess
) -> None:
    store, prefix = dataset
    ds = MapDataset(prefix, store=store)
    sampler = PrefetchSampler(SequentialSampler(ds), ds, lookahead=4, concurrency=1)
    proxy.reset(s3_proxy.endpoint)
    it = iter(sampler)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert sampler.settle(timeout=60)
    warmed = set(gets(s3_proxy.endpoint))
    assert warmed and warmed <= {f"{i:03d}.bin" for i in range(8)}, warmed


def test_warms_in_flight_are_bounded_by_concurrency_and_bytes(
    dataset: tuple[Store, str], s3_proxy: ServerProcess
) -> None:
    store, prefix = dataset
    ds = MapDataset(prefix, store=store)
    biggest = max(len(sample(i)) for i in range(COUNT))
    peaks = []
    for concurrency, max_bytes in ((3, 1 << 30), (16, biggest + 1)):
        store.cache.clear()
        sampler = PrefetchSampler(
            SequentialSampler(ds), ds, lookahead=COUNT, concurrency=concurrency, max_bytes=max_bytes
        )
        proxy.set_latency(s3_proxy.endpoint, 0.1)
        try:
            proxy.reset(s3_proxy.endpoint)
            it = iter(sampler)
            next(it)  # the first item starts the warms that fit
            assert sampler.settle(timeout=60)
            peaks.append(proxy.counts(s3_proxy.endpoint)["peak_in_flight"])
            it.close()
        finally:
            proxy.set_latency(s3_proxy.endpoint, 0)
    assert peaks == [3, 1], peaks


def test_a_dataset_without_urls_is_refused(dataset: tuple[Store, str]) -> None:
    with pytest.raises(ConfigError, match="url\\(i\\) and version\\(i\\)"):
        PrefetchSampler(range(3), [b"a", b"b", b"c"])  # type: ignore[arg-type]
    store, prefix = dataset
    ds = MapDataset(prefix, store=store)
    with pytest.raises(ConfigError, match="lookahead must be at least 1"):
        PrefetchSampler(range(3), ds, lookahead=0)
    sampler = pickle.loads(pickle.dumps(PrefetchSampler(SequentialSampler(ds), ds)))
    assert list(sampler)[:3] == [0, 1, 2]
