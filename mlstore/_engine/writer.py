"""Writes: replace an object, open one for writing, delete, copy, make a directory
(copies of trees, in parallel and skipping what is there: :mod:`.copying`).

Every write through a Store is seen by the next read on the node: after it, the cached
data and metadata of the URL (and of the physical URLs behind a mount) are dropped, in
this process's memory and in the node's disk index (``invalidate``). Where the store
names the version a write made, the node also learns that this version is the content
the write hashed (a :data:`Made` proof), so a copy of that content already on disk
serves it without a GET.

A whole-object write is idempotent, so it is retried like a read. A file opened for
writing on a backend that buffers is stored with one such write when it is closed, and
that write is retried too. On a backend that uploads in parts (s3, gs, az), a write
larger than ``StoreConfig.multipart_threshold`` goes up in parts instead, each part one
retried call (see :mod:`.multipart`); the cache is told about it exactly as about a
whole-object write, once the object is published.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, cast

from mlstore._engine.calls import Calls
from mlstore._engine.copying import Copier, CopyResult
from mlstore._engine.identity import CACHED_PROTOCOLS
from mlstore._engine.multipart import PartPlan, StreamedWrite, Uploader
from mlstore._engine.reader import Reader
from mlstore._engine.replicas import Resolved
from mlstore._engine.syncing import SyncResult, sync
from mlstore._util.files import BufferedWrite, CountingWriter, TextWriter
from mlstore.backends.base import Backend, ObjectInfo
from mlstore.errors import IsADirectoryError_, MlstoreError, NotFoundError
from mlstore.hashing import block_digests, content_hash
from mlstore.url import URL

__all__ = ["CopyResult", "Made", "Progress", "SyncResult", "Writer"]

Progress = Callable[[int, int], None]
#: What writes made: physical URL -> (the version the store named, the content hash of
#: the bytes sent).
Made = dict[URL, tuple[str, str]]


@dataclass(frozen=True)
class Writer:
    """Writes through this process's backends.

    Attributes:
        calls: this process's backends and the retried call.
        reader: opens sources of cross-backend copies.
        resolve: resolves a physical URL (the parts of a recursive copy).
        locate: the replica and info of a resolved URL (through the metadata cache).
        invalidate: forgets what is cached of a resolved URL (and records what the
            write made).
        block_size: the read size of copy sources.
        plan: how large writes are cut into parts.
        copy_pool: ``(workers, pool)``: the process's kept pool of that many threads,
            used by a recursive copy of that many workers.
        dedupe_from: whole-object writes of at least this many bytes check first
            whether the destination holds their content (``None``: never).
    """

    calls: Calls
    reader: Reader
    resolve: Callable[[URL], Resolved]
    locate: Callable[[Resolved], tuple[URL, ObjectInfo]]
    invalidate: Callable[[Resolved, Made | None, bytes | memoryview | None], None]
    block_size: int
    plan: PartPlan
    copy_pool: tuple[int, Callable[[], ThreadPoolExecutor]] | None = None
    dedupe_from: int | None = None

    def write(
        self,
        where: Resolved,
        data: bytes | memoryview,
        *,
        replicate: bool,
        dedupe: bool | None = None,
    ) -> None:
        """Replace the object with ``data`` on the primary (every replica with
        ``replicate``, in order; a failure names the replicas already written).

        With ``dedupe`` (default: when ``data`` is at least ``dedupe_from`` bytes), a
        destination that already holds this content is not sent it again (see
        :meth:`holds`)."""
        targets = where.replicas if replicate else where.replicas[:1]
        nbytes = memoryview(data).nbytes
        if dedupe is None:
            dedupe = self.dedupe_from is not None and nbytes >= self.dedupe_from
        digest = content_hash(data) if dedupe else None
        done: list[str] = []
        made: Made = {}
        for target in targets:
            backend = self.calls.writable(target, "write")
            if digest is not None and self.holds(backend, target, data, digest):
                self.calls.count(backend, "dedupe_uploads_skipped")
                self.calls.count(backend, "dedupe_bytes_skipped", nbytes)
                continue
            try:
                self._put(backend, target, data, made)
            except MlstoreError as exc:
                if done:
                    exc.reason += f" (already written to: {', '.join(done)})"
                raise
            self.calls.count(backend, "bytes_written", nbytes)
            done.append(str(target))
        if done:
            self.invalidate(where, made, data)

    def holds(self, backend: Backend, target: URL, data: bytes | memoryview, digest: str) -> bool:
        """Whether ``target`` holds ``data`` already (one HEAD): the same size and the
        same mlstore content hash ``digest`` in its metadata, and, where the store
        serves an MD5 of the content (a single-part S3 ETag, GCS, Azure), the same MD5
        too. Metadata can be written by anyone who can write the object; the MD5 is the
        store's own account of the bytes."""
        if backend.read_only or target.protocol not in CACHED_PROTOCOLS:
            return False  # a local file costs nothing to rewrite; no metadata to trust
        info_of = functools.partial(backend.info, target)
        try:
            info = self.calls.call(backend, info_of, target, "info")
        except NotFoundError:
            return False
        if info.is_dir or info.size != memoryview(data).nbytes or info.content_hash != digest:
            return False
        served = info.checksums.get("md5")
        if served is None:
            return True
        return hashlib.md5(data, usedforsecurity=False).hexdigest() == served.strip('"')

    def open(
        self,
        where: Resolved,
        *,
        text: bool,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> IO[Any]:
        """A file whose content replaces the object atomically when it is closed (and is
        discarded if the ``with`` block raises)."""
        target = where.primary
        backend = self.calls.writable(target, "write")
        made: Made = {}

        def committed(n: int) -> None:
            self.calls.count(backend, "bytes_written", n)
            self.invalidate(where, made, None)

        native: IO[bytes]
        if backend.supports_multipart:  # parts as they fill, or one write if small

            def made_by(version: str | None, digest: str) -> None:
                if version is not None:
                    made[target] = (version, digest)

            streamed = StreamedWrite(
                self.plan,
                backend.max_parts,
                start=functools.partial(Uploader, self.calls, backend, target, self.plan),
                whole=functools.partial(self._put, backend, target, made=made),
                made=made_by,
                name=str(target),
            )
            native = cast(IO[bytes], streamed)  # an io.RawIOBase: typeshed's IO is nominal
        elif backend.buffered_writes:  # one whole-object write at close: retried
            put = functools.partial(self._put, backend, target, made=made)
            native = BufferedWrite(put, str(target))
        else:
            native = backend.open_write(target)
            self.calls.count_request(backend, "put")
        raw = CountingWriter(native, committed)
        if not text:
            return cast(IO[Any], raw)
        try:
            return TextWriter(raw, encoding=encoding, errors=errors, newline=newline)
        except BaseException:  # an unknown encoding, say: nothing is written
            raw.discard()
            raise

    def _put(self, backend: Backend, target: URL, data: bytes | memoryview, made: Made) -> None:
        """One retried whole-object write, or a multipart upload when the object is
        large and the backend can; what it made goes into ``made``."""
        if backend.supports_multipart and memoryview(data).nbytes > self.plan.cutoff:
            self._put_parts(backend, target, memoryview(data).cast("B"), made)
            return
        payload = data if type(data) is bytes else bytes(data)
        write = functools.partial(backend.write, target, payload)
        version = self.calls.call(backend, write, target, "write")
        if version is not None:
            made[target] = (version, content_hash(payload))

    def _put_parts(self, backend: Backend, target: URL, data: memoryview, made: Made) -> None:
        """``data`` as a multipart upload of slices of it. Its hash and block digests are
        known before the first part, so every store records them."""
        digest = content_hash(data)
        uploader = Uploader(
            self.calls,
            backend,
            target,
            self.plan,
            content_hash=digest,
            block_digests=block_digests(data),
        )
        try:
            for start, end in self.plan.cut(len(data), backend.max_parts):
                uploader.send(data[start:end])
        except BaseException:
            uploader.abort()
            raise
        version = uploader.finish(digest)
        if version is not None:
            made[target] = (version, digest)

    def mkdir(self, where: Resolved) -> None:
        target = where.primary
        backend = self.calls.backend(target.protocol)
        mkdir = functools.partial(backend.mkdir, target)
        self.calls.call(backend, mkdir, target, "write", op="mkdir")

    def rm(self, where: Resolved, *, recursive: bool, replicate: bool) -> None:
        """Delete the object (or, with ``recursive``, everything below it) on the
        primary (every replica with ``replicate``)."""
        targets = where.replicas if replicate else where.replicas[:1]
        below: list[URL] = []
        for target in targets:
            backend = self.calls.writable(target, "rm")
            if not recursive and self.locate(self.resolve(target))[1].is_dir:
                raise IsADirectoryError_.at(target, "rm")
            if recursive and target.protocol in CACHED_PROTOCOLS:
                # What the node may hold copies of: every object below, listed first.
                below += [entry.url for entry in self.sorted_find(target)]
            rm = functools.partial(backend.rm, target, recursive)
            self.calls.call(backend, rm, target, "write", op="delete")
        self.invalidate(where, None, None)
        for url in below:
            self.invalidate(self.resolve(url), None, None)

    def copy(
        self,
        src: Resolved,
        dst: Resolved,
        *,
        recursive: bool,
        progress: Progress | None,
        skip_existing: bool = False,
        max_workers: int = 1,
    ) -> CopyResult:
        """Copy ``src`` to ``dst`` (see :meth:`mlstore.Store.copy` and :mod:`.copying`),
        ``max_workers`` objects at a time."""
        copier = self._copier(skip_existing=skip_existing, max_workers=max_workers)
        return copier.run(src.primary, dst.primary, recursive=recursive, progress=progress)

    def sync(
        self,
        src: Resolved,
        dst: Resolved,
        *,
        delete: bool,
        dry_run: bool,
        progress: Progress | None,
        max_workers: int = 1,
    ) -> SyncResult:
        """Make ``dst`` hold what ``src`` holds (see :meth:`mlstore.Store.sync` and
        :mod:`.syncing`)."""
        copier = self._copier(skip_existing=True, max_workers=max_workers)
        return sync(
            copier, src.primary, dst.primary, delete=delete, dry_run=dry_run, progress=progress
        )

    def _copier(self, *, skip_existing: bool, max_workers: int) -> Copier:
        pool = None
        if threading.current_thread().name.startswith("mlstore-copy"):
            max_workers = 1  # a copy inside a copy's own threads (from progress): serial
        elif self.copy_pool is not None and max_workers == self.copy_pool[0]:
            pool = self.copy_pool[1]()
        return Copier(self, skip_existing=skip_existing, workers=max_workers, pool=pool)

    def sorted_find(self, url: URL) -> list[ObjectInfo]:
        """The objects below ``url``, by URL (one retried listing)."""
        backend = self.calls.backend(url.protocol)
        found = self.calls.call(backend, lambda: list(backend.find(url)), url, op="list")
        return sorted(found, key=lambda e: str(e.url))
