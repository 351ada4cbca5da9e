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
are exact and take no time.

tenacity runs the loop, configured the tenacity way: its ``retry`` predicate lets only
transient errors through; the stop is its built-in attempt limit ``|`` our deadline
``|`` our budget; the wait is our full-jitter strategy; ``before_sleep`` reports each
retry. The strategies are built once per :class:`Retrier` (on its first call, so that
``import mlstore`` does not import tenacity) and each call runs on a copy.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from mlstore.config import RetryPolicy
from mlstore.errors import MlstoreError, StorageTimeoutError, TransientError

if TYPE_CHECKING:
    import tenacity

__all__ = ["Retrier", "RetryBudget"]

T = TypeVar("T")
log = logging.getLogger("mlstore.retry")

# Where a call's start, read from the injected clock, is kept: tenacity's statistics are
# per Retrying object and thread, and each call runs on its own copy. (tenacity's
# ``RetryCallState.start_time`` comes from its own monotonic clock, which a test's
# clock does not move, so the deadline cannot be measured from it.)
_STARTED = "mlstore_started"


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


def _jittered(
    policy: RetryPolicy, rng: Callable[[], float], attempt: int, error: BaseException
) -> float:
    """Full jitter below the doubling ceiling of ``attempt``, floored by the error's
    ``Retry-After`` (the server knows better than our guess when it will take us back)."""
    ceiling = min(policy.backoff_max, policy.backoff_base * (2 ** (attempt - 1)))
    delay: float = rng() * ceiling
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        delay = max(delay, float(retry_after))
    return delay


def _failure(retry_state: tenacity.RetryCallState) -> BaseException:
    """The error of the attempt just made (tenacity consults waits, stops and
    ``before_sleep`` only after a failure its ``retry`` predicate accepted)."""
    outcome = retry_state.outcome
    error = outcome.exception() if outcome is not None else None
    return error if error is not None else Exception()


class _Strategies(NamedTuple):
    """Constructors of the strategy classes, which subclass tenacity's own bases."""

    before_deadline: Callable[[float, Callable[[], float]], tenacity.stop.stop_base]
    budget_pays: Callable[[RetryBudget], tenacity.stop.stop_base]
    full_jitter: Callable[[RetryPolicy, Callable[[], float]], tenacity.wait.wait_base]


@functools.cache
def _strategies() -> _Strategies:
    """Define the strategy classes, once per process, when the first call needs them:
    their bases live in tenacity, which ``import mlstore`` must not import."""
    import tenacity

    class BeforeDeadline(tenacity.stop.stop_base):
        """Stop when the next attempt could not start before ``deadline`` seconds after
        the call began, both read from the injected ``clock``."""

        def __init__(self, deadline: float, clock: Callable[[], float]) -> None:
            self.deadline = deadline
            self.clock = clock

        def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
            # tenacity asks the wait strategy first, so the coming delay is known here.
            started: float = retry_state.retry_object.statistics[_STARTED]
            return self.clock() - started + retry_state.upcoming_sleep > self.deadline

    class BudgetPays(tenacity.stop.stop_base):
        """Stop unless the budget pays for a retry. It spends, so it must be the last
        condition of the stop: ``|`` evaluates left to right and stops at the first
        that holds, so tokens go only to a retry that will happen."""

        def __init__(self, budget: RetryBudget) -> None:
            self.budget = budget

        def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
            error = _failure(retry_state)
            if self.budget.spend(error):
                return False
            log.debug("retry budget empty: not retrying %s", error)
            return True

    class FullJitter(tenacity.wait.wait_base):
        """Full jitter with the ``Retry-After`` floor, drawn from the injected ``rng``."""

        def __init__(self, policy: RetryPolicy, rng: Callable[[], float]) -> None:
            self.policy = policy
            self.rng = rng

        def __call__(self, retry_state: tenacity.RetryCallState) -> float:
            return _jittered(
                self.policy, self.rng, retry_state.attempt_number, _failure(retry_state)
            )

    return _Strategies(BeforeDeadline, BudgetPays, FullJitter)


def _mark_start(clock: Callable[[], float], retry_state: tenacity.RetryCallState) -> None:
    """tenacity's ``before`` hook: note when the call's first attempt starts."""
    if retry_state.attempt_number == 1:
        retry_state.retry_object.statistics[_STARTED] = clock()


def _report_retry(
    on_retry: Callable[[MlstoreError, int, float], None], retry_state: tenacity.RetryCallState
) -> None:
    """tenacity's ``before_sleep`` hook: the retry is decided (and paid for)."""
    error = _failure(retry_state)
    if isinstance(error, MlstoreError):  # always, past the retry predicate
        on_retry(error, retry_state.attempt_number, retry_state.upcoming_sleep)


class Retrier:
    """Runs calls under a :class:`~mlstore.config.RetryPolicy`.

    The arguments are read once, when the first call builds the tenacity strategies.

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
        self._configured: tenacity.Retrying | None = None

    def backoff(self, attempt: int, error: BaseException) -> float:
        """The wait before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
        return _jittered(self.policy, self.rng, attempt, error)

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()``, retried on transient errors within the policy and the budget."""
        # A copy per call: a Retrying keeps its loop state per thread, and a retried
        # function may itself call through this Retrier.
        retrying = (self._configured or self._configure()).copy()
        try:
            result: T = retrying(fn)
        except TransientError as error:
            if self.on_give_up is not None:
                self.on_give_up(error, retrying.statistics.get("attempt_number", 1))
            raise
        self.budget.earn()
        return result

    def _configure(self) -> tenacity.Retrying:
        """The configured Retrying every call copies. Two threads' first calls may both
        build one; either serves, since they are equal."""
        import tenacity

        kit = _strategies()
        p = self.policy
        stop = (
            tenacity.stop_after_attempt(p.max_attempts)
            | kit.before_deadline(p.deadline, self.clock)
            | kit.budget_pays(self.budget)  # last: it spends
        )
        on_retry = self.on_retry
        self._configured = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientError),
            stop=stop,
            wait=kit.full_jitter(p, self.rng),
            before=functools.partial(_mark_start, self.clock),
            before_sleep=None if on_retry is None else functools.partial(_report_retry, on_retry),
            sleep=self.sleep,
            reraise=True,
        )
        return self._configured
