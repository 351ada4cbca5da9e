"""mlstore.torch.ShardSampler and ShardMapDataset: whole shards per rank, exactly once
per epoch, balanced, deterministic; the shard index; samples read by index equal to
the ones ShardDataset streams; clear errors for bad input."""

from __future__ import annotations

import collections
import itertools
import pickle
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from mlstore import ConfigError, Manifest, PreconditionFailedError, Store  # noqa: E402
from mlstore.torch import (  # noqa: E402
    ShardDataset,
    ShardInfo,
    ShardMapDataset,
    ShardSampler,
    index_shards,
    load_index,
    save_index,
)
from tests.emulators import ServerProcess  # noqa: E402
from tests.servers import proxy  # noqa: E402
from tests.test_torch_shards import sample_members, tar_bytes, write_shards  # noqa: E402

pytestmark = pytest.mark.torch


def shard_of(counts: list[int]) -> list[int]:
    """The shard of every index, when samples are numbered shard after shard."""
    return [s for s, n in enumerate(counts) for _ in range(n)]


def ranks(counts: list[int], world: int, **kwargs: object) -> list[ShardSampler]:
    return [ShardSampler(counts, r, world, **kwargs) for r in range(world)]  # type: ignore[arg-type]


def random_counts(rng: random.Random) -> list[int]:
    return [rng.randrange(0, 40) for _ in range(rng.randrange(5, 30))]


# ---------------------------------------------------------------- the sampler


def test_every_sample_once_per_epoch_and_only_from_the_ranks_own_shards() -> None:
    rng = random.Random(3)
    for _ in range(40):
        counts = random_counts(rng)
        world = rng.randrange(1, 6)
        owner = shard_of(counts)
        samplers = ranks(counts, world, even="none", seed=rng.randrange(100))
        for epoch in range(3):
            seen: collections.Counter[int] = collections.Counter()
            for sampler in samplers:
                sampler.set_epoch(epoch)
                order = list(sampler)
                assert len(order) == len(sampler)
                assert {owner[i] for i in order} <= set(sampler.shards), "a foreign shard"
                seen.update(order)
            assert seen == collections.Counter(range(sum(counts))), (counts, world, epoch)
        shards = [s for sampler in samplers for s in sampler.shards]
        assert sorted(shards) == list(range(len(counts))), "each shard to exactly one rank"


def test_shards_are_balanced_by_sample_count_within_the_largest_shard() -> None:
    rng = random.Random(5)
    for _ in range(200):
        counts = random_counts(rng)
        world = rng.randrange(1, 6)
        held = ShardSampler(counts, 0, world).rank_samples
        assert sum(held) == sum(counts)
        assert max(held) - min(held) <= max(counts), (counts, world, held)
    # Shards of equal size split evenly.
    assert ShardSampler([10] * 8, 0, 4).rank_samples == [20] * 4


def test_the_deal_is_the_same_every_epoch_and_the_order_is_new() -> None:
    counts = [7, 5, 9, 3, 8, 6, 4, 2]
    sampler = ShardSampler(counts, 1, 3, seed=4)
    shards = sampler.shards
    first = list(sampler)
    assert list(sampler) == first, "the same epoch gives the same order"
    sampler.set_epoch(1)
    second = list(sampler)
    assert sampler.shards == shards
    assert second != first and sorted(second) == sorted(first)
    again = ShardSampler(counts, 1, 3, seed=4)
    again.set_epoch(1)
    assert list(again) == second, "the order depends on (seed, epoch) alone"
    other = ShardSampler(counts, 1, 3, seed=5)
    other.set_epoch(1)
    assert other.shards == shards and list(other) != second


def test_without_shuffle_shards_and_samples_come_in_order() -> None:
    sampler = ShardSampler([3, 3, 2, 2], 0, 2, shuffle=False, even="none")
    assert sampler.shards == [0, 2]
    assert list(sampler) == [0, 1, 2, 6, 7]


def test_a_window_mixes_the_samples_of_that_many_shards() -> None:
    counts = [20] * 6
    owner = shard_of(counts)
    one = [owner[i] for i in ShardSampler(counts, 0, 1, window=1)]
    # window=1: a shard's samples are consecutive (a shard is touched once).
    assert [s for s, _ in itertools.groupby(one)] == list(dict.fromkeys(one))
    three = [owner[i] for i in ShardSampler(counts, 0, 1, window=3)]
    assert len(set(three[:60])) == 3 and set(three[:60]).isdisjoint(three[60:])


def test_even_drop_keeps_samples_at_most_once_and_pad_repeats_only_own_samples() -> None:
    counts = [9, 7, 5, 4, 2]
    owner = shard_of(counts)
    dropped = ranks(counts, 2, even="drop")
    assert [len(s) for s in dropped] == [min(dropped[0].rank_samples)] * 2
    seen = [i for s in dropped for i in s]
    assert len(seen) == len(set(seen)) == 2 * len(dropped[0])
    padded = ranks(counts, 2, even="pad")
    longest = max(padded[0].rank_samples)
    for sampler in padded:
        order = list(sampler)
        assert len(order) == longest
        assert set(order) == {i for i, s in enumerate(owner) if s in sampler.shards}
        extra = len(order) - len(set(order))
        assert extra == longest - sampler.rank_samples[sampler.rank]


def test_rank_and_world_default_to_torch_distributed(tmp_path: Path) -> None:
    assert (ShardSampler([1, 2]).rank, ShardSampler([1, 2]).world) == (0, 1)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        sampler = ShardSampler([1, 2, 3])
        assert (sampler.rank, sampler.world) == (0, 1)
    finally:
        dist.destroy_process_group()


def test_bad_input_is_refused_with_a_config_error() -> None:
    bad: list[Callable[[], object]] = [
        lambda: ShardSampler([]),
        lambda: ShardSampler([3, -1], 0, 1),
        lambda: ShardSampler([3, 1.5], 0, 1),  # type: ignore[list-item]
        lambda: ShardSampler([3, 2], 0, 3),  # fewer shards than ranks
        lambda: ShardSampler([3, 2], 2, 2),
        lambda: ShardSampler([3, 2], -1, 2),
        lambda: ShardSampler([3, 2], 0, 0),
        lambda: ShardSampler([3, 2], dp_rank=0),
        lambda: ShardSampler([3, 2], 0, 1, even="some"),
        lambda: ShardSampler([3, 2], 0, 1, window=0),
        lambda: ShardSampler([3, 0], 0, 2, even="pad"),  # rank 1 holds no sample
        lambda: ShardMapDataset([]),
        lambda: ShardMapDataset([("memory://x/a.tar", -2)]),
        lambda: ShardMapDataset([("memory://x/a.tar",)]),  # type: ignore[list-item]
        lambda: ShardMapDataset([("memory://x/a.tar", 1)], keep=0),
    ]
    for make in bad:
        with pytest.raises(ConfigError):
            make()


# ---------------------------------------------------------------- the dataset


@pytest.fixture
def s3_store(s3_options: dict[str, object], tmp_path: Path) -> Iterator[Store]:
    with Store(options={"s3": s3_options}, cache={"disk_dir": str(tmp_path / "cache")}) as s:
        yield s


@pytest.mark.s3
def test_samples_by_index_are_the_samples_shard_dataset_streams(
    s3_store: Store, s3_bucket: str
) -> None:
    write_shards(s3_store, f"s3://{s3_bucket}/d", [3, 0, 5, 2])
    manifest = Manifest.build(f"s3://{s3_bucket}/d/*.tar", store=s3_store)
    dataset = ShardMapDataset(manifest, transform=lambda s: {**s, "n": len(s["bin"])})
    assert dataset.counts == [3, 0, 5, 2] and len(dataset) == 10
    streamed = list(ShardDataset(manifest))
    assert [dataset[i] for i in range(len(dataset))] == [
        {**s, "n": len(s["bin"])} for s in streamed
    ]
    assert dataset[-1]["__key__"] == "s03/001" and dataset.locate(-1) == (3, 1)
    assert [s.version for s in dataset.shards] == [e.version for e in manifest]
    with pytest.raises(IndexError):
        dataset[10]
    dataset.transform = None  # a lambda: not picklable
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy[4] == dataset[4] == streamed[4]


@pytest.mark.s3
def test_an_index_saved_and_loaded_names_the_same_shards(
    s3_store: Store, s3_bucket: str, tmp_path: Path
) -> None:
    urls, _ = write_shards(s3_store, f"s3://{s3_bucket}/i", [2, 4])
    index = index_shards(urls, store=s3_store)
    assert index == [ShardInfo(urls[0], 2), ShardInfo(urls[1], 4)]
    for where in (f"s3://{s3_bucket}/i/index.json", str(tmp_path / "index.json")):
        save_index(index, where, store=s3_store)
        assert load_index(where, store=s3_store) == index
    dataset = ShardMapDataset(f"s3://{s3_bucket}/i/index.json", store=s3_store)
    assert dataset[5]["__key__"] == "s01/003"
    # A wids shard list with URLs relative to the index's folder.
    s3_store.write_bytes(
        f"s3://{s3_bucket}/i/rel.json",
        b'{"shardlist": [{"url": "shard-0001.tar", "nsamples": 4}]}',
    )
    assert load_index(f"s3://{s3_bucket}/i/rel.json", store=s3_store) == [ShardInfo(urls[1], 4)]
    s3_store.write_bytes(f"s3://{s3_bucket}/i/bad.json", b'{"shards": []}')
    with pytest.raises(ConfigError, match="not a shard index"):
        load_index(f"s3://{s3_bucket}/i/bad.json", store=s3_store)


@pytest.mark.s3
def test_a_shard_that_no_longer_matches_its_index_is_an_error(
    s3_store: Store, s3_bucket: str
) -> None:
    urls, _ = write_shards(s3_store, f"s3://{s3_bucket}/c", [3])
    dataset = ShardMapDataset([(urls[0], 4)], store=s3_store)
    with pytest.raises(PreconditionFailedError, match="rebuild the index") as caught:
        dataset[0]
    assert caught.value.url == urls[0]
    # Pinned to a version: a rewritten shard is refused, not read.
    manifest = Manifest.build(f"s3://{s3_bucket}/c/", store=s3_store)
    pinned = ShardMapDataset(manifest)
    s3_store.write_bytes(urls[0], tar_bytes(sample_members(0, 3)[::-1]))
    with pytest.raises(PreconditionFailedError):
        pinned[0]


@pytest.mark.s3
def test_two_ranks_with_their_own_caches_each_fetch_only_their_shards(
    s3_bucket: str, moto: ServerProcess, s3_proxy: ServerProcess, tmp_path: Path
) -> None:
    """Two ranks as on two nodes (a Store and a cache directory each, through the
    counting proxy) read their ShardSampler order for two epochs: every sample once per
    epoch, one GET per shard in the first epoch and none in the second."""
    with Store(options={"s3": {"endpoint_url": moto.endpoint}}, cache={"enabled": False}) as s:
        urls, keys = write_shards(s, f"s3://{s3_bucket}/r", [4, 6, 5, 3, 4, 2])
        index = index_shards(Manifest.build(f"s3://{s3_bucket}/r/", store=s))
    proxy.reset(s3_proxy.endpoint)
    stores = [
        Store(
            options={"s3": {"endpoint_url": s3_proxy.endpoint}},
            cache={"disk_dir": str(tmp_path / n)},
        )
        for n in ("a", "b")
    ]
    try:
        datasets = [ShardMapDataset(index, store=store) for store in stores]
        samplers = ranks([i.samples for i in index], 2, even="none", seed=1)
        gets = []
        for epoch in range(2):
            seen = []
            for dataset, sampler in zip(datasets, samplers, strict=True):
                sampler.set_epoch(epoch)
                seen += [dataset[i]["__key__"] for i in sampler]
            assert sorted(seen) == sorted(keys)
            gets.append(
                sum(1 for r in proxy.request_log(s3_proxy.endpoint) if r["method"] == "GET")
            )
        assert gets == [len(urls), len(urls)], "a GET per shard, then none"
    finally:
        for store in stores:
            store.close()
