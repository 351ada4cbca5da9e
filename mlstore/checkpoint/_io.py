"""A checkpoint's save (a transaction that commits with its manifest) and its reader."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from mlstore.checkpoint._chunks import (
    ChunkReader,
    ChunkWriter,
    Progress,
    cdc_pieces,
    listed_chunks,
    wait_all,
)
from mlstore.checkpoint._format import Layout, Manifest, Part, canonical
from mlstore.checkpoint._locks import Lock, lock_for_save
from mlstore.checkpoint._staging import StagedChunks, check_staging
from mlstore.errors import CheckpointError, NotFoundError
from mlstore.store import Store, default_store

__all__ = ["CheckpointInfo", "CheckpointReader", "CheckpointWriter", "read_manifest"]


@dataclass(frozen=True)
class CheckpointInfo:
    """What a save stored.

    Attributes:
        url: the checkpoint's manifest.
        bytes: the bytes the checkpoint holds (its parts, before dedupe).
        uploaded: the bytes this save uploaded (chunks the store did not hold).
        chunks: the chunks it names; ``new_chunks`` of them were uploaded.
        seconds: how long the save took.
        staged: the save was staged on the node's disk (``staging="local"``) and is
            uploading in the background: ``uploaded`` and ``new_chunks`` are 0, and the
            checkpoint at ``url`` is the previous one until the upload commits (wait
            with :func:`~mlstore.checkpoint.flush`).
    """

    url: str
    bytes: int
    uploaded: int
    chunks: int
    new_chunks: int
    seconds: float
    staged: bool = False

    @property
    def dedupe_ratio(self) -> float:
        """The share of the checkpoint's bytes that was not uploaded (0.0 - 1.0)."""
        return 1.0 - self.uploaded / self.bytes if self.bytes else 1.0


class CheckpointWriter:
    """One save: parts go up as they are added; the manifest commits them all at once.

    Use as a context manager: leaving the block without :meth:`commit` (or with an
    exception) writes no manifest, so the checkpoint at ``url`` stays what it was.

    Args:
        url: where the manifest goes (the checkpoint's name).
        kind: the format of the parts (``"torch"``, ``"dcp"``, ...), recorded.
        store: the Store to write through (default: the default Store).
        chunks: the chunk store's root (default: ``.chunks`` beside ``url``).
        tags: names :func:`~mlstore.checkpoint.retain` keeps the checkpoint under.
        workers: parallel uploads.
        max_bytes: bytes in flight at most.
        timeout: seconds to wait for a running chunk collection before
            :class:`~mlstore.errors.CheckpointBusyError`.
        progress: called with (bytes done, bytes so far) as chunks finish.
        staging: ``"local"`` writes the chunks and manifest to the node's disk cache
            and commits once they are there, durably; the upload follows in the
            background (see :func:`~mlstore.checkpoint.flush`). ``None``: upload now.
    """

    def __init__(
        self,
        url: str,
        *,
        kind: str,
        store: Store | None = None,
        chunks: str | None = None,
        tags: Sequence[str] = (),
        workers: int = 16,
        max_bytes: int = 256 * 1024 * 1024,
        timeout: float = 600.0,
        progress: Progress | None = None,
        staging: str | None = None,
    ) -> None:
        self.url = canonical(url)
        check_staging(staging, self.url)
        self.staging = staging
        self.kind = kind
        self.store = store or default_store()
        self.layout = Layout.beside(self.url, chunks)
        self.tags = list(tags)
        self._options = {"workers": workers, "max_bytes": max_bytes, "progress": progress}
        self.timeout = timeout
        self.parts: dict[str, Part] = {}
        self._lock: Lock | None = None
        self._chunks: ChunkWriter | None = None
        self._started = 0.0
        self.created = time.time()

    def __enter__(self) -> CheckpointWriter:
        self._started = time.perf_counter()
        if self.staging is not None:  # no request now: the upload takes the lock
            self._chunks = StagedChunks(self.store, self.url, self.layout, **self._options)  # type: ignore[arg-type]
            return self
        self._lock = lock_for_save(self.store, self.layout, self.timeout)
        try:
            known = listed_chunks(self.store, self.layout)
            self._chunks = ChunkWriter(self.store, self.layout, known, **self._options)  # type: ignore[arg-type]
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._chunks is not None:
                self._chunks.close()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _writer(self) -> ChunkWriter:
        if self._chunks is None:
            raise CheckpointError("a CheckpointWriter is used inside `with`", url=self.url)
        return self._chunks

    def add_pieces(
        self, name: str, pieces: Iterable[memoryview], meta: dict[str, Any] | None = None
    ) -> Part:
        """Store part ``name`` from its pieces (e.g. fixed slices of a tensor: chunks
        dedupe by piece)."""
        if name in self.parts:
            raise CheckpointError(f"the part {name!r} was added twice", url=self.url)
        part = self._writer().add(pieces)
        part.meta = dict(meta or {})
        self.parts[name] = part
        return part

    def add_bytes(
        self, name: str, data: bytes | memoryview, meta: dict[str, Any] | None = None
    ) -> Part:
        """Store part ``name``, cut by content (blobs, files, pickles)."""
        return self.add_pieces(name, cdc_pieces(data), meta)

    def commit(self, meta: dict[str, Any] | None = None) -> CheckpointInfo:
        """Wait for every chunk, then write the manifest: the checkpoint exists."""
        stats = self._writer().finish()
        manifest = Manifest(
            kind=self.kind,
            parts=self.parts,
            meta=dict(meta or {}),
            tags=self.tags,
            created=self.created,
            stats=stats,
            chunks_root=self.layout.root,
        )
        if isinstance(self._chunks, StagedChunks):
            self._chunks.commit(manifest)
            return CheckpointInfo(
                url=self.url,
                bytes=stats["bytes"],
                uploaded=0,
                chunks=stats["chunks"],
                new_chunks=0,
                seconds=time.perf_counter() - self._started,
                staged=True,
            )
        # The ref first: a collector that finds a ref with no manifest yet leaves the
        # chunks alone while this save's lock lives; a manifest with no ref would be
        # invisible to it.
        self.store.write_bytes(self.layout.ref(self.url), self.url.encode())
        self.store.write_bytes(self.url, manifest.dumps(self.url))
        return CheckpointInfo(
            url=self.url,
            bytes=stats["bytes"],
            uploaded=stats["uploaded"],
            chunks=stats["chunks"],
            new_chunks=stats["new_chunks"],
            seconds=time.perf_counter() - self._started,
        )


def read_manifest(store: Store, url: str) -> Manifest:
    """The manifest at ``url`` (:class:`~mlstore.errors.CheckpointError` if it is not
    one; :class:`~mlstore.errors.NotFoundError` if nothing is there).

    Read from the storage itself, never from a cache: a manifest is the one part of a
    checkpoint that changes in place (a save to the same URL, from any node), and a
    load must see the last one committed. Chunks never change, so they are cached."""
    raw, _version = store.read_versioned(url)
    return Manifest.loads(url, raw)


class CheckpointReader:
    """Reads the parts of the checkpoint at ``url``, verified, in parallel."""

    def __init__(self, url: str, *, store: Store | None = None, workers: int = 16) -> None:
        self.url = canonical(url)
        self.store = store or default_store()
        self.manifest = read_manifest(self.store, self.url)
        layout = Layout(self.manifest.chunks_root)
        self._chunks = ChunkReader(self.store, layout, self.url, workers=workers)

    def part(self, name: str) -> Part:
        try:
            return self.manifest.parts[name]
        except KeyError:
            raise CheckpointError(f"the checkpoint has no part {name!r}", url=self.url) from None

    def read(self, name: str) -> bytes:
        return self._chunks.read(self.part(name))

    def read_into(self, name: str, out: memoryview) -> None:
        self._chunks.read_into(self.part(name), out)

    def fill(self, targets: dict[str, memoryview]) -> None:
        """Fill each buffer with its part, every chunk of every part fetched at once
        (bounded by ``workers``); the first failure is raised when all have ended."""
        futures: list[Future[None]] = []
        for name, out in targets.items():
            futures += self._chunks.start(self.part(name), out)
        wait_all(futures)

    def close(self) -> None:
        self._chunks.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def exists(store: Store, url: str) -> bool:
    try:
        read_manifest(store, url)
    except (NotFoundError, CheckpointError):
        return False
    return True


def commit_manifest(store: Store, url: str, manifest: Manifest) -> None:
    """Write ``manifest`` at ``url``: its ref first, then the manifest itself, as
    :meth:`CheckpointWriter.commit` does, for savers that upload their chunks apart (the
    DCP storage writer: every rank uploads, one writes the manifest). Call it while
    holding the save lock, after every chunk the manifest names is stored."""
    store.write_bytes(Layout(manifest.chunks_root).ref(url), url.encode())
    store.write_bytes(url, manifest.dumps(url))
