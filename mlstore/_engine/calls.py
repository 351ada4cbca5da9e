"""Per-process backends, and the one counted, retried call every request goes through.

:class:`Calls` belongs to one process (the Store keeps it in a
:class:`~mlstore._util.process.PerProcess`): a backend's clients are never shared with a
forked child. Each request is counted (by operation) and timed in the Store's metrics,
and run under the :class:`~mlstore.retry.Retrier` of the retry policy that applies to its
URL and operation; inside a replica sweep (see :mod:`.replicas`) the sweep as a whole is what is
retried, so a call made there gets one attempt.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from mlstore._engine.identity import options_for
from mlstore.backends.base import Backend, Hedge, get_backend_class
from mlstore.config import StoreConfig
from mlstore.errors import MlstoreError, ThrottledError, UnsupportedOperation
from mlstore.metrics import Metrics
from mlstore.retry import Retrier, RetryBudget
from mlstore.url import URL

__all__ = ["IN_SWEEP", "Calls"]

T = TypeVar("T")
log = logging.getLogger("mlstore")

#: True while a replica sweep runs: its calls make one attempt each.
IN_SWEEP: contextvars.ContextVar[bool] = contextvars.ContextVar("mlstore_sweep", default=False)


#: The request an operation makes when its call site names none (see ``Calls.call``).
_OPS = {"read": "get", "info": "head", "write": "put"}


def protocol_of(error: MlstoreError) -> str:
    """The protocol an error's URL names (a metrics label; never the URL itself)."""
    return error.url.split("://", 1)[0] if error.url and "://" in error.url else "unknown"


class Calls:
    """One process's backends and retriers.

    Args:
        config: the Store's configuration (backend options, retry policy).
        metrics: where requests, errors, retries and bytes are counted.
        clock: monotonic seconds for the retry deadline (injectable).
        sleep: waits between attempts (injectable).
    """

    def __init__(
        self,
        config: StoreConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()
        self._retrier = Retrier(
            config.retry,
            RetryBudget(),
            sleep=sleep,
            clock=clock,
            on_retry=self._on_retry,
            on_give_up=lambda error, _n: metrics.add("give_ups", protocol_of(error)),
        )
        self._retriers: dict[tuple[str, ...], Retrier] = {}

    # ------------------------------------------------------------------ backends

    @property
    def built(self) -> dict[str, Backend]:
        """The backends this process has built so far, by protocol."""
        return dict(self._backends)

    def backend(self, protocol: str) -> Backend:
        """The backend of ``protocol`` (built on first use)."""
        backend = self._backends.get(protocol)
        if backend is None:
            with self._lock:
                backend = self._backends.get(protocol)
                if backend is None:
                    backend = self._backends[protocol] = self._build(protocol)
        return backend

    def _build(self, protocol: str) -> Backend:
        cls = get_backend_class(protocol, self.config.transport)
        opts = options_for(self.config, protocol)
        after = self.config.retry.hedge_after
        if after is None or not cls.hedges:
            return cls(opts, self.config)
        hedge = Hedge(
            after,
            on_hedge=functools.partial(self.metrics.add, "hedges", protocol),
            on_win=functools.partial(self.metrics.add, "hedge_wins", protocol),
        )
        return cls(opts, self.config, hedge=hedge)

    def writable(self, target: URL, operation: str) -> Backend:
        """The backend of ``target``, refused when it cannot write."""
        backend = self.backend(target.protocol)
        if backend.read_only:
            raise UnsupportedOperation(
                f"{target.protocol} URLs are read-only", url=str(target), operation=operation
            )
        return backend

    def close(self) -> None:
        """Release every backend's clients and connections."""
        with self._lock:
            backends, self._backends = self._backends, {}
        for backend in backends.values():
            backend.close()

    # ------------------------------------------------------------------ calls

    def count(self, backend: Backend, name: str, amount: int = 1) -> None:
        self.metrics.add(name, backend.protocol, amount)

    def count_request(self, backend: Backend, op: str) -> None:
        """One request made outside :meth:`call` (untimed): ``requests`` and
        ``{op}_requests``."""
        self.metrics.add("requests", backend.protocol)
        self.metrics.add(f"{op}_requests", backend.protocol)

    def call(
        self,
        backend: Backend,
        fn: Callable[[], T],
        url: URL | None = None,
        operation: str = "read",
        *,
        op: str | None = None,
    ) -> T:
        """``fn()`` as one counted, timed request to ``backend``, retried on transient
        errors under the policy for ``operation`` on ``url`` (one attempt inside a
        sweep). ``op`` names the request in the metrics (one of
        :data:`~mlstore.metrics.OPERATIONS`; default: ``get`` for a read, ``head`` for
        an info, ``put`` for a write)."""
        kind = op or _OPS.get(operation, operation)
        if IN_SWEEP.get():
            return self._attempt(backend, fn, kind)
        return self.retrier_for(url, operation).call(lambda: self._attempt(backend, fn, kind))

    def retrier_for(self, url: URL | None, operation: str) -> Retrier:
        """The retrier of the policy that applies (every one shares the process's budget)."""
        policy = self.config.retry
        if not policy.overrides:
            return self._retrier
        keys = policy.matching(str(url) if url is not None else "", operation)
        if not keys:
            return self._retrier
        retrier = self._retriers.get(keys)
        if retrier is None:
            base = self._retrier
            retrier = self._retriers[keys] = Retrier(
                policy.resolved(keys),
                base.budget,
                sleep=base.sleep,
                clock=base.clock,
                on_retry=base.on_retry,
                on_give_up=base.on_give_up,
            )
        return retrier

    def _attempt(self, backend: Backend, fn: Callable[[], T], op: str) -> T:
        """One attempt: counted as a request (and an error if it raises one of
        mlstore's), and timed, whatever its outcome."""
        failed = False
        start = time.perf_counter()
        try:
            return fn()
        except MlstoreError:
            failed = True
            raise
        finally:
            elapsed = time.perf_counter() - start
            self.metrics.request(op, backend.protocol, elapsed, failed=failed)

    def _on_retry(self, error: MlstoreError, attempt: int, delay: float) -> None:
        protocol = protocol_of(error)
        self.metrics.add("retries", protocol)
        if isinstance(error, ThrottledError):
            self.metrics.add("throttles", protocol)
        log.debug("retrying after %s (attempt %d, waiting %.3fs)", error, attempt, delay)
