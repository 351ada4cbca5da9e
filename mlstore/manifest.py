"""Manifests: the objects of a dataset, listed once, read pinned to what was listed.

A :class:`Manifest` is built from one listing of a prefix (its common prefixes listed
in parallel) or a glob and records, per
object, its URL, size, version (S3 ETag, GCS generation, Azure ETag, local
``mtime_ns-size``) and content hash where the listing reports one. It is saved to any URL
(JSON Lines, or Parquet when pyarrow is installed) and loaded from it, so training
workers and restarts read the same objects without listing again.

Every read through a manifest is pinned to the recorded version: an object that changed
since raises :class:`~mlstore.errors.PreconditionFailedError` naming its URL (or, with
``on_change="reread"``, the current object is read and its URL added to
:attr:`Manifest.changed`). An object whose backend reported no version is read unpinned.

Why the columns are packed: a manifest of a million objects held as a list of
:class:`ManifestEntry` costs ~340 bytes an entry (an object, three ``str`` and an
``int``). Here the keys (relative to the manifest's root) share one UTF-8 buffer, sizes
are an ``array('q')`` and versions/hashes of the common shapes are 16 raw bytes (see
:mod:`mlstore._util.compact`): 34 bytes plus the key's length, 16 more with a content
hash; 75 bytes an entry measured for S3-shaped entries with 36-character keys. Entries are sorted by
URL, so :meth:`Manifest.index` is a binary search and needs no dict.
``benchmarks/manifest.py`` measures it.
"""

from __future__ import annotations

import io
import os
import re
import threading
from array import array
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

from mlstore._util.compact import Strings, Tokens
from mlstore._util.html import human_size, table
from mlstore._util.redact import redact_url
from mlstore.errors import ConfigError, NotFoundError, NotInManifestError, PreconditionFailedError
from mlstore.url import URL, glob_regex, parse_url

if TYPE_CHECKING:
    from mlstore.backends.base import ObjectInfo
    from mlstore.store import Store

__all__ = ["FORMAT_VERSION", "Manifest", "ManifestEntry"]

#: The ``mlstore_manifest`` value in a saved manifest's header.
FORMAT_VERSION = 1
_WILDCARD = re.compile(r"[*?\[]")
_ON_CHANGE = ("raise", "reread")


@dataclass(frozen=True)
class ManifestEntry:
    """One object of a :class:`Manifest`.

    Attributes:
        url: the object's URL.
        size: its length in bytes when it was listed.
        version: its version token when it was listed (``None``: the backend reported
            none, and reads of it are not pinned).
        content_hash: its xxh3-128 (or other recorded digest), if known.
    """

    url: str
    size: int
    version: str | None = None
    content_hash: str | None = None


class Manifest(Sequence[ManifestEntry]):
    """The objects below a prefix, listed once: sizes, versions and hashes, sorted by URL.

    Build one with :meth:`build` (one listing), :meth:`from_entries`, or :meth:`load`;
    ``save`` it to any URL. ``len(m)``, ``m[i]``, iteration, ``m.urls`` and
    ``m.index(url)`` work as for a sequence of :class:`ManifestEntry`.

    Args:
        store: the Store that reads go through by default (else the default Store).

    Example:
        >>> import mlstore
        >>> mlstore.write_bytes("memory://manifest-doc/a.bin", b"abc")
        >>> m = mlstore.Manifest.build("memory://manifest-doc")
        >>> len(m), m[0].size, m.read(0)
        (1, 3, b'abc')
    """

    def __init__(self, root: str = "", *, store: Store | None = None) -> None:
        self.root = root
        self.store = store
        #: URLs whose object changed since the manifest recorded it and was re-read
        #: (``on_change="reread"``); their entries now hold the new size and version.
        self.changed: list[str] = []
        self._keys = Strings()
        self._sizes = array("q")
        self._versions = Tokens()
        self._hashes = Tokens()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ building

    @classmethod
    def from_entries(
        cls, entries: Iterable[ManifestEntry], *, store: Store | None = None
    ) -> Manifest:
        """A manifest of ``entries`` (sorted here by URL; a URL given twice keeps the last)."""
        unique = {e.url: e for e in entries}
        urls = sorted(unique)
        m = cls(_common_root(urls), store=store)
        for url in urls:
            e = unique[url]
            m._append(url[len(m.root) :], e.size, e.version, e.content_hash)
        return m

    @classmethod
    def build(cls, source: str | os.PathLike[str] | URL, *, store: Store | None = None) -> Manifest:
        """Every file below the prefix ``source``, or matching the glob ``source``
        (``*``, ``?``, ``[abc]``, ``**``). A prefix is listed one level down, then
        each of its common prefixes recursively, in parallel (a flat prefix: one
        listing); a glob, with one recursive listing below its literal head.

        Raises:
            NotFoundError: ``source`` is a prefix with nothing below it.
        """
        s = store if store is not None else _default()
        text = str(source) if isinstance(source, URL) else os.fspath(source)
        url = parse_url(text)
        wild = _WILDCARD.search(url.path)
        if wild is None:
            infos = _listing(s, url)
            if not infos:
                raise NotFoundError(
                    "nothing to put in a manifest: no object below this prefix",
                    url=text,
                    operation="build manifest",
                )
            base = url
        else:
            head = url.path[: wild.start()]
            base = URL(url.protocol, url.bucket, head[: head.rfind("/") + 1].rstrip("/"))
            regex = glob_regex(url.path)
            try:
                listed = s.find(base, detail=True)
            except NotFoundError:
                listed = []
            infos = [i for i in listed if regex.fullmatch(i.url.path)]
        m = cls(store=store)
        prefix = str(base) if str(base).endswith("/") else str(base) + "/"
        urls = [str(i.url) for i in infos]
        m.root = prefix if all(u.startswith(prefix) for u in urls) else _common_root(urls)
        cut = len(m.root)
        for u, i in zip(urls, infos, strict=True):
            m._append(u[cut:], i.size, i.version, i.content_hash)
        return m

    def _append(self, key: str, size: int, version: str | None, content_hash: str | None) -> None:
        self._keys.append(key)
        self._sizes.append(size)
        self._versions.append(version)
        self._hashes.append(content_hash)

    # ------------------------------------------------------------------ sequence

    def __len__(self) -> int:
        return len(self._sizes)

    @overload
    def __getitem__(self, i: int) -> ManifestEntry: ...
    @overload
    def __getitem__(self, i: slice) -> list[ManifestEntry]: ...
    def __getitem__(self, i: int | slice) -> ManifestEntry | list[ManifestEntry]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"manifest index {i} out of range ({len(self)} entries)")
        return ManifestEntry(self.url(i), self._sizes[i], self._versions[i], self._hashes[i])

    def __iter__(self) -> Iterator[ManifestEntry]:
        for i in range(len(self)):
            yield self[i]

    def __contains__(self, url: object) -> bool:
        return isinstance(url, str) and self._find(url) is not None

    @property
    def total_bytes(self) -> int:
        """The sizes of all entries, added up."""
        return sum(self._sizes)

    def __repr__(self) -> str:
        size = human_size(self.total_bytes)
        return f"Manifest({redact_url(self.root)!r}, {len(self):,} entries, {size})"

    def _repr_html_(self, rows: int = 10) -> str:
        """The first ``rows`` entries as a table, with the count and total size."""
        shown = [
            [redact_url(e.url), human_size(e.size), e.version or "-", e.content_hash or "-"]
            for e in self[:rows]
        ]
        if len(self) > rows:
            shown.append([f"... {len(self) - rows:,} more", "", "", ""])
        caption = (
            f"Manifest of {redact_url(self.root) or '(no common root)'}: "
            f"{len(self):,} entries, {human_size(self.total_bytes)}"
        )
        return table(shown, header=["url", "size", "version", "content hash"], caption=caption)

    def __getstate__(self) -> dict[str, Any]:
        state = {k: getattr(self, k) for k in ("root", "store", "changed")}
        state.update(keys=self._keys, sizes=self._sizes, versions=self._versions)
        state.update(hashes=self._hashes)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root, self.store, self.changed = state["root"], state["store"], state["changed"]
        self._keys, self._sizes = state["keys"], state["sizes"]
        self._versions, self._hashes = state["versions"], state["hashes"]
        self._lock = threading.Lock()

    def url(self, i: int) -> str:
        """The URL of entry ``i``."""
        return self.root + self._keys[i]

    @property
    def urls(self) -> list[str]:
        """Every URL, in order (a new list: for a large manifest, prefer :meth:`url`)."""
        return [self.url(i) for i in range(len(self))]

    def index(self, url: Any, start: int = 0, stop: int | None = None) -> int:
        """The position of ``url``.

        Raises:
            NotInManifestError: the manifest holds no entry for ``url`` (also a KeyError).
        """
        i = self._find(url) if isinstance(url, str) else None
        if i is None or not start <= i < (len(self) if stop is None else stop):
            raise NotInManifestError(
                "not in this manifest; rebuild it to include new objects",
                url=str(url),
                operation="manifest lookup",
            )
        return i

    def _find(self, url: str) -> int | None:
        if not url.startswith(self.root):
            return None
        key = url[len(self.root) :].encode("utf-8")
        lo, hi = 0, len(self)
        while lo < hi:  # entries are sorted by key
            mid = (lo + hi) // 2
            if self._keys.bytes_at(mid) < key:
                lo = mid + 1
            else:
                hi = mid
        return lo if lo < len(self) and self._keys.bytes_at(lo) == key else None

    def _position(self, item: int | str) -> int:
        if isinstance(item, str):
            return self.index(item)
        if item < 0:
            item += len(self)
        if not 0 <= item < len(self):
            raise IndexError(f"manifest index {item} out of range ({len(self)} entries)")
        return item

    # ------------------------------------------------------------------ reading

    def read(
        self, item: int | str, *, store: Store | None = None, on_change: str = "raise"
    ) -> bytes:
        """The bytes of entry ``item`` (a position or a URL), pinned to its version.

        Args:
            store: read through this Store instead of the manifest's.
            on_change: ``"raise"``: an object changed since it was recorded raises
                :class:`~mlstore.errors.PreconditionFailedError` naming its URL.
                ``"reread"``: read the current object instead, record its new size and
                version in this manifest and its URL in :attr:`changed`.
        """
        if on_change not in _ON_CHANGE:
            raise ConfigError(f"on_change must be 'raise' or 'reread', got {on_change!r}")
        i = self._position(item)
        s = store or self.store or _default()
        url, version = self.url(i), self._versions[i]
        try:
            return s.read_bytes(url, version=version)
        except PreconditionFailedError as exc:
            if on_change == "raise":
                raise PreconditionFailedError(
                    f"the object changed since the manifest recorded version {version}; "
                    "rebuild the manifest, or read with on_change='reread'",
                    url=url,
                    operation="read",
                ) from exc
        # From the storage, not s.info(): the Store's metadata cache may still hold the
        # version that just failed. The bytes and their version come from one answer.
        data, current = s.read_versioned(url)
        with self._lock:
            self._sizes[i] = len(data)
            self._versions.set(i, current)
            self._hashes.set(i, None)  # the recorded hash was of the old content
            if url not in self.changed:
                self.changed.append(url)
        return data

    def read_many(
        self,
        items: Iterable[int | str],
        *,
        store: Store | None = None,
        on_change: str = "raise",
        max_workers: int | None = None,
    ) -> list[bytes]:
        """Read entries concurrently, each pinned as :meth:`read` is; results in order.

        Through :meth:`Store.read_many <mlstore.Store.read_many>`: cached copies are
        served in the calling thread, the rest by the Store's kept pool of threads.
        """
        if on_change not in _ON_CHANGE:
            raise ConfigError(f"on_change must be 'raise' or 'reread', got {on_change!r}")
        positions = [self._position(x) for x in items]
        s = store or self.store or _default()
        urls = [self.url(i) for i in positions]
        versions = [self._versions[i] for i in positions]
        try:
            return s.read_many(urls, versions=versions, max_workers=max_workers)
        except PreconditionFailedError:  # one changed: each read again, as read() says
            return [self.read(i, store=s, on_change=on_change) for i in positions]

    # ------------------------------------------------------------------ saving

    def save(self, url: str | os.PathLike[str] | URL, *, store: Store | None = None) -> None:
        """Write the manifest to ``url``, atomically: JSON Lines for ``.jsonl``
        (a header line, then one object a line), Parquet for ``.parquet``."""
        from mlstore._manifest_io import dump

        target = str(url) if isinstance(url, URL) else os.fspath(url)
        s = store or self.store or _default()
        s.write_bytes(target, dump(self, target))

    @classmethod
    def load(cls, url: str | os.PathLike[str] | URL, *, store: Store | None = None) -> Manifest:
        """The manifest saved at ``url`` (one read; no listing).

        Raises:
            ConfigError: the file is not a manifest; the message names the URL and line.
        """
        from mlstore._manifest_io import parse

        source = str(url) if isinstance(url, URL) else os.fspath(url)
        s = store if store is not None else _default()
        m = cls(store=store)
        parse(m, source, io.BytesIO(s.read_bytes(source)))
        return m

    def _sort(self) -> None:
        """Sort the entries by key (for a file written out of order)."""
        rows = sorted(
            (self._keys[i], self._sizes[i], self._versions[i], self._hashes[i])
            for i in range(len(self))
        )
        self._keys, self._sizes, self._versions, self._hashes = (
            Strings(),
            array("q"),
            Tokens(),
            Tokens(),
        )
        for row in rows:
            self._append(*row)


def _common_root(urls: Sequence[str]) -> str:
    """The longest prefix of every URL that ends at a ``/``."""
    if not urls:
        return ""
    # by character, not path component: "s3://b/x" has no path components to compare
    prefix = os.path.commonprefix([min(urls), max(urls)])  # noqa: RUF071
    return prefix[: prefix.rfind("/") + 1]


def _listing(store: Store, url: URL) -> list[ObjectInfo]:
    """Every file below ``url``: one listing of its first level, then each of its
    common prefixes listed recursively, concurrently. A flat prefix costs one listing
    (its first level is all of it); a tree of many prefixes is listed in parallel."""
    try:
        top = store.ls(url, detail=True, refresh=True)
    except NotFoundError:
        return []
    files = [e for e in top if not e.is_dir]
    below = [e.url for e in top if e.is_dir]
    if not below:
        return files
    workers = min(store.config.max_workers, len(below))
    with ThreadPoolExecutor(workers, thread_name_prefix="mlstore-list") as pool:
        parts = list(pool.map(lambda d: store.find(d, detail=True), below))
    return sorted([*files, *(e for p in parts for e in p)], key=lambda e: str(e.url))


def _default() -> Store:
    from mlstore.store import default_store

    return default_store()
