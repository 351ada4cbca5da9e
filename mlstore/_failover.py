"""Choosing a replica of a mount: try them in order, and skip one that keeps failing.

A replica that fails with a transient error ``threshold`` times in a row is *open*
(skipped) for ``cooldown`` seconds; after that it is tried again like any other, a
success resets its count, and ``threshold`` more failures open it again. When every
replica is open, all are tried anyway, in order: a cool-down never turns a slow
recovery into a certain failure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from mlstore.errors import MlstoreError, NotFoundError, TransientError

__all__ = ["CircuitBreaker", "with_failover"]

T = TypeVar("T")
K = TypeVar("K")


@dataclass
class _State:
    failures: int = 0
    open_until: float = 0.0


class CircuitBreaker:
    """Per-key failure counting with a cool-down. Thread-safe.

    Args:
        threshold: consecutive transient failures that open the circuit.
        cooldown: seconds an open circuit stays open.
        clock: returns seconds; injectable so tests need no waiting.
    """

    def __init__(
        self,
        threshold: int = 3,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self._states: dict[str, _State] = {}
        self._lock = threading.Lock()

    def is_open(self, key: str) -> bool:
        """Whether ``key`` is cooling down and should be skipped."""
        with self._lock:
            state = self._states.get(key)
            return state is not None and state.open_until > self.clock()

    def success(self, key: str) -> None:
        with self._lock:
            self._states.pop(key, None)

    def failure(self, key: str) -> bool:
        """Record a failure; returns True when this failure opened the circuit."""
        with self._lock:
            state = self._states.setdefault(key, _State())
            state.failures += 1
            if state.failures >= self.threshold and state.open_until <= self.clock():
                state.open_until = self.clock() + self.cooldown
                state.failures = 0
                return True
            return False


def with_failover(
    replicas: Sequence[K],
    call: Callable[[K], T],
    *,
    breaker: CircuitBreaker,
    key: Callable[[K], str],
    on_failover: Callable[[K, MlstoreError], None] | None = None,
) -> T:
    """Run ``call`` on the first replica that answers.

    A :class:`NotFoundError` or a :class:`TransientError` moves on to the next replica;
    any other error (permission, precondition, bad input) is raised at once, since
    another replica would not make it right. When every replica fails, the error of
    the first one tried is raised (a not-found is preferred to a transient error only
    when every replica said not-found).
    """
    if len(replicas) == 1:
        return call(replicas[0])
    ordered = [r for r in replicas if not breaker.is_open(key(r))]
    ordered += [r for r in replicas if r not in ordered]  # all open: try them anyway
    errors: list[MlstoreError] = []
    for index, replica in enumerate(ordered):
        try:
            result = call(replica)
        except NotFoundError as exc:
            errors.append(exc)
        except TransientError as exc:
            breaker.failure(key(replica))
            errors.append(exc)
        else:
            breaker.success(key(replica))
            return result
        if on_failover is not None and index + 1 < len(ordered):
            on_failover(replica, errors[-1])
    if all(isinstance(e, NotFoundError) for e in errors):
        raise errors[0]
    raise next(e for e in errors if not isinstance(e, NotFoundError))
