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

from mlstore.checkpoint._chunks import ChunkWriter, Progress
from mlstore.checkpoint._flush import uploader
from mlstore.checkpoint._format import Chunk, Layout, Manifest
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


class StagedChunks(ChunkWriter):
    """The chunks of one staged save, written to the node's disk.

    A :class:`~mlstore.checkpoint._chunks.ChunkWriter` whose new chunks go to the
    staging area (pieces hashed and written on a small pool, at most ``max_bytes`` in
    flight), so a
    :class:`~mlstore.checkpoint.CheckpointWriter` drives either; ``commit`` then writes
    the manifest and the journal and hands the save to the background uploader.

    Args:
        store: the Store whose cache holds the staging area and that uploads later.
        url: the checkpoint's manifest URL.
        layout: its chunk store.
        workers: parallel disk writes now, and parallel uploads later.
    """

    thread_name = "mlstore-ckpt-stage"

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
        self.url = url
        self.workers = workers  # parallel uploads, later
        self.staged: dict[str, int] = {}  # digest -> size, distinct chunks written
        root = staging_root(store, url=url, create=True)
        self.dir, self._lock = StagedDir.new(root)
        self._lock_owned: JournalLock | None = self._lock
        super().__init__(
            store, layout, (), workers=min(workers, 8), max_bytes=max_bytes, progress=progress
        )

    def _claim(self, digest: str, size: int) -> bool:
        fresh = digest not in self.staged
        self.staged[digest] = size
        return fresh

    def _keep(self, digest: str, piece: memoryview) -> None:
        write_durably(self.dir.chunk(digest), piece)

    def finish(self) -> dict[str, int]:
        """Wait for every disk write; the first failure is raised. Returns the stats
        (``uploaded`` stays 0: nothing has gone up yet)."""
        stats = super().finish()
        fsync_dir(self.dir.chunks)
        return stats

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
        self._stop()
        if self._lock_owned is not None:
            self.dir.remove(self._lock_owned)
            self._lock_owned = None
