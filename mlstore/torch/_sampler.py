"""``ShardSampler``: data-parallel ranks that each read whole shards.

A ``DistributedSampler`` deals indices to ranks by stride, so over a dataset whose
samples live in shards every rank, and so every node, touches nearly every shard: each
node downloads the whole dataset. Here the unit dealt is the shard: a rank's indices
all come from its own shards, and a node fetches only the shards of its ranks.

**Dealing.** Shards go to ranks balanced by sample count (largest first, each to the
rank with the fewest samples so far; ties to the rank with fewer shards, then the
lower rank), so
the ranks' sample counts differ by at most the largest shard. The deal depends only on
the shard counts and the world size: it is the same every epoch, so from the second
epoch on a node reads its shards from its own cache.

**Order.** Every epoch (:meth:`ShardSampler.set_epoch`), with ``shuffle``, a rank's
shards are put in a new order, and the samples of each run of ``window`` consecutive
shards in it are shuffled together, by a ``random.Random`` of ``(seed, epoch, rank)``:
the same seed and epoch give the same order on every run. A larger ``window`` mixes
more shards at once (and touches that many at a time).

**Equal lengths.** Ranks holding whole shards rarely hold the same number of samples,
and DDP needs every rank to take the same number of steps. ``even`` chooses:

- ``"drop"`` (the default): every rank yields as many samples as the smallest rank
  holds; the tail of a longer rank's epoch order is left out (other samples each
  epoch when shuffling). Each sample is yielded at most once per epoch.
- ``"pad"``: every rank yields as many as the largest rank holds; a shorter rank
  starts its own epoch order again for the missing ones (duplicates, from its own
  shards: no shard is fetched for them).
- ``"none"``: every rank yields all its samples, exactly once per epoch, in counts
  that may differ (for ``torch.distributed.algorithms.Join``, or no DDP at all).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch.utils.data

from mlstore.errors import ConfigError

__all__ = ["ShardSampler"]

_EVEN = ("drop", "pad", "none")


class Counted(Protocol):
    """What the sampler needs of a dataset: the sample count of each shard, in
    the order the dataset numbers them (:class:`~mlstore.torch.ShardMapDataset`)."""

    counts: list[int]


class ShardSampler(torch.utils.data.Sampler[int]):  # type: ignore[misc,unused-ignore]
    """Indices of this rank's whole shards, for a map-style dataset over shards.

    See :mod:`mlstore.torch._sampler` for how shards are dealt and ordered, and what
    ``even`` does.

    Args:
        dataset: a :class:`~mlstore.torch.ShardMapDataset`, or the sample count of
            each shard (samples numbered shard after shard, as that dataset does).
        dp_rank: this rank in the data-parallel group.
        dp_world: the size of the data-parallel group. Both default to
            ``torch.distributed``'s rank and world size when it is initialized, else
            0 and 1.
        shuffle: a new order of shards and samples every epoch (see above).
        seed: the seed of the shuffle (the same on every rank).
        even: ``"drop"``, ``"pad"`` or ``"none"`` (see above).
        window: how many consecutive shards (of this rank's epoch order) have their
            samples shuffled together.

    Raises:
        ConfigError: no shards, a bad count, fewer shards than ranks, a rank outside
            ``[0, dp_world)``, or a bad ``even`` or ``window``.

    Examples:
        >>> from mlstore.torch import ShardSampler
        >>> sampler = ShardSampler([3, 3, 2, 2], dp_rank=1, dp_world=2, shuffle=False)
        >>> sampler.shards, list(sampler)
        ([1, 3], [3, 4, 5, 8, 9])
    """

    def __init__(
        self,
        dataset: Counted | Sequence[int],
        dp_rank: int | None = None,
        dp_world: int | None = None,
        *,
        shuffle: bool = True,
        seed: int = 0,
        even: str = "drop",
        window: int = 1,
    ) -> None:
        counts: list[int] = list(dataset.counts if hasattr(dataset, "counts") else dataset)
        if not counts:
            raise ConfigError("no shards: give at least one shard's sample count")
        for n, count in enumerate(counts):
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ConfigError(
                    f"the sample count of shard {n} must be a non-negative int, got {count!r}"
                )
        rank, world = _world(dp_rank, dp_world)
        if len(counts) < world:
            raise ConfigError(
                f"{len(counts)} shards for {world} ranks: each rank reads whole shards, "
                "so give at least as many shards as ranks (write smaller shards)"
            )
        if even not in _EVEN:
            raise ConfigError(f"even must be one of {', '.join(_EVEN)}; got {even!r}")
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ConfigError(f"window must be a positive int, got {window!r}")
        if not isinstance(seed, int):
            raise ConfigError(f"seed must be an int, got {type(seed).__name__}")
        self.counts = counts
        self.rank = rank
        self.world = world
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.even = even
        self.window = window
        self.epoch = 0
        self.offsets = [0]
        for count in counts:
            self.offsets.append(self.offsets[-1] + count)
        self.assignment = deal(counts, world)
        #: Samples held by each rank's shards.
        self.rank_samples = [sum(counts[s] for s in shards) for shards in self.assignment]
        if even == "pad" and min(self.rank_samples) == 0:
            raise ConfigError(
                "even='pad' needs samples on every rank, and a rank's shards hold none"
            )

    @property
    def shards(self) -> list[int]:
        """This rank's shards (positions in the dataset's shard list), ascending."""
        return list(self.assignment[self.rank])

    def __len__(self) -> int:
        if self.even == "drop":
            return min(self.rank_samples)
        if self.even == "pad":
            return max(self.rank_samples)
        return self.rank_samples[self.rank]

    def __repr__(self) -> str:
        return (
            f"ShardSampler(rank {self.rank} of {self.world}, {len(self.shards)} shards, "
            f"{len(self)} samples, even={self.even!r}, epoch={self.epoch})"
        )

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(self.order())

    def order(self) -> list[int]:
        """This rank's indices for the current epoch, in order."""
        shards = self.shards
        rng = random.Random(f"mlstore.torch ShardSampler {self.seed} {self.epoch} {self.rank}")
        if self.shuffle:
            rng.shuffle(shards)
        order: list[int] = []
        for at in range(0, len(shards), self.window):
            run = [
                self.offsets[s] + k
                for s in shards[at : at + self.window]
                for k in range(self.counts[s])
            ]
            if self.shuffle:
                rng.shuffle(run)
            order.extend(run)
        want = len(self)
        while len(order) < want:  # even="pad": this rank's own order again
            order.extend(order[: want - len(order)])
        return order[:want]


def deal(counts: Sequence[int], world: int) -> list[list[int]]:
    """Shards (positions in ``counts``) for each of ``world`` ranks, balanced by sample
    count: largest shard first, to the rank holding the fewest samples so far."""
    ranks: list[tuple[int, int, int]] = [(0, 0, r) for r in range(world)]  # (samples, shards, rank)
    dealt: list[list[int]] = [[] for _ in range(world)]
    for shard in sorted(range(len(counts)), key=lambda s: (-counts[s], s)):
        samples, held, rank = heapq.heappop(ranks)
        dealt[rank].append(shard)
        heapq.heappush(ranks, (samples + counts[shard], held + 1, rank))
    return [sorted(shards) for shards in dealt]


def _world(rank: int | None, world: int | None) -> tuple[int, int]:
    if (rank is None) != (world is None):
        raise ConfigError("give dp_rank and dp_world together, or neither")
    if rank is None or world is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ConfigError(f"dp_world must be a positive int, got {world!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world:
        raise ConfigError(f"dp_rank must be in [0, {world}), got {rank!r}")
    return rank, world
