"""PyTorch datasets over mlstore: map-style, sampler-driven prefetch, and tar shards.

This is the only part of mlstore that imports torch (``import mlstore`` does not)::

    from torch.utils.data import DataLoader, RandomSampler
    from mlstore.torch import MapDataset, PrefetchSampler

    ds = MapDataset(mlstore.Manifest.load("s3://bucket/train.manifest.jsonl"))
    loader = DataLoader(ds, batch_size=32, num_workers=4,
                        sampler=PrefetchSampler(RandomSampler(ds), ds))

See the PyTorch page of the documentation.
"""

from __future__ import annotations

from mlstore.torch._checkpoint import load, save
from mlstore.torch._cooperative import CooperativeWarm, NodeExchange, cooperative_warm
from mlstore.torch._map import MapDataset
from mlstore.torch._prefetch import PrefetchSampler
from mlstore.torch._sampler import ShardSampler
from mlstore.torch._shardmap import (
    ShardInfo,
    ShardMapDataset,
    index_shards,
    load_index,
    save_index,
)
from mlstore.torch._shards import ShardDataset, ShardFormatError

__all__ = [
    "CooperativeWarm",
    "MapDataset",
    "NodeExchange",
    "PrefetchSampler",
    "ShardDataset",
    "ShardFormatError",
    "ShardInfo",
    "ShardMapDataset",
    "ShardSampler",
    "cooperative_warm",
    "index_shards",
    "load",
    "load_index",
    "save",
    "save_index",
]
