"""The one fork rule: state that belongs to a process is rebuilt in a forked child.

A DataLoader forks its workers from a process that already holds clients, connections,
open lock files and thread locks. A child that reused them would share sockets and event
loops with its parent, inherit locks held by threads that do not exist in it, and flock
through file descriptions its parent still uses. So every such piece of state lives in a
:class:`PerProcess` holder: built lazily on first use, once per process, and built
afresh the first time a child touches it. ``on_fork`` lets the child let go of what it
inherited (close descriptors) without touching the parent's copy.

Most holders let go lazily, when the child first asks for the value. A holder made with
``eager=True`` lets go at the fork itself, while the child still has a single thread:
for state that must not outlive the fork even in a child that never touches it (lock
files whose flocks would stay held after the parent dies), or whose ``on_fork`` closes
descriptors by number (later, the child may have reused those numbers). Either way one
hook, registered here once, gives every holder a new lock in the child: the inherited
one may be held by a parent thread that does not exist there.
"""

from __future__ import annotations

import os
import threading
import weakref
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
        eager: let go of the inherited value (and run ``on_fork``) in the child at the
            fork itself rather than on the child's first use.

    Pickling carries only the factory and the options: the unpickling process builds its
    own value.
    """

    __slots__ = ("__weakref__", "_eager", "_factory", "_lock", "_on_fork", "_pid", "_value")

    def __init__(
        self,
        factory: Callable[[], T],
        *,
        on_fork: Callable[[T], None] | None = None,
        eager: bool = False,
    ) -> None:
        self._factory = factory
        self._on_fork = on_fork
        self._eager = eager
        self._pid = -1
        self._value: T | None = None
        self._lock = threading.Lock()
        _HOLDERS.add(self)

    def get(self) -> T:
        """This process's value (built now if this process has none yet)."""
        if self._pid == os.getpid():  # the hot path: one compare
            return self._value  # type: ignore[return-value]
        return self._build()

    def _build(self) -> T:
        pid = os.getpid()
        with self._lock:
            if self._pid != pid:
                self._let_go_of_inherited()
                self._value = self._factory()
                self._pid = pid
        return self._value  # type: ignore[return-value]

    def _let_go_of_inherited(self) -> None:
        """Forget the value unless this process built it; one a parent built goes to
        ``on_fork``. (Under the lock, or in the child at the fork, with one thread.)"""
        value, owner = self._value, self._pid
        if owner == os.getpid():
            return
        self._value, self._pid = None, -1
        if owner != -1 and self._on_fork is not None:
            self._on_fork(value)  # type: ignore[arg-type]

    def peek(self) -> T | None:
        """This process's value if it was built, else ``None`` (never builds)."""
        return self._value if self._pid == os.getpid() else None

    def reset(self) -> T | None:
        """Forget this process's value (the next :meth:`get` builds a new one); returns
        the value forgotten, for the caller to close. In a child, a value inherited from
        the parent is not returned: it goes to ``on_fork``, as on a first use."""
        with self._lock:
            if self._pid == os.getpid():
                value, self._value, self._pid = self._value, None, -1
                return value
            self._let_go_of_inherited()
            return None

    def __getstate__(self) -> dict[str, Any]:
        return {"factory": self._factory, "on_fork": self._on_fork, "eager": self._eager}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["factory"], on_fork=state["on_fork"], eager=state.get("eager", False)
        )


# Every holder of this process, for the fork hook (weakly: a holder's life is its owner's).
_HOLDERS: weakref.WeakSet[PerProcess[Any]] = weakref.WeakSet()


def _in_forked_child() -> None:
    """Runs in a new child before ``fork()`` returns there, while it has one thread."""
    holders = list(_HOLDERS)
    for holder in holders:
        holder._lock = threading.Lock()
    for holder in holders:  # after the locks: an on_fork that raises leaves none stale
        if holder._eager:
            holder._let_go_of_inherited()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_forked_child)
