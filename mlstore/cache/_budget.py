"""The disk tier's fills, and the budget they keep: room is reserved before a byte is
written, not checked after the fill lands.

Checked after, the budget held only between fills: every filler on the node wrote its
blob first and evicted later, so 6 processes x 4 threads filling 1 MiB objects into a
4 MiB cache held up to 11 MiB. Now a filler reserves its blob's size in the index, in
one short transaction, before it writes:

- what is held is the indexed blobs (``meta.bytes``) plus every reservation. If the fill
  would take that past the budget, least recently used blobs are evicted first, their
  files deleted before the transaction ends, so no filler counts on room still taken.
  Blobs being filled are not in the index yet, so they are never chosen;
- if that is not enough (the rest is reserved by live fillers, or the object is larger
  than the whole budget), the fill is skipped: :class:`DiskNoRoomError`, counted as
  ``disk_skips``; the read returns its bytes uncached;
- a reservation is named by its filler's temp file, ``flock``-ed for the fill's life.
  One whose file is gone, or whose lock can be taken, belongs to a dead filler (in any
  PID namespace, killed by any signal) and is reclaimed when room runs short;
- the rename into ``blobs/``, the index rows and the release of the reservation are one
  transaction, so no filler ever sees a blob that is neither reserved nor indexed. A
  filler killed between its rename and its commit leaves a reservation whose temp file
  is gone and a blob the index does not know: reclaiming the one deletes the other.

So blobs plus fills in progress never hold more than the budget: the slack is zero.

Under ``disk_cap="all"`` the budget also holds the directory's other files: the SQLite
index with its WAL and shared memory, the node's metadata tier (``meta/``) and stats.
Their sizes, read when a fill reserves (a few ``stat`` calls), count as held, so a
growing index evicts blobs like a fill would. Not counted either way: a deleted blob a
reader still has open, and the file system's rounding of each file up to its blocks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING

from mlstore.cache._index import IndexCare, _ProcessIndex
from mlstore.cache._layout import _BLOB_NAME, _TEMP_NAME, _create_temp, _remove_if_unheld
from mlstore.cache._plans import victims as eviction_order
from mlstore.cache._sqlite import DiskUnavailableError

_HELD = """SELECT (SELECT value FROM meta WHERE name = 'bytes'),
                  (SELECT coalesce(sum(size), 0) FROM reservations)"""


class DiskNoRoomError(DiskUnavailableError):
    """No room within the disk tier's budget for a fill: the rest is reserved by live
    fillers, or the object is larger than the whole budget. The fill was skipped
    (counted as ``disk_skips``); the caller reads without caching."""


def delete_blobs(db: sqlite3.Connection, digests: list[str]) -> int:
    """Delete the index rows of ``digests`` and every entry pointing at them (inside a
    transaction); returns the bytes freed. The caller deletes the files."""
    freed = 0
    for digest in digests:
        row = db.execute("SELECT size FROM blobs WHERE hash = ?", (digest,)).fetchone()
        db.execute("DELETE FROM entries WHERE hash = ?", (digest,))
        if row is not None:
            db.execute("DELETE FROM blobs WHERE hash = ?", (digest,))
            freed += int(row[0])
    if freed:
        db.execute("UPDATE meta SET value = value - ? WHERE name = 'bytes'", (freed,))
    return freed


class FillCare(IndexCare):
    """Fills of the disk tier, within its budget, for
    :class:`~mlstore.cache.disk.DiskTier` (a mixin: it sets the attributes below)."""

    budget: int
    verify: bool
    clock: Callable[[], float]
    root: str
    _tmp: str
    #: Whether the budget also holds the index, metadata and stats files (``disk_cap``).
    caps_all: bool

    if TYPE_CHECKING:

        def blob_path(self, digest: str) -> str: ...

        def evict(self, to_bytes: int | None = None, keep: str | None = None) -> int: ...

        def _flush(self, index: _ProcessIndex, db: sqlite3.Connection | None = None) -> None: ...

    def _put(
        self, key: str, version: str | None, data: bytes, digest: str, checked: float | None
    ) -> bool:
        # Blob files appear only by rename, so one that exists is whole (a torn one,
        # after a power loss, fails its hash on read): it needs index rows, not room.
        if os.path.exists(self.blob_path(digest)):
            with self._transaction() as db:
                inserted, total = self._index_rows(db, key, version, len(data), digest, checked)
        else:
            inserted, total = self._fill(key, version, data, digest, checked)
        if total + self.overhead() > self.budget:  # a blob already there, or a smaller budget
            self.evict(keep=digest)
        return inserted

    def overhead(self) -> int:
        """The bytes the budget holds besides blobs and fills: under ``disk_cap="all"``,
        the files of the directory and of its ``meta/`` (the index, its WAL and shared
        memory, the metadata tier, the node's stats); else 0."""
        if not self.caps_all:
            return 0
        total = 0
        for directory in (self.root, os.path.join(self.root, "meta")):
            with contextlib.suppress(OSError), os.scandir(directory) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        if entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
        return total

    def _fill(
        self, key: str, version: str | None, data: bytes, digest: str, checked: float | None
    ) -> tuple[bool, int]:
        final = self.blob_path(digest)
        fd, tmp = _create_temp(self._tmp)  # locked until closed: the filler lives
        name = os.path.basename(tmp)
        reserved = renamed = False
        try:
            if not self._reserve(name, digest, len(data)):
                self.on_event("disk_skips", 1)
                raise DiskNoRoomError(
                    errno.ENOSPC,
                    f"no room for {len(data)} bytes within the disk budget ({self.budget} "
                    "bytes): the fill is skipped",
                )
            reserved = True
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if not self.verify:
                # Without a hash check on read, only fsync guards against a torn file
                # after a power loss. With it, a torn file is caught and refetched.
                os.fsync(fd)
            # Not makedirs: a cache directory removed meanwhile must not come back as
            # bare parents without its marker (the replace fails instead).
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.dirname(final), 0o700)
            with self._transaction() as db:
                os.replace(tmp, final)
                renamed = True
                indexed = self._index_rows(db, key, version, len(data), digest, checked)
                db.execute("DELETE FROM reservations WHERE temp = ?", (name,))
            return indexed
        except BaseException:
            # Unindexed, a renamed blob would only hold on to the space.
            with contextlib.suppress(OSError):
                os.unlink(final if renamed else tmp)
            if reserved:
                with contextlib.suppress(sqlite3.Error, OSError):
                    self._conn().execute("DELETE FROM reservations WHERE temp = ?", (name,))
            raise
        finally:
            os.close(fd)

    def _index_rows(
        self,
        db: sqlite3.Connection,
        key: str,
        version: str | None,
        size: int,
        digest: str,
        checked: float | None,
    ) -> tuple[bool, int]:
        """Index blob ``digest`` as the content of ``key`` (inside a transaction), its
        entry stamped ``checked`` (default: now); returns whether the blob is new to the
        index, and the indexed bytes."""
        now = self.clock()
        inserted = db.execute(
            "INSERT OR IGNORE INTO blobs VALUES (?, ?, ?)", (digest, size, now)
        ).rowcount
        if inserted:
            db.execute("UPDATE meta SET value = value + ? WHERE name = 'bytes'", (size,))
        else:
            db.execute("UPDATE blobs SET atime = ? WHERE hash = ?", (now, digest))
        db.execute(
            "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?)",
            (self.stored_key(key), version, digest, size, now if checked is None else checked),
        )
        total = int(db.execute("SELECT value FROM meta WHERE name = 'bytes'").fetchone()[0])
        return bool(inserted), total

    def _reserve(self, name: str, digest: str, size: int) -> bool:
        """Reserve ``size`` bytes for the fill whose temp file is ``name``, evicting
        least recently used blobs if need be; False if there is no room."""
        victims: list[str] = []
        with self._transaction() as db:
            indexed, reserved = (int(n) for n in db.execute(_HELD).fetchone())
            extra = self.overhead()
            budget = self._cap(indexed + reserved + size + extra)
            if indexed + reserved + size + extra > budget:
                if size + extra > budget:
                    return False
                reserved -= self._reclaim(db)
                if reserved + size + extra > budget:
                    return False  # evicting every blob would not make room
                self._flush(self._index.get(), db)  # this process's uses: the LRU order
                excess = indexed + reserved + size + extra - budget
                for victim, victim_size in eviction_order(db):
                    if excess <= 0:
                        break
                    victims.append(victim)
                    excess -= victim_size
                delete_blobs(db, victims)
                for victim in victims:  # before the commit: nobody counts on room still taken
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.blob_path(victim))
            db.execute("INSERT INTO reservations VALUES (?, ?, ?)", (name, digest, size))
        if victims:
            self.on_event("evictions", len(victims))
        return True

    def _cap(self, held: int) -> int:
        """The budget a reservation that would make the tier hold ``held`` bytes must fit
        in (called inside its transaction; a tenant's tier shares the node's here)."""
        return self.budget

    def _reclaim(self, db: sqlite3.Connection) -> int:
        """Drop the reservations of dead fillers (inside a transaction); returns the
        bytes they held. A filler killed after its rename left a blob no row knows:
        deleted too. Only names mlstore gives its files are ever touched."""
        freed = 0
        rows = db.execute("SELECT temp, hash, size FROM reservations").fetchall()
        for name, digest, size in rows:
            ours = _TEMP_NAME.fullmatch(name) and _BLOB_NAME.fullmatch(digest)
            if ours:
                path = os.path.join(self._tmp, name)
                if not _remove_if_unheld(path) and os.path.lexists(path):
                    continue  # its filler lives (in whatever PID namespace)
            db.execute("DELETE FROM reservations WHERE temp = ?", (name,))
            freed += int(size)
            if ours and not db.execute("SELECT 1 FROM blobs WHERE hash = ?", (digest,)).fetchone():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.blob_path(digest))
        return freed
