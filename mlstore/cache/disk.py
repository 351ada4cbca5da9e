"""The node-wide disk tier: content-addressed blobs plus a small SQLite index.

Layout of ``CacheConfig.disk_dir``::

    .mlstore-cache   the marker: written first, it says mlstore made (or adopted) this
                     directory, so the files below are its own to delete
    index.sqlite     entries (key -> version, hash, size, checked) and blobs (hash -> size, atime)
    index.key        random bytes that key the digests of credential-bearing keys (below)
    blobs/ab/<hash>  one file per distinct content, named by its xxh3-128 (so stored once)
    tmp/             fills in progress, named <pid>-<random>.mlstore-tmp and flock-ed by
                     their filler for the fill's life; one nobody holds is removed
    locks/           lock stripes for single-flight (see flight.py)

Why not diskcache's value store: its ``get`` runs a SQLite write per hit under an LRU
policy and reads values through its own layer; measured on a 2-core machine that is
3-9k gets/s for 256 KiB values against ~26k/s for a plain file read. Here a hit is one
indexed SELECT, one file read and one xxh3 pass; access times are batched in memory and
written every couple of seconds, which keeps eviction least-recently-used without a
write per hit. Nothing is ever pickled: blobs are raw bytes, index rows are text and
numbers.

Invariants kept here:

- fills are atomic: a temp file in ``tmp/`` (same file system), then ``rename`` into
  ``blobs/``, then the index row. A killed filler leaves at most a temp file (removed at
  the next start) or an unindexed blob, never an entry that can be served;
- every blob is checked against its name when read (``verify="always"``): a mismatch
  deletes it and reports a miss, so corrupt bytes are never returned;
- blobs plus fills in progress never hold more than ``disk_bytes``: a filler reserves
  its blob's size node-wide before writing it, evicting least recently used blobs to
  make room, and skips the disk if there is none (``_budget.py``);
- the directory is created 0700 and refused if another user owns it or others can write
  to it; one of the user's own that others may only read or enter (0755, as ``mkdir``
  makes it) is tightened to 0700. Every file in it is 0600, the index and its WAL
  included (SQLite gives those the index file's mode, so the index is created 0600);
- no credential is written to the index. A key whose URL carries user info or a
  credential query value (``https://user:pw@host/x?sig=...``) is stored as the URL with
  those masked plus a keyed BLAKE2b digest of the whole key: still readable, still
  distinct for URLs that differ only in their signature, and of no use for guessing the
  password (the digest key lives in ``index.key``, so a copy of the index attached to a
  bug report gives nothing to test guesses against). The node's cache outlives the job;
  the credentials it was given should not;
- mlstore deletes only what it provably made: it refuses a non-empty directory without
  its marker (``/scratch/$USER`` named by mistake), a symlinked directory or
  subdirectory, and removes in ``tmp/`` and ``blobs/`` only regular files named as it
  names them. A filler is known to be gone when its temp file's ``flock`` can be taken,
  which holds across PID namespaces (containers sharing the directory), where a pid
  means nothing;
- trouble with the directory (a damaged index, a full disk, the directory removed while
  in use) is a miss, never a failed read: it is counted as ``cache_errors``, logged once,
  and repaired (a damaged index is renamed aside, a removed directory recreated).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mlstore._util.process import PerProcess
from mlstore.cache._budget import DiskNoRoomError, FillCare, delete_blobs
from mlstore.cache._index import _ProcessIndex
from mlstore.cache._layout import (
    _BLOB_NAME,
    _TEMP_NAME,
    _create_temp,  # noqa: F401 (tests play fillers with it)
    _pid_alive,
    _private_file,
    _private_subdir,
    _read_whole,
    _remove_if_unheld,
    check_private_dir,
    claim_cache_dir,
)
from mlstore.cache._plans import PlanCare
from mlstore.cache._plans import victims as eviction_order
from mlstore.cache._sqlite import DiskFullError, DiskUnavailableError, _is_corrupt, _is_full
from mlstore.hashing import content_hash

__all__ = [
    "DiskEntry",
    "DiskFullError",
    "DiskNoRoomError",
    "DiskTier",
    "DiskUnavailableError",
    "check_private_dir",
    "claim_cache_dir",
]

_TOUCH_EVERY = 2.0  # seconds between flushes of batched access times

log = logging.getLogger("mlstore.cache")


@dataclass(frozen=True)
class DiskEntry:
    """What the index knows of one cached key."""

    key: str
    version: str | None
    hash: str
    size: int
    checked: float


class DiskTier(FillCare, PlanCare):
    """Content-addressed blobs shared by every process on the node.

    Args:
        root: the cache directory.
        budget: byte budget of the blobs (and fills in progress).
        caps_all: the budget also holds the index, metadata and stats (``disk_cap="all"``).
        verify: re-hash blobs when read (``True``) or trust them (``False``).
        clock: wall-clock seconds for ``checked`` times (shared across processes).
        on_event: ``on_event(name, amount)`` for metrics (evictions, integrity failures).
    """

    def __init__(
        self,
        root: str,
        budget: int,
        *,
        verify: bool = True,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str, int], None] = lambda name, amount: None,
        caps_all: bool = False,
    ) -> None:
        self.root = root
        self.budget = budget
        self.caps_all = caps_all
        self.verify = verify
        self.clock = clock
        self.on_event = on_event
        self._blobs = os.path.join(root, "blobs")
        self._tmp = os.path.join(root, "tmp")
        self._index_path = os.path.join(root, "index.sqlite")
        wal = min(max(budget // 16, 64 << 10), 4 << 20) if caps_all else None  # counted: kept small
        self._index = PerProcess(functools.partial(_ProcessIndex, self._index_path, wal))
        self._warned: set[str] = set()
        self._warn_lock = threading.Lock()
        self._repair_lock = threading.Lock()  # one thread repairs; the rest see its work
        self._key = b""
        self._prepare()
        try:
            self._conn()
        except sqlite3.DatabaseError as exc:
            if not _is_corrupt(exc):
                raise
            self.recover(exc)  # a damaged index: set aside, and a new one started
            self._conn()
        self._drop_clear_keys()
        self.clean_orphans()
        from mlstore.cache.scrub import adopt  # (it imports this module)

        try:  # the blobs of an index lost before this start, if any
            adopt(self)
        except (sqlite3.Error, OSError) as exc:
            self.recover(exc)

    def _prepare(self) -> None:
        """Make (or check) the directory, its marker and subdirectories, the digest key,
        and the modes of the index files."""
        claim_cache_dir(self.root)
        for sub in ("blobs", "tmp", "locks"):
            _private_subdir(os.path.join(self.root, sub))
        self._key = self._digest_key()
        # SQLite creates the WAL and shared-memory files with the index file's mode.
        index = self._index_path
        for path in (index, index + "-wal", index + "-shm"):
            if path == index or os.path.exists(path):
                _private_file(path)

    def close(self) -> None:
        """Write pending access times and close this process's index connections (in a
        forked child, never the parent's: those are not this process's to close)."""
        index = self._index.peek()
        if index is not None:
            with contextlib.suppress(sqlite3.Error, OSError):  # access times: not vital
                self._flush(index)
        index = self._index.reset()
        if index is not None:
            index.close()

    def blob_path(self, digest: str) -> str:
        return f"{self._blobs}/{digest[:2]}/{digest}"

    # ------------------------------------------------------------------ reading

    def lookup(self, key: str) -> DiskEntry | None:
        """The index entry of ``key``, if any (none if the index fails: repaired, counted)."""
        try:
            row = self._conn().one(
                "SELECT version, hash, size, checked FROM entries WHERE key = ?",
                (self.stored_key(key),),
            )
        except (sqlite3.Error, OSError) as exc:
            self.recover(exc)
            return None
        if row is None:
            return None
        return DiskEntry(key, row[0], row[1], int(row[2]), float(row[3]))

    def read_blob(self, digest: str, size: int) -> bytes | None:
        """The bytes of blob ``digest``, or ``None`` if it is gone or corrupt (a corrupt
        blob is deleted and counted)."""
        try:
            fd = os.open(self.blob_path(digest), os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.recover(exc)
            return None
        try:
            data = _read_whole(fd, size)
        except OSError as exc:
            self.recover(exc)
            return None
        finally:
            os.close(fd)
        if len(data) != size or (self.verify and content_hash(data) != digest):
            self.on_event("integrity_failures", 1)
            self.drop_blob(digest)
            return None
        self.touch_blob(digest)
        return data

    def blob_size(self, digest: str) -> int | None:
        """The size of blob ``digest`` if the index has it."""
        try:
            db = self._conn()
            row = db.execute("SELECT size FROM blobs WHERE hash = ?", (digest,)).fetchone()
        except (sqlite3.Error, OSError) as exc:
            self.recover(exc)
            return None
        return None if row is None else int(row[0])

    def touch_blob(self, digest: str) -> None:
        """Record a use of blob ``digest``. Uses are written to the index in batches,
        every few seconds, by a background thread: a hit never waits for the index's
        write lock, which fillers and other processes' batches take."""
        now = self.clock()
        index = self._index.get()
        with index.lock:
            index.touched[digest] = now
            due = not index.flushing and time.monotonic() - index.last_flush > _TOUCH_EVERY
            if due:
                index.flushing = True
        if not due:
            return
        if index.flusher is None:
            index.flusher = threading.Thread(
                target=self._flush_in_background, args=(index,), name="mlstore-atime", daemon=True
            )
            index.flusher.start()
        index.wake.set()

    def _flush_in_background(self, index: _ProcessIndex) -> None:
        """The flusher's loop: one batch each time a hit wakes it, until the index of
        this process is closed."""
        while True:
            index.wake.wait()
            index.wake.clear()
            if index.closed:
                return
            try:
                self._flush(index)
            except (sqlite3.Error, OSError) as exc:
                self.recover(exc)
            finally:
                index.flushing = False

    def flush_access_times(self) -> None:
        """Write the batched access times now (before eviction, and at close)."""
        self._flush(self._index.get())

    def _flush(self, index: _ProcessIndex, db: sqlite3.Connection | None = None) -> None:
        """Write ``index``'s batched access times in one transaction (one per touched
        blob would queue every batch of every process on the write lock many times), or
        in the caller's transaction ``db``."""
        with index.lock:
            touched, index.touched = index.touched, {}
            index.last_flush = time.monotonic()
        rows = [(t, h) for h, t in touched.items()]
        if not rows:
            return
        update = "UPDATE blobs SET atime = max(atime, ?) WHERE hash = ?"
        if db is not None:
            db.executemany(update, rows)
        elif index is self._index.peek():  # not closed meanwhile (a background flush)
            with self._transaction() as tx:
                tx.executemany(update, rows)

    # ------------------------------------------------------------------ writing

    def put(
        self,
        key: str,
        version: str | None,
        data: bytes,
        digest: str | None = None,
        *,
        checked: float | None = None,
    ) -> bool:
        """Store ``data`` as the content of ``key``; returns True if the blob was new
        (False: identical content was already cached, so only the index grew).

        Room for the blob is reserved before it is written (see ``_budget.py``), so the
        blobs and the fills in progress never hold more than the budget. The entry is
        stamped ``checked`` (default: now): the time its version was last known current.

        Raises:
            DiskFullError: the file system is full; nothing was stored.
            DiskNoRoomError: no room within the budget (the rest is being filled by live
                fillers, or ``data`` is larger than the budget); nothing was stored.
            DiskUnavailableError: the directory or its index failed (counted, logged,
                repaired for later reads); nothing was stored.
        """
        digest = digest or content_hash(data)
        try:
            return self._put(key, version, data, digest, checked)
        except (DiskFullError, DiskUnavailableError):
            raise
        except (sqlite3.Error, OSError) as exc:
            if _is_full(exc):
                raise DiskFullError(errno.ENOSPC, "the cache file system is full") from None
            self.recover(exc)
            raise DiskUnavailableError(errno.EIO, f"the disk tier failed: {exc}") from None

    def touch_entry(self, key: str) -> None:
        """Record that ``key`` was just validated against the store."""
        try:
            self._conn().execute(
                "UPDATE entries SET checked = ? WHERE key = ?",
                (self.clock(), self.stored_key(key)),
            )
        except (sqlite3.Error, OSError) as exc:
            self.recover(exc)

    def claim(self, key: str, seen: float, until: float) -> bool:
        """Take the node's revalidation of ``key`` until ``until`` (or until
        :meth:`release`): True for exactly one process while the entry still carries the
        stamp ``seen`` and no one else holds an unexpired claim. A claim whose holder
        died lapses at ``until``; an entry restamped since ``seen`` needs no claim."""
        stored = self.stored_key(key)
        try:
            with self._transaction() as db:
                fresher = db.execute(
                    "SELECT 1 FROM entries WHERE key = ? AND checked > ?", (stored, seen)
                ).fetchone()
                if fresher is not None:
                    return False
                taken = db.execute(
                    "INSERT INTO revalidations VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
                    "SET until = excluded.until WHERE revalidations.until < ?",
                    (stored, until, self.clock()),
                )
                return taken.rowcount == 1
        except (sqlite3.Error, OSError) as exc:
            self.recover(exc)
            return False

    def release(self, key: str) -> None:
        """Give up the claim :meth:`claim` took on ``key``."""
        try:
            self._conn().execute("DELETE FROM revalidations WHERE key = ?", (self.stored_key(key),))
        except (sqlite3.Error, OSError) as exc:
            self.recover(exc)

    def forget(self, key: str) -> None:
        """Drop the index entry of ``key`` (its blob stays while others use it)."""
        try:
            self._conn().execute("DELETE FROM entries WHERE key = ?", (self.stored_key(key),))
        except (sqlite3.Error, OSError) as exc:
            self.recover(exc)

    def drop_blob(self, digest: str) -> None:
        """Delete blob ``digest`` and every entry that points at it."""
        try:
            with self._transaction() as db:
                delete_blobs(db, [digest])
                # Before the commit, as every deletion: a filler reserving the room
                # freed here must not find the file still taking it.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.blob_path(digest))
        except (sqlite3.Error, OSError) as exc:
            self.recover(exc)

    # ------------------------------------------------------------------ budget

    def size(self) -> int:
        """Bytes of blobs in the index."""
        db = self._conn()
        return int(db.execute("SELECT value FROM meta WHERE name = 'bytes'").fetchone()[0])

    def count(self) -> int:
        db = self._conn()
        return int(db.execute("SELECT count(*) FROM blobs").fetchone()[0])

    def evict(self, to_bytes: int | None = None, keep: str | None = None) -> int:
        """Delete blobs in eviction order (least recently used, or by the plans of
        readers that know their order: :mod:`._plans`) until at most ``to_bytes``
        (default: the budget) remain, the :meth:`overhead` included; ``keep`` is never
        evicted. Returns the bytes freed."""
        limit = (self.budget if to_bytes is None else to_bytes) - self.overhead()
        if self.size() <= limit:
            return 0
        self.flush_access_times()
        victims: list[str] = []
        with self._transaction() as db:
            total = int(db.execute("SELECT value FROM meta WHERE name = 'bytes'").fetchone()[0])
            excess = total - limit
            if excess > 0:
                for digest, size in eviction_order(db, keep or ""):
                    victims.append(digest)
                    excess -= size
                    if excess <= 0:
                        break
            freed = delete_blobs(db, victims)
            for digest in victims:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.blob_path(digest))
        if victims:
            self.on_event("evictions", len(victims))
        return freed

    def clear(self) -> None:
        """Delete every entry and blob."""
        self.evict(to_bytes=0)
        db = self._conn()
        db.execute("DELETE FROM entries")
        db.execute("DELETE FROM revalidations")

    def clean_orphans(self) -> int:
        """Remove temp files whose filler is gone. Returns how many.

        A filler holds its temp file's ``flock`` for the fill's life and the kernel
        drops it when the filler dies, even by SIGKILL: a file whose lock can be taken
        has no filler, whatever PID namespace it ran in (containers sharing the
        directory see each other's pids as unrelated or absent). The pid in the name
        only ever keeps a file: an older mlstore's filler took no lock. Only regular
        files named as mlstore names its temp files are considered.
        """
        removed = 0
        with os.scandir(self._tmp) as entries:
            for entry in entries:
                named = _TEMP_NAME.fullmatch(entry.name)
                if named is None or not entry.is_file(follow_symlinks=False):
                    continue
                if _pid_alive(int(named.group(1))):
                    continue
                if _remove_if_unheld(entry.path):
                    removed += 1
        return removed

    def blob_files(self) -> Iterator[os.DirEntry[str]]:
        """Every file in ``blobs/`` named as a blob, in its fan, indexed or not (other
        files and directories are never looked into)."""
        with contextlib.suppress(FileNotFoundError), os.scandir(self._blobs) as fans:
            for fan in fans:
                if len(fan.name) != 2 or not fan.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(fan.path) as names:
                    for entry in names:
                        if (
                            entry.name.startswith(fan.name)
                            and _BLOB_NAME.fullmatch(entry.name)
                            and entry.is_file(follow_symlinks=False)
                        ):
                            yield entry

    def verify_all(self) -> tuple[int, int]:
        """Re-hash every blob; drop the bad ones, and blob files the index does not know
        (a filler killed between its rename and its index row). Returns
        (checked, dropped)."""
        db = self._conn()
        rows = db.execute("SELECT hash, size FROM blobs").fetchall()
        known = {digest for digest, _ in rows}
        for entry in self.blob_files():
            if entry.name not in known:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        dropped = 0
        for digest, size in rows:
            try:
                with open(self.blob_path(digest), "rb", buffering=0) as fh:
                    data = fh.read()
            except FileNotFoundError:
                data = None
            if data is None or len(data) != size or content_hash(data) != digest:
                self.on_event("integrity_failures", 1)
                self.drop_blob(digest)
                dropped += 1
        return len(rows), dropped
