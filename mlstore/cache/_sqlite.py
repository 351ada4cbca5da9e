"""SQLite for the disk tier's files: connections whose every call runs in a section of
the fork guard, opening one (in WAL mode, even when several processes open a new file
at once), and what SQLite's errors mean (a full disk, a damaged file).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import time
from typing import Any

from mlstore._util.process import SQLITE

#: SQLite result codes (the primary code: the low byte of an extended one).
_SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_NOTADB = 11, 13, 26

__all__ = ["DiskFullError", "DiskUnavailableError", "damaged", "set_aside"]


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
    """Whether ``exc`` says the database file itself is damaged (not busy or full)."""
    return isinstance(exc, sqlite3.DatabaseError) and _sqlite_code(exc) in (
        _SQLITE_CORRUPT,
        _SQLITE_NOTADB,
    )


def damaged(path: str) -> bool:
    """Whether the SQLite file at ``path`` fails SQLite's own consistency check, judged
    on a fresh connection (an error from one that predates a repair proves nothing)."""
    try:
        probe = _open(path)
    except sqlite3.Error:
        return False
    try:
        row = probe.execute("PRAGMA quick_check").fetchone()
        return row is None or row[0] != "ok"
    except sqlite3.DatabaseError as exc:
        return _is_corrupt(exc)
    finally:
        probe.close()


def set_aside(path: str) -> str:
    """Rename a damaged SQLite file (with its WAL and shared memory) aside, for a look
    later; returns its new name."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    aside = f"{path}.corrupt-{stamp}-{os.getpid()}"
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.rename(path + suffix, aside + suffix)
    return aside


#: Every SQLite call of the index runs in a section of the SQLite fork guard (see
#: :data:`~mlstore._util.process.SQLITE`). Connections a child inherits are kept and never
#: touched, not even closed: SQLite's close can checkpoint and delete the parent's
#: write-ahead log. (SQLite forbids using a connection across a fork.)
_GUARD = SQLITE


class _Cursor(sqlite3.Cursor):
    """A cursor whose statements run and step in sections of the fork guard."""

    def execute(self, sql: str, parameters: Any = (), /) -> _Cursor:
        with _GUARD.section():
            return super().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> _Cursor:
        with _GUARD.section():
            return super().executemany(sql, parameters)

    def fetchone(self) -> Any:
        with _GUARD.section():
            return super().fetchone()

    def fetchmany(self, size: int | None = 1) -> list[Any]:
        with _GUARD.section():
            return super().fetchmany(size)

    def fetchall(self) -> list[Any]:
        with _GUARD.section():
            return super().fetchall()

    def __next__(self) -> Any:
        with _GUARD.section():
            return super().__next__()


class _Connection(sqlite3.Connection):
    """A connection whose every call runs in a section of the fork guard."""

    def cursor(self, factory: Any = _Cursor) -> Any:
        return super().cursor(factory)

    def execute(self, sql: str, parameters: Any = (), /) -> _Cursor:
        return self.cursor().execute(sql, parameters)  # type: ignore[no-any-return]

    def executemany(self, sql: str, parameters: Any, /) -> _Cursor:
        return self.cursor().executemany(sql, parameters)  # type: ignore[no-any-return]

    def one(self, sql: str, parameters: Any = (), /) -> Any:
        """The first row of ``sql`` (or ``None``), run and stepped in one section."""
        with _GUARD.section():
            return sqlite3.Connection.execute(self, sql, parameters).fetchone()

    def executescript(self, script: str, /) -> sqlite3.Cursor:
        with _GUARD.section():
            return super().executescript(script)

    def close(self) -> None:
        with _GUARD.section():
            super().close()


def _open(path: str) -> _Connection:
    """A connection to the index at ``path`` (made in a section of the fork guard, and
    kept by a child forked while it is open)."""
    with _GUARD.section():
        db = sqlite3.connect(
            path,
            timeout=60,
            isolation_level=None,  # explicit transactions only
            check_same_thread=False,
            factory=_Connection,
        )
    _GUARD.keep(db)
    return db


#: Every table and index :data:`_SCHEMA` makes.
