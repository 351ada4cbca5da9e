"""Eviction by known future use: plans in the node index (any process's fill evicts by
them), their lapse, and a PrefetchSampler whose next epoch starts with the samples it
will want first still cached."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from mlstore import Store
from mlstore.cache.disk import DiskTier
from tests.conftest import run_child
from tests.emulators import ServerProcess
from tests.servers import proxy

KiB = 1024


def blob(name: str) -> bytes:
    return name.encode() * (KiB // len(name))


def cached(tier: DiskTier, names: str) -> str:
    return "".join(n for n in names if tier.lookup(n) is not None)


def test_without_a_plan_eviction_is_lru(tmp_path: Path) -> None:
    tier = DiskTier(str(tmp_path / "cache"), 3 * KiB, clock=lambda: 1000.0)
    for name in "abc":
        tier.put(name, "v1", blob(name))
    tier.put("d", "v1", blob("d"))
    assert cached(tier, "abcd") == "bcd"


def test_a_fill_evicts_the_unplanned_first_then_the_furthest_next_use(tmp_path: Path) -> None:
    now = [1000.0]
    tier = DiskTier(str(tmp_path / "cache"), 4 * KiB, clock=lambda: now[0])
    for name in "abcd":
        tier.put(name, "v1", blob(name))
    # a reader at position 10 will read b at 30, a at 12, c at 50; d is not in its plan
    tier.schedule("job", 10, [("a", 12), ("b", 30), ("c", 50)])
    tier.put("e", "v1", blob("e"))
    assert cached(tier, "abcde") == "abce", "the unplanned blob goes first, even if newest"
    tier.schedule("job", 10, [("e", 20)])
    tier.put("f", "v1", blob("f"))
    assert cached(tier, "abcef") == "abef", "then the one wanted last"
    # Past its due, a blob is no longer planned: LRU among the unplanned again.
    tier.schedule("job", 40, [("b", None)])
    tier.put("g", "v1", blob("g"))
    assert "a" not in cached(tier, "abefg"), "a's use (12) is behind the reader (40)"


def test_two_plans_keep_a_blob_by_its_nearest_use_and_a_silent_plan_lapses(
    tmp_path: Path,
) -> None:
    now = [1000.0]
    tier = DiskTier(str(tmp_path / "cache"), 3 * KiB, clock=lambda: now[0])
    for name in "abc":
        tier.put(name, "v1", blob(name))
    tier.schedule("rank0", 0, [("a", 100), ("b", 5), ("c", 50)])
    tier.schedule("rank1", 0, [("a", 1)])  # another rank wants a soon
    tier.put("d", "v1", blob("d"))
    assert cached(tier, "abcd") == "abd", "c is wanted last by everyone"
    now[0] += 601  # both plans go silent; a new reader's plan takes over
    tier.schedule("new", 0, [("d", 1)])
    tier.put("e", "v1", blob("e"))
    assert cached(tier, "abde") == "bde", "the lapsed plans no longer protect a"


def test_a_plan_made_in_one_process_rules_a_fill_in_another(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    tier = DiskTier(str(root), 3 * KiB)
    for name in "abc":
        tier.put(name, "v1", blob(name))
    tier.schedule("job", 0, [("a", 9), ("b", 1), ("c", 2)])  # a, filled first, wanted last
    out = run_child(
        f"""
        import json
        from mlstore.cache.disk import DiskTier
        tier = DiskTier({str(root)!r}, 3 * 1024)
        tier.put("d", "v1", b"d" * 1024)
        print(json.dumps("".join(n for n in "abcd" if tier.lookup(n) is not None)))
        """,
        {},
    )
    assert out == "bcd"


def test_a_store_plan_ending_returns_eviction_to_lru(tmp_path: Path) -> None:
    store = Store(cache={"disk_dir": str(tmp_path / "cache")})
    store.plan_reads("job", 0, [("memory://x/a", 1)])  # not a cached protocol: ignored
    store.plan_reads("job", None)
    tier = store.cache.disk
    assert tier is not None
    assert tier._conn().execute("SELECT count(*) FROM plans").fetchone()[0] == 0


@pytest.mark.torch
@pytest.mark.s3
@pytest.mark.parametrize("plan", [True, False], ids=["belady", "lru"])
def test_the_next_epoch_starts_with_what_it_wants_first_still_cached(
    plan: bool, s3_bucket: str, s3_proxy: ServerProcess, tmp_path: Path
) -> None:
    """A cache that holds half the dataset: under the sampler's plan, the samples the
    next epoch reads first were kept through the epoch before and are read with no
    request; under LRU (the same run without the plan) they were not."""
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader, DistributedSampler

    from mlstore.torch import MapDataset, PrefetchSampler

    count, size = 64, 4 * KiB
    endpoint = s3_proxy.endpoint
    options = {"s3": {"endpoint_url": endpoint}}
    with Store(options=options, cache={"enabled": False}) as w:
        for i in range(count):
            w.write_bytes(f"s3://{s3_bucket}/d/{i:03d}", bytes([i]) * size)
    store = Store(
        options=options,
        cache={"disk_dir": str(tmp_path / "c"), "disk_bytes": count // 2 * size, "memory_bytes": 0},
    )
    ds = MapDataset(f"s3://{s3_bucket}/d/", store=store)
    inner = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=5)
    sampler = PrefetchSampler(inner, ds, lookahead=4, concurrency=2, plan=plan)
    loader = DataLoader(ds, sampler=sampler, batch_size=4)
    for _ in loader:  # epoch 0 fills the cache (half of it evicted on the way)
        pass
    assert sampler.settle(timeout=60)
    sampler.set_epoch(1)
    reference = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=5)
    reference.set_epoch(1)
    first = [ds.url(i).rsplit("/", 1)[1] for i in list(reference)[:16]]
    proxy.reset(endpoint)
    got = [bytes(b[:1]) for batch in loader for b in batch]
    assert sorted(got) == sorted(bytes([i]) for i in range(count))
    fetched = collections.Counter(
        r["path"].rsplit("/", 1)[1] for r in proxy.request_log(endpoint) if r["method"] == "GET"
    )
    refetched_early = [k for k in first if fetched[k]]
    if plan:
        assert refetched_early == [], "Belady kept the samples wanted first"
    else:
        assert refetched_early, "LRU kept the samples read last, not those wanted first"
    sampler.close()
