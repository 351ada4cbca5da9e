"""Chunks in and out of a chunk store: parallel, bounded in memory, verified.

Writing: a part's bytes arrive as pieces (fixed slices of a tensor's storage, or
content-defined cuts of a blob); each is hashed and, unless the store already holds a
chunk of that name, uploaded, on a small pool of threads. The producer blocks while
more than ``max_bytes`` of pieces are in flight, so a save holds the object being
saved plus at most that much, never a serialized copy of the whole.

Reading: a part's chunks are fetched on the same kind of pool and copied into one
preallocated buffer at their offsets, each checked against its name first: a chunk
whose bytes do not hash to its name is never used.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from mlstore.checkpoint._format import Chunk, Layout, Part
from mlstore.errors import CheckpointError, IntegrityError, NotFoundError
from mlstore.hashing import content_hash
from mlstore.store import Store

__all__ = [
    "ChunkReader",
    "ChunkWriter",
    "cdc_pieces",
    "fixed_pieces",
    "listed_chunks",
    "wait_all",
]

#: Fixed piece of a tensor's storage: large enough that a request's latency is small
#: against its transfer, small enough that a partly changed model dedupes by piece.
PIECE_BYTES = 32 * 1024 * 1024
#: Content-defined chunking of blobs: average, least and most chunk size.
CDC_AVG, CDC_MIN, CDC_MAX = 1024 * 1024, 256 * 1024, 8 * 1024 * 1024

#: Bytes of chunks in flight at most, by default, on a save or a load: beyond the
#: model itself, what a save or load holds (each piece is copied once on its way).
MAX_IN_FLIGHT = 256 * 1024 * 1024

Progress = Callable[[int, int], None]


def fixed_pieces(view: memoryview, size: int = PIECE_BYTES) -> Iterator[memoryview]:
    """``view`` in slices of ``size`` bytes (no copies)."""
    flat = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    for start in range(0, len(flat), size):
        yield flat[start : start + size]


def cdc_pieces(view: memoryview | bytes) -> Iterator[memoryview]:
    """``view`` cut where its content says (FastCDC): an insertion early in a file
    moves the cuts only near it, so the rest dedupes against the previous version."""
    from pyfastcdc import FastCDC  # a dependency of the checkpoint feature only

    data = memoryview(view).cast("B") if not isinstance(view, bytes) else memoryview(view)
    if len(data) <= CDC_MIN:
        if len(data):
            yield data
        return
    cutter = FastCDC(avg_size=CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX)
    for cut in cutter.cut_buf(data):
        yield data[cut.offset : cut.offset + cut.length]


def listed_chunks(store: Store, layout: Layout) -> dict[str, int]:
    """The chunks the store holds, digest to size (one listing)."""
    try:
        found = store.find(layout.data, detail=True)
    except NotFoundError:
        return {}
    return {str(i.url).rsplit("/", 1)[-1]: i.size for i in found}


class ChunkWriter:
    """Uploads the chunks of one save.

    Pieces are hashed and stored on a pool of threads, at most ``max_bytes`` of them in
    flight. Subclasses change where a new chunk goes (:meth:`_claim`, :meth:`_keep`):
    the staged writer keeps them on the node's disk instead.

    Args:
        store: writes go through it.
        layout: the chunk store.
        known: digests already stored (listed under the save's lock): not uploaded.
        workers: parallel uploads.
        max_bytes: bytes of pieces in flight at most (the producer waits).
        progress: called with (bytes done, bytes so far announced) as pieces finish.
    """

    thread_name = "mlstore-ckpt-put"

    def __init__(
        self,
        store: Store,
        layout: Layout,
        known: Iterable[str],
        *,
        workers: int = 16,
        max_bytes: int = MAX_IN_FLIGHT,
        progress: Progress | None = None,
    ) -> None:
        self.store = store
        self.layout = layout
        self.known = set(known)
        self.max_bytes = max_bytes
        self.progress = progress
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=self.thread_name)
        self._room = threading.Condition()
        self._in_flight = 0
        self._claimed: set[str] = set()  # digests being uploaded by this save
        self._futures: list[Future[None]] = []
        self.stats = {"bytes": 0, "uploaded": 0, "chunks": 0, "new_chunks": 0}
        self._announced = 0
        self._done = 0

    def add(self, pieces: Iterable[memoryview]) -> Part:
        """Store a part given as its pieces, in order; the returned part's chunk list
        is complete once :meth:`finish` returns."""
        part = Part(0)
        slots: list[Chunk | None] = []
        for piece in pieces:
            n = len(piece)
            with self._room:
                while self._in_flight and self._in_flight + n > self.max_bytes:
                    self._room.wait()
                self._in_flight += n
                self._announced += n
            part.size += n
            slots.append(None)
            self._futures.append(self._pool.submit(self._put, piece, slots, len(slots) - 1))
        part.chunks = slots  # type: ignore[assignment]  # filled by the uploads
        return part

    def _claim(self, digest: str, size: int) -> bool:
        """Whether ``digest`` must be stored by this save (under the writer's lock)."""
        fresh = digest not in self.known and digest not in self._claimed
        self._claimed.add(digest)
        return fresh

    def _keep(self, digest: str, piece: memoryview) -> None:
        """Store a chunk this save claimed."""
        self.store.write_bytes(self.layout.chunk(digest), piece, dedupe=False)
        with self._room:
            self.stats["uploaded"] += len(piece)
            self.stats["new_chunks"] += 1

    def _put(self, piece: memoryview, slots: list[Chunk | None], index: int) -> None:
        n = len(piece)
        try:
            digest = content_hash(piece)
            slots[index] = Chunk(digest, n)
            with self._room:
                fresh = self._claim(digest, n)
                self.stats["chunks"] += 1
                self.stats["bytes"] += n
            if fresh:
                self._keep(digest, piece)
        finally:
            with self._room:
                self._in_flight -= n
                self._done += n
                done, announced = self._done, self._announced
                self._room.notify_all()
            if self.progress is not None:
                self.progress(done, announced)

    def finish(self) -> dict[str, int]:
        """Wait for every chunk; the first failure is raised. Returns the stats."""
        try:
            for future in self._futures:
                future.result()
        finally:
            self._stop()
        return dict(self.stats)

    def _stop(self) -> None:
        for future in self._futures:
            future.cancel()
        self._pool.shutdown(wait=True)

    def close(self) -> None:
        self._stop()


def wait_all(futures: Iterable[Future[Any]]) -> None:
    """Wait for every future; raise the first failure (in order) after all ended."""
    error: BaseException | None = None
    for future in list(futures):
        exc = future.exception()
        if exc is not None and error is None:
            error = exc
    if error is not None:
        raise error


class ChunkReader:
    """Fetches parts of one checkpoint, verified, into buffers."""

    def __init__(
        self,
        store: Store,
        layout: Layout,
        url: str,
        *,
        workers: int = 16,
        max_bytes: int = MAX_IN_FLIGHT,
    ) -> None:
        self.store = store
        self.layout = layout
        self.url = url
        self.workers = workers
        self.max_bytes = max_bytes
        self._room = threading.Condition()
        self._in_flight = 0
        self._pool: ThreadPoolExecutor | None = None

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="mlstore-ckpt-get")
        return self._pool

    def start(self, part: Part, out: memoryview) -> list[Future[None]]:
        """Start filling ``out`` (``part.size`` bytes) with the part's bytes; the
        futures of its chunks."""
        if len(out) != part.size or sum(c.size for c in part.chunks) != part.size:
            raise CheckpointError(
                f"the manifest's chunks do not add up to the part's {part.size} bytes",
                url=self.url,
                operation="load",
            )
        futures = []
        offset = 0
        for chunk in part.chunks:
            target = out[offset : offset + chunk.size]
            futures.append(self._executor().submit(self._fetch, chunk, target))
            offset += chunk.size
        return futures

    def read_into(self, part: Part, out: memoryview) -> None:
        """Fill ``out`` with the part's bytes."""
        wait_all(self.start(part, out))

    def read(self, part: Part) -> bytes:
        buf = bytearray(part.size)
        self.read_into(part, memoryview(buf))
        return bytes(buf)

    def _fetch(self, chunk: Chunk, target: memoryview) -> None:
        with self._room:  # bytes fetched but not yet copied into place: bounded
            while self._in_flight and self._in_flight + chunk.size > self.max_bytes:
                self._room.wait()
            self._in_flight += chunk.size
        try:
            self._fetch_one(chunk, target)
        finally:
            with self._room:
                self._in_flight -= chunk.size
                self._room.notify_all()

    def _fetch_one(self, chunk: Chunk, target: memoryview) -> None:
        url = self.layout.chunk(chunk.digest)
        try:
            # Into the node cache (other ranks on the node load the same chunks), but not
            # into this process's memory tier: a load reads each chunk once, and the
            # tensors it fills already hold the bytes.
            self.store.warm(url)
            data = self.store.read_bytes(url)
        except NotFoundError as exc:
            raise CheckpointError(
                f"the checkpoint names a chunk that is not stored ({url}); it was deleted "
                "outside mlstore's retention, or the save that wrote it did not finish",
                url=self.url,
                operation="load",
            ) from exc
        if len(data) != chunk.size or content_hash(data) != chunk.digest:
            raise IntegrityError("a chunk's bytes do not match its name", url=url, operation="load")
        target[:] = data

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
