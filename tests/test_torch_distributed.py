"""MapDataset under torch.distributed (issue 13 item 6, the MapDataset half): two
spawned ranks in a gloo group, each reading through DistributedSampler wrapped in
PrefetchSampler, read disjoint shards whose union is the dataset."""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch.utils.data import DistributedSampler  # noqa: E402

from mlstore.hashing import content_hash  # noqa: E402
from tests.emulators import ServerProcess  # noqa: E402
from tests.servers import proxy  # noqa: E402
from tests.torch_children import SHUFFLE_SEED, put, remove, run_program  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.s3]

SAMPLES = 32  # even: DistributedSampler pads nothing


@pytest.fixture
def samples(s3_bucket: str, moto: ServerProcess) -> Iterator[tuple[str, dict[int, str]]]:
    """SAMPLES objects below a prefix, written to moto directly; yields the prefix and
    each sample's content hash."""
    prefix = f"s3://{s3_bucket}/dist/"
    blobs = {f"{prefix}{i:03d}.bin": os.urandom(1024 + 61 * i) for i in range(SAMPLES)}
    put(moto.endpoint, blobs)
    yield prefix, {i: content_hash(blobs[f"{prefix}{i:03d}.bin"]) for i in range(SAMPLES)}
    remove(moto.endpoint, prefix)


def test_two_ranks_read_disjoint_shards_that_make_up_the_dataset(
    samples: tuple[str, dict[int, str]], s3_proxy: ServerProcess, tmp_path: Path
) -> None:
    """The launcher lists the prefix once into a Manifest and spawns two ranks
    (``torch.multiprocessing.spawn``, gloo, a TCP rendezvous on loopback); each runs a
    DataLoader with two persistent workers over a MapDataset of that manifest for two
    epochs (``set_epoch`` reshuffles), with a node cache of its own, as on two nodes.

    Every epoch, each rank reads exactly its DistributedSampler shard, in its order and
    with the right content; the two shards are disjoint and together they are the
    dataset. The proxy sees one GET per object and rank that read it: neither the
    workers nor the prefetching read beyond the shard."""
    prefix, hashes = samples
    proxy.reset(s3_proxy.endpoint)
    out = run_program(
        "distributed",
        {
            "endpoint": s3_proxy.endpoint,
            "prefix": prefix,
            "cache_root": str(tmp_path / "nodes"),
            "out": str(tmp_path / "ranks.json"),
        },
        cache_dir=str(tmp_path / "launcher"),
    )
    ranks = out["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    readers: dict[int, set[int]] = collections.defaultdict(set)  # sample -> ranks
    for epoch in range(2):
        shards = []
        for rank, r in enumerate(ranks):
            records = r["epochs"][epoch]
            assert all(hashes[i] == h for i, h in records), "corrupt samples"
            expected = DistributedSampler(
                range(SAMPLES), num_replicas=2, rank=rank, shuffle=True, seed=SHUFFLE_SEED
            )
            expected.set_epoch(epoch)
            assert [i for i, _ in records] == list(expected), f"rank {rank}, epoch {epoch}"
            shards.append({i for i, _ in records})
            for i, _ in records:
                readers[i].add(rank)
        assert len(shards[0]) == len(shards[1]) == SAMPLES // 2
        assert not shards[0] & shards[1], f"epoch {epoch}: a sample read by both ranks"
        assert shards[0] | shards[1] == set(range(SAMPLES))
    assert [r["epochs"][0] for r in ranks] != [r["epochs"][1] for r in ranks], "reshuffled"

    gets = collections.Counter(
        r["path"].rsplit("/", 1)[-1]
        for r in proxy.request_log(s3_proxy.endpoint)
        if r["method"] == "GET" and r["path"].startswith(prefix.replace("s3:/", "", 1))
    )
    assert gets == {f"{i:03d}.bin": len(readers[i]) for i in range(SAMPLES)}
