"""Hedged reads: when a read is slow, send a second copy and take the first answer.

A few requests in a thousand land on a slow server or a congested path and take ten
times the median; at thousands of reads per step, one of them holds up every step.
Sending a second copy of a read that has not answered by the p95 latency cuts that tail
for a few percent more requests (Dean & Barroso, "The Tail at Scale", CACM 2013).

:class:`Hedge` holds the policy of one Store: when to hedge (a fixed delay, or a
percentile of the latencies it has seen), and a cap so that hedges stay under 5% of
reads even when everything is slow. :func:`hedged` runs one read that way on an asyncio
loop: the loser is cancelled, which closes its connection.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["Hedge", "hedged"]

T = TypeVar("T")

_WINDOW = 512  # latencies kept for the percentile
_MIN_SAMPLES = 20  # no percentile-based hedge before this many reads were seen


class Hedge:
    """When to send a second copy of a read, and how many may be sent.

    Args:
        after: seconds, or ``"pNN"``: the NN-th percentile of observed latencies.
        max_fraction: hedges allowed per read, over the Store's life (plus one).
        on_hedge: called when a second request is sent.
        on_win: called when the second request answered first.
    """

    def __init__(
        self,
        after: float | str,
        *,
        max_fraction: float = 0.05,
        on_hedge: Callable[[], None] = lambda: None,
        on_win: Callable[[], None] = lambda: None,
    ) -> None:
        self.after = after
        self.max_fraction = max_fraction
        self.on_hedge = on_hedge
        self.on_win = on_win
        self._latencies: collections.deque[float] = collections.deque(maxlen=_WINDOW)
        self._reads = 0
        self._hedges = 0
        self._lock = threading.Lock()

    def delay(self) -> float | None:
        """Seconds to wait before hedging this read, or ``None`` (not yet known)."""
        if isinstance(self.after, float | int):
            return float(self.after)
        with self._lock:
            if len(self._latencies) < _MIN_SAMPLES:
                return None
            ordered = sorted(self._latencies)
        rank = int(self.after[1:]) / 100
        return ordered[min(len(ordered) - 1, int(rank * len(ordered)))]

    def started(self) -> None:
        with self._lock:
            self._reads += 1

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._latencies.append(seconds)

    def allow(self) -> bool:
        """Take one hedge from the allowance (False if it is spent)."""
        with self._lock:
            if self._hedges + 1 > self.max_fraction * self._reads + 1:
                return False
            self._hedges += 1
        self.on_hedge()
        return True


async def hedged(hedge: Hedge | None, make: Callable[[], Awaitable[T]]) -> T:
    """``await make()``, with a second ``make()`` sent if the first is slow.

    The first successful answer wins and the other task is cancelled. If the first to
    finish failed, the other is awaited instead; if both fail, the first error is raised.
    """
    import asyncio

    if hedge is None:
        return await make()
    hedge.started()
    delay = hedge.delay()
    began = time.monotonic()
    first = asyncio.ensure_future(make())
    if delay is None:
        result = await first
        hedge.observe(time.monotonic() - began)
        return result
    done, _ = await asyncio.wait({first}, timeout=delay)
    if done or not hedge.allow():
        result = await first
        hedge.observe(time.monotonic() - began)
        return result
    second = asyncio.ensure_future(make())
    tasks = {first, second}
    error: BaseException | None = None
    try:
        while tasks:
            done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is None:
                    if task is second:
                        hedge.on_win()
                    hedge.observe(time.monotonic() - began)
                    return task.result()
                error = error or task.exception()
        assert error is not None
        raise error
    finally:
        for task in tasks:
            task.cancel()
        if tasks:  # let the loser unwind (close its connection) before returning
            await asyncio.gather(*tasks, return_exceptions=True)
