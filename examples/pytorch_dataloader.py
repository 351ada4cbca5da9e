"""PyTorch DataLoader over a bucket: MapDataset and ShardDataset, two epochs each.

What it shows: a map-style ``MapDataset`` read pinned to a saved ``Manifest`` (one object
per sample) and an iterable ``ShardDataset`` over tar shards (WebDataset layout), each
through a ``DataLoader`` with two worker processes for two epochs. Epoch 1 fetches from
the bucket and fills the node-wide disk cache; epoch 2, in new worker processes, is
served from that cache: the node-wide totals (every worker's counts) show 0 GETs. The
script exits non-zero unless every sample is seen exactly once per epoch and epoch 2
made no GET.

What it needs: ``pip install "mlstore[s3,torch]"`` and a prefix you can write to (the
script writes 64 small objects and 4 shards there, and deletes them at the end). Its
cache directory is ``MLSTORE_CACHE_DIR`` (default ``~/.cache/mlstore``); the node-wide
totals of that directory are reset at the start.

Run it against a real bucket::

    python examples/pytorch_dataloader.py s3://my-bucket/mlstore-examples/dataloader

or set ``EXAMPLE_URL`` instead of the argument. ``nox -s examples`` runs it against a
local S3 emulator (moto_server), set through ``MLSTORE_S3_ENDPOINT_URL`` and ``AWS_*``,
with a private cache directory.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
import time
from collections import Counter
from typing import Any

import torch
from torch.utils.data import DataLoader

import mlstore
import mlstore.metrics
from mlstore.torch import MapDataset, ShardDataset

SAMPLES = 64
SHARDS = 4
PER_SHARD = 16


def decode(data: bytes) -> int:
    """A sample's bytes are its index, repeated: return the index."""
    return int.from_bytes(data[:4], "big")


def keys(batch: list[dict[str, Any]]) -> list[str]:
    return [sample["__key__"] for sample in batch]


def write_data(root: str) -> None:
    urls = [f"{root}/objects/{i:04d}.bin" for i in range(SAMPLES)]
    for i, url in enumerate(urls):
        mlstore.write_bytes(url, i.to_bytes(4, "big") * 256)  # 1 KiB each
    mlstore.Manifest.build(f"{root}/objects/").save(f"{root}/objects.manifest.jsonl")
    for s in range(SHARDS):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(PER_SHARD):
                for ext, data in (("bin", bytes([s, i]) * 512), ("cls", b"%d" % (i % 2))):
                    member = tarfile.TarInfo(f"{s}-{i:03d}.{ext}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
        mlstore.write_bytes(f"{root}/shards/train-{s:04d}.tar", buf.getvalue())
    mlstore.Manifest.build(f"{root}/shards/").save(f"{root}/shards.manifest.jsonl")


def gets(stats: mlstore.Stats) -> int:
    return sum(ops.get("get", 0) for ops in stats.requests_by_op().values())


def node_totals() -> mlstore.Stats:
    mlstore.metrics.flush_node_stats()
    return mlstore.metrics.node_stats()


def epochs(name: str, loader: DataLoader[Any], expected: Counter[Any]) -> None:
    for epoch in (1, 2):
        if isinstance(loader.dataset, ShardDataset):
            loader.dataset.set_epoch(epoch)
        before = node_totals()
        start = time.monotonic()
        seen: Counter[Any] = Counter()
        for batch in loader:
            seen.update(batch.tolist() if isinstance(batch, torch.Tensor) else batch)
        seconds = time.monotonic() - start
        delta = node_totals() - before
        print(f"{name} epoch {epoch}: {seconds:.2f} s, node-wide requests {delta.requests_by_op()}")
        assert seen == expected, f"{name} epoch {epoch}: samples missing or seen twice"
        if epoch == 2:
            assert gets(delta) == 0, f"{name} epoch 2 made {gets(delta)} GETs; expected 0"


def main(root: str) -> None:
    root = root.rstrip("/")
    write_data(root)
    mlstore.metrics.reset_node_stats()

    manifest = mlstore.Manifest.load(f"{root}/objects.manifest.jsonl")
    maps = MapDataset(manifest, transform=decode)
    loader = DataLoader(maps, batch_size=8, shuffle=True, num_workers=2)
    epochs("MapDataset", loader, Counter(range(SAMPLES)))

    shard_manifest = mlstore.Manifest.load(f"{root}/shards.manifest.jsonl")
    shards = ShardDataset(shard_manifest, shuffle=True, seed=0, buffer_size=16)
    loader = DataLoader(shards, batch_size=8, num_workers=2, collate_fn=keys)
    expected = Counter(f"{s}-{i:03d}" for s in range(SHARDS) for i in range(PER_SHARD))
    epochs("ShardDataset", loader, expected)

    mlstore.rm(root, recursive=True)
    print("pytorch_dataloader: OK")


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EXAMPLE_URL")
    sys.exit(main(url) if url else __doc__)  # no URL: print the header, exit 1
