"""What every SQLite file of mlstore's needs when many processes open it at once."""

from __future__ import annotations

import sqlite3
import time

__all__ = ["wal_mode"]


def wal_mode(db: sqlite3.Connection) -> None:
    """Put the database of ``db`` in WAL mode.

    Several processes opening a new file at once all ask for the switch, and SQLite
    answers some of them "locked" at once, without waiting on its busy handler, while
    another switches. So ask again, briefly backing off: once any one has switched, the
    mode is persistent and the next ask succeeds. (Without this, of 8 processes creating
    a node's stats file together, one in a few hundred lost its counts.)
    """
    for attempt in range(40):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            time.sleep(min(0.005 * (attempt + 1), 0.1))
    db.execute("PRAGMA journal_mode=WAL")  # the last word: raises if still locked
