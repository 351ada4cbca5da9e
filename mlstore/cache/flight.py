"""Single-flight: one fetch per key per node at a time.

Threads of one process queue on a per-key lock; processes on a node queue on an OS file
lock (``flock``) in the cache directory. The kernel releases a file lock when its holder
dies, even by SIGKILL, so a dead filler never blocks the others; a filler that hangs
blocks them at most ``timeout`` seconds, after which a waiter goes ahead on its own.

Keys are hashed onto a fixed set of lock files (stripes) so the directory never grows
with the number of objects; two keys sharing a stripe only wait for each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator

from mlstore._util.process import PerProcess

__all__ = ["KeyedLocks", "SingleFlight"]

STRIPES = 4096
_OPEN_STRIPES = 128  # lock files kept open per process (idle ones are closed beyond it)


class _KeyLock:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class KeyedLocks:
    """A thread lock per key, made on first use and dropped when no thread holds or
    waits for it."""

    def __init__(self) -> None:
        self._keys: dict[str, _KeyLock] = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[bool]:
        """Hold ``key``; yields True if another thread held it first."""
        with self._guard:
            entry = self._keys.setdefault(key, _KeyLock())
            entry.users += 1
        try:
            waited = not entry.lock.acquire(blocking=False)
            if waited:
                entry.lock.acquire()
            try:
                yield waited
            finally:
                entry.lock.release()
        finally:
            with self._guard:
                entry.users -= 1
                if entry.users == 0:
                    del self._keys[key]


class _Stripe:
    __slots__ = ("fd", "lock", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        self.users = 0


class _Flights:
    """One process's side of single-flight: its threads' per-key locks and the stripe
    files it has open (file descriptions that only this process may lock through)."""

    __slots__ = ("guard", "keys", "local", "stripes")

    def __init__(self) -> None:
        self.keys = KeyedLocks()
        self.local = KeyedLocks()
        self.guard = threading.Lock()  # over ``stripes`` and their ``users``
        self.stripes: dict[int, _Stripe] = {}

    def take(self, lock_dir: str, stripe: int) -> _Stripe:
        """The stripe's lock file, opened once per process and kept open (opening and
        closing it per fill was a measurable share of a cold read); counted as in use
        until :meth:`give_back`."""
        with self.guard:
            found = self.stripes.get(stripe)
            if found is None:
                if len(self.stripes) >= _OPEN_STRIPES:
                    self._close_idle()
                path = os.path.join(lock_dir, f"{stripe:03x}")
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                found = self.stripes[stripe] = _Stripe(fd)
            found.users += 1
            return found

    def give_back(self, entry: _Stripe) -> None:
        with self.guard:
            entry.users -= 1

    def _close_idle(self) -> None:
        for stripe, entry in list(self.stripes.items()):
            if entry.users == 0:  # (called under the guard) no thread holds or wants it
                del self.stripes[stripe]
                with contextlib.suppress(OSError):
                    os.close(entry.fd)

    def close(self) -> None:
        """Close the lock files no thread is using, and forget them all."""
        with self.guard:
            for entry in self.stripes.values():
                if entry.users == 0:
                    with contextlib.suppress(OSError):
                        os.close(entry.fd)
            self.stripes = {}

    def close_inherited(self) -> None:
        """In a forked child, at the fork: close the child's copies of the parent's lock
        files, never unlocking them. A flock belongs to the open file description, which
        the parent's own descriptor keeps, so the parent's locks stay as they were.
        (No guard: a parent thread may have held it at the fork.)"""
        for entry in self.stripes.values():
            with contextlib.suppress(OSError):
                os.close(entry.fd)


class SingleFlight:
    """Per-key mutual exclusion across threads and processes.

    Args:
        lock_dir: where the stripe files live (inside the cache directory).
        timeout: longest wait for another filler, in seconds.
        sleep: injectable for tests.
        repair: recreates ``lock_dir`` when it has vanished (the cache directory
            removed while in use). If a lock file still cannot be opened, the key is
            held against this process's threads only: a read must not fail because
            the cache cannot coordinate it (at worst two processes fetch it).
    """

    def __init__(
        self,
        lock_dir: str,
        timeout: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
        repair: Callable[[], None] | None = None,
    ) -> None:
        self.lock_dir = lock_dir
        self.timeout = timeout
        self.sleep = sleep
        self.repair = repair
        # A child forked while a thread here held a key (a DataLoader worker forked
        # mid-read) would inherit that lock held for ever, and the parent's open lock
        # files, whose flocks it would share: it starts afresh. Eagerly, at the fork: a
        # child that never takes a lock must not keep the parent's lock files open (a
        # flock outlives its holder's death while any copy of the file stays open).
        self._process = PerProcess(_Flights, on_fork=_Flights.close_inherited, eager=True)

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[bool]:
        """Hold ``key`` exclusively; yields True if someone else held it first (the
        caller should look in the cache again before fetching)."""
        flights = self._process.get()
        with (
            flights.keys.hold(key) as waited,
            self._file_lock(flights, key) as waited_for_process,
        ):
            yield waited or waited_for_process

    def hold_in_process(self, key: str) -> contextlib.AbstractContextManager[bool]:
        """Hold ``key`` against this process's other threads only (no file lock)."""
        return self._process.get().local.hold(key)

    @contextlib.contextmanager
    def _file_lock(self, flights: _Flights, key: str) -> Iterator[bool]:
        import xxhash

        stripe = xxhash.xxh3_64_intdigest(key.encode()) % STRIPES
        entry = self._take(flights, stripe)
        if entry is None:
            yield False
            return
        fd = entry.fd
        # A flock belongs to the open file, which this process's threads share: the
        # thread lock keeps two of them (different keys, same stripe) from taking and
        # releasing it under each other.
        try:
            with entry.lock:
                waited = False
                deadline = time.monotonic() + self.timeout
                delay = 0.001
                locked = False
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        locked = True
                        break
                    except BlockingIOError:
                        waited = True
                        if time.monotonic() >= deadline:
                            break  # a hung filler: go ahead without the lock
                        self.sleep(delay)
                        delay = min(delay * 2, 0.05)
                try:
                    yield waited
                finally:
                    if locked:
                        fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            flights.give_back(entry)

    def _take(self, flights: _Flights, stripe: int) -> _Stripe | None:
        """The stripe's lock file, after one repair of a vanished lock directory; None if
        it cannot be had."""
        try:
            return flights.take(self.lock_dir, stripe)
        except OSError:
            if self.repair is None:
                raise
        try:
            self.repair()
            return flights.take(self.lock_dir, stripe)
        except (OSError, ValueError):  # unrepairable (ConfigError is a ValueError): go on
            return None

    def close(self) -> None:
        """Close the lock files this process opened (a child never saw its parent's:
        they were closed at the fork)."""
        flights = self._process.peek()
        if flights is not None:
            flights.close()
