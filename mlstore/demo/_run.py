"""The demo's work: make a synthetic dataset, upload it, and read it for a few epochs
through each contender (mlstore, plain s3fs, fsspec's ``simplecache``), timing every
epoch and taking the request counts of the proxy in front of the store.

Every contender reads every object once per epoch, in the same shuffled order, with the
same number of reads in flight, and every epoch's bytes are checked against what was
written (xxh3 of each object): a contender that reads wrong bytes fails the demo.
"""

from __future__ import annotations

import functools
import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import xxhash

from mlstore.errors import IntegrityError

if TYPE_CHECKING:
    from mlstore.metrics import Stats

__all__ = ["CONTENDERS", "Dataset", "Epoch", "Setup", "make_dataset", "run_contender", "upload"]

#: The contenders, in the order they run and are shown.
CONTENDERS = ("mlstore", "s3fs", "simplecache")


def digest(data: bytes) -> int:
    """The check value of one object's bytes (module level: DataLoader workers call it)."""
    return xxhash.xxh3_64_intdigest(data)


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


@dataclass(frozen=True)
class Dataset:
    """The synthetic objects: ``names`` (relative keys) and each one's bytes."""

    names: tuple[str, ...]
    blobs: dict[str, bytes]
    duplicates: int

    @property
    def total_bytes(self) -> int:
        return sum(len(b) for b in self.blobs.values())

    def digests(self) -> dict[str, int]:
        return {name: digest(data) for name, data in self.blobs.items()}


def make_dataset(objects: int, size: int, seed: int = 0) -> Dataset:
    """``objects`` random objects of ``size`` bytes; one in sixteen repeats an earlier
    object's content byte for byte (something for content dedupe to find)."""
    rng = random.Random(seed)
    names = tuple(f"train/{i:05d}.bin" for i in range(objects))
    blobs: dict[str, bytes] = {}
    duplicates = 0
    for i, name in enumerate(names):
        if i % 16 == 15:
            blobs[name] = blobs[names[rng.randrange(i - 15, i)]]
            duplicates += 1
        else:
            blobs[name] = rng.randbytes(size)
    return Dataset(names, blobs, duplicates)


@dataclass(frozen=True)
class Setup:
    """Where and how the contenders read.

    ``url``: the dataset's prefix (``s3://bucket/prefix``, no trailing slash);
    ``options``: s3fs options for the endpoint the contenders read through;
    ``workers``: reads in flight; ``tmp``: the demo's temporary directory;
    ``counts``/``reset``: the proxy's request counts (``None`` against a real bucket).
    """

    url: str
    options: dict[str, Any]
    workers: int
    epochs: int
    tmp: str
    use_torch: bool
    counts: Callable[[], dict[str, Any]] | None = None
    reset: Callable[[], None] | None = None
    seed: int = 0


@dataclass
class Epoch:
    """One epoch of one contender."""

    seconds: float
    samples: int
    bytes_read: int
    gets: int | None = None
    requests: int | None = None
    bytes_fetched: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _pool_map(fn: Callable[[str], Any], items: Sequence[str], workers: int) -> list[Any]:
    """``fn`` over ``items`` with ``workers`` threads, in order; on an error or Ctrl-C
    the reads not yet started are dropped instead of run."""
    pool = ThreadPoolExecutor(max(1, min(workers, len(items))), thread_name_prefix="demo")
    try:
        results = list(pool.map(fn, items))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


def upload(store: Any, url: str, data: Dataset, workers: int) -> None:
    """Write every object of ``data`` below ``url`` with ``store``, a bar on a terminal."""
    from mlstore._util.progress import progress

    with progress(len(data.names), desc="upload", unit="obj") as bar:

        def put(name: str) -> None:
            store.write_bytes(f"{url}/{name}", data.blobs[name])
            bar.update()

        _pool_map(put, data.names, workers)


def _order(names: Sequence[str], seed: int, epoch: int) -> list[str]:
    order = list(names)
    random.Random(seed * 1000 + epoch).shuffle(order)
    return order


def _check(who: str, epoch: int, got: list[int], want: Sequence[int]) -> None:
    """Each object read (in the epoch's order) against the digest of what was written."""
    if got != list(want):
        if len(got) != len(want):
            bad = len(want)
        else:
            bad = sum(g != w for g, w in zip(got, want, strict=True))
        raise IntegrityError(
            f"demo: {who} read wrong bytes in epoch {epoch + 1}: "
            f"{bad} of {len(want)} objects differ from what was uploaded"
        )


def _timed_epochs(
    who: str,
    setup: Setup,
    data: Dataset,
    read_epoch: Callable[[list[str]], list[int]],
    stats: Callable[[], Stats] | None = None,
) -> list[Epoch]:
    """Run ``read_epoch`` (names in → digests out) ``setup.epochs`` times."""
    want = data.digests()
    sizes = {name: len(blob) for name, blob in data.blobs.items()}
    epochs = []
    for n in range(setup.epochs):
        order = _order(data.names, setup.seed, n)
        if setup.reset is not None:
            setup.reset()
        before = stats() if stats is not None else None
        start = time.perf_counter()
        got = read_epoch(order)
        seconds = time.perf_counter() - start
        _check(who, n, got, [want[name] for name in order])
        epoch = Epoch(seconds, len(order), sum(sizes[name] for name in order))
        if setup.counts is not None:
            counted = setup.counts()
            epoch.gets = int(counted["methods"].get("GET", 0))
            epoch.requests = int(counted["requests"])
            epoch.bytes_fetched = int(counted["bytes_out"])
        if stats is not None:
            assert before is not None
            epoch.extra = mlstore_figures(stats() - before, len(order))
            if setup.counts is None:  # a real bucket: mlstore's own count is all there is
                epoch.gets = epoch.extra["own_gets"]
                epoch.bytes_fetched = epoch.extra["own_bytes_read"]
        priced = _cost(epoch)
        if priced is not None:
            epoch.extra["cost_usd"] = priced
        epochs.append(epoch)
    return epochs


def _s3fs(setup: Setup) -> Any:
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **setup.options)


def _bucket_path(url: str) -> str:
    return url.removeprefix("s3://")


def run_s3fs(setup: Setup, data: Dataset) -> list[Epoch]:
    """Plain s3fs: ``cat_file`` of every object, nothing cached."""
    fs = _s3fs(setup)
    root = _bucket_path(setup.url)

    def epoch(order: list[str]) -> list[int]:
        return _pool_map(lambda name: digest(fs.cat_file(f"{root}/{name}")), order, setup.workers)

    return _timed_epochs("s3fs", setup, data, epoch)


def run_simplecache(setup: Setup, data: Dataset) -> list[Epoch]:
    """fsspec's ``simplecache``: whole files copied to a local directory on first read."""
    import fsspec

    fs = fsspec.filesystem(
        "simplecache",
        target_protocol="s3",
        target_options={"skip_instance_cache": True, "use_listings_cache": False, **setup.options},
        cache_storage=os.path.join(setup.tmp, "simplecache"),
        skip_instance_cache=True,
    )
    root = _bucket_path(setup.url)

    def one(name: str) -> int:
        with fs.open(f"{root}/{name}", "rb") as f:
            return digest(f.read())

    def epoch(order: list[str]) -> list[int]:
        return _pool_map(one, order, setup.workers)

    return _timed_epochs("simplecache", setup, data, epoch)


def mlstore_figures(diff: Stats, samples: int) -> dict[str, Any]:
    """What mlstore's own counters say of one epoch (``diff``: the node's totals after
    it minus before it, DataLoader workers included): hit ratio per tier, dedupe, cost."""
    memory, disk = diff.get("hits", "memory"), diff.get("hits", "disk")
    reads = memory + disk + diff.get("misses", "cache") or samples
    cost = diff.cost
    return {
        "hit_ratio": {"memory": memory / reads, "disk": disk / reads},
        "dedupe_hits": diff["dedupe_hits"],
        "dedupe_bytes_saved": diff["dedupe_bytes_saved"],
        "own_gets": diff["get_requests"],
        "own_bytes_read": diff["bytes_read"],
        "spent_usd": cost.spent,
        "saved_usd": cost.saved,
    }


def _cost(epoch: Epoch) -> float | None:
    """What the epoch's remote requests and bytes would cost on S3, priced from the
    proxy's counts (every GET at a GET's price, LISTs included); ``None`` uncounted."""
    if epoch.gets is None or epoch.requests is None:
        return None
    from mlstore.cost import estimate
    from mlstore.metrics import Stats

    others = epoch.requests - epoch.gets
    counters = {
        ("requests", "s3"): epoch.requests,
        ("get_requests", "s3"): epoch.gets,
        ("head_requests", "s3"): others,
        ("bytes_read", "s3"): epoch.bytes_fetched or 0,
    }
    return estimate(Stats(counters)).spent


def run_mlstore(setup: Setup, data: Dataset) -> tuple[list[Epoch], str]:
    """mlstore with a fresh node cache under the temporary directory: a DataLoader over
    :class:`mlstore.torch.MapDataset` with two workers when torch is used, else
    ``Store.read_many``. Returns the epochs and the cache directory."""
    from mlstore import Store

    cache_dir = os.path.join(setup.tmp, "mlstore-cache")
    store = Store(
        cache={
            "enabled": True,
            "disk_dir": cache_dir,
            "disk_bytes": max(4 * data.total_bytes, 1 << 30),
        },
        options={"s3": dict(setup.options)},
        max_workers=setup.workers,
    )
    with store:
        urls = {name: f"{setup.url}/{name}" for name in data.names}
        if setup.use_torch:
            epoch = _torch_epoch(store, setup, urls)
        else:

            def epoch(order: list[str]) -> list[int]:
                blobs = store.read_many([urls[name] for name in order])
                return [digest(b) for b in blobs]

        figures = functools.partial(store.stats, node=True)
        return _timed_epochs("mlstore", setup, data, epoch, figures), cache_dir


def _torch_epoch(
    store: Any, setup: Setup, urls: dict[str, str]
) -> Callable[[list[str]], list[int]]:
    """One epoch through a DataLoader (2 workers, batches read concurrently); the
    dataset is built when the first epoch starts, so its listing counts in epoch 1."""
    import torch.utils.data

    from mlstore.torch import MapDataset

    made: dict[str, Any] = {}

    def epoch(order: list[str]) -> list[int]:
        if "dataset" not in made:
            made["dataset"] = MapDataset(f"{setup.url}/train/", transform=digest, store=store)
        dataset = made["dataset"]
        index = {url: i for i, url in enumerate(dataset.url(i) for i in range(len(dataset)))}
        sampler = [index[urls[name]] for name in order]
        loader = torch.utils.data.DataLoader(
            dataset,
            sampler=sampler,
            batch_size=max(1, setup.workers // 2),
            num_workers=2,
            collate_fn=_as_list,
        )
        return [d for batch in loader for d in batch]

    return epoch


def run_contender(name: str, setup: Setup, data: Dataset) -> tuple[list[Epoch], str | None]:
    """Run one contender; returns its epochs and where its cache lives (if it has one)."""
    if name == "mlstore":
        return run_mlstore(setup, data)
    if name == "s3fs":
        return run_s3fs(setup, data), None
    return run_simplecache(setup, data), os.path.join(setup.tmp, "simplecache")
