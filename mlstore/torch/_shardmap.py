"""``ShardMapDataset``: the samples of tar shards as a map-style dataset, and the shard
index (per-shard sample counts) it is built on.

A sampler hands out indices, so a map-style dataset is what lets a sampler decide
which rank reads which shard (:class:`~mlstore.torch.ShardSampler`). Index ``i`` names
sample ``j`` of shard ``s``, through the per-shard sample counts of an *index*, built
once by reading every shard (:func:`index_shards`) and saved next to the shards
(:func:`save_index`). The index file is the JSON of WebDataset's ``wids`` shard lists
(``{"__kind__": "wids-shard-index-v1", "shardlist": [{"url", "nsamples", "filesize"}]}``)
with one more field per shard, ``"version"``, when the shards are pinned.

Reading a sample: the shard goes through the Store, which fetches it once per node
and keeps it in the node's disk cache (a shard above ``CacheConfig.block_threshold``:
the cache blocks that hold the sample). Where the samples of a shard start and end is
found once per process, by walking its tar headers, and kept for the last ``keep``
shards touched; after that, a sample is one seek and one read of its own bytes.
"""

from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, cast

import torch.utils.data

from mlstore.errors import ConfigError, PreconditionFailedError
from mlstore.manifest import Manifest
from mlstore.store import Store, default_store
from mlstore.torch._tar import BLOCK, ShardFormatError, group, members, split_name
from mlstore.url import URL

__all__ = ["ShardInfo", "ShardMapDataset", "index_shards", "load_index", "save_index"]

Sample = dict[str, Any]
KIND = "wids-shard-index-v1"
ShardSource = (
    Sequence["ShardInfo | tuple[str, int] | tuple[str, int, str | None]"]
    | Manifest
    | str
    | os.PathLike[str]
    | URL
)


@dataclass(frozen=True)
class ShardInfo:
    """One shard of an index.

    Attributes:
        url: the shard's URL.
        samples: how many samples it holds.
        version: the version its reads are pinned to (``None``: read unpinned).
        size: its length in bytes, when known.
    """

    url: str
    samples: int
    version: str | None = None
    size: int | None = None


class _Span:
    """Where one sample lies in its shard: ``[start, end)`` and its members."""

    __slots__ = ("end", "key", "parts", "start")

    def __init__(self, key: str, start: int) -> None:
        self.key = key
        self.start = start
        self.end = start
        self.parts: list[tuple[str, int, int]] = []  # (extension, offset, size)


class _Counted:
    """A file read front to back that counts the bytes read."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self.offset = 0

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self.offset += len(data)
        return data


class ShardMapDataset(torch.utils.data.Dataset[Any]):  # type: ignore[misc,unused-ignore]
    """The samples of tar shards (WebDataset layout) as a map-style dataset.

    ``dataset[i]`` is the sample dict :class:`~mlstore.torch.ShardDataset` would yield
    (``{"__key__", "__url__", <extension>: bytes, ...}``), or ``transform`` of it.
    Samples are numbered shard after shard, in index order: shard ``s`` holds indices
    ``offsets[s]`` to ``offsets[s] + counts[s] - 1``.

    Args:
        shards: an index: the URL or path of one saved by :func:`save_index`, a list of
            :class:`ShardInfo`, or of ``(url, samples)`` / ``(url, samples, version)``
            tuples. A :class:`~mlstore.Manifest` of shards is indexed here, which
            reads every shard once (on a cluster, index once and share the file).
        store: the Store to read through (default: the manifest's, else the default
            Store). It crosses to DataLoader workers as its configuration.
        transform: applied to each sample dict.
        keep: how many shards' sample layouts a process keeps (a few numbers a
            sample; the bytes stay in the node cache).

    Raises:
        ConfigError: no shards, or a count that is not a non-negative int.

    Examples:
        >>> import io, tarfile
        >>> import mlstore
        >>> from mlstore.torch import ShardMapDataset, index_shards
        >>> for s in range(2):
        ...     buf = io.BytesIO()
        ...     with tarfile.open(fileobj=buf, mode="w") as tar:
        ...         for k in range(3):
        ...             member = tarfile.TarInfo(f"{s}-{k}.txt")
        ...             member.size = 1
        ...             tar.addfile(member, io.BytesIO(b"x"))
        ...     mlstore.write_bytes(f"memory://map-shards-doc/{s}.tar", buf.getvalue())
        >>> index = index_shards(["memory://map-shards-doc/0.tar", "memory://map-shards-doc/1.tar"])
        >>> [shard.samples for shard in index]
        [3, 3]
        >>> ds = ShardMapDataset(index)
        >>> len(ds), ds[4]["__key__"]
        (6, '1-1')
    """

    def __init__(
        self,
        shards: ShardSource,
        *,
        store: Store | None = None,
        transform: Callable[[Sample], Any] | None = None,
        keep: int = 16,
    ) -> None:
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ConfigError(f"keep must be a positive int, got {keep!r}")
        if isinstance(shards, Manifest):
            store = store if store is not None else shards.store
            infos = index_shards(shards, store=store)
        elif isinstance(shards, (str, os.PathLike, URL)):
            infos = load_index(shards, store=store)
        else:
            infos = [_info(item) for item in shards]
        if not infos:
            raise ConfigError("no shards: give at least one")
        self.store = store
        self.transform = transform
        self.keep = keep
        self.shards: list[ShardInfo] = infos
        self.counts = [info.samples for info in infos]
        self.offsets = [0]
        for count in self.counts:
            self.offsets.append(self.offsets[-1] + count)
        self._layouts: OrderedDict[int, list[_Span]] = OrderedDict()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __repr__(self) -> str:
        return f"ShardMapDataset({len(self.shards)} shards, {len(self)} samples)"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_layouts"] = OrderedDict()  # each process finds its own
        return state

    def locate(self, i: int) -> tuple[int, int]:
        """``(shard, sample)``: the shard holding index ``i`` and its position there."""
        n = len(self)
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"ShardMapDataset index {i} out of range ({n} samples)")
        shard = bisect.bisect_right(self.offsets, j) - 1
        return shard, j - self.offsets[shard]

    def url(self, i: int) -> str:
        """The URL of the shard holding sample ``i``."""
        return self.shards[self.locate(i)[0]].url

    def version(self, i: int) -> str | None:
        """The version the shard holding sample ``i`` is pinned to."""
        return self.shards[self.locate(i)[0]].version

    def __getitem__(self, i: int) -> Any:
        shard, j = self.locate(i)
        span = self._layout(shard)[j]
        info = self.shards[shard]
        with self._store().open(info.url, "rb", version=info.version) as fh:
            fh.seek(span.start)
            blob = fh.read(span.end - span.start)
        sample: Sample = {"__key__": span.key, "__url__": info.url}
        for extension, offset, size in span.parts:
            sample[extension] = blob[offset - span.start : offset - span.start + size]
        return sample if self.transform is None else self.transform(sample)

    def _store(self) -> Store:
        return self.store if self.store is not None else default_store()

    def _layout(self, shard: int) -> list[_Span]:
        spans = self._layouts.pop(shard, None)
        if spans is None:
            info = self.shards[shard]
            with self._store().open(info.url, "rb", version=info.version) as fh:
                spans = _spans(fh, info.url)
            if len(spans) != info.samples:
                raise PreconditionFailedError(
                    f"the shard holds {len(spans)} samples, the index says {info.samples}: "
                    "it changed since it was indexed; rebuild the index",
                    url=info.url,
                    operation="read shard",
                )
        self._layouts[shard] = spans
        while len(self._layouts) > self.keep:
            self._layouts.popitem(last=False)
        return spans


def _spans(fh: IO[bytes], url: str) -> list[_Span]:
    """The samples of the shard read from ``fh`` (WebDataset grouping, as
    :func:`mlstore.torch._tar.group`), as byte ranges."""
    counted = _Counted(fh)
    spans: list[_Span] = []
    for name, data in members(cast(IO[bytes], counted), url):
        parts = split_name(name)
        if parts is None:
            continue
        key, extension = parts
        end = counted.offset - (-len(data) % BLOCK)  # read: the data and its padding
        start = end - len(data)
        if not spans or spans[-1].key != key:
            spans.append(_Span(key, start))
        elif any(extension == e for e, _, _ in spans[-1].parts):
            raise ShardFormatError(
                f"member {name!r} repeats the extension {extension!r} of sample {key!r}; "
                "each sample holds one file per extension",
                url=url,
                member=name,
            )
        spans[-1].parts.append((extension, start, len(data)))
        spans[-1].end = end
    return spans


def _info(item: Any) -> ShardInfo:
    if isinstance(item, ShardInfo):
        info = item
    elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
        url = str(item[0]) if isinstance(item[0], URL) else item[0]
        info = ShardInfo(url, item[1], item[2] if len(item) == 3 else None)
    else:
        raise ConfigError(
            "a shard is a ShardInfo or a (url, samples[, version]) tuple, "
            f"got {type(item).__name__}"
        )
    count = info.samples
    if not isinstance(info.url, str) or not info.url:
        raise ConfigError(f"a shard URL must be a non-empty string, got {info.url!r}")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ConfigError(
            f"the sample count of {info.url} must be a non-negative int, got {count!r}"
        )
    return info


def index_shards(
    shards: Manifest | Iterable[str | os.PathLike[str] | URL],
    *,
    store: Store | None = None,
    concurrency: int = 8,
) -> list[ShardInfo]:
    """Count the samples of each shard, reading each once (``concurrency`` at a time).

    A :class:`~mlstore.Manifest` gives pinned shards: each is read at its recorded
    version, and the index records it. A list of URLs is read, and recorded, unpinned.

    Raises:
        ShardFormatError: a shard is not a complete tar archive.
    """
    todo: list[tuple[str, str | None, int | None]]
    if isinstance(shards, Manifest):
        store = store if store is not None else shards.store
        todo = [(e.url, e.version, e.size) for e in shards]
    else:
        todo = [(str(u) if isinstance(u, URL) else os.fspath(u), None, None) for u in shards]
    s = store if store is not None else default_store()

    def count(item: tuple[str, str | None, int | None]) -> ShardInfo:
        url, version, size = item
        with s.open(url, "rb", version=version) as fh:
            n = sum(1 for _ in group(members(fh, url), url))
        return ShardInfo(url, n, version, size)

    with ThreadPoolExecutor(max(1, min(concurrency, len(todo) or 1))) as pool:
        return list(pool.map(count, todo))


def save_index(
    shards: Sequence[ShardInfo], url: str | os.PathLike[str] | URL, *, store: Store | None = None
) -> None:
    """Write ``shards`` to ``url`` as a wids shard index (JSON), atomically."""
    listed = []
    for info in shards:
        entry: dict[str, Any] = {"url": info.url, "nsamples": info.samples}
        if info.size is not None:
            entry["filesize"] = info.size
        if info.version is not None:
            entry["version"] = info.version
        listed.append(entry)
    text = json.dumps({"__kind__": KIND, "wids_version": 1, "shardlist": listed}, indent=1)
    target = str(url) if isinstance(url, URL) else os.fspath(url)
    (store if store is not None else default_store()).write_bytes(target, text.encode())


def load_index(url: str | os.PathLike[str] | URL, *, store: Store | None = None) -> list[ShardInfo]:
    """The shards of the index at ``url`` (:func:`save_index`'s, or any wids shard
    list: a relative shard URL is taken relative to the index's folder).

    Raises:
        ConfigError: the file is not a shard index.
    """
    source = str(url) if isinstance(url, URL) else os.fspath(url)
    raw = (store if store is not None else default_store()).read_bytes(source)
    try:
        doc = json.loads(raw)
        listed = doc["shardlist"]
        base = source.rsplit("/", 1)[0] + "/" if "/" in source else ""
        return [
            _info(
                ShardInfo(
                    _joined(base, e["url"]), e["nsamples"], e.get("version"), e.get("filesize")
                )
            )
            for e in listed
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"{source} is not a shard index (JSON with a 'shardlist' of "
            f"{{'url', 'nsamples'}}): {exc}"
        ) from None


def _joined(base: str, url: str) -> str:
    if not isinstance(url, str):
        raise TypeError(f"a shard URL must be a string, got {url!r}")
    if "://" in url or url.startswith("/") or not base:
        return url
    return base + url
