"""A sampler's order, shared with the node cache's eviction (Belady's rule).

The :class:`~mlstore.torch.PrefetchSampler` tells the node cache, through
:meth:`Store.plan_reads <mlstore.Store.plan_reads>`, where its reader stands and when
it will next read each sample it warmed or handed out:

- a sample read ahead into the window is due at its position in this epoch;
- a sample handed to the DataLoader keeps that due until the reader is ``lag``
  positions past it (the DataLoader's workers read what it hands out a little later:
  it must not look finished before they have read it); then it is due at its position
  in the next epoch, when the next epoch's order can be known in advance, or never.

The next epoch's order is known for a ``SequentialSampler``, a ``DistributedSampler``
(a function of its seed and epoch) and a ``RandomSampler`` drawing from its own
``generator``; batch samplers over any of these too. Other samplers (a
``RandomSampler`` on torch's global generator, whose state other code also draws
from) give no next-epoch order, and their samples are due never once read: evicted
first, by least recent use, which is LRU's order for them. A wrong guess would cost
only hits, never correctness: eviction chooses what to drop, not what is served.
"""

from __future__ import annotations

import collections
import copy
import logging
from typing import Any, Protocol

import torch.utils.data

from mlstore.errors import MlstoreError
from mlstore.store import Store

__all__ = ["Plan", "flat", "predict_next"]

log = logging.getLogger("mlstore.torch")
#: Samples handed out, or read ahead, between two reports to the node cache.
_REPORT_EVERY = 8


class Addressed(Protocol):
    def url(self, i: int) -> str: ...


def flat(item: Any) -> list[int]:
    """The sample indices of a sampler's item (an index, or a batch of them)."""
    if isinstance(item, (list, tuple)):
        return [int(i) for i in item]
    return [int(item)]


def predict_next(sampler: Any) -> list[int] | None:
    """The order ``sampler`` will give when iterated next, without disturbing it, or
    ``None`` if that cannot be known (call after its current epoch has begun)."""
    data = torch.utils.data
    try:
        if isinstance(sampler, data.BatchSampler):
            return predict_next(sampler.sampler)
        if isinstance(sampler, data.SequentialSampler):
            return list(range(len(sampler)))
        if isinstance(sampler, data.DistributedSampler):
            twin = copy.copy(sampler)
            twin.set_epoch(sampler.epoch + 1)
            return [int(i) for i in twin]
        if isinstance(sampler, data.RandomSampler):
            gen = sampler.generator
            whole = not sampler.replacement and sampler.num_samples == len(sampler.data_source)
            if gen is None or not whole:
                return None
            clone = torch.Generator(device=gen.device)
            clone.set_state(gen.get_state())
            shuffled = copy.copy(sampler)
            shuffled.generator = clone
            return [int(i) for i in shuffled]
    except (TypeError, AttributeError, RuntimeError) as exc:
        log.debug("cannot predict the next epoch of %s: %s", type(sampler).__name__, exc)
    return None


class Plan:
    """One reader's plan, reported to the node cache as it advances.

    Args:
        store: the Store whose node cache evicts by it.
        dataset: maps indices to URLs.
        name: the plan's name on the node (unique per sampler).
        base: the reader's position when this epoch began (over all epochs).
        lag: positions a handed-out sample stays due at its current position.
    """

    def __init__(self, store: Store, dataset: Addressed, name: str, base: int, lag: int) -> None:
        self.store = store
        self.dataset = dataset
        self.name = name
        self.base = base
        self.lag = lag
        self.read = 0  # indices read ahead from the sampler this epoch
        self.taken = 0  # indices handed out this epoch
        self.handed: collections.deque[tuple[int, int]] = collections.deque()  # (index, due)
        self.reports: list[tuple[str, int | None]] = []
        self.next_due: dict[int, int] | None = None
        self.predicted = False
        self.failed = False

    def ahead(self, i: int) -> None:
        """Index ``i`` was read ahead from the sampler: due at its position."""
        self.reports.append((self.dataset.url(i), self.base + self.read))
        self.read += 1

    def handed_out(self, indices: list[int], sampler: Any) -> None:
        if not self.predicted:
            self.predicted = True
            upcoming = predict_next(sampler)
            if upcoming is not None:
                start = self.base + len(upcoming)  # epochs of equal length
                self.next_due = {}
                for q, i in enumerate(upcoming):
                    self.next_due.setdefault(i, start + q)
        for i in indices:
            self.handed.append((i, self.base + self.taken))
            self.taken += 1

    def flush(self) -> None:
        """Report, if enough changed since the last report (before warms start, so
        that what they fill is planned from the first)."""
        if len(self.reports) >= _REPORT_EVERY or (
            self.handed and self.handed[0][1] < self.base + self.taken - self.lag - _REPORT_EVERY
        ):
            self.report(self.base + self.taken - self.lag)

    def report(self, cursor: int, final: bool = False) -> None:
        """Send what changed: samples handed out before ``cursor`` are due next epoch."""
        if self.failed:
            return
        nxt = self.next_due or {}
        updates, self.reports = self.reports, []
        while self.handed and (final or self.handed[0][1] < cursor):
            i, _ = self.handed.popleft()
            updates.append((self.dataset.url(i), nxt.get(i)))
        try:
            self.store.plan_reads(self.name, max(0, cursor), updates)
        except (MlstoreError, OSError) as exc:  # eviction falls back to LRU: still safe
            self.failed = True
            log.warning("the node cache cannot take this sampler's plan: %s", exc)

    def finish(self) -> int:
        """The epoch ended (or broke): report everything; the next epoch's base."""
        end = self.base + self.taken
        self.report(end, final=True)
        return end
