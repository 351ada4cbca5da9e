"""Write-back staging: a save that writes to the node's disk and uploads afterwards.

``CheckpointWriter(url, ..., staging="local")`` (and ``mlstore.torch.save(...,
staging="local")``) hand their chunks to :class:`StagedChunks` instead of uploading
them: each is hashed and written to the staging area at disk speed (fsync'd, renamed
into place), the manifest's bytes beside them, and last the journal (see
``_journal``). The save returns once the journal is on disk; the upload runs on this
process's background uploader (``_flush``), which commits exactly as a direct save
does: chunks, then the ref, then the manifest. Until then readers anywhere see the
previous checkpoint.

If the process dies before the upload finishes, the journal stays, its lock free, and
the next mlstore process on the node that saves with staging, or runs
:func:`mlstore.checkpoint.flush` / ``mlstore flush``, finishes it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from mlstore.checkpoint._chunks import Progress
from mlstore.checkpoint._flush import uploader
from mlstore.checkpoint._format import Chunk, Layout, Manifest, Part
from mlstore.checkpoint._journal import (
    Journal,
    JournalLock,
    StagedDir,
    fsync_dir,
    refuse_credentials,
    staging_root,
    write_durably,
)
from mlstore.errors import ConfigError
from mlstore.hashing import content_hash
from mlstore.store import Store

__all__ = ["STAGING_MODES", "StagedChunks", "check_staging"]

#: Where a save may stage: ``"local"``, the node's disk cache.
STAGING_MODES = ("local",)


def check_staging(staging: str | None, url: str) -> None:
    if staging is not None and staging not in STAGING_MODES:
        raise ConfigError(
            f"staging must be None or one of {', '.join(map(repr, STAGING_MODES))}, "
            f"not {staging!r}",
            url=url,
            operation="save",
        )


class StagedChunks:
    """The chunks of one staged save, written to the node's disk.

    The same ``add``/``finish``/``close`` as :class:`~mlstore.checkpoint._chunks.ChunkWriter`
    (pieces hashed and written on a small pool, at most ``max_bytes`` in flight), so a
    :class:`~mlstore.checkpoint.CheckpointWriter` drives either; ``commit`` then writes
    the manifest and the journal and hands the save to the background uploader.

    Args:
        store: the Store whose cache holds the staging area and that uploads later.
        url: the checkpoint's manifest URL.
        layout: its chunk store.
        workers: parallel disk writes now, and parallel uploads later.
    """

    def __init__(
        self,
        store: Store,
        url: str,
        layout: Layout,
        *,
        workers: int = 16,
        max_bytes: int = 512 * 1024 * 1024,
        progress: Progress | None = None,
    ) -> None:
        refuse_credentials(url)
        refuse_credentials(layout.root)
        self.store = store
        self.url = url
        self.layout = layout
        self.workers = workers
        self.max_bytes = max_bytes
        self.progress = progress
        root = staging_root(store, url=url, create=True)
        self.dir, self._lock = StagedDir.new(root)
        self._lock_owned: JournalLock | None = self._lock
        self._pool = ThreadPoolExecutor(min(workers, 8), thread_name_prefix="mlstore-ckpt-stage")
        self._room = threading.Condition()
        self._in_flight = 0
        self._futures: list[Future[None]] = []
        self.staged: dict[str, int] = {}  # digest -> size, distinct chunks written
        self.stats = {"bytes": 0, "uploaded": 0, "chunks": 0, "new_chunks": 0}
        self._announced = 0
        self._done = 0

    def add(self, pieces: Iterable[memoryview]) -> Part:
        """Stage a part given as its pieces, in order (complete once :meth:`finish`
        returns)."""
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
        part.chunks = slots  # type: ignore[assignment]  # filled by the writes
        return part

    def _put(self, piece: memoryview, slots: list[Chunk | None], index: int) -> None:
        n = len(piece)
        try:
            digest = content_hash(piece)
            slots[index] = Chunk(digest, n)
            with self._room:
                fresh = digest not in self.staged
                self.staged[digest] = n
                self.stats["chunks"] += 1
                self.stats["bytes"] += n
            if fresh:
                write_durably(self.dir.chunk(digest), piece)
        finally:
            with self._room:
                self._in_flight -= n
                self._done += n
                done, announced = self._done, self._announced
                self._room.notify_all()
            if self.progress is not None:
                self.progress(done, announced)

    def finish(self) -> dict[str, int]:
        """Wait for every disk write; the first failure is raised. Returns the stats
        (``uploaded`` stays 0: nothing has gone up yet)."""
        try:
            for future in self._futures:
                future.result()
        finally:
            self._pool.shutdown(wait=True)
        fsync_dir(self.dir.chunks)
        return dict(self.stats)

    def commit(self, manifest: Manifest) -> None:
        """Write the manifest, then the journal (the save now exists on the node), and
        hand the upload to this process's uploader."""
        lock = self._lock_owned
        if lock is None:
            raise ConfigError("this staged save was committed already", url=self.url)
        write_durably(self.dir.manifest, manifest.dumps(self.url))
        journal = Journal(
            id=self.dir.id,
            url=self.url,
            chunks_root=self.layout.root,
            chunks=[Chunk(d, n) for d, n in self.staged.items()],
            created=manifest.created,
        )
        self.dir.write_journal(journal)
        fsync_dir(self.dir.root)
        self._lock_owned = None
        uploader().submit(self.store, self.dir, lock, url=self.url, workers=self.workers)

    def close(self) -> None:
        """End the save; one that was not committed is deleted from the disk."""
        for future in self._futures:
            future.cancel()
        self._pool.shutdown(wait=True)
        if self._lock_owned is not None:
            self.dir.remove(self._lock_owned)
            self._lock_owned = None
