"""The :class:`Store`: one object through which every read and write goes.

The Store is a facade. Each call parses its URL once, resolves a mount once, picks the
path (cached or direct, read or write) and hands the resolved URL down to the engine in
:mod:`mlstore._engine`, which never calls back up. The engine is built per process
(:class:`~mlstore._util.process.PerProcess`): a Store made before ``fork`` works in the
child with clients of its own.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any, Literal, overload

from mlstore._bulk import BulkReads, hot_hit
from mlstore._display import store_html, store_repr
from mlstore._engine.listing import logical
from mlstore._engine.replicas import Resolved
from mlstore._engine.runtime import Runtime
from mlstore._engine.writer import CopyResult, Progress, SyncResult, Writer
from mlstore._util.files import as_buffer
from mlstore._util.process import PerProcess
from mlstore._util.progress import bar_for as _bar
from mlstore._util.redact import redact_protocol_options
from mlstore.backends.base import Backend, ObjectInfo
from mlstore.cache.tiered import TieredCache
from mlstore.config import CacheConfig, CostConfig, HttpPolicy, RetryPolicy, StoreConfig
from mlstore.errors import ConfigError, UnsupportedOperation
from mlstore.metrics import Stats, node_stats
from mlstore.url import URL, parse_url

__all__ = ["CopyResult", "Store", "SyncResult", "default_store", "set_default_store"]

UrlLike = str | os.PathLike[str] | URL


class Store(BulkReads):
    """Reads and writes any supported URL through one cache and one retry policy.

    Args:
        config: a complete :class:`StoreConfig`; the keyword arguments below
            override its fields.
        cache: a :class:`CacheConfig` (or a dict of its fields).
        retry: a :class:`RetryPolicy` (or a dict of its fields).
        http: an :class:`HttpPolicy` (or a dict of its fields).
        mounts: ``{"name": ["s3://bucket/prefix", "gs://bucket/prefix"]}``: reads of
            ``mlstore://name/<key>`` go to the first replica; writes to the first.
        options: per-protocol backend options, e.g. ``{"s3": {"endpoint_url": ...}}``.
        max_workers: threads for ``read_many`` and objects copied at once by a
            recursive ``copy``.
        transport: ``"fsspec"`` or ``"obstore"`` for s3, gs and az
            (:attr:`StoreConfig.transport`).
        multipart_threshold: writes to s3, gs and az larger than this go up in parts
            (:attr:`StoreConfig.multipart_threshold`).
        multipart_part_size: the size of those parts.
        multipart_concurrency: parts of one write sent at once.

    Example:
        >>> store = Store()
        >>> store.write_bytes("memory://docs/hello.txt", b"hello")
        >>> store.read_bytes("memory://docs/hello.txt", start=1, end=4)
        b'ell'
    """

    def __init__(
        self,
        config: StoreConfig | None = None,
        *,
        cache: CacheConfig | Mapping[str, Any] | None = None,
        retry: RetryPolicy | Mapping[str, Any] | None = None,
        http: HttpPolicy | Mapping[str, Any] | None = None,
        mounts: Mapping[str, Iterable[str] | str] | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        max_workers: int | None = None,
        replica_failures: int | None = None,
        replica_cooldown: float | None = None,
        transport: str | None = None,
        multipart_threshold: int | str | None = None,
        multipart_part_size: int | str | None = None,
        multipart_concurrency: int | None = None,
        dedupe_writes: int | str | None = None,
        cost: CostConfig | Mapping[str, Any] | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        base = config or StoreConfig()
        if not isinstance(base, StoreConfig):
            raise ConfigError(f"config must be a StoreConfig, got {type(base).__name__}")
        self.config = base.updated(
            cache=cache,
            retry=retry,
            http=http,
            mounts=mounts,
            options=options,
            max_workers=max_workers,
            replica_failures=replica_failures,
            replica_cooldown=replica_cooldown,
            transport=transport,
            multipart_threshold=multipart_threshold,
            multipart_part_size=multipart_part_size,
            multipart_concurrency=multipart_concurrency,
            dedupe_writes=dedupe_writes,
            cost=cost,
        )
        self._clock = clock
        self._sleep = sleep
        self._runtime = PerProcess(self._new_runtime)

    def _new_runtime(self) -> Runtime:
        return Runtime(self.config, self._clock, self._sleep)

    def _where(self, url: UrlLike) -> tuple[Runtime, Resolved]:
        """This process's engine and ``url`` parsed and resolved (once per call)."""
        runtime = self._runtime.get()
        return runtime, runtime.resolve(parse_url(url))

    # ------------------------------------------------------------------ plumbing

    def __repr__(self) -> str:
        return store_repr(self.config, self._runtime.peek())

    def _repr_html_(self) -> str:
        return store_html(self.config, self._runtime.peek())

    def __getstate__(self) -> dict[str, Any]:
        # Only configuration crosses a pickle (DataLoader workers, spawn): clients are
        # rebuilt in the child, credentials re-resolved there (options are redacted).
        cfg = self.config
        state = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        state["mounts"] = dict(cfg.mounts)
        state["options"] = redact_protocol_options(cfg.options)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.config = StoreConfig(**state)
        self._clock = None
        self._sleep = None
        self._runtime = PerProcess(self._new_runtime)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release every backend's clients and connections (rebuilt if used again)."""
        runtime = self._runtime.peek()
        if runtime is not None:
            runtime.close()

    @property
    def cache(self) -> TieredCache:
        """The read cache: ``.size()``, ``.clear()``, ``.prune(to_bytes)``, ``.verify()``."""
        return self._runtime.get().cache_reads().cache

    def backend(self, protocol: str) -> Backend:
        """The backend of ``protocol`` for this process (created on first use)."""
        return self._runtime.get().calls.backend(protocol)

    def resolve(self, url: UrlLike) -> list[URL]:
        """The physical URLs behind ``url``: several for a mount with replicas."""
        return list(self._where(url)[1].replicas)

    # ------------------------------------------------------------------ reading

    def info(self, url: UrlLike) -> ObjectInfo:
        """Size, version, checksums and type of ``url``.

        Raises:
            NotFoundError: nothing exists at ``url``.
        """
        runtime, where = self._where(url)
        return logical(where, runtime.locate(where)[1])

    def exists(self, url: UrlLike) -> bool:
        """Whether an object or directory exists at ``url``."""
        runtime, where = self._where(url)
        return runtime.exists(where)

    def read_bytes(
        self,
        url: UrlLike,
        start: int | None = None,
        end: int | None = None,
        *,
        version: str | None = None,
    ) -> bytes:
        """The bytes of ``url``, or of ``[start:end)`` with Python slice semantics
        (negative offsets count from the end).

        Args:
            version: read only this version (as reported by :meth:`info`, or recorded
                in a manifest); if the object has changed,
                :class:`~mlstore.errors.PreconditionFailedError`. A whole pinned read
                is served from the cache when a copy of that version is there, with no
                request at all (a version's bytes never change); on a miss it is
                fetched pinned and cached.
        """
        runtime = self._runtime.get()
        if version is None and type(url) is str:
            hit = hot_hit(runtime, url)  # a URL read before, now a trusted hit
            if hit is not None:
                return hit if start is None and end is None else hit[start:end]
        where = runtime.resolve(parse_url(url))
        reads = runtime.cached_for(where)
        if reads is not None and version is not None:
            if start is None and end is None:  # a pinned range is one ranged GET
                return reads.pinned(where, version)
        elif reads is not None:
            if type(url) is str:
                runtime.remember(url, where)
            return reads.read(where, start, end)
        return runtime.reader.read_range(where, start, end, version)

    def open(
        self,
        url: UrlLike,
        mode: str = "rb",
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
        buffer_size: int | None = None,
        version: str | None = None,
    ) -> IO[Any]:
        """Open ``url`` as a file.

        ``"rb"`` gives a seekable binary file (``read``, ``readinto``, ``readline``,
        ``seek``); every range it reads is pinned to the version seen at open, so an
        object replaced meanwhile raises
        :class:`~mlstore.errors.PreconditionFailedError` instead of mixing versions.
        ``"wb"`` gives a file whose content replaces the object atomically when it is
        closed (and is discarded if the ``with`` block raises). ``"r"``/``"w"`` are the
        text versions. ``version`` opens that version only (as ``read_bytes`` does),
        cached like any read: another process opens it from the node's copy.
        """
        binary = mode.replace("t", "")
        if binary not in ("r", "rb", "w", "wb") or ("b" in mode and "t" in mode):
            raise UnsupportedOperation(
                f"mode {mode!r} is not supported; use 'rb', 'wb', 'r' or 'w'",
                url=str(url),
                operation="open",
            )
        text = "b" not in mode
        runtime, where = self._where(url)
        if binary.startswith("w"):
            return runtime.writer.open(
                where, text=text, encoding=encoding, errors=errors, newline=newline
            )
        reads = runtime.cached_for(where)
        fh: IO[bytes] | None = None
        if reads is not None:
            fh = reads.open(where) if version is None else reads.open_pinned(where, version)
        if fh is None:
            block_size = self.config.cache.block_size
            fh = runtime.reader.open(
                where, buffer_size=buffer_size, version=version, block_size=block_size
            )
        if text:
            return io.TextIOWrapper(fh, encoding=encoding, errors=errors, newline=newline)
        return fh

    def read_versioned(self, url: UrlLike) -> tuple[bytes, str | None]:
        """The whole object at ``url`` and the version those bytes are, from the storage
        itself (never the cache, whose metadata may be older), in one consistent read.

        For callers that pin later reads to what they saw: a
        :class:`~mlstore.Manifest` re-reading an object that changed
        (``on_change="reread"``) records this version.
        """
        runtime, where = self._where(url)
        return runtime.reader.fetch_whole(where)

    def ls(self, url: UrlLike, detail: bool = False, *, refresh: bool = False) -> list[Any]:
        """Entries directly below ``url`` (names, or :class:`ObjectInfo` with ``detail``).

        Args:
            refresh: list from the storage even if the cache holds a listing that its
                consistency policy still trusts.

        Raises:
            NotFoundError: ``url`` does not exist.
        """
        runtime, where = self._where(url)
        reads = runtime.cached_for(where) if not refresh else None
        if reads is not None:
            entries = reads.listing(where, lambda: runtime.listing.ls(where))
        else:
            entries = runtime.listing.ls(where)
        named = sorted((logical(where, e) for e in entries), key=lambda e: str(e.url))
        return named if detail else [str(e.url) for e in named]

    @overload
    def find(self, url: UrlLike, detail: Literal[False] = False) -> list[str]: ...
    @overload
    def find(self, url: UrlLike, detail: Literal[True]) -> list[ObjectInfo]: ...
    @overload
    def find(self, url: UrlLike, detail: bool) -> list[str] | list[ObjectInfo]: ...
    def find(self, url: UrlLike, detail: bool = False) -> list[str] | list[ObjectInfo]:
        """Every file below ``url``, recursively, sorted: URLs, or with ``detail`` their
        :class:`ObjectInfo` (size and version as the listing reported them), from the
        same one listing."""
        runtime, where = self._where(url)
        if not detail:
            return runtime.listing.find_urls(where)
        found = (logical(where, e) for e in runtime.listing.find(where))
        return sorted((e for e in found if not e.is_dir), key=lambda e: str(e.url))

    def glob(self, pattern: UrlLike) -> list[str]:
        """URLs matching ``pattern``: ``*`` and ``?`` stay within one path segment,
        ``**`` spans any number of them, ``[abc]`` is a character class."""
        text = str(pattern) if isinstance(pattern, URL) else os.fspath(pattern)
        return self._runtime.get().listing.glob(parse_url(text))

    # ------------------------------------------------------------------ writing

    def write_bytes(
        self,
        url: UrlLike,
        data: bytes | bytearray | memoryview,
        *,
        replicate: bool = False,
        dedupe: bool | None = None,
    ) -> None:
        """Replace the object at ``url`` with ``data``, atomically.

        For a mount, the write goes to the primary (first) replica; with
        ``replicate=True`` to every replica, in order. A replica that fails stops the
        write there and the error says which replicas were already written.

        A large ``data`` going to s3, gs or az is sent in parts, slices of it: it is not
        copied whole (see :attr:`StoreConfig.multipart_threshold`). Do not change it
        until the call returns.

        Dedupe on write: with ``dedupe=True`` (default: for ``data`` of at least
        :attr:`StoreConfig.dedupe_writes` bytes, 8 MiB) the destination is asked first
        (one HEAD), and nothing is sent when it already holds this content (the same
        size and mlstore content hash, and the same MD5 where the store serves one).
        ``stats()`` counts ``dedupe_uploads_skipped`` and ``dedupe_bytes_skipped``.

        Raises:
            TypeError: ``data`` is not bytes-like (checked before any request).
        """
        payload = as_buffer(data, "write_bytes", url)
        runtime, where = self._where(url)
        runtime.writer.write(where, payload, replicate=replicate, dedupe=dedupe)

    def mkdir(self, url: UrlLike) -> None:
        """Create a directory and its parents (a no-op on object stores)."""
        runtime, where = self._where(url)
        runtime.writer.mkdir(where)

    def rm(self, url: UrlLike, recursive: bool = False, *, replicate: bool = False) -> None:
        """Delete the object at ``url`` (or, with ``recursive``, everything below it).

        For a mount, only the primary replica is changed unless ``replicate=True``
        (otherwise reads would still find the object on the other replicas).

        Raises:
            NotFoundError: nothing exists at ``url``.
        """
        runtime, where = self._where(url)
        runtime.writer.rm(where, recursive=recursive, replicate=replicate)

    def copy(
        self,
        src: UrlLike,
        dst: UrlLike,
        *,
        recursive: bool = False,
        progress: Progress | bool | None = None,
        skip_existing: bool = False,
        max_workers: int | None = None,
    ) -> CopyResult:
        """Copy ``src`` to ``dst``, between any two backends; returns the URLs written
        (a :class:`~mlstore.store.CopyResult`: a list, which also names what was skipped).

        With ``recursive``, every file below ``src`` is copied to the same relative
        path below ``dst``, ``max_workers`` objects at a time (default: the Store's
        ``max_workers``; ``1`` copies one after the other). A key that would land
        outside ``dst`` (``..``, an absolute path, a NUL) is refused with
        :class:`~mlstore.errors.PermissionDeniedError` naming the key, before anything
        is written. If an object fails, no further object is started, the copies under
        way finish, and the first error is raised, naming its URL; the objects already
        copied stay copied (run the copy again with ``skip_existing`` to finish it).
        Within one backend the storage copies (S3 ``CopyObject``), without the bytes
        passing through this process.

        With ``skip_existing``, a destination that already holds the same content is
        left alone: same size and a matching proof of content (the mlstore content
        hash recorded in both objects' metadata or computed from a local side's bytes,
        equal S3 ETags within one store, or equal MD5s), never the size alone. The
        result's ``skipped`` and ``skipped_bytes`` say what was left alone, and
        ``stats()`` counts ``copies_skipped`` and ``copy_bytes_skipped``.

        ``progress(done_bytes, total_bytes)`` is called as the copy advances, from one
        thread at a time, never going back, and last with ``done_bytes ==
        total_bytes`` once everything is copied (skipped objects count as done).
        ``progress=True`` draws a byte progress bar on stderr (a widget in Jupyter),
        ``False`` none; by default a recursive copy draws one in Jupyter or when
        stderr is a terminal, and is silent elsewhere (CI, pipes, batch jobs).
        """
        writer, source, target, workers = self._tree(src, dst, max_workers)
        with _bar(progress if progress is not None or recursive else False, "copy") as bar:
            return writer.copy(
                source,
                target,
                recursive=recursive,
                progress=bar,
                skip_existing=skip_existing,
                max_workers=workers,
            )

    def sync(
        self,
        src: UrlLike,
        dst: UrlLike,
        *,
        delete: bool = False,
        dry_run: bool = False,
        progress: Progress | bool | None = None,
        max_workers: int | None = None,
    ) -> SyncResult:
        """Make the tree at ``dst`` hold what the tree at ``src`` holds, sending only
        what differs; returns a :class:`~mlstore.store.SyncResult` (a list of the URLs
        written, with ``skipped``, ``deleted`` and a one-line ``summary()``).

        Every object below ``src`` is copied to the same relative path below ``dst``,
        ``max_workers`` at a time, unless the destination provably holds the same
        content already (as ``copy(..., skip_existing=True)``: the mlstore content
        hash, equal S3 ETags in one store, or equal MD5s; never size or time alone). So
        a sync is resumable: after a failure, run it again and only what is still
        missing or different is sent. With ``delete``, the objects below ``dst`` that
        ``src`` does not have are deleted, after every copy succeeded. With
        ``dry_run``, nothing is written or deleted and the result says what would be.
        ``progress`` is a ``progress(done_bytes, total_bytes)`` callback, or ``True`` /
        ``False`` / ``None`` for a progress bar as with :meth:`copy`.

        Raises:
            ConfigError: ``src`` and ``dst`` overlap (one is below the other), or
                ``max_workers`` is below 1.
            NotFoundError: nothing exists at ``src``.
        """
        writer, source, target, workers = self._tree(src, dst, max_workers)
        with _bar(progress, "sync") as bar:
            return writer.sync(
                source, target, delete=delete, dry_run=dry_run, progress=bar, max_workers=workers
            )

    def _tree(
        self, src: UrlLike, dst: UrlLike, max_workers: int | None
    ) -> tuple[Writer, Resolved, Resolved, int]:
        """This process's writer, both ends resolved, and the objects copied at once."""
        if max_workers is not None and max_workers < 1:
            raise ConfigError(f"max_workers must be at least 1, got {max_workers}")
        runtime, source = self._where(src)
        target = runtime.resolve(parse_url(dst))
        return runtime.writer, source, target, max_workers or self.config.max_workers

    # ------------------------------------------------------------------ metrics

    def stats(self, node: bool = False) -> Stats:
        """A snapshot of this Store's counters (requests, bytes, errors by protocol),
        or with ``node=True`` the totals of every process that shares its cache
        directory, this one's latest counts included (see :mod:`mlstore.metrics`)."""
        if not node:
            return self._runtime.get().metrics.snapshot()
        if self.config.cache.enabled:
            self._runtime.get().cache_reads()  # counted in the node's totals from now
        return node_stats(self.config.cache.resolved_disk_dir)


# ------------------------------------------------------------ the default store

_default: Store | None = None
_default_lock = threading.Lock()


def default_store() -> Store:
    """The Store behind the module-level functions (``mlstore.read_bytes`` ...),
    configured from the environment and config file on first use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Store()
    return _default


def set_default_store(store: Store | None) -> None:
    """Replace the default Store (``None``: build a fresh one on next use)."""
    global _default
    with _default_lock:
        _default = store
