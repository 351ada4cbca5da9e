"""The :class:`Store`: one object through which every read and write goes.

A Store resolves ``mlstore://`` mounts to physical URLs, picks the backend for each
protocol (created lazily, once per process), counts what it does, and offers the
public API: ``open``, ``read_bytes``, ``write_bytes``, ``ls``, ``info``, ``exists``,
``glob``, ``rm``, ``copy``, ``read_many`` and ``stats``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import io
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, TypeVar, cast

from mlstore._cached import CACHED_PROTOCOLS, CachedReads
from mlstore._failover import CircuitBreaker, with_failover
from mlstore._util.files import (
    BufferedWrite,
    CountingReader,
    CountingWriter,
    TextWriter,
    open_ranged,
)
from mlstore.backends.base import Backend, Hedge, ObjectInfo, Received, get_backend_class
from mlstore.cache.tiered import TieredCache
from mlstore.config import CacheConfig, HttpPolicy, RetryPolicy, StoreConfig, redact_options
from mlstore.errors import (
    ConfigError,
    IsADirectoryError_,
    MlstoreError,
    NotFoundError,
    PreconditionFailedError,
    ThrottledError,
    TransientError,
    UnsupportedOperation,
)
from mlstore.metrics import Metrics, Stats
from mlstore.retry import Retrier, RetryBudget
from mlstore.url import URL, glob_regex, parse_url, resolve_mount, safe_join

__all__ = ["Store", "default_store", "set_default_store"]

T = TypeVar("T")
UrlLike = str | os.PathLike[str] | URL
Progress = Callable[[int, int], None]

_COPY_CHUNK = 8 * 1024 * 1024


_IN_SWEEP: contextvars.ContextVar[bool] = contextvars.ContextVar("mlstore_sweep", default=False)
log = logging.getLogger("mlstore")


def _protocol_of(error: MlstoreError) -> str:
    """The protocol an error's URL names (a metrics label; never the URL itself)."""
    return error.url.split("://", 1)[0] if error.url and "://" in error.url else "unknown"


def _replica_key(url: URL) -> str:
    """Replicas are judged per bucket (or per host, or per local tree)."""
    return f"{url.protocol}://{url.bucket}"


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
        replica_failures: int | None = None,
        replica_cooldown: float | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        base = config or StoreConfig()
        if not isinstance(base, StoreConfig):
            raise ConfigError(f"config must be a StoreConfig, got {type(base).__name__}")
        given: dict[str, Any] = {
            name: value
            for name, value in (
                ("cache", cache),
                ("retry", retry),
                ("http", http),
                ("max_workers", max_workers),
                ("replica_failures", replica_failures),
                ("replica_cooldown", replica_cooldown),
            )
            if value is not None
        }
        if mounts is not None:
            given["mounts"] = {
                **base.mounts,
                **{k: ([v] if isinstance(v, str) else list(v)) for k, v in mounts.items()},
            }
        if options is not None:
            given["options"] = _merge_options(base.options, options)
        if given:
            current = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
            base = StoreConfig(**{**current, **given})
        self.config = base
        self._clock = clock
        self._sleep = sleep
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._backends: dict[str, Backend] = {}
        self._backends_pid = os.getpid()
        self._lock = threading.Lock()
        self._metrics = Metrics()
        self._breaker = CircuitBreaker(
            threshold=self.config.replica_failures,
            cooldown=self.config.replica_cooldown,
            clock=self._clock or time.monotonic,
        )
        self._cached: CachedReads | None = None
        self._retrier = Retrier(
            self.config.retry,
            RetryBudget(),
            sleep=self._sleep or time.sleep,
            clock=self._clock or time.monotonic,
            on_retry=self._on_retry,
            on_give_up=lambda error, _n: self._metrics.add("give_ups", _protocol_of(error)),
        )
        self._retriers: dict[tuple[str, ...], Retrier] = {}

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
            "replica_failures": cfg.replica_failures,
            "replica_cooldown": cfg.replica_cooldown,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.config = StoreConfig(**state)
        self._clock = None
        self._sleep = None
        self._init_runtime()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release every backend's clients and connections."""
        with self._lock:
            backends, self._backends = self._backends, {}
            cached, self._cached = self._cached, None
        for backend in backends.values():
            backend.close()
        if cached is not None:
            cached.close()

    # ------------------------------------------------------------------ cache

    @property
    def cache(self) -> TieredCache:
        """The read cache: ``.size()``, ``.clear()``, ``.prune(to_bytes)``, ``.verify()``."""
        return self._cache_reads().cache

    def _cache_reads(self) -> CachedReads:
        if self._backends_pid != os.getpid():  # a fork: never reuse the parent's state
            self._init_runtime()
        cached = self._cached
        if cached is None:
            with self._lock:
                cached = self._cached
                if cached is None:
                    tiered = TieredCache(
                        self.config.cache,
                        self._metrics,
                        clock=self._clock or time.time,
                    )
                    cached = self._cached = CachedReads(self, tiered)
        return cached

    def _reads_for(self, url: URL) -> CachedReads | None:
        """The cached read path for ``url``, or None when it is read directly."""
        if not self.config.cache.enabled:
            return None
        physical = self.resolve(url)[0]
        if physical.protocol not in CACHED_PROTOCOLS:
            return None
        return self._cache_reads()

    def _locate(self, url: URL) -> tuple[URL, ObjectInfo]:
        """The replica that answers for ``url`` and the object's info there (uncached)."""
        return self._on_replicas(
            url,
            lambda target, backend: (
                target,
                self._call(backend, lambda: backend.info(target), target),
            ),
        )

    def _fetch_whole(self, url: URL) -> tuple[bytes, str | None]:
        """The whole object and its version, from the first replica that answers."""
        return self._on_replicas(
            url, lambda target, backend: self._resumable(backend, target, None, None, None)
        )

    def _read_pinned(self, target: URL, start: int, end: int, version: str | None) -> bytes:
        backend = self.backend(target.protocol)
        return self._resumable(backend, target, start, end, version, whole=False)[0]

    def _resumable(
        self,
        backend: Backend,
        target: URL,
        start: int | None,
        end: int | None,
        version: str | None,
        *,
        whole: bool = True,
    ) -> tuple[bytes, str | None]:
        """A read under the retry policy (the whole object when ``whole``, else
        ``[start, end)`` pinned to ``version``) that resumes an interrupted body.

        When a body stops early (reset, stall, short body), the bytes that arrived are
        kept and the next attempt asks only for the rest, with a range request pinned
        to the version the first response came from (If-Match / generation). If the
        object changed meanwhile, a read pinned by the caller raises
        :class:`~mlstore.errors.PreconditionFailedError`; an unpinned read starts over
        on the new version. Versions are never stitched together.
        """
        resume = _Resume(start, end, version)
        resumable = backend.resumable

        def first(got: Received | None) -> tuple[bytes, str | None]:
            if whole:
                return backend.fetch(target, received=got) if got else backend.fetch(target)
            if got is None:
                return backend.read(target, start, end, version), version
            return backend.read(target, start, end, version, received=got), version

        def attempt() -> tuple[bytes, str | None]:
            got = Received() if resumable else None
            try:
                if not resume.parts:
                    return first(got)
                try:
                    rest = backend.read(
                        target, resume.offset, resume.end, resume.version, received=got
                    )
                except PreconditionFailedError:
                    if version is not None:
                        raise  # the caller pinned the version that is gone
                    resume.restart()  # changed under us: start over, all on the new one
                    self._count(backend, "restarts")
                    return first(got)
                return b"".join([*resume.parts, rest]), resume.version
            except TransientError:
                if got is not None and resume.keep(got):
                    self._count(backend, "resumes")
                raise

        data, got_version = cast(tuple[bytes, str | None], self._call(backend, attempt, target))
        self._count(backend, "bytes_read", len(data))
        return data, got_version

    def _invalidate(self, url: UrlLike) -> None:
        """Forget cached data and metadata of ``url`` (this Store just changed it)."""
        cached = self._cached
        if cached is None:
            return
        parsed = parse_url(url)
        for key in {parsed, *self.resolve(parsed)}:
            cached.invalidate(key)

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
                    after = self.config.retry.hedge_after
                    if after is not None and cls.hedges:
                        hedge = Hedge(
                            after,
                            on_hedge=functools.partial(self._metrics.add, "hedges", protocol),
                            on_win=functools.partial(self._metrics.add, "hedge_wins", protocol),
                        )
                        backend = cls(opts, self.config, hedge=hedge)
                    else:
                        backend = cls(opts, self.config)
                    self._backends[protocol] = backend
        return backend

    def resolve(self, url: UrlLike) -> list[URL]:
        """The physical URLs behind ``url``: several for a mount with replicas."""
        return resolve_mount(parse_url(url), dict(self.config.mounts))

    def _target(self, url: UrlLike) -> tuple[URL, Backend]:
        """The primary physical URL of ``url`` and its backend (writes go there)."""
        physical = self.resolve(url)[0]
        return physical, self.backend(physical.protocol)

    def _on_replicas(self, url: UrlLike, fn: Callable[[URL, Backend], T]) -> T:
        """Run ``fn`` on the first replica of ``url`` that answers (see _failover).

        One replica: its calls are retried as usual. Several: each replica gets one
        attempt per sweep (a dead cloud is left quickly), and the whole sweep is
        retried under the policy when every replica failed transiently.
        """
        replicas = self.resolve(url)
        if len(replicas) == 1:
            return fn(replicas[0], self.backend(replicas[0].protocol))

        def sweep() -> T:
            token = _IN_SWEEP.set(True)
            try:
                return with_failover(
                    replicas,
                    lambda target: fn(target, self.backend(target.protocol)),
                    breaker=self._breaker,
                    key=_replica_key,
                    on_failover=lambda target, _e: self._metrics.add("failovers", target.protocol),
                )
            finally:
                _IN_SWEEP.reset(token)

        return self._retrier_for(parse_url(url), "read").call(sweep)

    def _on_retry(self, error: MlstoreError, attempt: int, delay: float) -> None:
        protocol = _protocol_of(error)
        self._metrics.add("retries", protocol)
        if isinstance(error, ThrottledError):
            self._metrics.add("throttles", protocol)
        log.debug("retrying after %s (attempt %d, waiting %.3fs)", error, attempt, delay)

    def _count(self, backend: Backend, name: str, amount: int = 1) -> None:
        self._metrics.add(name, backend.protocol, amount)

    def _call(
        self,
        backend: Backend,
        fn: Callable[[], Any],
        url: URL | None = None,
        operation: str = "read",
    ) -> Any:
        """One backend call, counted, retried on transient errors (the one retry layer;
        inside a replica sweep the sweep is what is retried) under the policy for
        ``operation`` on ``url``."""
        if _IN_SWEEP.get() or self._backends_pid != os.getpid():
            return self._attempt(backend, fn)
        return self._retrier_for(url, operation).call(lambda: self._attempt(backend, fn))

    def _retrier_for(self, url: URL | None, operation: str) -> Retrier:
        """The retrier of the policy that applies (all share the process's budget)."""
        policy = self.config.retry
        keys = policy.matching(str(url) if url is not None else "", operation)
        if not keys:
            return self._retrier
        retrier = self._retriers.get(keys)
        if retrier is None:
            base = self._retrier
            retrier = Retrier(
                policy.resolved(keys),
                base.budget,
                sleep=base.sleep,
                clock=base.clock,
                on_retry=base.on_retry,
                on_give_up=base.on_give_up,
            )
            self._retriers[keys] = retrier
        return retrier

    def _attempt(self, backend: Backend, fn: Callable[[], Any]) -> Any:
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
        parsed = parse_url(url)
        reads = self._reads_for(parsed)
        if reads is not None:
            return self._logical(parsed, reads.located_info(parsed)[1])
        info: ObjectInfo = self._locate(parsed)[1]
        return self._logical(parsed, info)

    def exists(self, url: UrlLike) -> bool:
        """Whether an object or directory exists at ``url``."""
        try:
            self.info(url)
        except NotFoundError:
            return False
        return True

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
        cached = self._cached
        if (
            cached is not None
            and version is None
            and type(url) is str
            and self._backends_pid == os.getpid()  # after a fork the child rebuilds
        ):
            hit = cached.cache.peek(url)  # the hot path: a fresh memory-tier hit
            if hit is not None:
                return hit if start is None and end is None else hit[start:end]
        parsed = parse_url(url)
        reads = self._reads_for(parsed) if version is None else None
        if reads is not None:
            return reads.read(parsed, start, end)

        return self._on_replicas(
            parsed,
            lambda target, backend: self._resumable(
                backend, target, start, end, version, whole=False
            )[0],
        )

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
        target, _ = self._target(url)
        backend = self._writable(target, "write")

        def committed(n: int) -> None:
            self._count(backend, "bytes_written", n)
            self._invalidate(url)

        native: IO[bytes]
        if backend.buffered_writes:  # one whole-object write at close: idempotent, so retried
            native = BufferedWrite(
                lambda data: self._call(
                    backend, functools.partial(backend.write, target, data), target, "write"
                ),
                str(target),
            )
        else:
            native = backend.open_write(target)
            self._count(backend, "requests")
        raw = CountingWriter(native, committed)
        if text:
            try:
                return TextWriter(raw, encoding=encoding, errors=errors, newline=newline)
            except BaseException:  # an unknown encoding, say: nothing is written
                raw.discard()
                raise
        return cast(IO[Any], raw)

    def _open_read(
        self, url: UrlLike, *, buffer_size: int | None, version: str | None
    ) -> IO[bytes]:
        parsed = parse_url(url)
        reads = self._reads_for(parsed) if version is None else None
        if reads is not None:
            return reads.open(parsed)
        target, info = self._locate(parsed)
        backend = self.backend(target.protocol)
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
            return self._resumable(backend, target, start, end, pinned, whole=False)[0]

        size_hint = buffer_size or min(self.config.cache.block_size, 4 * 1024 * 1024)
        return open_ranged(fetch, info.size, str(target), buffer_size=size_hint, info=info)

    def ls(self, url: UrlLike, detail: bool = False) -> list[Any]:
        """Entries directly below ``url`` (names, or :class:`ObjectInfo` with ``detail``).

        Raises:
            NotFoundError: ``url`` does not exist.
        """
        parsed = parse_url(url)

        def listing() -> list[ObjectInfo]:
            found: list[ObjectInfo] = self._on_replicas(
                parsed,
                lambda target, backend: self._call(backend, lambda: backend.ls(target), target),
            )
            return found

        reads = self._reads_for(parsed)
        entries = reads.listing(parsed, listing) if reads is not None else listing()
        entries = [self._logical(parsed, e) for e in entries]
        entries.sort(key=lambda e: str(e.url))
        return entries if detail else [str(e.url) for e in entries]

    def find(self, url: UrlLike) -> list[str]:
        """Every file below ``url``, recursively, sorted."""
        found: list[ObjectInfo] = self._on_replicas(
            url,
            lambda target, backend: self._call(backend, lambda: list(backend.find(target)), target),
        )
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
        regex = glob_regex(path)
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
        name = str(entry.url)
        rel = entry.url.name
        for physical in self.resolve(parsed):  # the entry may come from any replica
            base = str(physical).rstrip("/")
            if name == base or name.startswith(base + "/"):
                rel = name[len(base) :].lstrip("/")
                break
        return dataclasses.replace(entry, url=parsed.join(rel) if rel else parsed)

    # ------------------------------------------------------------------ writing

    def write_bytes(
        self, url: UrlLike, data: bytes | bytearray | memoryview, *, replicate: bool = False
    ) -> None:
        """Replace the object at ``url`` with ``data``, atomically.

        For a mount, the write goes to the primary (first) replica; with
        ``replicate=True`` to every replica, in order. A replica that fails stops the
        write there and the error says which replicas were already written.
        """
        payload = bytes(data)
        targets = self.resolve(url) if replicate else self.resolve(url)[:1]
        done: list[str] = []
        for target in targets:
            backend = self._writable(target, "write")
            try:
                self._call(
                    backend, functools.partial(backend.write, target, payload), target, "write"
                )
            except MlstoreError as exc:
                if done:
                    exc.reason += f" (already written to: {', '.join(done)})"
                raise
            self._count(backend, "bytes_written", len(payload))
            done.append(str(target))
        self._invalidate(url)

    def _writable(self, target: URL, operation: str) -> Backend:
        backend = self.backend(target.protocol)
        if backend.read_only:
            raise UnsupportedOperation(
                f"{target.protocol} URLs are read-only", url=str(target), operation=operation
            )
        return backend

    def mkdir(self, url: UrlLike) -> None:
        """Create a directory and its parents (a no-op on object stores)."""
        target, backend = self._target(url)
        self._call(backend, lambda: backend.mkdir(target), target, "write")

    def rm(self, url: UrlLike, recursive: bool = False, *, replicate: bool = False) -> None:
        """Delete the object at ``url`` (or, with ``recursive``, everything below it).

        For a mount, only the primary replica is changed unless ``replicate=True``
        (otherwise reads would still find the object on the other replicas).

        Raises:
            NotFoundError: nothing exists at ``url``.
        """
        targets = self.resolve(url) if replicate else self.resolve(url)[:1]
        for target in targets:
            backend = self._writable(target, "rm")
            if not recursive and self.info(target).is_dir:
                raise IsADirectoryError_(
                    "this is a directory; pass recursive=True to delete everything below it",
                    url=str(target),
                    operation="rm",
                )
            self._call(backend, functools.partial(backend.rm, target, recursive), target, "write")
        self._invalidate(url)

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
        found: list[ObjectInfo] = self._call(backend, lambda: list(backend.find(url)), url)
        return iter(sorted(found, key=lambda e: str(e.url)))

    def _copy_one(
        self, entry: ObjectInfo, dst: URL, done: int, total: int, progress: Progress | None
    ) -> int:
        src = entry.url
        src_backend = self.backend(src.protocol)
        dst_backend = self._writable(dst, "copy")
        if src_backend is dst_backend:
            self._call(src_backend, lambda: src_backend.copy(src, dst), dst, "write")
            self._invalidate(dst)
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


class _Resume:
    """What an interrupted read of ``[start, end)`` has received so far, and where to go
    on from. A suffix read (negative ``start``) is never resumed: it starts over."""

    __slots__ = ("_asked", "end", "offset", "parts", "version")

    def __init__(self, start: int | None, end: int | None, version: str | None) -> None:
        self._asked = (start, end, version)
        self.restart()

    def restart(self) -> None:
        """Back to what was asked: forget what arrived (its version is gone)."""
        start, self.end, self.version = self._asked
        self.offset = start or 0
        self.parts: list[bytes] = []

    def keep(self, got: Received) -> bool:
        """Keep the bytes that arrived before the body broke off; True if the next
        attempt resumes from them."""
        if not got.data or (self._asked[0] or 0) < 0:
            return False
        version = self.version or got.version
        if version is None:
            return False  # nothing to pin the rest to: start over
        if self.end is None and got.length is not None:
            self.end = self.offset + int(got.length)
        self.version = version
        self.parts.append(got.data)
        self.offset += len(got.data)
        return True
