"""The node-wide disk tier: content-addressed blobs plus a small SQLite index.

Layout of ``CacheConfig.disk_dir``::

    index.sqlite     entries (key -> version, hash, size, checked) and blobs (hash -> size, atime)
    index.key        random bytes that key the digests of credential-bearing keys (below)
    blobs/ab/<hash>  one file per distinct content, named by its xxh3-128 (so stored once)
    tmp/             fills in progress, named <pid>-<random>; a dead filler's are removed
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
- the total stays within ``disk_bytes`` but for the object being filled: eviction runs
  after each fill, least recently used first;
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
  the credentials it was given should not.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mlstore._util.process import PerProcess
from mlstore._util.redact import redact_url
from mlstore.errors import ConfigError
from mlstore.hashing import content_hash

__all__ = ["DiskEntry", "DiskFullError", "DiskTier", "check_private_dir"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY, version TEXT, hash TEXT NOT NULL, size INTEGER NOT NULL,
    checked REAL NOT NULL);
CREATE INDEX IF NOT EXISTS entries_hash ON entries(hash);
CREATE TABLE IF NOT EXISTS blobs (
    hash TEXT PRIMARY KEY, size INTEGER NOT NULL, atime REAL NOT NULL);
CREATE INDEX IF NOT EXISTS blobs_atime ON blobs(atime);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('bytes', 0);
"""
_TOUCH_EVERY = 2.0  # seconds between flushes of batched access times
_KEY_BYTES = 32  # of index.key
#: ``meta`` row set once the index holds no key in clear (see ``_drop_clear_keys``).
_KEYS_SAFE = "keys_redacted"

log = logging.getLogger("mlstore.cache")
#: Largest blob read with a single ``read()``. Linux returns at most 0x7ffff000 bytes
#: from one call (and macOS refuses more than 2 GiB), so a larger blob takes several.
_ONE_READ = 1 << 30


def _read_whole(fd: int, size: int) -> bytes:
    """The contents of ``fd`` from its start, expected to be ``size`` bytes.

    A blob that fits is one ``read`` of ``size + 1`` bytes (the extra byte shows a file
    that grew), the hot path. A larger one is read to its end in as many calls as it
    takes: a single call would stop at the kernel's cap, the blob would look truncated
    and be dropped and fetched again on every read. ``FileIO.readall`` sizes one buffer
    from the file's length and loops, so the bytes are not copied a second time.
    """
    if size < _ONE_READ:
        return os.read(fd, size + 1)
    with io.FileIO(fd, "r", closefd=False) as fh:
        return fh.readall()


class DiskFullError(OSError):
    """The cache's file system is full; the caller reads without caching."""


@dataclass(frozen=True)
class DiskEntry:
    """What the index knows of one cached key."""

    key: str
    version: str | None
    hash: str
    size: int
    checked: float


def check_private_dir(path: str) -> None:
    """Create ``path`` 0700 if missing; refuse one that another user owns or that
    others may write to (a shared cache dir would let them plant data)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the cache directory {path!r} ({exc.strerror}); set "
            "CacheConfig(disk_dir=...) or MLSTORE_CACHE_DIR to a writable place"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"the cache directory {path!r} is not a directory")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise ConfigError(
            f"the cache directory {path!r} belongs to another user (uid {st.st_uid}); "
            "mlstore refuses to read a cache others control. Use a directory of your own "
            "(CacheConfig(disk_dir=...) or MLSTORE_CACHE_DIR)"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"the cache directory {path!r} is writable by other users (mode "
            f"{stat.S_IMODE(st.st_mode):o}); run 'chmod 700 {path}' or choose another "
            "directory"
        )
    if st.st_mode & 0o077:
        # Others may read it but never could write to it: nothing can have been planted,
        # so tightening it is safe, and refusing would only break every existing setup
        # whose directory came from a plain mkdir.
        _make_private(path, st, 0o700)
        log.info(
            "made the cache directory %s private (mode %o -> 700)", path, stat.S_IMODE(st.st_mode)
        )


def _make_private(path: str, st: os.stat_result, mode: int) -> None:
    """``chmod`` ``path`` (of stat ``st``) to ``mode`` if others have any access to it."""
    if not st.st_mode & 0o077:
        return
    try:
        os.chmod(path, mode)
    except OSError as exc:
        raise ConfigError(
            f"{path!r} in the cache directory is open to other users (mode "
            f"{stat.S_IMODE(st.st_mode):o}) and cannot be made private ({exc.strerror}); "
            f"run 'chmod -R go= {path}' or choose another directory"
        ) from None


def _private_file(path: str) -> None:
    """Create ``path`` 0600 if missing, or make an existing one 0600 (a cache written by
    an older mlstore, or under a lax umask, may have left it readable)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class _ProcessIndex:
    """One process's side of the index: a SQLite connection per thread, every one listed
    so that :meth:`close` reaches them, and the access times waiting to be written.

    SQLite connections must not cross a fork (the child would share the parent's file
    locks and WAL state), so this lives in a :class:`PerProcess`: a forked child starts
    with no connection, no pending access times (its parent writes its own) and a lock
    no parent thread can be holding.
    """

    __slots__ = ("connections", "last_flush", "lock", "path", "threads", "touched")

    def __init__(self, path: str) -> None:
        self.path = path
        self.threads = threading.local()  # .db: that thread's connection
        self.connections: list[sqlite3.Connection] = []
        self.lock = threading.Lock()  # over ``connections`` and ``touched``
        self.touched: dict[str, float] = {}
        self.last_flush = time.monotonic()

    def connection(self) -> sqlite3.Connection:
        """The calling thread's connection (made on its first use)."""
        db: sqlite3.Connection | None = getattr(self.threads, "db", None)
        return db if db is not None else self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path,
            timeout=60,
            isolation_level=None,  # explicit transactions only
            check_same_thread=False,
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        self.threads.db = db
        with self.lock:
            self.connections.append(db)
        return db

    def close(self) -> None:
        with self.lock:
            connections, self.connections = self.connections, []
        for db in connections:
            with contextlib.suppress(sqlite3.Error):
                db.close()


class DiskTier:
    """Content-addressed blobs shared by every process on the node.

    Args:
        root: the cache directory.
        budget: byte budget of the blobs.
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
    ) -> None:
        check_private_dir(root)
        self.root = root
        self.budget = budget
        self.verify = verify
        self.clock = clock
        self.on_event = on_event
        for sub in ("blobs", "tmp", "locks"):
            sub_path = os.path.join(root, sub)
            os.makedirs(sub_path, mode=0o700, exist_ok=True)
            _make_private(sub_path, os.stat(sub_path), 0o700)
        self._blobs = os.path.join(root, "blobs")
        self._key = self._digest_key()
        index = os.path.join(root, "index.sqlite")
        # SQLite creates the WAL and shared-memory files with the index file's mode.
        for path in (index, index + "-wal", index + "-shm"):
            if path == index or os.path.exists(path):
                _private_file(path)
        self._index = PerProcess(functools.partial(_ProcessIndex, index))
        db = self._conn()
        db.executescript(_SCHEMA)
        self._drop_clear_keys()
        self.clean_orphans()

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
            tmp = os.path.join(self.root, "tmp", f"{os.getpid()}-{os.urandom(6).hex()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, os.urandom(_KEY_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process won: read its key
            finally:
                os.unlink(tmp)
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

    # ------------------------------------------------------------------ plumbing

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (one per thread and process)."""
        return self._index.get().connection()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled
        back if the block raises)."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        """Write pending access times and close this process's index connections (in a
        forked child, never the parent's: those are not this process's to close)."""
        index = self._index.reset()
        if index is not None:
            self._flush(index)
            index.close()

    def blob_path(self, digest: str) -> str:
        return f"{self._blobs}/{digest[:2]}/{digest}"

    # ------------------------------------------------------------------ reading

    def lookup(self, key: str) -> DiskEntry | None:
        """The index entry of ``key``, if any."""
        row = (
            self._conn()
            .execute(
                "SELECT version, hash, size, checked FROM entries WHERE key = ?",
                (self.stored_key(key),),
            )
            .fetchone()
        )
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
        try:
            data = _read_whole(fd, size)
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
        db = self._conn()
        row = db.execute("SELECT size FROM blobs WHERE hash = ?", (digest,)).fetchone()
        return None if row is None else int(row[0])

    def touch_blob(self, digest: str) -> None:
        """Record a use of blob ``digest`` (written to the index in batches)."""
        now = self.clock()
        index = self._index.get()
        with index.lock:
            index.touched[digest] = now
            due = time.monotonic() - index.last_flush > _TOUCH_EVERY
        if due:
            self._flush(index)

    def flush_access_times(self) -> None:
        """Write the batched access times (called every few seconds and before eviction)."""
        self._flush(self._index.get())

    @staticmethod
    def _flush(index: _ProcessIndex) -> None:
        with index.lock:
            touched, index.touched = index.touched, {}
            index.last_flush = time.monotonic()
        if touched:
            index.connection().executemany(
                "UPDATE blobs SET atime = max(atime, ?) WHERE hash = ?",
                [(t, h) for h, t in touched.items()],
            )

    # ------------------------------------------------------------------ writing

    def put(self, key: str, version: str | None, data: bytes, digest: str | None = None) -> bool:
        """Store ``data`` as the content of ``key``; returns True if the blob was new
        (False: identical content was already cached, so only the index grew).

        Raises:
            DiskFullError: the file system is full; nothing was stored.
        """
        digest = digest or content_hash(data)
        # Blob files appear only by rename, so one that exists is whole (a torn one,
        # after a power loss, fails its hash on read): no index query needed to know.
        if not os.path.exists(self.blob_path(digest)):
            self._write_blob(digest, data)
        now = self.clock()
        with self._transaction() as db:
            inserted = db.execute(
                "INSERT OR IGNORE INTO blobs VALUES (?, ?, ?)", (digest, len(data), now)
            ).rowcount
            if inserted:
                db.execute("UPDATE meta SET value = value + ? WHERE name = 'bytes'", (len(data),))
            else:
                db.execute("UPDATE blobs SET atime = ? WHERE hash = ?", (now, digest))
            db.execute(
                "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?)",
                (self.stored_key(key), version, digest, len(data), now),
            )
            total = int(db.execute("SELECT value FROM meta WHERE name = 'bytes'").fetchone()[0])
        if total > self.budget:
            self.evict(keep=digest)
        return bool(inserted)

    def _write_blob(self, digest: str, data: bytes) -> None:
        tmp = os.path.join(self.root, "tmp", f"{os.getpid()}-{os.urandom(6).hex()}")
        final = self.blob_path(digest)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if not self.verify:
                    # Without a hash check on read, only fsync guards against a torn
                    # file after a power loss. With it, a torn file is caught and refetched.
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.makedirs(os.path.dirname(final), mode=0o700, exist_ok=True)
            os.replace(tmp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(exc.errno, "the cache file system is full") from None
            raise

    def touch_entry(self, key: str) -> None:
        """Record that ``key`` was just validated against the store."""
        db = self._conn()
        db.execute(
            "UPDATE entries SET checked = ? WHERE key = ?", (self.clock(), self.stored_key(key))
        )

    def forget(self, key: str) -> None:
        """Drop the index entry of ``key`` (its blob stays while others use it)."""
        db = self._conn()
        db.execute("DELETE FROM entries WHERE key = ?", (self.stored_key(key),))

    def drop_blob(self, digest: str) -> None:
        """Delete blob ``digest`` and every entry that points at it."""
        with self._transaction() as db:
            self._delete_blobs(db, [digest])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.blob_path(digest))

    @staticmethod
    def _delete_blobs(db: sqlite3.Connection, digests: list[str]) -> int:
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

    # ------------------------------------------------------------------ budget

    def size(self) -> int:
        """Bytes of blobs in the index."""
        db = self._conn()
        return int(db.execute("SELECT value FROM meta WHERE name = 'bytes'").fetchone()[0])

    def count(self) -> int:
        db = self._conn()
        return int(db.execute("SELECT count(*) FROM blobs").fetchone()[0])

    def evict(self, to_bytes: int | None = None, keep: str | None = None) -> int:
        """Delete least-recently-used blobs until at most ``to_bytes`` (default: the
        budget) remain; ``keep`` is never evicted. Returns the bytes freed."""
        limit = self.budget if to_bytes is None else to_bytes
        if self.size() <= limit:
            return 0
        self.flush_access_times()
        victims: list[str] = []
        with self._transaction() as db:
            total = int(db.execute("SELECT value FROM meta WHERE name = 'bytes'").fetchone()[0])
            excess = total - limit
            if excess > 0:
                for digest, size in db.execute(
                    "SELECT hash, size FROM blobs WHERE hash != ? ORDER BY atime",
                    (keep or "",),
                ):
                    victims.append(digest)
                    excess -= int(size)
                    if excess <= 0:
                        break
            freed = self._delete_blobs(db, victims)
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

    def clean_orphans(self) -> int:
        """Remove temp files whose filler process is gone. Returns how many."""
        removed = 0
        tmp = os.path.join(self.root, "tmp")
        for name in os.listdir(tmp):
            pid_text = name.split("-", 1)[0]
            alive = False
            if pid_text.isdigit():
                try:
                    os.kill(int(pid_text), 0)
                    alive = True
                except ProcessLookupError:
                    alive = False
                except PermissionError:
                    alive = True
            if not alive:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(tmp, name))
                    removed += 1
        return removed

    def verify_all(self) -> tuple[int, int]:
        """Re-hash every blob; drop the bad ones, and blob files the index does not know
        (a filler killed between its rename and its index row). Returns
        (checked, dropped)."""
        db = self._conn()
        rows = db.execute("SELECT hash, size FROM blobs").fetchall()
        known = {digest for digest, _ in rows}
        blobs = os.path.join(self.root, "blobs")
        for fan in os.listdir(blobs):
            for name in os.listdir(os.path.join(blobs, fan)):
                if name not in known:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(blobs, fan, name))
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
