"""The one fork rule: state that belongs to a process is rebuilt in a forked child.

A DataLoader forks its workers from a process that already holds clients, connections,
open lock files and thread locks. A child that reused them would share sockets and event
loops with its parent, inherit locks held by threads that do not exist in it, and flock
through file descriptions its parent still uses. So every such piece of state lives in a
:class:`PerProcess` holder: built lazily on first use, once per process, and built
afresh the first time a child touches it. ``on_fork`` lets the child let go of what it
inherited (close descriptors) without touching the parent's copy.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["PerProcess"]

T = TypeVar("T")


class PerProcess(Generic[T]):
    """A value built by ``factory()`` once per process, on first use.

    Args:
        factory: builds the value (called again in a forked child).
        on_fork: called in a child with the value inherited from the parent, before the
            child builds its own (e.g. to close inherited file descriptors).

    Pickling carries only the factory: the unpickling process builds its own value.
    """

    __slots__ = ("_factory", "_lock", "_on_fork", "_pid", "_value")

    def __init__(
        self, factory: Callable[[], T], *, on_fork: Callable[[T], None] | None = None
    ) -> None:
        self._factory = factory
        self._on_fork = on_fork
        self._pid = -1
        self._value: T | None = None
        self._lock = threading.Lock()

    def get(self) -> T:
        """This process's value (built now if this process has none yet)."""
        if self._pid == os.getpid():
            return self._value  # type: ignore[return-value]
        return self._build()

    def _build(self) -> T:
        pid = os.getpid()
        if self._pid not in (-1, pid):  # a forked child: the parent's lock may be held
            self._lock = threading.Lock()
        with self._lock:
            if self._pid != pid:
                inherited, had = self._value, self._pid != -1
                self._value = None
                if had and self._on_fork is not None:
                    self._on_fork(inherited)  # type: ignore[arg-type]
                self._value = self._factory()
                self._pid = pid
        return self._value  # type: ignore[return-value]

    def peek(self) -> T | None:
        """This process's value if it was built, else ``None`` (never builds)."""
        return self._value if self._pid == os.getpid() else None

    def reset(self) -> T | None:
        """Forget this process's value (the next :meth:`get` builds a new one); returns
        the value forgotten, for the caller to close."""
        with self._lock:
            value = self._value if self._pid == os.getpid() else None
            self._value = None
            self._pid = -1
        return value

    def __getstate__(self) -> dict[str, Any]:
        return {"factory": self._factory, "on_fork": self._on_fork}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["factory"], on_fork=state["on_fork"])  # type: ignore[misc]
