"""ShardDataset: a PyTorch ``IterableDataset`` over tar shards in WebDataset layout.

Shards are streamed through a :class:`~mlstore.Store`, split between ranks and
DataLoader workers, shuffled deterministically, and resumable mid-epoch. The tar
reading and the grouping of members into samples live in :mod:`mlstore.torch._tar`.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import os
import random
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch.distributed
import torch.utils.data

from mlstore import Manifest, Store, default_store
from mlstore.errors import ConfigError, NotFoundError, PreconditionFailedError
from mlstore.torch._tar import ShardFormatError, group, members
from mlstore.url import URL, parse_url

__all__ = ["ShardDataset", "ShardFormatError"]

Sample = dict[str, Any]
T = TypeVar("T")
MiB = 1 << 20
_WILDCARD = re.compile(r"[*?\[]")
_STATE_KEYS = ("epoch", "seed", "slot", "slots", "yielded", "counts", "stream")


class ShardDataset(torch.utils.data.IterableDataset[Any]):  # type: ignore[misc, unused-ignore]
    """The samples of tar shards (WebDataset layout), streamed shard by shard.

    Consecutive members of a shard that share a key (the member's path up to the first
    ``.`` of its file name) form one sample, a dict keyed by the rest of the file name::

        a/0001.jpg, a/0001.cls  ->  {"__key__": "a/0001", "__url__": shard_url,
                                     "jpg": b"...", "cls": b"..."}

    Members without an extension, directories and other non-regular members are
    skipped. A shard that is not a complete tar archive raises
    :class:`ShardFormatError` naming the shard and the member, never a short epoch.

    **Streaming.** Each shard is read front to back through ``store.open(url, "rb")``
    and never held whole by this class. On the uncached path (the Store's cache off)
    ``readahead`` bytes are fetched per request. With the cache on (shards pinned by a
    manifest included), the Store decides: a shard larger than ``CacheConfig.block_threshold``
    (64 MiB by default) is read in cache blocks with the cache's own read-ahead, a
    smaller one is fetched and cached whole.

    **Splitting.** Every epoch, the shard order (permuted when ``shuffle``) is dealt
    round-robin to ``world_size * num_workers`` slots; a DataLoader worker reads the
    shards of slot ``rank * num_workers + worker_id``. Each sample is yielded exactly
    once per epoch across all ranks and workers (a slot with no shard yields nothing).
    ``rank`` and ``world_size`` default to those of ``torch.distributed`` when it is
    initialized (a copy pickled for a spawned worker keeps the parent's), else 0 and 1.

    **Shuffling** (``shuffle=True``) is deterministic: the shard order is permuted by a
    ``random.Random`` of ``(seed, epoch)``, and samples pass through a buffer of
    ``buffer_size`` shuffled by a ``random.Random`` of ``(seed, epoch, slot)``. The same
    seed and epoch give the same order, whatever torch's global seed; call
    :meth:`set_epoch` before each epoch for a new order (a DataLoader with
    ``persistent_workers=True`` keeps the copies its workers started with, and so the
    epoch they had then).

    **Resuming.** :meth:`state_dict` describes the stream of this iterator's slot:
    ``{"epoch", "seed", "slot", "slots", "yielded", "counts", "stream"}`` (``yielded``
    samples so far; ``counts``, the number of samples of each shard of the slot that the
    stream has read to its end; ``stream``, a digest of the shard URLs, ``shuffle`` and
    ``buffer_size``). After :meth:`load_state_dict`, the next iteration goes on exactly
    where that stream stopped, by deterministic replay: the same shards are dealt, the
    shuffle buffer is replayed on sample positions alone (its draws depend only on how
    many samples it holds), and the first ``yielded`` samples are dropped. A shard whose
    samples were all yielded before the state was saved is not opened again (its
    recorded count stands in for it); every other shard is read again from its start.
    Without ``shuffle`` this is every shard before the current one; with it, every shard
    none of whose samples is still waiting in the buffer. Resume with the same shards,
    ``seed``, ``shuffle``, ``buffer_size``, world size and number of workers, else
    :class:`~mlstore.ConfigError`. With DataLoader workers, the state lives in each
    worker: save and load it there, as torchdata's ``StatefulDataLoader`` does. The
    state follows the most recently started iterator.

    Args:
        shards: a list of URLs (in this order), a prefix (every object below it whose
            name ends in ``.tar``, sorted), a glob pattern (its matches, sorted), or a
            :class:`~mlstore.Manifest` (every shard is then read pinned to its recorded
            version: one that changed raises :class:`~mlstore.PreconditionFailedError`
            naming it). Prefixes and globs are listed once, here.
        store: the Store to read through (default: the manifest's, else the default
            Store). It is pickled with the dataset (its configuration, not its
            credentials: workers re-read those from their environment).
        shuffle: shuffle the shard order and the samples (see above).
        seed: the seed of both shuffles.
        buffer_size: samples held by the shuffle buffer.
        transform: called on each sample before it is yielded.
        readahead: bytes fetched per request on the uncached path (see above).
        rank: this process's rank (give ``world_size`` with it).
        world_size: the number of ranks.

    Raises:
        NotFoundError: a prefix or glob matched no shard.
        ConfigError: an invalid argument.

    Examples:
        >>> import io, tarfile
        >>> import mlstore
        >>> from mlstore.torch import ShardDataset
        >>> buf = io.BytesIO()
        >>> with tarfile.open(fileobj=buf, mode="w") as tar:
        ...     for name, data in [("0001.txt", b"hello"), ("0001.cls", b"1")]:
        ...         member = tarfile.TarInfo(name)
        ...         member.size = len(data)
        ...         tar.addfile(member, io.BytesIO(data))
        >>> mlstore.write_bytes("memory://shards-doc/train-0000.tar", buf.getvalue())
        >>> dataset = ShardDataset("memory://shards-doc/", shuffle=True, seed=7)
        >>> [(s["__key__"], s["txt"], s["cls"]) for s in dataset]
        [('0001', b'hello', b'1')]

        In training, ``DataLoader(dataset, batch_size=32, num_workers=4)`` and
        ``dataset.set_epoch(epoch)`` at the start of each epoch.
    """

    def __init__(
        self,
        shards: Sequence[str | os.PathLike[str] | URL] | str | os.PathLike[str] | URL | Manifest,
        *,
        store: Store | None = None,
        shuffle: bool = False,
        seed: int = 0,
        buffer_size: int = 1000,
        transform: Callable[[Sample], Any] | None = None,
        readahead: int = 8 * MiB,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        _positive(buffer_size, "buffer_size")
        _positive(readahead, "readahead")
        if (rank is None) != (world_size is None):
            raise ConfigError("give rank and world_size together, or neither")
        if world_size is not None:
            _positive(world_size, "world_size")
            if not isinstance(rank, int) or not 0 <= rank < world_size:
                raise ConfigError(f"rank must be in [0, {world_size}), got {rank!r}")
        if not isinstance(seed, int):
            raise ConfigError(f"seed must be an int, got {type(seed).__name__}")
        versions: list[str | None] | None = None
        if isinstance(shards, Manifest):
            store = store if store is not None else shards.store
            urls = shards.urls
            versions = [entry.version for entry in shards]
        elif isinstance(shards, (str, os.PathLike, URL)):
            urls = _expand(shards, store if store is not None else default_store())
        else:
            urls = [str(u) if isinstance(u, URL) else os.fspath(u) for u in shards]
        if not urls:
            raise ConfigError("no shards: give at least one URL")
        self.store = store
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.buffer_size = buffer_size
        self.transform = transform
        self.readahead = readahead
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._urls = urls
        self._versions = versions
        self._stream_id = _digest(urls, self.shuffle, buffer_size)
        self._dist: tuple[int, int] | None = None  # torch.distributed's, when pickled
        self._resume: dict[str, Any] | None = None
        self._progress: _Progress | None = None

    @property
    def shards(self) -> list[str]:
        """The shard URLs, in the order given (a prefix or glob: sorted)."""
        return list(self._urls)

    def __repr__(self) -> str:
        return (
            f"ShardDataset({len(self._urls)} shards, shuffle={self.shuffle}, "
            f"seed={self.seed}, epoch={self.epoch})"
        )

    # ------------------------------------------------------------------ epochs

    def set_epoch(self, epoch: int) -> None:
        """Use the shard order and shuffle of ``epoch`` from the next iteration on
        (a state loaded for another epoch is dropped)."""
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        slot, slots = self._slot()
        resume, self._resume = self._resume, None
        if resume is not None and (resume["slot"], resume["slots"]) != (slot, slots):
            raise ConfigError(
                f"the state was saved by slot {resume['slot']} of {resume['slots']} "
                f"(rank * num_workers + worker), and is loaded in slot {slot} of {slots}; "
                "resume with the same world size and number of workers"
            )
        progress = _Progress(self.epoch, slot, slots)
        self._progress = progress
        return self._iterate(self._deal(slot, slots), progress, resume)

    def _iterate(
        self, mine: list[int], progress: _Progress, resume: dict[str, Any] | None
    ) -> Iterator[Any]:
        recorded: list[int] = list(resume["counts"]) if resume else []
        skip: int = resume["yielded"] if resume else 0
        skippable = [False] * len(recorded)
        if skip:
            skippable = self._skippable(recorded, len(recorded) == len(mine), skip, progress)
        source = self._inputs(mine, progress, recorded, skippable)
        stream = self._order(source, progress)
        deque(itertools.islice(stream, skip), maxlen=0)  # replayed: already yielded
        progress.yielded = skip
        transform = self.transform
        for sample in stream:
            if sample is None:  # pragma: no cover - the replay guarantees it
                raise AssertionError("a skipped shard's sample came after the resume point")
            progress.yielded += 1
            yield transform(sample) if transform is not None else sample

    def _deal(self, slot: int, slots: int) -> list[int]:
        """The shards (positions in :attr:`shards`) of ``slot`` this epoch."""
        order = list(range(len(self._urls)))
        if self.shuffle:
            random.Random(f"mlstore.torch shards {self.seed} {self.epoch}").shuffle(order)
        return order[slot::slots]

    def _order(self, source: Iterator[T], progress: _Progress) -> Iterator[T]:
        if not self.shuffle:
            return source
        rng = random.Random(f"mlstore.torch samples {self.seed} {progress.epoch} {progress.slot}")
        return _buffered(source, self.buffer_size, rng)

    def _skippable(
        self, counts: list[int], complete: bool, yielded: int, progress: _Progress
    ) -> list[bool]:
        """For each shard read to its end before the state was saved, whether all its
        samples were among the first ``yielded``: found by replaying the stream on
        sample positions, without reading anything."""
        ends = list(itertools.accumulate(counts))
        total = ends[-1] if ends else 0
        positions: Iterator[int] = iter(range(total)) if complete else itertools.count()
        hits = [0] * len(counts)
        for position in itertools.islice(self._order(positions, progress), yielded):
            shard = bisect.bisect_right(ends, position)
            if shard < len(counts):
                hits[shard] += 1
        return [hit == count for hit, count in zip(hits, counts, strict=True)]

    def _inputs(
        self,
        mine: list[int],
        progress: _Progress,
        recorded: list[int],
        skippable: list[bool],
    ) -> Iterator[Sample | None]:
        """The samples of ``mine``, shard after shard; ``None`` for each sample of a
        shard skipped on resume. Records each shard's count once it is read to its end."""
        for n, shard in enumerate(mine):
            if n < len(skippable) and skippable[n]:
                progress.counts.append(recorded[n])
                yield from itertools.repeat(None, recorded[n])
                continue
            count = 0
            done = False
            for sample, last in self._samples(shard):
                count += 1
                if last:  # the shard is complete: counted before its last sample goes
                    self._record(shard, n, count, progress, recorded)
                    done = True
                yield sample
            if not done:  # a shard with no samples
                self._record(shard, n, count, progress, recorded)

    def _record(
        self, shard: int, n: int, count: int, progress: _Progress, recorded: list[int]
    ) -> None:
        if n < len(recorded) and recorded[n] != count:
            raise PreconditionFailedError(
                f"the shard holds {count} samples, {recorded[n]} when the state being "
                "resumed was saved: it changed, and the resumed epoch would not be exact",
                url=self._urls[shard],
                operation="resume",
            )
        progress.counts.append(count)

    def _samples(self, shard: int) -> Iterator[tuple[Sample, bool]]:
        url = self._urls[shard]
        version = self._versions[shard] if self._versions is not None else None
        store = self.store if self.store is not None else default_store()
        try:
            with store.open(url, "rb", buffer_size=self.readahead, version=version) as fh:
                yield from group(members(fh, url), url)
        except PreconditionFailedError as exc:
            if version is None:
                raise
            raise PreconditionFailedError(
                f"the shard changed since the manifest recorded version {version}; "
                "rebuild the manifest",
                url=url,
                operation="read shard",
            ) from exc

    # ------------------------------------------------------------------ ranks and workers

    def _slot(self) -> tuple[int, int]:
        """This iterator's slot and the number of slots."""
        rank, world = self._world()
        info = torch.utils.data.get_worker_info()
        if info is None:
            return rank, world
        return rank * info.num_workers + info.id, world * info.num_workers

    def _world(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        live = _distributed()
        if live is not None:
            return live
        return self._dist if self._dist is not None else (0, 1)

    def __getstate__(self) -> dict[str, Any]:
        # Workers started by spawn or forkserver do not join the process group: they
        # carry the parent's rank and world size with them.
        state = dict(self.__dict__)
        state["_progress"] = None
        if self.rank is None:
            state["_dist"] = _distributed() or self._dist
        return state

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Where this slot's stream is in the current epoch (see the class docstring):
        a small dict of ints and a list of per-shard counts."""
        if self._resume is not None:
            return {**self._resume, "counts": list(self._resume["counts"])}
        p = self._progress
        if p is None or p.epoch != self.epoch:
            slot, slots = self._slot()
            p = _Progress(self.epoch, slot, slots)
        return {
            "epoch": p.epoch,
            "seed": self.seed,
            "slot": p.slot,
            "slots": p.slots,
            "yielded": p.yielded,
            "counts": list(p.counts),
            "stream": self._stream_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from ``state`` (from :meth:`state_dict`) at the next iteration.

        Raises:
            ConfigError: ``state`` is not a ShardDataset state, or was saved by a dataset
                over other shards or with another seed, ``shuffle`` or ``buffer_size``.
        """
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ConfigError(f"not a ShardDataset state: no {', '.join(missing)}")
        ints = ("epoch", "seed", "slot", "slots", "yielded")
        counts = state["counts"]
        if not all(isinstance(state[k], int) for k in ints) or not (
            isinstance(counts, list) and all(isinstance(c, int) and c >= 0 for c in counts)
        ):
            raise ConfigError(f"not a ShardDataset state: {state!r}")
        if state["seed"] != self.seed:
            raise ConfigError(
                f"the state was saved with seed {state['seed']}, this dataset has seed "
                f"{self.seed}; build it with the same seed to resume"
            )
        if state["stream"] != self._stream_id:
            raise ConfigError(
                "the state was saved by a dataset over other shards, or with another "
                "shuffle or buffer_size; resume with the same ones"
            )
        if state["yielded"] < 0 or not 0 <= state["slot"] < state["slots"]:
            raise ConfigError(f"not a ShardDataset state: {state!r}")
        self.epoch = state["epoch"]
        self._resume = {k: state[k] for k in _STATE_KEYS}
        self._resume["counts"] = list(counts)
        self._progress = None


class _Progress:
    """How far the current iterator's stream has gone."""

    __slots__ = ("counts", "epoch", "slot", "slots", "yielded")

    def __init__(self, epoch: int, slot: int, slots: int) -> None:
        self.epoch = epoch
        self.slot = slot
        self.slots = slots
        self.yielded = 0
        self.counts: list[int] = []


def _buffered(source: Iterator[T], size: int, rng: random.Random) -> Iterator[T]:
    """``source`` through a shuffle buffer of ``size``: once it is full, each new item
    takes the place of one drawn at random, which goes out; the rest, shuffled, at the
    end. The draws depend only on the number of items, never on their values."""
    buffer: list[T] = []
    for item in source:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        out, buffer[i] = buffer[i], item
        yield out
    rng.shuffle(buffer)
    yield from buffer


def _distributed() -> tuple[int, int] | None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return None


def _expand(source: str | os.PathLike[str] | URL, store: Store) -> list[str]:
    """The shards a prefix (``.tar`` objects below it) or glob pattern names, sorted."""
    text = str(source) if isinstance(source, URL) else os.fspath(source)
    if _WILDCARD.search(parse_url(text).path):
        urls = store.glob(text)
    else:
        try:
            urls = [u for u in store.find(text) if u.endswith(".tar")]
        except NotFoundError:
            urls = []
    if not urls:
        raise NotFoundError(
            "no shards: nothing matches this pattern, or no .tar object is below this "
            "prefix; pass a list of URLs for shards with other names",
            url=text,
            operation="list shards",
        )
    return sorted(urls)


def _digest(urls: Iterable[str], shuffle: bool, buffer_size: int) -> str:
    h = hashlib.sha256(f"{shuffle} {buffer_size if shuffle else 0}\n".encode())
    for url in urls:
        h.update(url.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()[:16]


def _positive(value: object, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
