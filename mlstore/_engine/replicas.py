"""Mounts and their replicas: which physical URLs stand behind a URL, and which of them
answers (failover, with a circuit breaker).

:func:`resolve` turns a parsed URL into a :class:`Resolved` once per call; everything
below the facade works on that, so a URL is parsed and a mount looked up once.
:class:`Replicas` runs an operation on the first replica that answers: one replica is
called directly (its calls are retried as usual); with several, each gets one attempt
per sweep (a dead cloud is left quickly), and the whole sweep is retried under the
policy when every replica failed transiently.

A replica that fails with a transient error ``threshold`` times in a row is *open*
(skipped) for ``cooldown`` seconds; after that it is tried again like any other, a
success resets its count, and ``threshold`` more failures open it again. When every
replica is open, all are tried anyway, in order: a cool-down never turns a slow
recovery into a certain failure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from mlstore._engine.calls import IN_SWEEP, Calls
from mlstore.backends.base import Backend
from mlstore.errors import MlstoreError, NotFoundError, TransientError
from mlstore.url import URL, resolve_mount

__all__ = ["CircuitBreaker", "Replicas", "Resolved", "resolve", "with_failover"]

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


@dataclass(frozen=True, slots=True)
class Resolved:
    """A URL as the caller named it, with the physical URLs behind it.

    Attributes:
        url: the URL asked for (``mlstore://mount/key`` stays logical).
        replicas: the physical URLs, primary first (one for a URL that is no mount).
        key: ``str(url)``: the key of its cache entries and metadata.
    """

    url: URL
    replicas: tuple[URL, ...]
    key: str

    @property
    def primary(self) -> URL:
        """Where writes go, and the replica read first."""
        return self.replicas[0]


def resolve(url: URL, mounts: Mapping[str, Sequence[str | URL]]) -> Resolved:
    """``url`` with its mount (if any) resolved to physical URLs."""
    replicas = (url,) if url.protocol != "mlstore" else tuple(resolve_mount(url, mounts))
    return Resolved(url, replicas, str(url))


def _replica_key(url: URL) -> str:
    """Replicas are judged per bucket (or per host, or per local tree)."""
    return f"{url.protocol}://{url.bucket}"


class Replicas:
    """Runs operations on the replica of a URL that answers.

    Args:
        calls: this process's backends and retriers.
        breaker: skips a replica that keeps failing.
    """

    def __init__(self, calls: Calls, breaker: CircuitBreaker) -> None:
        self.calls = calls
        self.breaker = breaker

    def run(self, where: Resolved, fn: Callable[[URL, Backend], T]) -> T:
        """``fn(replica, its backend)`` on the first replica of ``where`` that answers."""
        replicas = where.replicas
        if len(replicas) == 1:
            return fn(replicas[0], self.calls.backend(replicas[0].protocol))
        backend = self.calls.backend
        metrics = self.calls.metrics

        def sweep() -> T:
            token = IN_SWEEP.set(True)
            try:
                return with_failover(
                    replicas,
                    lambda target: fn(target, backend(target.protocol)),
                    breaker=self.breaker,
                    key=_replica_key,
                    on_failover=lambda target, _e: metrics.add("failovers", target.protocol),
                )
            finally:
                IN_SWEEP.reset(token)

        return self.calls.retrier_for(where.url, "read").call(sweep)
