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

Some state cannot be rebuilt that way because a library below keeps process-wide state
of its own: SQLite's locks and mutexes for a database file are shared by every
connection of the process, so a child forked while a parent thread was inside SQLite
would find a write lock, or a mutex, that no thread of it will ever release. A
:class:`ForkGuard` covers such code: a fork waits until no thread is inside one of its
sections, and a forked child keeps the objects it inherited (referenced for good, never
closed: closing the parent's connection could clean up files under the parent).
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, ParamSpec, TypeVar

__all__ = ["SQLITE", "ForkGuard", "PerProcess", "keep_inherited"]

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")


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


class ForkGuard:
    """Sections of code that a fork waits out, and objects a forked child must keep.

    ``with guard.section():`` marks code that must not be cut in two by a fork (a
    SQLite call or transaction): ``fork()`` waits until no thread is inside a section,
    and threads wait to enter one until the fork is done. Sections nest within a thread,
    and a thread that forks from inside one does not wait for itself.

    ``guard.keep(obj)`` names an object the process must not release in a forked child
    (a SQLite connection). The parent still frees it as usual; a child keeps its copy
    referenced for good, so that no garbage collection ever runs its cleanup there.
    """

    __slots__ = (
        "__weakref__",
        "_handed",
        "_held",
        "_inherited",
        "_kept",
        "_local",
        "_locks",
        "_registry",
    )

    def __init__(self) -> None:
        self._local = threading.local()  # .lock: this thread's RLock
        self._locks: weakref.WeakSet[Any] = weakref.WeakSet()  # every thread's
        self._registry = threading.Lock()  # over ``_locks``; held through a fork
        self._kept: weakref.WeakSet[Any] = weakref.WeakSet()
        self._inherited: list[Any] = []  # the parents' objects, kept for good
        self._held: list[Any] = []  # the locks ``_before`` took, for ``_after``
        self._handed: list[Any] = []  # the objects to keep, held through the fork
        _GUARDS.add(self)

    def section(self) -> Any:
        """The calling thread's section lock (``with guard.section(): ...``)."""
        lock = getattr(self._local, "lock", None)
        if lock is None:
            lock = threading.RLock()  # freed with the thread's locals when it ends
            with self._registry:
                self._locks.add(lock)
            self._local.lock = lock
        return lock

    def around(self, fn: Callable[P, R]) -> Callable[P, R]:
        """``fn`` with its every call run in a section of this guard (a decorator)."""

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            with self.section():
                return fn(*args, **kwargs)

        return guarded

    def keep(self, obj: object) -> None:
        """Let a forked child keep ``obj`` referenced for good (weakly held here)."""
        self._kept.add(obj)

    def _before(self) -> None:
        """In the forking thread: wait until every thread is out of its sections, and
        keep them out; hold the objects to keep, so that the child inherits them held."""
        self._registry.acquire()
        self._held = list(self._locks)
        for lock in self._held:
            lock.acquire()
        self._handed = list(self._kept)

    def _after(self, child: bool) -> None:
        for lock in self._held:
            lock.release()
        if child:  # the parent's objects stay here for good; the child's start afresh
            self._inherited.extend(self._handed)
            self._kept = weakref.WeakSet()
        self._held, self._handed = [], []
        self._registry.release()


# What forked children inherited and must never release (see keep_inherited).
_INHERITED: list[object] = []


def keep_inherited(value: object) -> None:
    """In a forked child, keep ``value`` (a client inherited from the parent) referenced
    for good, and disarm the ``weakref.finalize`` cleanups registered on it.

    An inherited async client's cleanup, run by garbage collection or at exit, would
    close the parent's connections through the parent's event loop, which has no thread
    in the child: scheduled on the child's own loop it fails with an asyncio traceback
    ("attached to a different loop"), and it can even unregister the parent's sockets
    from the event-loop selector both processes share. Its sockets stay open in the child
    until it exits, like any descriptor it inherited. A ``PerProcess`` passes this as
    ``on_fork`` (``eager=True``: before the child drops the value, unreferenced).
    """
    _INHERITED.append(value)
    registry: dict[weakref.finalize[Any, Any], Any] = getattr(weakref.finalize, "_registry", {})
    for finalizer in list(registry):
        found = finalizer.peek()
        if found is not None and found[0] is value:
            finalizer.detach()


# Every holder of this process, for the fork hook (weakly: a holder's life is its owner's).
_HOLDERS: weakref.WeakSet[PerProcess[Any]] = weakref.WeakSet()
_GUARDS: weakref.WeakSet[ForkGuard] = weakref.WeakSet()
_FORKING: list[ForkGuard] = []  # the guards prepared for the fork under way

#: The guard of every SQLite database mlstore opens (the disk tier's index, the node-wide
#: metadata tier). SQLite keeps the locks and mutexes of a database file per process, not
#: per connection: a child forked while a parent thread was inside a transaction would
#: find the write lock taken by a connection of its own that no thread will ever commit,
#: and one forked inside any call could find a mutex held for ever. So every SQLite call
#: runs in a section of this guard, and a fork waits until none is under way.
SQLITE = ForkGuard()


def _before_fork() -> None:
    _FORKING[:] = list(_GUARDS)
    for guard in _FORKING:
        guard._before()


def _in_parent() -> None:
    for guard in reversed(_FORKING):
        guard._after(child=False)
    _FORKING.clear()


def _in_forked_child() -> None:
    """Runs in a new child before ``fork()`` returns there, while it has one thread."""
    for guard in reversed(_FORKING):
        guard._after(child=True)
    _FORKING.clear()
    holders = list(_HOLDERS)
    for holder in holders:
        holder._lock = threading.Lock()
    for holder in holders:  # after the locks: an on_fork that raises leaves none stale
        if holder._eager:
            holder._let_go_of_inherited()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork, after_in_parent=_in_parent, after_in_child=_in_forked_child
    )
