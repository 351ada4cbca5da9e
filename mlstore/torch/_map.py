"""``MapDataset``: a map-style PyTorch dataset over objects named by URL."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch.utils.data

from mlstore.errors import ConfigError
from mlstore.manifest import Manifest
from mlstore.store import Store, default_store
from mlstore.url import URL

__all__ = ["MapDataset"]

Source = Manifest | Sequence[str] | str | os.PathLike[str] | URL


class MapDataset(torch.utils.data.Dataset[Any]):  # type: ignore[misc,unused-ignore]
    """The objects of ``source`` as a map-style dataset: ``dataset[i]`` is the bytes of
    the i-th object, or ``transform(bytes)``.

    Args:
        source: a :class:`~mlstore.Manifest`; a prefix or glob (listed once, here, into
            a manifest: workers and restarts never list again); or a list of URLs.
        transform: applied to each object's bytes in the worker that reads it.
        store: the Store reads go through (default: the Manifest's, else the default
            Store). It crosses to DataLoader workers as its configuration.
        on_change: for a manifest (given or built): ``"raise"`` (the default) when an
            object changed since it was listed,
            :class:`~mlstore.errors.PreconditionFailedError` naming its URL;
            ``"reread"``: read the current object (see :meth:`Manifest.read`).

    Reads through a manifest are pinned to the listed versions and need no
    revalidation: a copy of that version in the node cache is served with no request,
    however old. A list of URLs is read unpinned, under the Store's consistency policy.

    ``__getitems__`` reads a whole batch concurrently (the DataLoader calls it with
    the batch's indices), so one worker keeps many requests in flight.

    Examples:
        >>> import mlstore
        >>> from mlstore.torch import MapDataset
        >>> for i in range(3):
        ...     mlstore.write_bytes(f"memory://map-doc/{i}.bin", bytes([i]))
        >>> ds = MapDataset("memory://map-doc/", transform=len)
        >>> len(ds), ds[2], ds.__getitems__([0, 1])
        (3, 1, [1, 1])
    """

    def __init__(
        self,
        source: Source,
        transform: Callable[[bytes], Any] | None = None,
        store: Store | None = None,
        *,
        on_change: str = "raise",
    ) -> None:
        if on_change not in ("raise", "reread"):
            raise ConfigError(f"on_change must be 'raise' or 'reread', got {on_change!r}")
        self.transform = transform
        self.on_change = on_change
        self.manifest: Manifest | None
        self._urls: list[str] | None
        if isinstance(source, Manifest):
            self.manifest, self._urls = source, None
        elif isinstance(source, (str, os.PathLike, URL)):
            text = str(source) if isinstance(source, URL) else os.fspath(source)
            self.manifest, self._urls = Manifest.build(text, store=store), None
        elif isinstance(source, Sequence):
            self.manifest, self._urls = None, [_url(u) for u in source]
        else:
            raise ConfigError(
                "MapDataset source must be a Manifest, a prefix or glob, or a list of URLs; "
                f"got {type(source).__name__}"
            )
        self.store = store if store is not None else getattr(self.manifest, "store", None)

    def __len__(self) -> int:
        return len(self.manifest) if self.manifest is not None else len(self._urls or ())

    def __repr__(self) -> str:
        what = repr(self.manifest) if self.manifest is not None else f"{len(self)} URLs"
        return f"MapDataset({what})"

    def _store(self) -> Store:
        return self.store if self.store is not None else default_store()

    def url(self, i: int) -> str:
        """The URL of sample ``i``."""
        if self.manifest is not None:
            return self.manifest.url(self._index(i))
        return (self._urls or [])[self._index(i)]

    def version(self, i: int) -> str | None:
        """The version sample ``i`` is pinned to (``None``: read unpinned)."""
        if self.manifest is None:
            return None
        return self.manifest[self._index(i)].version

    def _index(self, i: int) -> int:
        n = len(self)
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"MapDataset index {i} out of range ({n} samples)")
        return j

    def _apply(self, data: bytes) -> Any:
        return data if self.transform is None else self.transform(data)

    def __getitem__(self, i: int) -> Any:
        j = self._index(i)
        if self.manifest is not None:
            data = self.manifest.read(j, store=self._store(), on_change=self.on_change)
        else:
            data = self._store().read_bytes((self._urls or [])[j])
        return self._apply(data)

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """The samples at ``indices``, read concurrently (``read_many``), in order."""
        positions = [self._index(i) for i in indices]
        store = self._store()
        if self.manifest is not None:
            blobs = self.manifest.read_many(positions, store=store, on_change=self.on_change)
        else:
            urls = self._urls or []
            blobs = store.read_many([urls[j] for j in positions])
        return [self._apply(b) for b in blobs]


def _url(item: Any) -> str:
    if isinstance(item, URL):
        return str(item)
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    raise ConfigError(f"MapDataset URLs must be strings, got {type(item).__name__}")
