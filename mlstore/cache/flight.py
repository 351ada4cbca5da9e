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
import functools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator

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


class SingleFlight:
    """Per-key mutual exclusion across threads and processes.

    Args:
        lock_dir: where the stripe files live (inside the cache directory).
        timeout: longest wait for another filler, in seconds.
        sleep: injectable for tests.
    """

    def __init__(
        self,
        lock_dir: str,
        timeout: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.lock_dir = lock_dir
        self.timeout = timeout
        self.sleep = sleep
        self._keys = KeyedLocks()
        self._local = KeyedLocks()
        self._guard = threading.Lock()
        self._stripes: dict[int, _Stripe] = {}
        self._pid = os.getpid()
        # A child forked while a thread here held a key (a DataLoader worker forked
        # mid-read) inherits that lock held for ever, and the parent's open lock files,
        # whose flocks it would share: it starts afresh.
        os.register_at_fork(after_in_child=functools.partial(_after_fork, weakref.ref(self)))

    def _forked(self) -> None:
        self._keys = KeyedLocks()
        self._local = KeyedLocks()
        self._guard = threading.Lock()
        for entry in self._stripes.values():
            with contextlib.suppress(OSError):
                os.close(entry.fd)
        self._stripes = {}
        self._pid = os.getpid()

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[bool]:
        """Hold ``key`` exclusively; yields True if someone else held it first (the
        caller should look in the cache again before fetching)."""
        with self._keys.hold(key) as waited, self._file_lock(key) as waited_for_process:
            yield waited or waited_for_process

    def hold_in_process(self, key: str) -> contextlib.AbstractContextManager[bool]:
        """Hold ``key`` against this process's other threads only (no file lock)."""
        return self._local.hold(key)

    @contextlib.contextmanager
    def _file_lock(self, key: str) -> Iterator[bool]:
        import xxhash

        stripe = xxhash.xxh3_64_intdigest(key.encode()) % STRIPES
        entry = self._stripe(stripe)
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
            with self._guard:
                entry.users -= 1

    def _stripe(self, stripe: int) -> _Stripe:
        """The stripe's lock file, opened once per process and kept open (opening and
        closing it per fill was a measurable share of a cold read)."""
        with self._guard:
            found = self._stripes.get(stripe)
            if found is None:
                if len(self._stripes) >= _OPEN_STRIPES:
                    self._close_idle()
                path = os.path.join(self.lock_dir, f"{stripe:03x}")
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                found = self._stripes[stripe] = _Stripe(fd)
            found.users += 1
            return found

    def _close_idle(self) -> None:
        for stripe, entry in list(self._stripes.items()):
            if entry.users == 0:  # (called under the guard) no thread holds or wants it
                del self._stripes[stripe]
                with contextlib.suppress(OSError):
                    os.close(entry.fd)

    def close(self) -> None:
        """Close the lock files this process opened."""
        with self._guard:
            if self._pid == os.getpid():
                for entry in self._stripes.values():
                    if entry.users == 0:
                        with contextlib.suppress(OSError):
                            os.close(entry.fd)
            self._stripes = {}


def _after_fork(ref: weakref.ref[SingleFlight]) -> None:
    flight = ref()
    if flight is not None:
        flight._forked()
