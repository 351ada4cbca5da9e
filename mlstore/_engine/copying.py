"""Copies: one object, or a tree of them through a bounded pool of threads, leaving
alone the objects the destination already holds (``skip_existing``).

A recursive copy of many small objects is bound by round trips, not bandwidth: one
object at a time, 2,000 objects through a 20 ms store took over two minutes. So the
objects of a tree are copied ``max_workers`` at a time. At most twice that many are
handed to the pool at once, so a tree of a million keys does not become a million
queued tasks; after the first failure no further object is started, the copies under
way finish (each leaves its destination whole or untouched), and that failure is
raised, naming its URL.

Every destination written is invalidated in the node cache, as a single write is.
``progress(done_bytes, total_bytes)`` is called under one lock, so from one thread at a
time, with ``done_bytes`` never going back, and ends with ``done == total`` (skipped
objects count as done).

**Skipping.** With ``skip_existing``, an object is not copied when the destination
already holds the same content, which is proven, never guessed: the sizes must agree
and then one of

- the mlstore content hash (xxh3-128) recorded in both objects' metadata, or computed
  from the bytes of a side that is local (``file://``, ``memory://``: reading them costs
  no request), is equal;
- for a copy within one S3 store, the ETags are equal (an S3 ETag is the MD5 of the
  content, or of its parts' MD5s: equal ETags mean equal bytes);
- the MD5s are equal (S3's single-part ETag, against a local side's MD5).

Size alone, or size and modification time, never skips. The destination is listed
once (for a tree), so objects that are not there yet cost no extra request; an object
that is there with the same size costs at most a HEAD of each side.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Protocol

from mlstore._engine.identity import CACHED_PROTOCOLS
from mlstore._util.html import copy_result_html, copy_result_repr
from mlstore.backends.base import ObjectInfo
from mlstore.errors import IsADirectoryError_, NotFoundError
from mlstore.hashing import Hasher
from mlstore.url import URL, safe_join

if TYPE_CHECKING:
    from mlstore._engine.writer import Progress, Writer

__all__ = ["CONTENT_VERSIONS", "Copier", "CopyResult", "Tally", "bounded"]

#: Protocols whose version (the S3 ETag) is derived from the content alone, so two
#: objects of one store with equal versions hold equal bytes.
CONTENT_VERSIONS = frozenset({"s3"})

_CHUNK = 8 * 1024 * 1024


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


class CopyResult(list[str]):
    """What :meth:`mlstore.Store.copy` did: the URLs written, in source order (it *is*
    that list, as before ``skip_existing`` existed), and what it left alone.

    Attributes:
        skipped: destination URLs left as they were: they already held the same content
            (``skip_existing``).
        skipped_bytes: the bytes of those objects (not sent again).
        copied_bytes: the bytes of the objects written.
    """

    def __init__(
        self,
        written: Iterable[str] = (),
        *,
        skipped: Iterable[str] = (),
        skipped_bytes: int = 0,
        copied_bytes: int = 0,
    ) -> None:
        super().__init__(written)
        self.skipped = list(skipped)
        self.skipped_bytes = skipped_bytes
        self.copied_bytes = copied_bytes

    def __repr__(self) -> str:
        return copy_result_repr(self, self.skipped, self.skipped_bytes)

    def _repr_html_(self) -> str:
        return copy_result_html(self, self.skipped, self.copied_bytes, self.skipped_bytes)


class Tally:
    """Bytes done of a copy, reported under one lock (one caller at a time, monotonic)."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total = total
        self.done = 0
        self.reported = -1
        self.progress = progress
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            self.reported = self.done
            if self.progress is not None:
                self.progress(self.done, self.total)

    def finish(self) -> None:
        """Say it finished, if the last call did not (empty files; nothing to copy)."""
        with self.lock:
            if self.reported != self.done:
                self.reported = self.done
                if self.progress is not None:
                    self.progress(self.done, self.total)


class Copier:
    """One call of :meth:`~mlstore._engine.writer.Writer.copy`.

    Args:
        writer: writes the destinations (and knows the backends, resolving, the cache).
        skip_existing: leave alone destinations that hold the same content already.
        workers: objects copied at once.
        pool: the process's kept pool of ``workers`` threads, if there is one to use.
    """

    def __init__(
        self,
        writer: Writer,
        *,
        skip_existing: bool,
        workers: int,
        pool: ThreadPoolExecutor | None = None,
    ) -> None:
        self.writer = writer
        self.calls = writer.calls
        self.skip_existing = skip_existing
        self.workers = max(1, workers)
        self.pool = pool

    # ------------------------------------------------------------------ planning

    def run(
        self, src_url: URL, dst_url: URL, *, recursive: bool, progress: Progress | None
    ) -> CopyResult:
        pairs, there = self.plan(src_url, dst_url, recursive=recursive)
        tally = Tally(sum(e.size for e, _ in pairs), progress)
        outcomes = self.each(pairs, there, tally)
        tally.finish()
        return self.result(pairs, outcomes)

    def plan(
        self, src_url: URL, dst_url: URL, *, recursive: bool, list_dst: bool = False
    ) -> tuple[list[tuple[ObjectInfo, URL]], dict[str, ObjectInfo] | None]:
        """The ``(source object, destination URL)`` pairs of a copy, in source order,
        and the destination's objects by URL when they were listed (a tree copy that
        skips, or ``list_dst``; ``None`` otherwise)."""
        w = self.writer
        src_info = w.locate(w.resolve(src_url))[1]
        if src_info.is_dir and not recursive:
            raise IsADirectoryError_.at(src_url, "copy")
        pairs: list[tuple[ObjectInfo, URL]] = []
        there: dict[str, ObjectInfo] | None = None  # the destination's objects, if listed
        if src_info.is_dir:
            base = str(src_url).rstrip("/")
            for entry in w.sorted_find(src_url):
                rel = str(entry.url)[len(base) :].lstrip("/")
                pairs.append((entry, safe_join(dst_url, rel)))  # refuses keys that escape
            if self.skip_existing or list_dst:
                there = self._listed(dst_url)
        else:
            pairs.append((src_info, dst_url))
        return pairs, there

    @staticmethod
    def result(pairs: list[tuple[ObjectInfo, URL]], copied: list[bool]) -> CopyResult:
        """What was written and what was left alone, from whether each pair was copied."""
        result = CopyResult()
        for (entry, target), done in zip(pairs, copied, strict=True):
            if done:
                result.append(str(target))
                result.copied_bytes += entry.size
            else:
                result.skipped.append(str(target))
                result.skipped_bytes += entry.size
        return result

    def needed(self, entry: ObjectInfo, target: URL, there: dict[str, ObjectInfo] | None) -> bool:
        """Whether copying ``entry`` to ``target`` would write anything (what a dry run
        reports): always, unless skipping and the destination holds the content."""
        if not self.skip_existing:
            return True
        existing = self._existing(target, there)
        return existing is None or not self._same(entry, existing)

    def _listed(self, dst: URL) -> dict[str, ObjectInfo]:
        """The objects below ``dst`` now, by URL (none if there is nothing there)."""
        try:
            return {str(e.url): e for e in self.writer.sorted_find(dst)}
        except NotFoundError:
            return {}

    def each(
        self,
        pairs: list[tuple[ObjectInfo, URL]],
        there: dict[str, ObjectInfo] | None,
        tally: Tally,
    ) -> list[bool]:
        """Copy every pair (at most ``workers`` at once): whether each was copied."""
        return self.parallel(functools.partial(self._one, there=there, tally=tally), pairs)

    def parallel(
        self, fn: Callable[[ObjectInfo, URL], bool], pairs: list[tuple[ObjectInfo, URL]]
    ) -> list[bool]:
        """``fn`` over ``pairs``, ``workers`` at a time (see :func:`bounded`)."""
        if self.workers == 1 or len(pairs) <= 1:
            return [fn(entry, target) for entry, target in pairs]
        own = self.pool is None
        pool = self.pool or ThreadPoolExecutor(self.workers, thread_name_prefix="mlstore-copy")
        try:
            return bounded(pool, fn, pairs, window=2 * self.workers)
        finally:
            if own:
                pool.shutdown(wait=True)

    # ------------------------------------------------------------------ one object

    def _one(
        self,
        entry: ObjectInfo,
        target: URL,
        *,
        there: dict[str, ObjectInfo] | None,
        tally: Tally,
    ) -> bool:
        """Copy one object unless it may be skipped; whether it was copied."""
        dst_backend = self.calls.writable(target, "copy")
        if not self.needed(entry, target, there):
            self.calls.count(dst_backend, "copies_skipped")
            self.calls.count(dst_backend, "copy_bytes_skipped", entry.size)
            tally.add(entry.size)
            return False
        self.copy_one(entry, target, tally.add)
        return True

    def copy_one(self, entry: ObjectInfo, dst: URL, advance: Callable[[int], None]) -> None:
        """Copy the object ``entry`` to ``dst``: server side within one backend, else
        streamed; ``advance(n)`` as ``n`` more bytes are done."""
        w = self.writer
        src = entry.url
        src_backend = self.calls.backend(src.protocol)
        dst_backend = self.calls.writable(dst, "copy")
        if src_backend is dst_backend:  # server side, where the storage can
            copy = functools.partial(src_backend.copy, src, dst)
            self.calls.call(src_backend, copy, dst, "write", op="copy")
            w.invalidate(w.resolve(dst), None, None)
            advance(entry.size)
            return
        if entry.size <= _CHUNK and not entry.is_dir and src.protocol in CACHED_PROTOCOLS:
            # A small remote object: one GET pinned to the version the listing gave
            # (a whole read is checked against the recorded hash), then one write.
            # Opening it would first ask for its info again: two requests, not one.
            data, _ = w.reader.fetch_whole(w.resolve(src), version=entry.version)
            w.write(w.resolve(dst), data, replicate=False)
            advance(len(data))
            return
        source = w.reader.open(
            w.resolve(src), buffer_size=None, version=entry.version, block_size=w.block_size
        )
        with source as fin, w.open(w.resolve(dst), text=False) as fout:
            while chunk := fin.read(_CHUNK):
                fout.write(chunk)
                advance(len(chunk))

    # ------------------------------------------------------------------ skipping

    def _existing(self, target: URL, there: dict[str, ObjectInfo] | None) -> ObjectInfo | None:
        """What is at ``target`` now (``None``: nothing): from the listing of a tree,
        else one ``info``."""
        if there is not None:
            return there.get(str(target))
        return self._head(target)

    def _head(self, url: URL) -> ObjectInfo | None:
        backend = self.calls.backend(url.protocol)
        try:
            return self.calls.call(backend, functools.partial(backend.info, url), url, "info")
        except NotFoundError:
            return None

    def _same(self, src: ObjectInfo, dst: ObjectInfo) -> bool:
        """Whether ``dst`` provably holds the bytes of ``src`` (see the module docstring)."""
        if dst.is_dir or dst.size != src.size:
            return False
        protocol = src.url.protocol
        if (
            protocol == dst.url.protocol
            and protocol in CONTENT_VERSIONS
            and src.version
            and src.version.strip('"') == (dst.version or "").strip('"')
        ):
            return True
        for algo in ("xxh3", "md5"):  # first with what the listings gave: no request
            verdict = self._match(src, dst, algo)
            if verdict is not None:
                return verdict
        src, dst = self._described(src), self._described(dst)
        for algo in ("xxh3", "md5"):
            verdict = self._match(src, dst, algo)
            if verdict is not None:
                return verdict
        return False

    def _described(self, info: ObjectInfo) -> ObjectInfo:
        """``info`` with what a HEAD tells of a remote object (listings carry no
        metadata, so no recorded hash)."""
        if info.url.protocol in CACHED_PROTOCOLS and info.content_hash is None:
            return self._head(info.url) or info
        return info

    def _match(self, a: ObjectInfo, b: ObjectInfo, algo: str) -> bool | None:
        """Whether ``a`` and ``b`` have equal ``algo`` digests; ``None``: cannot tell
        without downloading (a remote side records none)."""
        known_a, known_b = _recorded(a, algo), _recorded(b, algo)
        if (known_a is None and not _local(a)) or (known_b is None and not _local(b)):
            return None
        digest_a = known_a or self._hash(a, algo)
        digest_b = known_b or self._hash(b, algo)
        return digest_a == digest_b

    def _hash(self, info: ObjectInfo, algo: str) -> str:
        """The ``algo`` digest of a local object's bytes, read now."""
        w = self.writer
        hasher: _Digest = Hasher() if algo == "xxh3" else hashlib.md5(usedforsecurity=False)
        source = w.reader.open(
            w.resolve(info.url), buffer_size=None, version=None, block_size=w.block_size
        )
        with source as fin:
            while chunk := fin.read(_CHUNK):
                hasher.update(chunk)
        return hasher.hexdigest()


def _recorded(info: ObjectInfo, algo: str) -> str | None:
    if algo == "xxh3":
        return info.content_hash
    value = info.checksums.get(algo)
    return _hex(value) if value else None


def _hex(digest: str) -> str:
    """An MD5 as hex, whether a store gave it as hex (S3's ETag) or base64 (GCS's
    ``md5Hash``, Azure's ``Content-MD5``)."""
    text = digest.strip('"')
    if len(text) == 24 and text.endswith("=="):
        try:
            return base64.b64decode(text, validate=True).hex()
        except ValueError:
            return text
    return text.lower()


def _local(info: ObjectInfo) -> bool:
    """Objects read with no request, so hashed rather than trusted to metadata."""
    return info.url.protocol not in CACHED_PROTOCOLS


def bounded(
    pool: ThreadPoolExecutor,
    fn: Callable[[ObjectInfo, URL], bool],
    pairs: list[tuple[ObjectInfo, URL]],
    *,
    window: int,
) -> list[bool]:
    """``fn`` over ``pairs`` in ``pool``, at most ``window`` submitted at a time; after
    the first failure nothing more is started, and it is raised once those under way
    have finished."""
    out: list[bool] = [False] * len(pairs)
    todo: Iterator[int] = iter(range(len(pairs)))
    running: dict[Future[bool], int] = {}
    failure: BaseException | None = None
    while True:
        while failure is None and len(running) < window:
            i = next(todo, None)
            if i is None:
                break
            running[pool.submit(fn, *pairs[i])] = i
        if not running:
            break
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            i = running.pop(future)
            error = future.exception()
            if error is not None:
                failure = failure or error
            else:
                out[i] = future.result()
    if failure is not None:
        raise failure
    return out
