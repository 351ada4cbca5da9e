"""The :class:`Store`: one object through which every read and write goes.

A Store resolves ``mlstore://`` mounts to physical URLs, picks the backend for each
protocol (created lazily, once per process), counts what it does, and offers the
public API: ``open``, ``read_bytes``, ``write_bytes``, ``ls``, ``info``, ``exists``,
``glob``, ``rm``, ``copy``, ``read_many`` and ``stats``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, cast

from mlstore._file import CountingReader, open_ranged
from mlstore.backends.base import Backend, ObjectInfo, get_backend_class
from mlstore.config import CacheConfig, HttpPolicy, RetryPolicy, StoreConfig, redact_options
from mlstore.errors import (
    ConfigError,
    IsADirectoryError_,
    MlstoreError,
    NotFoundError,
    PermissionDeniedError,
    UnsupportedOperation,
)
from mlstore.metrics import Metrics, Stats
from mlstore.url import URL, parse_url, resolve_mount

__all__ = ["Store", "default_store", "set_default_store"]

UrlLike = str | os.PathLike[str] | URL
Progress = Callable[[int, int], None]

_COPY_CHUNK = 8 * 1024 * 1024


class Store:
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
        max_workers: threads for ``read_many``.

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
    ) -> None:
        base = config or StoreConfig()
        if not isinstance(base, StoreConfig):
            raise ConfigError(f"config must be a StoreConfig, got {type(base).__name__}")
        given: dict[str, Any] = {}
        if cache is not None:
            given["cache"] = cache
        if retry is not None:
            given["retry"] = retry
        if http is not None:
            given["http"] = http
        if mounts is not None:
            given["mounts"] = {
                k: ([v] if isinstance(v, str) else list(v)) for k, v in mounts.items()
            }
        if options is not None:
            given["options"] = options
        if max_workers is not None:
            given["max_workers"] = max_workers
        if given:
            base = StoreConfig(
                cache=given.get("cache", base.cache),
                retry=given.get("retry", base.retry),
                http=given.get("http", base.http),
                mounts={**base.mounts, **given.get("mounts", {})},
                options=_merge_options(base.options, given.get("options", {})),
                max_workers=given.get("max_workers", base.max_workers),
            )
        self.config = base
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._backends: dict[str, Backend] = {}
        self._backends_pid = os.getpid()
        self._lock = threading.Lock()
        self._metrics = Metrics()

    # ------------------------------------------------------------------ plumbing

    def __repr__(self) -> str:
        mounts = sorted(self.config.mounts)
        protocols = sorted(self.config.options)
        return f"Store(mounts={mounts}, options for {protocols})"

    def __getstate__(self) -> dict[str, Any]:
        # Only configuration crosses a pickle (DataLoader workers, spawn); clients are
        # rebuilt in the child, and options that look like credentials are dropped, so
        # the child re-resolves them from its environment or config file.
        cfg = self.config
        safe_options = {proto: redact_options(opts) for proto, opts in cfg.options.items()}
        return {
            "cache": cfg.cache,
            "retry": cfg.retry,
            "http": cfg.http,
            "mounts": dict(cfg.mounts),
            "options": safe_options,
            "max_workers": cfg.max_workers,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.config = StoreConfig(**state)
        self._init_runtime()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release every backend's clients and connections."""
        with self._lock:
            backends, self._backends = self._backends, {}
        for backend in backends.values():
            backend.close()

    def backend(self, protocol: str) -> Backend:
        """The backend of ``protocol`` for this process (created on first use)."""
        pid = os.getpid()
        if self._backends_pid != pid:  # a fork: never reuse the parent's clients
            self._init_runtime()
        backend = self._backends.get(protocol)
        if backend is None:
            with self._lock:
                backend = self._backends.get(protocol)
                if backend is None:
                    cls = get_backend_class(protocol)
                    opts = self.config.options.get(protocol, {})
                    if protocol == "https" and not opts:
                        opts = self.config.options.get("http", {})
                    elif protocol == "http" and not opts:
                        opts = self.config.options.get("https", {})
                    backend = cls(opts, self.config)
                    self._backends[protocol] = backend
        return backend

    def resolve(self, url: UrlLike) -> list[URL]:
        """The physical URLs behind ``url``: several for a mount with replicas."""
        return resolve_mount(parse_url(url), dict(self.config.mounts))

    def _target(self, url: UrlLike) -> tuple[URL, Backend]:
        physical = self.resolve(url)[0]
        return physical, self.backend(physical.protocol)

    def _count(self, backend: Backend, name: str, amount: int = 1) -> None:
        self._metrics.add(name, backend.protocol, amount)

    def _call(self, backend: Backend, fn: Callable[[], Any]) -> Any:
        self._count(backend, "requests")
        try:
            return fn()
        except MlstoreError:
            self._count(backend, "errors")
            raise

    # ------------------------------------------------------------------ reading

    def info(self, url: UrlLike) -> ObjectInfo:
        """Size, version, checksums and type of ``url``.

        Raises:
            NotFoundError: nothing exists at ``url``.
        """
        target, backend = self._target(url)
        info: ObjectInfo = self._call(backend, lambda: backend.info(target))
        return self._logical(url, info)

    def exists(self, url: UrlLike) -> bool:
        """Whether an object or directory exists at ``url``."""
        target, backend = self._target(url)
        return bool(self._call(backend, lambda: backend.exists(target)))

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
            version: read only this version (as reported by :meth:`info`); if the
                object has changed, :class:`~mlstore.errors.PreconditionFailedError`.
        """
        target, backend = self._target(url)
        data: bytes = self._call(backend, lambda: backend.read(target, start, end, version))
        self._count(backend, "bytes_read", len(data))
        return data

    def read_many(self, urls: Iterable[UrlLike], *, max_workers: int | None = None) -> list[bytes]:
        """Read many whole objects concurrently; results come back in input order.

        The first failure is raised (after the reads already started finish).
        """
        items = list(urls)
        if not items:
            return []
        workers = min(max_workers or self.config.max_workers, len(items))
        if workers <= 1:
            return [self.read_bytes(u) for u in items]
        with ThreadPoolExecutor(workers, thread_name_prefix="mlstore-read") as pool:
            return list(pool.map(self.read_bytes, items))

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
        text versions.
        """
        binary = mode.replace("t", "")
        if binary not in ("r", "rb", "w", "wb") or ("b" in mode and "t" in mode):
            raise UnsupportedOperation(
                f"mode {mode!r} is not supported; use 'rb', 'wb', 'r' or 'w'",
                url=str(url),
                operation="open",
            )
        text = "b" not in mode
        if binary.startswith("r"):
            fh: IO[Any] = self._open_read(url, buffer_size=buffer_size, version=version)
            if text:
                return io.TextIOWrapper(fh, encoding=encoding, errors=errors, newline=newline)
            return fh
        target, backend = self._target(url)
        if backend.read_only:
            raise UnsupportedOperation(
                f"{backend.protocol} URLs are read-only", url=str(target), operation="write"
            )
        raw = _CountingWriter(
            backend.open_write(target), lambda n: self._count(backend, "bytes_written", n)
        )
        self._count(backend, "requests")
        if text:
            try:
                return _TextWriter(raw, encoding=encoding, errors=errors, newline=newline)
            except BaseException:  # an unknown encoding, say: nothing is written
                raw.discard()
                raise
        return cast(IO[Any], raw)

    def _open_read(
        self, url: UrlLike, *, buffer_size: int | None, version: str | None
    ) -> IO[bytes]:
        target, backend = self._target(url)
        info = self.info(target)
        if info.is_dir:
            raise IsADirectoryError_(
                "this is a directory; use ls() to list it", url=str(target), operation="open"
            )
        if version is not None and info.version is not None and version != info.version:
            from mlstore.errors import PreconditionFailedError

            raise PreconditionFailedError(
                f"version {version} was asked for, but the object is now {info.version}",
                url=str(target),
                operation="open",
            )
        native = backend.open_read(target, info)
        if isinstance(native, io.RawIOBase):
            # An unbuffered native file (local disk) gets the buffer size asked for, and
            # its reads are counted like ranged ones.
            raw = CountingReader(native, lambda n: self._count(backend, "bytes_read", n))
            return cast(IO[bytes], io.BufferedReader(raw, buffer_size or io.DEFAULT_BUFFER_SIZE))
        if native is not None:
            return native
        pinned = info.version

        def fetch(start: int, end: int) -> bytes:
            data: bytes = self._call(backend, lambda: backend.read(target, start, end, pinned))
            self._count(backend, "bytes_read", len(data))
            return data

        size_hint = buffer_size or min(self.config.cache.block_size, 4 * 1024 * 1024)
        return open_ranged(fetch, info.size, str(target), buffer_size=size_hint, info=info)

    def ls(self, url: UrlLike, detail: bool = False) -> list[Any]:
        """Entries directly below ``url`` (names, or :class:`ObjectInfo` with ``detail``).

        Raises:
            NotFoundError: ``url`` does not exist.
        """
        target, backend = self._target(url)
        entries: list[ObjectInfo] = self._call(backend, lambda: backend.ls(target))
        entries = [self._logical(url, e) for e in entries]
        entries.sort(key=lambda e: str(e.url))
        return entries if detail else [str(e.url) for e in entries]

    def find(self, url: UrlLike) -> list[str]:
        """Every file below ``url``, recursively, sorted."""
        target, backend = self._target(url)
        found: list[ObjectInfo] = self._call(backend, lambda: list(backend.find(target)))
        return sorted(str(self._logical(url, e).url) for e in found)

    def glob(self, pattern: UrlLike) -> list[str]:
        """URLs matching ``pattern``: ``*`` and ``?`` stay within one path segment,
        ``**`` spans any number of them, ``[abc]`` is a character class."""
        text = str(pattern) if isinstance(pattern, URL) else os.fspath(pattern)
        parsed = parse_url(text)
        # Split at the first segment holding a wildcard: list below the literal part.
        path = parsed.path
        m = re.search(r"[*?\[]", path)
        if m is None:
            return [str(parsed)] if self.exists(parsed) else []
        head = path[: m.start()]
        root = head[: head.rfind("/") + 1] if "/" in head else ""
        base = URL(parsed.protocol, parsed.bucket, root.rstrip("/") or root)
        regex = _glob_regex(path)
        try:
            files = self.find(base)
        except NotFoundError:
            return []
        candidates: set[str] = set()
        # "memory://" and "file:///" already end in a slash; "s3://bucket" does not
        prefix = str(base) if str(base).endswith("/") else str(base) + "/"
        for f in files:
            candidates.add(f)
            # the directories between the base and each file
            parts = f[len(prefix) :].split("/")
            for i in range(1, len(parts)):
                candidates.add(prefix + "/".join(parts[:i]))
        out = []
        for c in candidates:
            p = parse_url(c).path
            if regex.fullmatch(p):
                out.append(c)
        return sorted(out)

    def _logical(self, asked: UrlLike, entry: ObjectInfo) -> ObjectInfo:
        """Express a physical listing entry in the mount namespace the caller used."""
        parsed = parse_url(asked)
        if parsed.protocol != "mlstore":
            return entry
        physical = self.resolve(parsed)[0]
        base = str(physical).rstrip("/")
        name = str(entry.url)
        inside = name == base or name.startswith(base + "/")
        rel = name[len(base) :].lstrip("/") if inside else entry.url.name
        return dataclasses.replace(entry, url=parsed.join(rel) if rel else parsed)

    # ------------------------------------------------------------------ writing

    def write_bytes(self, url: UrlLike, data: bytes | bytearray | memoryview) -> None:
        """Replace the object at ``url`` with ``data``, atomically."""
        target, backend = self._target(url)
        if backend.read_only:
            raise UnsupportedOperation(
                f"{backend.protocol} URLs are read-only", url=str(target), operation="write"
            )
        payload = bytes(data)
        self._call(backend, lambda: backend.write(target, payload))
        self._count(backend, "bytes_written", len(payload))

    def mkdir(self, url: UrlLike) -> None:
        """Create a directory and its parents (a no-op on object stores)."""
        target, backend = self._target(url)
        self._call(backend, lambda: backend.mkdir(target))

    def rm(self, url: UrlLike, recursive: bool = False) -> None:
        """Delete the object at ``url`` (or, with ``recursive``, everything below it).

        Raises:
            NotFoundError: nothing exists at ``url``.
        """
        target, backend = self._target(url)
        if backend.read_only:
            raise UnsupportedOperation(
                f"{backend.protocol} URLs are read-only", url=str(target), operation="rm"
            )
        if not recursive and self.info(target).is_dir:
            raise IsADirectoryError_(
                "this is a directory; pass recursive=True to delete everything below it",
                url=str(target),
                operation="rm",
            )
        self._call(backend, lambda: backend.rm(target, recursive))

    def copy(
        self,
        src: UrlLike,
        dst: UrlLike,
        *,
        recursive: bool = False,
        progress: Progress | None = None,
    ) -> list[str]:
        """Copy ``src`` to ``dst``, between any two backends; returns the URLs written.

        With ``recursive``, every file below ``src`` is copied to the same relative
        path below ``dst``. A key that would land outside ``dst`` (``..``, an absolute
        path, a NUL) is refused with :class:`~mlstore.errors.PermissionDeniedError`
        naming the key, before anything is written. ``progress(done_bytes,
        total_bytes)`` is called as the copy advances.
        """
        src_url = self.resolve(src)[0]
        dst_url = self.resolve(dst)[0]
        src_info = self.info(src_url)
        if src_info.is_dir and not recursive:
            raise IsADirectoryError_(
                "this is a directory; pass recursive=True to copy everything below it",
                url=str(src_url),
                operation="copy",
            )
        pairs: list[tuple[ObjectInfo, URL]] = []
        if src_info.is_dir:
            base = str(src_url).rstrip("/")
            for entry in self._sorted_find(src_url):
                rel = str(entry.url)[len(base) :].lstrip("/")
                pairs.append((entry, safe_join(dst_url, rel)))
        else:
            pairs.append((src_info, dst_url))
        total = sum(e.size for e, _ in pairs)
        reported = -1

        def report(done: int, total: int) -> None:
            nonlocal reported
            reported = done
            if progress is not None:
                progress(done, total)

        done = 0
        written = []
        for entry, target in pairs:
            done = self._copy_one(entry, target, done, total, report)
            written.append(str(target))
        if reported != done:  # empty files, or nothing to copy: still say it finished
            report(done, total)
        return written

    def _sorted_find(self, url: URL) -> Iterator[ObjectInfo]:
        backend = self.backend(url.protocol)
        found: list[ObjectInfo] = self._call(backend, lambda: list(backend.find(url)))
        return iter(sorted(found, key=lambda e: str(e.url)))

    def _copy_one(
        self, entry: ObjectInfo, dst: URL, done: int, total: int, progress: Progress | None
    ) -> int:
        src = entry.url
        src_backend = self.backend(src.protocol)
        dst_backend = self.backend(dst.protocol)
        if dst_backend.read_only:
            raise UnsupportedOperation(
                f"{dst_backend.protocol} URLs are read-only", url=str(dst), operation="copy"
            )
        if src_backend is dst_backend:
            self._call(src_backend, lambda: src_backend.copy(src, dst))
            done += entry.size
            if progress is not None:
                progress(done, total)
            return done
        with self.open(src, "rb", version=entry.version) as fin, self.open(dst, "wb") as fout:
            while chunk := fin.read(_COPY_CHUNK):
                fout.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        return done

    # ------------------------------------------------------------------ metrics

    def stats(self) -> Stats:
        """A snapshot of this Store's counters (requests, bytes, errors by protocol)."""
        return self._metrics.snapshot()


def _merge_options(
    base: Mapping[str, Mapping[str, Any]], given: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per-protocol options of ``given`` over those of ``base``, key by key."""
    out = {proto: dict(opts) for proto, opts in base.items()}
    for proto, opts in given.items():
        out[proto] = {**out.get(proto, {}), **opts}
    return out


def safe_join(base: URL, rel: str) -> URL:
    """``base`` joined with the object key ``rel``, refusing keys that would escape
    ``base``: ``..`` segments, absolute paths, backslashes on local targets, NULs."""
    bad = None
    if "\x00" in rel:
        bad = "contains a NUL character"
    elif rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        bad = "is an absolute path"
    else:
        parts = re.split(r"[\\/]" if base.protocol == "file" else "/", rel)
        if any(p == ".." for p in parts):
            bad = "contains a '..' segment"
    if bad is None and base.protocol == "file":
        joined = os.path.abspath(os.path.join(base.path, rel))
        if os.path.commonpath([joined, os.path.abspath(base.path)]) != os.path.abspath(base.path):
            bad = "would be written outside the destination"
    if bad is not None:
        raise PermissionDeniedError(
            f"refusing the key {rel!r}: it {bad}", url=str(base), operation="copy"
        )
    return base.join(rel)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


class _CountingWriter(io.RawIOBase):
    """A write file that counts bytes and commits the inner atomic writer on close."""

    def __init__(self, inner: IO[bytes], count: Callable[[int], None]) -> None:
        super().__init__()
        self._inner = inner
        self._count = count
        self._written = 0
        self.name = getattr(inner, "name", "")

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = self._inner.write(data)
        n = len(memoryview(data)) if n is None else n
        self._written += n
        return n

    def tell(self) -> int:
        return self._written

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None:
            self.discard()
        else:
            self.close()

    def discard(self) -> None:
        """Abandon the write; the destination is left as it was."""
        if not self.closed:
            discard = getattr(self._inner, "discard", None)
            if discard is not None:
                discard()
            super().close()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._inner.close()
            self._count(self._written)
        finally:
            super().close()

    def __del__(self) -> None:
        # Never publish a write that was not closed: an abandoned writer is discarded
        # (before warning, so a warning turned into an error cannot skip the discard).
        if not getattr(self, "closed", True):
            self.discard()
            warnings.warn(
                f"write file {self.name!r} was never closed; its content was discarded",
                ResourceWarning,
                stacklevel=1,
            )


class _TextWriter(io.TextIOWrapper):
    """Text mode over a :class:`_CountingWriter`, with the same promise: leaving a
    ``with`` block through an exception, or being garbage-collected unclosed, discards
    the write instead of publishing it."""

    buffer: _CountingWriter

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None:
            self.discard()
        else:
            self.close()

    def discard(self) -> None:
        """Abandon the write; the destination is left as it was."""
        self.buffer.discard()

    def __del__(self) -> None:
        raw = getattr(self, "buffer", None)
        if raw is not None and not raw.closed:
            raw.discard()
            warnings.warn(
                f"write file {raw.name!r} was never closed; its content was discarded",
                ResourceWarning,
                stacklevel=1,
            )


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
