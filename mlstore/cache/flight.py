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

__all__ = ["SingleFlight"]

STRIPES = 4096


class _KeyLock:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
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
        self._keys: dict[str, _KeyLock] = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[bool]:
        """Hold ``key`` exclusively; yields True if someone else held it first (the
        caller should look in the cache again before fetching)."""
        with self._guard:
            entry = self._keys.setdefault(key, _KeyLock())
            entry.users += 1
        try:
            waited = not entry.lock.acquire(blocking=False)
            if waited:
                entry.lock.acquire()
            try:
                with self._file_lock(key) as waited_for_process:
                    yield waited or waited_for_process
            finally:
                entry.lock.release()
        finally:
            with self._guard:
                entry.users -= 1
                if entry.users == 0:
                    del self._keys[key]

    @contextlib.contextmanager
    def _file_lock(self, key: str) -> Iterator[bool]:
        import xxhash

        stripe = xxhash.xxh3_64_intdigest(key.encode()) % STRIPES
        path = os.path.join(self.lock_dir, f"{stripe:03x}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
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
            os.close(fd)
