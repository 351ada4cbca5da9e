"""The SQLite index of the disk tier: its schema, one connection per thread and process,
and what SQLite's errors mean (a full disk, a damaged file).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from mlstore._util.process import PerProcess
from mlstore._util.redact import redact_url
from mlstore._util.sqlite import wal_mode
from mlstore.cache._layout import MARKER, _create_temp, _private_file
from mlstore.cache._plans import SCHEMA as PLANS_SCHEMA
from mlstore.cache._sqlite import (  # noqa: F401 (DiskFullError, DiskUnavailableError: re-exported)
    _GUARD,
    DiskFullError,
    DiskUnavailableError,
    _Connection,
    _is_corrupt,
    _open,
    damaged,
    set_aside,
)
from mlstore.errors import ConfigError

log = logging.getLogger("mlstore.cache")

_KEY_BYTES = 32  # of index.key
#: ``meta`` row set once the index holds no key in clear (see ``_drop_clear_keys``).
_KEYS_SAFE = "keys_redacted"
_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY, version TEXT, hash TEXT NOT NULL, size INTEGER NOT NULL,
    checked REAL NOT NULL);
CREATE INDEX IF NOT EXISTS entries_hash ON entries(hash);
CREATE TABLE IF NOT EXISTS blobs (
    hash TEXT PRIMARY KEY, size INTEGER NOT NULL, atime REAL NOT NULL);
CREATE INDEX IF NOT EXISTS blobs_atime ON blobs(atime);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('bytes', 0);
CREATE TABLE IF NOT EXISTS proofs (
    key TEXT PRIMARY KEY, version TEXT NOT NULL, hash TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS proofs_at ON proofs(at);
CREATE TABLE IF NOT EXISTS reservations (
    temp TEXT PRIMARY KEY, hash TEXT NOT NULL, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS revalidations (key TEXT PRIMARY KEY, until REAL NOT NULL);
"""
    + PLANS_SCHEMA
)
#: Proofs kept (about 200 bytes each); the oldest go first.
_PROOFS = 65536


_SCHEMA_NAMES = frozenset(re.findall(r"IF NOT EXISTS (\w+)", _SCHEMA))


def _has_schema(db: sqlite3.Connection) -> bool:
    """Whether the index already has every table, index and row of :data:`_SCHEMA`,
    found by reads alone: a new connection (a new thread's) must not need the write
    lock, which another process may hold for a while."""
    names = {str(row[0]) for row in db.execute("SELECT name FROM sqlite_master")}
    if not names >= _SCHEMA_NAMES:
        return False
    return db.execute("SELECT 1 FROM meta WHERE name = 'bytes'").fetchone() is not None


def _alive(thread: threading.Thread | None) -> bool:
    return thread is not None and thread.is_alive()


class _ProcessIndex:
    """One process's side of the index: a SQLite connection per thread, every one listed
    so that :meth:`close` reaches them, and the access times waiting to be written.

    SQLite connections must not cross a fork (the child would share the parent's file
    locks and WAL state), so this lives in a :class:`PerProcess`: a forked child starts
    with no connection, no pending access times (its parent writes its own) and a lock
    no parent thread can be holding. The connections it inherited stay open, unused
    (see ``_GUARD``).
    """

    __slots__ = (
        "closed",
        "connections",
        "flusher",
        "flushing",
        "ino",
        "last_flush",
        "lock",
        "path",
        "threads",
        "touched",
        "wake",
        "wal_bytes",
    )

    def __init__(self, path: str, wal_bytes: int | None = None) -> None:
        self.path = path
        #: A bound on the WAL file's size (checkpointed and cut back to it), or None
        #: for SQLite's defaults (a checkpoint every 1000 pages, the file never cut).
        self.wal_bytes = wal_bytes
        #: The inode of the index file this process opened: a different one at the path
        #: means another process replaced a damaged or removed index (reconnect).
        self.ino: int | None = None
        self.threads = threading.local()  # .db: that thread's connection
        #: Every connection made, with the thread that made it: a thread that ended
        #: has its connection closed by the next thread to connect (a pool made per
        #: batch must not leave a connection and two descriptors per thread behind).
        self.connections: list[tuple[weakref.ref[threading.Thread], _Connection]] = []
        self.lock = threading.Lock()  # over ``connections`` and ``touched``
        self.touched: dict[str, float] = {}
        self.last_flush = time.monotonic()
        self.flushing = False  # a background flush of ``touched`` is under way
        #: The thread that writes ``touched`` when woken (started on the first flush,
        #: then kept: a hit never waits for a thread to start).
        self.flusher: threading.Thread | None = None
        self.wake = threading.Event()
        self.closed = False

    def connection(self) -> _Connection:
        """The calling thread's connection (made on its first use)."""
        db: _Connection | None = getattr(self.threads, "db", None)
        return db if db is not None else self._connect()

    def _connect(self) -> _Connection:
        # Made 0600 before SQLite sees it (the WAL and shared memory take its mode), and
        # given its tables by every connection: one made after the index was quarantined
        # or its directory recreated finds an empty file.
        _private_file(self.path)
        db = _open(self.path)
        try:
            wal_mode(db)
            db.execute("PRAGMA synchronous=NORMAL")
            if self.wal_bytes is not None:  # a budget that counts the index's files
                db.execute(f"PRAGMA journal_size_limit={int(self.wal_bytes)}")
                db.execute(f"PRAGMA wal_autocheckpoint={max(1, int(self.wal_bytes) // 4096)}")
            if not _has_schema(db):  # a write: only when something is missing
                db.executescript(_SCHEMA)
            if self.ino is None:
                self.ino = os.stat(self.path).st_ino
        except BaseException:
            db.close()
            raise
        self.threads.db = db
        with self.lock:
            ended = [made for owner, made in self.connections if not _alive(owner())]
            live = [(owner, made) for owner, made in self.connections if _alive(owner())]
            self.connections = [*live, (weakref.ref(threading.current_thread()), db)]
        for made in ended:
            with contextlib.suppress(sqlite3.Error):
                made.close()
        return db

    def close(self) -> None:
        self.closed = True
        self.wake.set()  # the flusher ends
        with self.lock:
            connections, self.connections = self.connections, []
        for _, db in connections:
            with contextlib.suppress(sqlite3.Error):
                db.close()


class IndexCare:
    """The index's care, for :class:`~mlstore.cache.disk.DiskTier`: this thread's
    connection and transactions, repair of a damaged or removed index, and the keyed
    digests that keep credentials out of stored keys. (A mixin: the attributes below are
    set by the disk tier.)"""

    root: str
    on_event: Callable[[str, int], None]
    _index: PerProcess[_ProcessIndex]
    _index_path: str
    _warned: set[str]
    _warn_lock: threading.Lock
    _repair_lock: threading.Lock
    _key: bytes

    if TYPE_CHECKING:

        def _prepare(self) -> None: ...

    # ------------------------------------------------------------------ repair

    def recover(self, exc: BaseException) -> None:
        """Count ``exc`` (a failure of the index or the directory), repair what caused
        it if it can be, and log it once per kind of trouble.

        The cache only holds copies, so repairing never tries to save its content: a
        damaged index is renamed aside (kept for a post-mortem) and a new, empty one
        started; a directory removed while in use (a tmp cleaner, a job epilogue) is
        recreated. Either way later reads cache again, and this one is a miss.
        """
        self.on_event("cache_errors", 1)
        try:
            with self._repair_lock:
                kind, message = self._repair(exc)
        except (OSError, sqlite3.Error, ConfigError) as failed:
            kind, message = "unrepaired", f"failed ({exc}) and cannot be repaired ({failed})"
        if not kind:
            return
        with self._warn_lock:
            if kind in self._warned:
                return
            self._warned.add(kind)
        log.warning(
            "the disk cache in %s %s; reads go on and return the right bytes, uncached "
            "where the disk tier cannot help (counted as cache_errors)",
            self.root,
            message,
        )

    def _repair(self, exc: BaseException) -> tuple[str, str]:
        """Repair the cause of ``exc``: ``(kind, message)`` for the log (empty if
        another process had already repaired it)."""
        if not os.path.isfile(os.path.join(self.root, MARKER)):
            self._index.reset()  # (its connections close once no thread uses them)
            self._prepare()
            return "removed", "was removed while in use and has been recreated, empty"
        ours = self._index.peek()
        try:
            ino: int | None = os.stat(self._index_path).st_ino
        except FileNotFoundError:
            ino = None
        if ours is None or (ours.ino is not None and ours.ino != ino):
            # Another thread or process replaced the index (or this process's connections
            # were just dropped): open the index that is there now.
            self._index.reset()
            return "", ""
        if _is_corrupt(exc):
            # Judged on a fresh connection: an error from a connection that predates a
            # repair must not send a sound new index aside.
            if not self._damaged():
                self._index.reset()
                return "", ""
            aside = self._quarantine()
            return "corrupt", f"had a damaged index, moved aside to {aside} (a new one is used)"
        if isinstance(exc, FileNotFoundError):
            self._prepare()  # a subdirectory removed: made again
            return "missing", f"lost some of its files ({exc}); they were recreated"
        return "failed", f"failed ({type(exc).__name__}: {exc})"

    def _damaged(self) -> bool:
        return damaged(self._index_path)

    def _quarantine(self) -> str:
        """Set the damaged index aside; the next connection creates a new one."""
        self._index.reset()
        return set_aside(self._index_path)

    # ------------------------------------------------------------------ keys

    def _digest_key(self) -> bytes:
        """The node's digest key from ``index.key``, made on first use. It is published
        by a hard link, which fails if another process published first: every process
        ends up with the same key, and none ever reads a half-written one."""
        path = os.path.join(self.root, "index.key")
        for _ in range(3):
            try:
                with open(path, "rb") as fh:
                    key = fh.read()
                if len(key) == _KEY_BYTES:
                    return key
                os.unlink(path)  # damaged: its digests will not be found again anyway
            except FileNotFoundError:
                pass
            fd, tmp = _create_temp(os.path.join(self.root, "tmp"))
            try:
                os.write(fd, os.urandom(_KEY_BYTES))
                os.fsync(fd)
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process won: read its key
            finally:
                os.unlink(tmp)
                os.close(fd)
        raise ConfigError(f"cannot create the cache's digest key {path!r}")

    def stored_key(self, key: str) -> str:
        """What the index stores for ``key``: ``key`` itself, or, if its URL carries a
        credential, the masked URL, the rest of the key, and a keyed digest of it all.

        A stored key of the second form ends in ``\\x00#<hex>``; a key of the first never
        does (block keys end in ``:<index>``), so the two forms cannot collide.
        """
        if "@" not in key and "?" not in key:
            return key  # no user info, no query: nothing to hide (the common case)
        url, sep, rest = key.partition("\x00")
        shown = redact_url(url)
        if shown == url:
            return key
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), key=self._key)
        return f"{shown}{sep}{rest}\x00#{digest.hexdigest()[:40]}"

    def _drop_clear_keys(self) -> None:
        """Once per index: delete the entries an older mlstore stored under keys with
        credentials in clear (their blobs stay, reachable by content or evicted in
        time). ``secure_delete`` overwrites the freed bytes, and the checkpoint empties
        the WAL, so the secrets leave the files too."""
        db = self._conn()
        if db.execute("SELECT 1 FROM meta WHERE name = ?", (_KEYS_SAFE,)).fetchone():
            return
        db.execute("PRAGMA secure_delete = ON")
        try:
            with self._transaction() as tx:
                rows = tx.execute(
                    "SELECT key FROM entries WHERE key LIKE '%@%' OR key LIKE '%?%'"
                ).fetchall()
                clear = [(k,) for (k,) in rows if self.stored_key(k) != k]
                tx.executemany("DELETE FROM entries WHERE key = ?", clear)
                tx.execute("INSERT OR IGNORE INTO meta VALUES (?, 1)", (_KEYS_SAFE,))
            if clear:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.execute("PRAGMA secure_delete = OFF")

    # ------------------------------------------------------------------ proofs

    def prove(self, key: str, version: str, digest: str) -> None:
        """Record that version ``version`` of ``key`` is the content ``digest``: this
        node wrote it (mlstore hashed the bytes it sent, and the store named the version
        it made of them)."""
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT OR REPLACE INTO proofs VALUES (?, ?, ?, ?)",
                    (self.stored_key(key), version, digest, time.time()),
                )
                db.execute(
                    "DELETE FROM proofs WHERE key IN (SELECT key FROM proofs ORDER BY at"
                    " DESC LIMIT -1 OFFSET ?)",
                    (_PROOFS,),
                )
        except (sqlite3.Error, OSError) as exc:
            self.recover(exc)

    def proven(self, key: str, version: str) -> str | None:
        """The content hash this node has proven for version ``version`` of ``key``:
        by writing that version, or by hashing its bytes when it fetched them. ``None``
        if neither happened: a hash the object's metadata names is only a claim."""
        stored = self.stored_key(key)
        try:
            row = (
                self._conn()
                .execute(
                    "SELECT hash FROM proofs WHERE key = ? AND version = ?"
                    " UNION ALL SELECT hash FROM entries WHERE key = ? AND version = ?",
                    (stored, version, stored, version),
                )
                .fetchone()
            )
        except (sqlite3.Error, OSError) as exc:
            self.recover(exc)
            return None
        return str(row[0]) if row is not None else None

    # ------------------------------------------------------------------ plumbing

    def _conn(self) -> _Connection:
        """This thread's connection (one per thread and process)."""
        return self._index.get().connection()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled
        back if the block or the commit raises, so the connection is never left inside
        a transaction), all in one section of the fork guard: a child is never forked
        with the transaction open."""
        with _GUARD.section():
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
