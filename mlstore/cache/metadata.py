"""Metadata on the node: ``info`` answers, listings and negative lookups, kept in a small
LRU per process in front of a node-wide tier that every process on the node shares.

The node-wide tier is a :class:`diskcache.Cache` in ``disk_dir/meta/`` (``cache.db``:
one SQLite file, 0600 in a 0700 directory, like the rest of the cache). It is bounded
by ``CacheConfig.metadata_bytes`` (diskcache culls the least recently stored entries
past it) and its entries expire with the policy's ``ttl``. What it stores is JSON text
and nothing else: :func:`json_disk` is a ``diskcache.Disk`` that writes values as text
in the database and refuses to read back anything stored in another mode, so a pickle
planted in the file is a miss, never unpickled. Keys and values never carry a
credential: an entry whose URL holds one stays in the process front only.

Why a front at all: a diskcache lookup is a SQLite query (tens of microseconds, see
``benchmarks/metadata.py``); the front answers the hot path from a dict, and only its
misses reach the node. A process adopts an entry from the node with the stamp it was
stored with, so passing through the node never stretches its trust.

A write through mlstore anywhere on the node drops the written URL's entries (and the
listings of its parent directories) from the node tier, by leaving a short-lived
*tombstone* in their place: an answer fetched before the write and stored after it (a
HEAD that raced the write) finds the tombstone and is not stored.

Trouble with the tier (a damaged file, the directory removed, a full disk) is a miss:
counted as ``cache_errors`` on the ``metadata`` label, logged once, and repaired (a
damaged file is renamed aside and a new one started). ``diskcache`` is imported when a
node tier is first opened, never by ``import mlstore``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from mlstore._util.lru import LRU
from mlstore._util.process import SQLITE, PerProcess
from mlstore._util.redact import redact_url
from mlstore.cache._jsondisk import UnsafeValueError, json_disk
from mlstore.cache._layout import MARKER, _private_file, _private_subdir
from mlstore.cache._sqlite import _is_corrupt, damaged, set_aside
from mlstore.cache.freshness import CLOCK_SKEW, trusted

__all__ = [
    "ABSENT",
    "META_DIR",
    "NodeMetadata",
    "Remembered",
    "clear_of_credentials",
    "json_disk",
    "keeps",
    "trusted",
]

log = logging.getLogger("mlstore.cache")

#: The node tier's directory, below ``disk_dir``.
META_DIR = "meta"
_DB = "cache.db"  # diskcache's name for its database
#: Seconds a tombstone fences off answers fetched before a write (a HEAD retried for
#: longer than this may still store what it saw: within the policy's ttl anyway).
_FENCE = 600.0
#: Seconds the node tier rests after a failure it could not repair.
_REST = 30.0
#: The write-ahead log is looked at every this many writes of a process, and emptied
#: once it holds more than ``_WAL_BYTES``. Writers that overlap without pause (threads,
#: processes) never let SQLite's own checkpoint start the log over, and it would grow
#: without bound (measured: 500 MB for 20,000 answers written by 16 threads).
_WAL_CHECK = 64
_WAL_BYTES = 4 * 1024 * 1024

T = TypeVar("T")


class _Absent:
    """The answer "nothing exists there" (a negative lookup)."""

    __slots__ = ()


ABSENT = _Absent()


def clear_of_credentials(text: str) -> bool:
    """Whether ``text`` (a URL, a node key) carries no credential (user info, a signed
    query) and so may be written to the node tier."""
    return ("@" not in text and "?" not in text) or redact_url(text) == text


def keeps(validate: str, ttl: float) -> bool:
    """Whether answers are kept at all under the policy (``ttl=0`` keeps nothing)."""
    return validate == "never" or (validate == "ttl" and ttl > 0)


class _Handle:
    """One process's open node tier: a diskcache.Cache, the inode it opened, and a count
    of the writes since the write-ahead log was last looked at."""

    __slots__ = ("cache", "ino", "writes")

    def __init__(self, cache: Any, ino: int) -> None:
        self.cache = cache
        self.ino = ino
        self.writes = 0


# Handles inherited across a fork are kept, never closed, in the child: closing a parent's
# SQLite connection there is a use of it, which SQLite forbids.
_INHERITED: list[_Handle] = []


class NodeMetadata:
    """The node-wide tier: JSON answers under text keys, in ``root/meta/``.

    Args:
        root: the cache directory (already claimed by the disk tier).
        size_limit: bytes the database may hold before the oldest entries are culled.
        on_event: counts events (``cache_errors``).
    """

    def __init__(self, root: str, size_limit: int, on_event: Callable[[str, int], None]) -> None:
        self.dir = os.path.join(root, META_DIR)
        self.path = os.path.join(self.dir, _DB)
        self.size_limit = size_limit
        self.on_event = on_event
        self._handle: PerProcess[_Handle] = PerProcess(self._open, on_fork=_INHERITED.append)
        self._resting_until = 0.0
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    @SQLITE.around  # no fork cuts a SQLite call in two
    def _open(self) -> _Handle:
        import diskcache

        # No marker (removed while in use): the disk tier's repair remakes it, not us.
        if not os.path.isfile(os.path.join(os.path.dirname(self.dir), MARKER)):
            raise FileNotFoundError(f"{os.path.dirname(self.dir)} is not (or no longer) a cache")
        _private_subdir(self.dir)
        _private_file(self.path)  # 0600 before SQLite sees it: the WAL takes its mode
        cache = diskcache.Cache(
            self.dir,
            timeout=10,
            disk=json_disk(),
            size_limit=self.size_limit,
            eviction_policy="least-recently-stored",  # a hit writes nothing
            statistics=0,
            tag_index=0,
        )
        return _Handle(cache, os.stat(self.path).st_ino)

    # ------------------------------------------------------------------ operations

    @SQLITE.around
    def get(self, key: str) -> dict[str, Any] | None:
        """The JSON object stored under ``key`` (a tombstone is a miss), or ``None``."""
        handle = self._usable()
        if handle is None:
            return None
        try:
            text = handle.cache.get(key)
        except UnsafeValueError:
            self._trouble("unsafe", "held an entry not stored as JSON (ignored and dropped)")
            with contextlib.suppress(Exception):
                handle.cache.delete(key)
            return None
        except Exception as exc:  # noqa: BLE001 - any trouble with the tier is a miss
            self._failed(exc)
            return None
        if text is None:
            return None
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if not isinstance(value, dict) or "dropped" in value:
            return None
        return value

    @SQLITE.around
    def put(self, key: str, value: dict[str, Any], expire: float | None, since: float) -> None:
        """Store ``value`` under ``key`` unless a write through mlstore dropped the key at
        or after ``since`` (wall-clock seconds when the answer was asked for)."""
        handle = self._usable()
        if handle is None:
            return
        text = json.dumps(value, separators=(",", ":"))
        cache = handle.cache
        try:
            with cache.transact():
                try:
                    old = cache.get(key)
                except UnsafeValueError:
                    old = None
                if old is not None and _dropped_since(old, since):
                    return
                cache.set(key, text, expire=expire)
        except Exception as exc:  # noqa: BLE001 - the answer stays in the process front
            self._failed(exc)
            return
        self._wrote(handle)

    @SQLITE.around
    def drop(self, keys: Iterable[str]) -> None:
        """Drop ``keys`` (a write through mlstore): each is left a tombstone."""
        handle = self._usable()
        if handle is None:
            return
        text = json.dumps({"dropped": time.time()})
        cache = handle.cache
        try:
            with cache.transact():
                for key in keys:
                    cache.set(key, text, expire=_FENCE)
        except Exception as exc:  # noqa: BLE001 - counted and repaired
            self._failed(exc)
            return
        self._wrote(handle)

    @SQLITE.around
    def _wrote(self, handle: _Handle) -> None:
        """After a write: now and then, empty the write-ahead log if it grew too big."""
        handle.writes += 1
        if handle.writes % _WAL_CHECK:
            return
        try:
            if os.path.getsize(self.path + "-wal") <= _WAL_BYTES:
                return
            db = sqlite3.connect(self.path, timeout=1)
        except (OSError, sqlite3.Error):
            return
        try:  # waits (a second at most) for readers to leave, then truncates the log
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass  # busy: the next look tries again
        finally:
            db.close()

    @SQLITE.around
    def usage(self) -> tuple[int, int]:
        """``(entries, bytes)`` of the tier (tombstones included)."""
        handle = self._usable()
        if handle is None:
            return 0, 0
        try:
            return len(handle.cache), int(handle.cache.volume())
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return 0, 0

    @SQLITE.around
    def close(self) -> None:
        handle = self._handle.reset()
        if handle is not None:
            handle.cache.close()

    # ------------------------------------------------------------------ repair

    def _usable(self) -> _Handle | None:
        """This process's handle, opened now if need be; ``None`` while resting."""
        if time.monotonic() < self._resting_until:
            return None
        try:
            return self._handle.get()
        except Exception as exc:  # noqa: BLE001 - a damaged file fails at open
            self._failed(exc)
        if time.monotonic() < self._resting_until:
            return None
        try:  # repaired: once more
            return self._handle.get()
        except Exception:  # noqa: BLE001 - still failing: rest a while
            self._resting_until = time.monotonic() + _REST
            return None

    def _failed(self, exc: BaseException) -> None:
        """Count ``exc``, repair its cause if it can be, and say so once per kind."""
        self.on_event("cache_errors", 1)
        with self._lock:
            ours = self._handle.peek()
            try:
                ino: int | None = os.stat(self.path).st_ino
            except OSError:
                ino = None
            if ours is not None and ino is not None and ours.ino != ino:
                self._reset()  # another process repaired it: open the new file
                return
            if _is_corrupt(exc) and self._damaged():
                self._reset()
                aside = self._quarantine()
                kind, message = "corrupt", f"was damaged; moved aside to {aside}, a new one is used"
            elif _is_corrupt(exc):
                self._reset()  # judged sound now: reopen
                return
            elif ino is None:
                self._reset()
                kind, message = "missing", "was removed while in use; it is made again"
            else:
                self._resting_until = time.monotonic() + _REST
                kind, message = "failed", f"failed ({type(exc).__name__}: {exc})"
        self._trouble(kind, message)

    def _trouble(self, kind: str, message: str) -> None:
        with self._lock:
            if kind in self._warned:
                return
            self._warned.add(kind)
        log.warning(
            "the metadata cache in %s %s; answers are asked of the store meanwhile "
            "(counted as cache_errors)",
            self.dir,
            message,
        )

    @SQLITE.around
    def _reset(self) -> None:
        handle = self._handle.reset()
        if handle is not None:
            with contextlib.suppress(Exception):
                handle.cache.close()

    def _damaged(self) -> bool:
        return damaged(self.path)

    def _quarantine(self) -> str:
        return set_aside(self.path)


def _dropped_since(text: Any, since: float) -> bool:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return False
    return isinstance(value, dict) and float(value.get("dropped", -1.0)) >= since


class Remembered(Generic[T]):
    """Answers of one kind (``info`` or listings): a process front, then the node tier.

    Args:
        kind: a short tag that keeps the kinds apart in the node tier.
        entries: how many answers the process front keeps.
        node: the node tier, or ``None`` (memory-only configurations).
        encode: an answer as a JSON object, or ``None`` if it must not leave the process
            (it carries a credential).
        decode: the answer back from its JSON object.
    """

    def __init__(
        self,
        kind: str,
        entries: int,
        node: NodeMetadata | None,
        encode: Callable[[T], dict[str, Any] | None],
        decode: Callable[[dict[str, Any]], T],
    ) -> None:
        self.kind = kind
        self.front: LRU[str, tuple[T | _Absent, float]] = LRU(entries)
        self.node = node
        self._encode = encode
        self._decode = decode

    def get(self, key: str) -> tuple[T | _Absent, float] | None:
        """The front's answer and stamp (no node lookup, no policy)."""
        return self.front.get(key)

    def lookup(self, key: str, validate: str, ttl: float, now: float) -> T | _Absent | None:
        """A trusted answer from the front, else from the node (then kept in the front
        with its stamp), else ``None``."""
        if not keeps(validate, ttl):
            return None
        hit = self.front.get(key)
        if hit is not None and trusted(validate, ttl, hit[1], now, hit[0] is ABSENT):
            return hit[0]
        if self.node is None:
            return None
        found = self.node.get(self._node_key(key))
        if found is None:
            return None
        try:
            stamp = float(found["t"])
            value: T | _Absent = ABSENT if found.get("absent") else self._decode(found["v"])
        except (KeyError, TypeError, ValueError):
            return None  # a shape this mlstore does not know: a miss
        if not trusted(validate, ttl, stamp, now, value is ABSENT):
            return None
        self.front.put(key, (value, stamp))
        return value

    def put(
        self, key: str, value: T | _Absent, validate: str, ttl: float, now: float, since: float
    ) -> None:
        """Keep ``value`` (stamped ``now``) in the front and on the node, as the policy
        allows; ``since`` is the wall-clock time the answer was asked for."""
        if not keeps(validate, ttl):
            return
        self.front.put(key, (value, now))
        if self.node is None or not clear_of_credentials(key):
            return
        if isinstance(value, _Absent):
            record: dict[str, Any] | None = {"t": now, "absent": True}
        else:
            encoded = self._encode(value)
            record = None if encoded is None else {"t": now, "v": encoded}
        if record is None:
            return
        expire = None if validate == "never" and value is not ABSENT else ttl + CLOCK_SKEW
        self.node.put(self._node_key(key), record, expire, since)

    def pop(self, key: str) -> None:
        """Forget ``key`` here and on the node."""
        self.front.pop(key)
        if self.node is not None:
            self.node.drop([self._node_key(key)])

    def node_keys(self, keys: Iterable[str]) -> list[str]:
        """The node tier's keys of ``keys`` (to drop several in one go)."""
        return [self._node_key(k) for k in keys]

    def _node_key(self, key: str) -> str:
        return f"{self.kind}\x00{key}"
