"""Node-wide totals: every process that shares a cache directory adds its counters to
one SQLite file there, ``stats.sqlite``.

Why this design:

- **Deltas, in the background.** A :class:`~mlstore.metrics.Metrics` counts in memory
  (a hit takes one lock, no I/O). A daemon thread per process wakes every
  :data:`FLUSH_EVERY` seconds and adds what changed since its last flush to the node's
  totals, in one transaction for every Store of the process; so does process exit
  (``atexit``, and a :mod:`multiprocessing` finalizer for workers that leave through
  ``os._exit``: DataLoader workers do). A worker that exits still counts; one killed by
  SIGKILL loses at most its last interval. SQLite's transactions make a flush all or
  nothing: a process killed in the middle of one leaves the totals as they were.
- **Its own file.** Not the disk tier's index: that one is written by every fill and
  may be set aside and rebuilt when damaged; the totals should neither wait on fills
  nor vanish with a repair. ``stats.sqlite`` outlives ``cache.clear()``; it is emptied
  by :func:`reset_node_stats`.
- **Fork-safe.** A forked child starts with nothing pending (what its parent counted is
  the parent's to hand over), a new lock, and its own connection; the parent's stays
  referenced, unused (see :data:`~mlstore._util.process.SQLITE`).
- **Fixed buckets.** Latency histograms are stored bucket by bucket, with the bounds
  they were made with: the sums of many processes are exact.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from typing import Any

from mlstore._util.process import SQLITE
from mlstore._util.sqlite import wal_mode
from mlstore.errors import MlstoreError
from mlstore.metrics._counters import Metrics, pending_of
from mlstore.metrics._stats import LATENCY_BOUNDS, Histogram, Stats

__all__ = ["FLUSH_EVERY", "STATS_FILE", "attach", "detach", "flush", "read", "reset"]

log = logging.getLogger("mlstore.metrics")

#: The file of node-wide totals, in the cache directory.
STATS_FILE = "stats.sqlite"
#: Seconds between two flushes of a process's counters to the node's totals.
FLUSH_EVERY = 5.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    name TEXT NOT NULL, label TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (name, label));
CREATE TABLE IF NOT EXISTS latency (
    op TEXT NOT NULL, protocol TEXT NOT NULL, bucket INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (op, protocol, bucket));
CREATE TABLE IF NOT EXISTS latency_sums (
    op TEXT NOT NULL, protocol TEXT NOT NULL, seconds REAL NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (op, protocol));
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_BOUNDS = json.dumps(LATENCY_BOUNDS)


class _Connection(sqlite3.Connection):
    """A connection the fork guard can keep (a subclass: weakly referable)."""


class _Sink:
    """One cache directory's totals, as this process writes them."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.path = os.path.join(root, STATS_FILE)
        self.lock = threading.Lock()  # one flush at a time; over ``db``
        self.db: sqlite3.Connection | None = None
        self.pid = os.getpid()
        self.ino = -1  # of the file ``db`` has open
        self.members: weakref.WeakSet[Metrics] = weakref.WeakSet()
        #: What members dropped without a close had not handed over (see ``_orphaned``).
        self.orphans: list[Stats] = []

    def connection(self, create: bool) -> sqlite3.Connection | None:
        """This process's connection (``None`` if the file is missing and not
        ``create``, or the directory is gone: nothing is recreated here). A file
        replaced meanwhile (the directory removed and made again) is reopened."""
        if self.db is not None and self.pid == os.getpid():
            try:
                if os.stat(self.path).st_ino == self.ino:
                    return self.db
            except FileNotFoundError:
                pass
            _close(self)
        if not os.path.isdir(self.root):
            return None
        if not os.path.exists(self.path):
            if not create:
                return None
            with contextlib.suppress(FileExistsError):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                os.close(fd)
        with SQLITE.section():
            db = sqlite3.connect(
                self.path,
                timeout=30,
                isolation_level=None,
                check_same_thread=False,
                factory=_Connection,
            )
            SQLITE.keep(db)  # a forked child never closes it (see _util.process)
            wal_mode(db)  # several processes may be making the file at once
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        self.db, self.pid, self.ino = db, os.getpid(), os.stat(self.path).st_ino
        return db

    def flush(self) -> None:
        """Add what every member counted since its last flush to the totals."""
        with self.lock:
            members = list(self.members)
            pending = [(m, m.take_pending()) for m in members]
            work = [(m, p) for m, p in pending if p.counters or p.latency]
            orphans, self.orphans = self.orphans, []
            if not work and not orphans:
                return
            try:
                db = self.connection(create=True)
                if db is None:
                    raise FileNotFoundError(f"the cache directory {self.root} is gone")
                with SQLITE.section():
                    _write(db, [p for _, p in work] + orphans)
            except (sqlite3.Error, OSError) as exc:
                for metrics, p in work:
                    metrics.give_back(p)  # kept for the next flush
                self.orphans.extend(orphans)
                self._trouble(exc)

    def _trouble(self, exc: BaseException) -> bool:
        """Log ``exc``; a damaged file is set aside (True), a new one made next time."""
        code = int(getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
        if code in (11, 26):  # SQLITE_CORRUPT, SQLITE_NOTADB: set it aside, start anew
            self.db = None
            aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.rename(self.path + suffix, aside + suffix)
            log.warning("the node's stats file was damaged; moved aside to %s", aside)
            return True
        log.debug("node stats not written to %s: %s", self.path, exc)
        return False


def _write(db: sqlite3.Connection, deltas: list[Stats]) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        row = db.execute("SELECT value FROM meta WHERE name = 'bounds'").fetchone()
        if row is not None and row[0] != _BOUNDS:  # written with other buckets: dropped
            db.execute("DELETE FROM latency")
            db.execute("DELETE FROM latency_sums")
        db.execute("INSERT OR REPLACE INTO meta VALUES ('bounds', ?)", (_BOUNDS,))
        db.execute("INSERT OR IGNORE INTO meta VALUES ('since', ?)", (repr(time.time()),))
        for delta in deltas:
            db.executemany(
                "INSERT INTO counters VALUES (?, ?, ?) ON CONFLICT (name, label)"
                " DO UPDATE SET value = value + excluded.value",
                [(n, label, v) for (n, label), v in delta.counters.items()],
            )
            for (op, proto), hist in delta.latency.items():
                db.executemany(
                    "INSERT INTO latency VALUES (?, ?, ?, ?) ON CONFLICT (op, protocol, bucket)"
                    " DO UPDATE SET count = count + excluded.count",
                    [(op, proto, i, n) for i, n in enumerate(hist.counts) if n],
                )
                db.execute(
                    "INSERT INTO latency_sums VALUES (?, ?, ?, ?) ON CONFLICT (op, protocol)"
                    " DO UPDATE SET seconds = seconds + excluded.seconds,"
                    " count = count + excluded.count",
                    (op, proto, hist.sum, hist.count),
                )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


# ---------------------------------------------------------------------- this process

_sinks: dict[str, _Sink] = {}
_lock = threading.Lock()
_wake = threading.Event()
_flusher_pid = -1  # the process whose flusher thread runs
_hooked_pid = -1  # the process whose exit flushes


def _key(root: str) -> str:
    return os.path.realpath(root)


def attach(metrics: Metrics, root: str) -> None:
    """Count ``metrics`` in the totals of the cache directory ``root`` (which the caller
    has made). Starts this process's flusher and exit hooks on first use."""
    global _flusher_pid
    with _lock:
        sink = _sinks.get(_key(root))
        if sink is None:
            sink = _sinks[_key(root)] = _Sink(root)
        if metrics not in sink.members:
            sink.members.add(metrics)
            hand_over = weakref.finalize(
                metrics,
                _orphaned,
                sink,
                metrics._counts,
                metrics._served,
                metrics._latency,
                metrics._handed,
            )
            hand_over.atexit = False  # at exit, the exit flush hands everything over
        start = _flusher_pid != os.getpid()
        if start:
            _flusher_pid = os.getpid()
    if start:
        threading.Thread(target=_run, name="mlstore-stats", daemon=True).start()
    _hook_exit()


def _orphaned(sink: _Sink, *parts: Any) -> None:
    """A member was dropped without a close: what it had not handed over waits in
    ``sink.orphans`` for the next flush. (Run by garbage collection, at any point of
    any thread: no lock, no I/O; ``list.append`` is atomic.)"""
    pending = pending_of(*parts)
    if pending.counters or pending.latency:
        sink.orphans.append(pending)


def detach(metrics: Metrics, root: str) -> None:
    """Flush ``metrics`` and stop counting it in ``root``'s totals (at a Store's close)."""
    sink = _sinks.get(_key(root))
    if sink is None or metrics not in sink.members:
        return
    sink.flush()
    with sink.lock:
        sink.members.discard(metrics)


def flush(root: str | None = None) -> None:
    """Write this process's pending counts now (of every directory, or of ``root``)."""
    with _lock:
        sinks = list(_sinks.values()) if root is None else [_sinks.get(_key(root))]
    for sink in sinks:
        if sink is not None:
            sink.flush()
    with _lock:  # a directory no Store of this process uses any more is let go
        for key, sink in list(_sinks.items()):
            if not sink.members and not sink.orphans:
                del _sinks[key]
                with sink.lock:
                    _close(sink)


def _run() -> None:
    while True:
        _wake.wait(FLUSH_EVERY)
        _wake.clear()
        with contextlib.suppress(Exception):  # never let the thread die: try again later
            flush()


def _at_exit() -> None:
    with contextlib.suppress(Exception):  # exit quietly whatever the cache dir's state
        flush()


def _hook_exit() -> None:
    """Flush at this process's exit: ``atexit`` (inherited by plain forks) and, since
    :mod:`multiprocessing` workers end with ``os._exit``, one of its finalizers, which
    its forked workers get through ``register_after_fork``."""
    global _hooked_pid
    if _hooked_pid == os.getpid():
        return
    import multiprocessing.util as mp_util

    with _lock:
        if _hooked_pid == os.getpid():
            return
        first = _hooked_pid == -1
        _hooked_pid = os.getpid()
    if first:
        atexit.register(_at_exit)
        mp_util.register_after_fork(_at_exit, _in_worker)
    mp_util.Finalize(None, _at_exit, exitpriority=10)


def _in_worker(_: object) -> None:
    global _hooked_pid
    import multiprocessing.util as mp_util

    _hooked_pid = os.getpid()
    mp_util.Finalize(None, _at_exit, exitpriority=10)


def _in_forked_child() -> None:
    """The child's sinks: new locks, no connection (the parent's is kept, unused), no
    flusher yet (the next attach starts one). Members have nothing pending (see
    :meth:`Metrics._forked`, which runs first: registered first)."""
    global _lock, _wake
    _lock = threading.Lock()
    _wake = threading.Event()
    for sink in _sinks.values():
        sink.lock = threading.Lock()
        sink.db = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_forked_child)


# ---------------------------------------------------------------------- reading


def read(root: str) -> Stats:
    """The totals of the cache directory ``root``, after this process's pending counts
    (empty if nothing was ever written there, or the file was damaged: it is then set
    aside, and the totals start anew)."""
    flush(root)
    sink = _sinks.get(_key(root)) or _Sink(root)
    with sink.lock:
        try:
            db = sink.connection(create=False)
            if db is None:
                return Stats()
            with SQLITE.section():
                return _query(db)
        except sqlite3.Error as exc:
            if sink._trouble(exc):  # damaged, and set aside
                return Stats()
            raise MlstoreError(
                f"cannot read the node's totals in {sink.path}: {exc}", operation="stats"
            ) from exc
        finally:
            if sink is not _sinks.get(_key(root)):
                _close(sink)


def _query(db: sqlite3.Connection) -> Stats:
    counters = {
        (str(n), str(label)): int(v)
        for n, label, v in db.execute("SELECT name, label, value FROM counters")
        if v
    }
    row = db.execute("SELECT value FROM meta WHERE name = 'bounds'").fetchone()
    if row is not None and row[0] != _BOUNDS:  # other buckets (another mlstore): not read
        return Stats(counters)
    buckets: dict[tuple[str, str], list[int]] = {}
    for op, proto, i, n in db.execute("SELECT op, protocol, bucket, count FROM latency"):
        counts = buckets.setdefault((op, proto), [0] * (len(LATENCY_BOUNDS) + 1))
        if 0 <= i < len(counts):
            counts[i] += int(n)
    latency = {
        (str(op), str(proto)): Histogram(
            LATENCY_BOUNDS, tuple(buckets.get((op, proto), ())), float(total), int(n)
        )
        for op, proto, total, n in db.execute(
            "SELECT op, protocol, seconds, count FROM latency_sums"
        ).fetchall()
        if n
    }
    return Stats(counters, latency)


def since(root: str) -> float | None:
    """When the totals of ``root`` started (their first write since the last reset)."""
    sink = _Sink(root)
    try:
        db = sink.connection(create=False)
        if db is None:
            return None
        with SQLITE.section():
            row = db.execute("SELECT value FROM meta WHERE name = 'since'").fetchone()
    except sqlite3.Error:
        return None  # unreadable: read() says why
    finally:
        _close(sink)
    return float(row[0]) if row is not None else None


def reset(root: str) -> None:
    """Empty the totals of ``root`` (this process's pending counts included)."""
    flush(root)
    sink = _sinks.get(_key(root)) or _Sink(root)
    with sink.lock:
        try:
            db = sink.connection(create=False)
            if db is None:
                return
            with SQLITE.section():
                _empty(db)
        except sqlite3.Error as exc:
            if not sink._trouble(exc):  # a damaged file is set aside: that empties it too
                raise MlstoreError(
                    f"cannot reset the node's totals in {sink.path}: {exc}", operation="stats"
                ) from exc
        finally:
            if sink is not _sinks.get(_key(root)):
                _close(sink)


def _empty(db: sqlite3.Connection) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        for table in ("counters", "latency", "latency_sums", "meta"):
            db.execute(f"DELETE FROM {table}")  # fixed names
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


def _close(sink: _Sink) -> None:
    if sink.db is not None:
        with SQLITE.section(), contextlib.suppress(sqlite3.Error):
            sink.db.close()
        sink.db = None
