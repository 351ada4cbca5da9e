"""The one retry layer.

Every request a Store makes goes through :class:`Retrier`, and nothing under it
retries: the cloud SDKs' own loops are turned off in the backends. A failure is retried
only when it is a :class:`~mlstore.errors.TransientError` (throttling, 5xx, timeouts,
dropped connections); anything else fails at once.

Between attempts the delay is drawn with *full jitter*: uniformly in
``[0, min(backoff_max, backoff_base * 2**n))``, so a thousand workers throttled at the
same moment do not come back at the same moment. A server's ``Retry-After`` is honoured
as a lower bound. Attempts stop at ``max_attempts`` or when the next one could not start
before ``deadline`` seconds, whichever comes first.

A per-process :class:`RetryBudget` (a token bucket, as the AWS SDKs keep) caps the extra
load: each retry spends tokens, each success earns one back, and with the bucket empty a
failure is raised instead of retried, so a storm of errors cannot multiply the traffic.

``sleep``, ``clock`` and ``random`` are injectable, so tests of backoff and deadlines
are exact and take no time (tenacity runs the loop; the waits and stops are ours).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from mlstore.config import RetryPolicy
from mlstore.errors import MlstoreError, StorageTimeoutError, TransientError

__all__ = ["Retrier", "RetryBudget"]

T = TypeVar("T")
log = logging.getLogger("mlstore.retry")


class RetryBudget:
    """A token bucket that bounds retries per process.

    Args:
        capacity: tokens when full (and at start).
        retry_cost: tokens a retry spends (``timeout_cost`` for a timeout, which is
            costlier to the service and to the caller).
        refund: tokens a success earns back.
    """

    def __init__(
        self,
        capacity: float = 500.0,
        retry_cost: float = 5.0,
        timeout_cost: float = 10.0,
        refund: float = 1.0,
    ) -> None:
        self.capacity = capacity
        self.retry_cost = retry_cost
        self.timeout_cost = timeout_cost
        self.refund = refund
        self._tokens = capacity
        self._lock = threading.Lock()

    @property
    def tokens(self) -> float:
        return self._tokens

    def spend(self, error: BaseException) -> bool:
        """Take the cost of retrying after ``error``; False if the bucket cannot pay."""
        cost = self.timeout_cost if isinstance(error, StorageTimeoutError) else self.retry_cost
        with self._lock:
            if self._tokens < cost:
                return False
            self._tokens -= cost
            return True

    def earn(self) -> None:
        with self._lock:
            self._tokens = min(self.capacity, self._tokens + self.refund)


class Retrier:
    """Runs calls under a :class:`~mlstore.config.RetryPolicy`.

    Args:
        policy: attempts, deadline and backoff.
        budget: the process's retry budget.
        sleep: waits between attempts (injectable).
        clock: monotonic seconds (injectable).
        rng: returns a float in [0, 1) (injectable).
        on_retry: ``on_retry(error, attempt, delay)`` before each wait (metrics).
        on_give_up: ``on_give_up(error, attempts)`` when a transient error is raised.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        budget: RetryBudget,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        on_retry: Callable[[MlstoreError, int, float], None] | None = None,
        on_give_up: Callable[[MlstoreError, int], None] | None = None,
    ) -> None:
        self.policy = policy
        self.budget = budget
        self.sleep = sleep
        self.clock = clock
        self.rng = rng
        self.on_retry = on_retry
        self.on_give_up = on_give_up

    def backoff(self, attempt: int, error: BaseException) -> float:
        """The wait before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
        p = self.policy
        ceiling = min(p.backoff_max, p.backoff_base * (2 ** (attempt - 1)))
        delay: float = self.rng() * ceiling
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            delay = max(delay, float(retry_after))
        return delay

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()``, retried on transient errors within the policy and the budget."""
        import tenacity

        started = self.clock()

        def wait(retry_state: tenacity.RetryCallState) -> float:
            error = retry_state.outcome.exception() if retry_state.outcome else None
            delay: float = self.backoff(retry_state.attempt_number, error or Exception())
            return delay

        def stop(retry_state: tenacity.RetryCallState) -> bool:
            # tenacity has already asked wait() for the coming delay
            error = retry_state.outcome.exception() if retry_state.outcome else None
            attempt = retry_state.attempt_number
            if not isinstance(error, TransientError) or attempt >= self.policy.max_attempts:
                return True
            delay = retry_state.upcoming_sleep
            if self.clock() - started + delay > self.policy.deadline:
                return True  # the next attempt could not start before the deadline
            if not self.budget.spend(error):
                log.debug("retry budget empty: not retrying %s", error)
                return True
            if self.on_retry is not None:
                self.on_retry(error, attempt, delay)
            return False

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientError),
            stop=stop,
            wait=wait,
            sleep=self.sleep,
            reraise=True,
        )
        try:
            result = retrying(fn)
        except TransientError as error:
            if self.on_give_up is not None:
                self.on_give_up(error, retrying.statistics.get("attempt_number", 1))
            raise
        self.budget.earn()
        return result
