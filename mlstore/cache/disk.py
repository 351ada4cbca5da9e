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
import fcntl
import functools
import hashlib
import io
import logging
import os
import re
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

__all__ = [
    "DiskEntry",
    "DiskFullError",
    "DiskTier",
    "DiskUnavailableError",
    "check_private_dir",
    "claim_cache_dir",
]

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
#: The file that marks a directory as an mlstore cache (see :func:`claim_cache_dir`).
MARKER = ".mlstore-cache"
_MARKER_TEXT = b"mlstore cache directory: mlstore deletes only files it made here\n"
#: What an mlstore of any version puts at the top of its cache directory.
_OWN_NAMES = frozenset(
    {"index.sqlite", "index.sqlite-wal", "index.sqlite-shm", "index.sqlite-journal"}
    | {"index.key", "blobs", "tmp", "locks", MARKER}
)
_TEMP_SUFFIX = ".mlstore-tmp"
#: A temp file of a filler: ``<pid>-<random>.mlstore-tmp`` (an older mlstore left the
#: suffix out, and such files are still its own inside a marked directory).
_TEMP_NAME = re.compile(r"(\d+)-[0-9a-f]+(?:\.mlstore-tmp)?")
_BLOB_NAME = re.compile(r"[0-9a-f]{32}")
#: SQLite result codes (the primary code: the low byte of an extended one).
_SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_NOTADB = 11, 13, 26

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


class DiskUnavailableError(OSError):
    """The disk tier could not store an object (counted, logged and being repaired);
    the caller reads without caching."""


def _sqlite_code(exc: BaseException) -> int:
    """The primary SQLite result code of ``exc`` (0 if it carries none)."""
    return int(getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


def _is_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return _sqlite_code(exc) == _SQLITE_FULL


def _is_corrupt(exc: BaseException) -> bool:
    """Whether ``exc`` says the index file itself is damaged (not merely busy or full)."""
    return isinstance(exc, sqlite3.DatabaseError) and _sqlite_code(exc) in (
        _SQLITE_CORRUPT,
        _SQLITE_NOTADB,
    )


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
    others may write to (a shared cache dir would let them plant data), or that is a
    symbolic link (what mlstore would delete there is not the directory it was named)."""
    if os.path.islink(path):
        raise ConfigError(
            f"the cache directory {path!r} is a symbolic link (to "
            f"{os.path.realpath(path)!r}); mlstore does not follow links in a directory it "
            "deletes files from. Name the target itself in CacheConfig(disk_dir=...) or "
            "MLSTORE_CACHE_DIR"
        )
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


def claim_cache_dir(path: str) -> None:
    """Check ``path`` as :func:`check_private_dir` does, then make sure it is mlstore's.

    mlstore deletes files in its cache directory (dead fillers' temp files, unindexed
    blobs), so it must never take a directory that holds someone else's files for its
    own: ``disk_dir=/scratch/$USER`` would lose the user's ``tmp/``. A directory is
    mlstore's if it holds the marker file; an empty one is claimed by writing the
    marker before anything else; one that holds only names an older mlstore used (with
    its index or its lock stripes) is adopted. Anything else is refused.

    Raises:
        ConfigError: the directory is not private, or holds files that are not mlstore's.
    """
    check_private_dir(path)
    marker = os.path.join(path, MARKER)
    if os.path.isfile(marker) and not os.path.islink(marker):
        return
    names = set(os.listdir(path))
    legacy = names <= _OWN_NAMES and ("index.sqlite" in names or "locks" in names)
    if names - {MARKER} and not legacy:
        shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
        raise ConfigError(
            f"the cache directory {path!r} is not empty ({shown}) and was not made by "
            f"mlstore (it has no {MARKER} file); mlstore deletes files in its cache "
            "directory, so it will not adopt one that may hold yours. Use an empty or new "
            "directory (CacheConfig(disk_dir=...) or MLSTORE_CACHE_DIR), e.g. a "
            "subdirectory of this one"
        )
    with contextlib.suppress(FileExistsError):
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, _MARKER_TEXT)
        finally:
            os.close(fd)


def _private_subdir(path: str) -> None:
    """Create the cache's subdirectory ``path`` 0700, refusing a link or a non-directory
    there (the cache would delete files wherever it points)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(
            f"{path!r} in the cache directory is not a directory (a symbolic link?); "
            "mlstore follows no links inside its cache. Remove it or choose another directory"
        )
    _make_private(path, st, 0o700)


def _create_temp(tmp_dir: str, tag: int | None = None) -> tuple[int, str]:
    """A new temp file in ``tmp_dir``, open for writing and ``flock``-ed for as long as
    the returned descriptor stays open: the lock, not the pid in the name, is what tells
    a cleaner the filler lives (a pid means nothing in another PID namespace).

    A cleaner unlinks a temp file only while holding its lock, so one that took the lock
    between our create and our flock has unlinked it by the time we get the lock: we
    check the link count and start over with a new name. ``tag`` replaces the pid in
    the name (for tests that play a filler from another PID namespace).
    """
    pid = os.getpid() if tag is None else tag
    for _ in range(8):
        path = os.path.join(tmp_dir, f"{pid}-{os.urandom(6).hex()}{_TEMP_SUFFIX}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink > 0:
                return fd, path
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise OSError(errno.EAGAIN, "temp files in the cache keep being removed", tmp_dir)


def _remove_if_unheld(path: str) -> bool:
    """Delete the temp file ``path`` if no process holds its lock; True if deleted."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False  # gone already, or a link: not ours to touch
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its filler lives (in whatever PID namespace)
        st = os.fstat(fd)
        try:
            same = os.lstat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or (same.st_dev, same.st_ino) != (st.st_dev, st.st_ino):
            return False  # renamed into blobs/ and replaced meanwhile: not the file we hold
        os.unlink(path)
        return True
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a live process in this PID namespace."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # someone else's, but alive
    return True


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

    __slots__ = ("connections", "ino", "last_flush", "lock", "path", "threads", "touched")

    def __init__(self, path: str) -> None:
        self.path = path
        #: The inode of the index file this process opened: a different one at the path
        #: means another process replaced a damaged or removed index (reconnect).
        self.ino: int | None = None
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
        # Made 0600 before SQLite sees it (the WAL and shared memory take its mode), and
        # given its tables by every connection: one made after the index was quarantined
        # or its directory recreated finds an empty file.
        _private_file(self.path)
        db = sqlite3.connect(
            self.path,
            timeout=60,
            isolation_level=None,  # explicit transactions only
            check_same_thread=False,
        )
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            if self.ino is None:
                self.ino = os.stat(self.path).st_ino
        except BaseException:
            db.close()
            raise
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
        self.root = root
        self.budget = budget
        self.verify = verify
        self.clock = clock
        self.on_event = on_event
        self._blobs = os.path.join(root, "blobs")
        self._tmp = os.path.join(root, "tmp")
        self._index_path = os.path.join(root, "index.sqlite")
        self._index = PerProcess(functools.partial(_ProcessIndex, self._index_path))
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
        """Whether the index file at its path fails SQLite's own consistency check."""
        try:
            probe = sqlite3.connect(self._index_path, timeout=60)
        except sqlite3.Error:
            return False
        try:
            row = probe.execute("PRAGMA quick_check").fetchone()
            return row is None or row[0] != "ok"
        except sqlite3.DatabaseError as exc:
            return _is_corrupt(exc)
        finally:
            probe.close()

    def _quarantine(self) -> str:
        """Rename the damaged index (with its WAL and shared memory) aside; returns
        its new name. The next connection creates a new index."""
        self._index.reset()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        aside = f"{self._index_path}.corrupt-{stamp}-{os.getpid()}"
        os.rename(self._index_path, aside)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.rename(self._index_path + suffix, aside + suffix)
        return aside

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
        """The index entry of ``key``, if any (none if the index fails: repaired, counted)."""
        try:
            row = (
                self._conn()
                .execute(
                    "SELECT version, hash, size, checked FROM entries WHERE key = ?",
                    (self.stored_key(key),),
                )
                .fetchone()
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
        """Record a use of blob ``digest`` (written to the index in batches)."""
        now = self.clock()
        index = self._index.get()
        with index.lock:
            index.touched[digest] = now
            due = time.monotonic() - index.last_flush > _TOUCH_EVERY
        if due:
            try:
                self._flush(index)
            except (sqlite3.Error, OSError) as exc:
                self.recover(exc)

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
            DiskUnavailableError: the directory or its index failed (counted, logged,
                repaired for later reads); nothing was stored.
        """
        digest = digest or content_hash(data)
        try:
            return self._put(key, version, data, digest)
        except DiskFullError:
            raise
        except (sqlite3.Error, OSError) as exc:
            if _is_full(exc):
                raise DiskFullError(errno.ENOSPC, "the cache file system is full") from None
            self.recover(exc)
            raise DiskUnavailableError(errno.EIO, f"the disk tier failed: {exc}") from None

    def _put(self, key: str, version: str | None, data: bytes, digest: str) -> bool:
        # Blob files appear only by rename, so one that exists is whole (a torn one,
        # after a power loss, fails its hash on read): no index query needed to know.
        wrote = not os.path.exists(self.blob_path(digest))
        if wrote:
            self._write_blob(digest, data)
        try:
            return self._index_blob(key, version, data, digest)
        except (sqlite3.Error, OSError) as exc:
            if wrote and _is_full(exc):  # unindexed, it would only hold on to the space
                with contextlib.suppress(OSError):
                    os.unlink(self.blob_path(digest))
            raise

    def _index_blob(self, key: str, version: str | None, data: bytes, digest: str) -> bool:
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
        final = self.blob_path(digest)
        tmp: str | None = None
        try:
            fd, tmp = _create_temp(self._tmp)
            try:  # the temp file's lock is held until it is renamed: the filler lives
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if not self.verify:
                    # Without a hash check on read, only fsync guards against a torn
                    # file after a power loss. With it, a torn file is caught and refetched.
                    os.fsync(fd)
                # Not makedirs: a cache directory removed meanwhile must not come back
                # as bare parents without its marker (the replace fails instead).
                with contextlib.suppress(FileExistsError):
                    os.mkdir(os.path.dirname(final), 0o700)
                os.replace(tmp, final)
                tmp = None
            finally:
                os.close(fd)
        except OSError as exc:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(exc.errno, "the cache file system is full") from None
            raise

    def touch_entry(self, key: str) -> None:
        """Record that ``key`` was just validated against the store."""
        try:
            self._conn().execute(
                "UPDATE entries SET checked = ? WHERE key = ?",
                (self.clock(), self.stored_key(key)),
            )
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
                self._delete_blobs(db, [digest])
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.blob_path(digest))
        except (sqlite3.Error, OSError) as exc:
            self.recover(exc)

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

    def verify_all(self) -> tuple[int, int]:
        """Re-hash every blob; drop the bad ones, and blob files the index does not know
        (a filler killed between its rename and its index row). Returns
        (checked, dropped)."""
        db = self._conn()
        rows = db.execute("SELECT hash, size FROM blobs").fetchall()
        known = {digest for digest, _ in rows}
        with os.scandir(self._blobs) as fans:
            for fan in fans:
                if len(fan.name) != 2 or not fan.is_dir(follow_symlinks=False):
                    continue  # not a directory mlstore made: never looked into
                with os.scandir(fan.path) as names:
                    for entry in names:
                        if (
                            entry.name not in known
                            and entry.name.startswith(fan.name)
                            and _BLOB_NAME.fullmatch(entry.name)
                            and entry.is_file(follow_symlinks=False)
                        ):
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
