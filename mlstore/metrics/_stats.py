"""The immutable snapshots: :class:`Histogram` (request latencies) and :class:`Stats`.

Both add and subtract, so snapshots taken in many processes sum to the node's totals and
two snapshots of one process give what happened in between.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

__all__ = ["LATENCY_BOUNDS", "OPERATIONS", "TIERS", "Histogram", "Stats"]

if TYPE_CHECKING:
    from mlstore.cost import Cost

#: Upper bounds (seconds) of the latency buckets: four a decade, from 100 µs to 100 s,
#: plus one for anything slower. Fixed, so that histograms of every process on every
#: node add up bucket by bucket (Prometheus sums ``_bucket`` series the same way).
LATENCY_BOUNDS: tuple[float, ...] = tuple(float(f"{10 ** (k / 4):.3g}") for k in range(-16, 9))

#: Remote operations counted one by one (``{op}_requests`` counters, latency histograms).
OPERATIONS = ("get", "head", "put", "list", "delete", "copy", "mkdir", "upload_part", "upload")

#: Labels that name a cache tier rather than a backend protocol.
TIERS = ("memory", "disk", "cache", "metadata")

_QUANTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}


@dataclass(frozen=True)
class Histogram:
    """Counts of durations in fixed buckets: ``counts[i]`` is how many took at most
    ``bounds[i]`` seconds and more than ``bounds[i - 1]``; the last count is of those
    slower than every bound. ``sum`` is their total in seconds, ``count`` how many."""

    bounds: tuple[float, ...] = LATENCY_BOUNDS
    counts: tuple[int, ...] = ()
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            object.__setattr__(self, "counts", (0,) * (len(self.bounds) + 1))
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError(
                f"a histogram of {len(self.bounds)} bounds has {len(self.bounds) + 1} "
                f"counts, not {len(self.counts)}"
            )

    def _check(self, other: Histogram) -> None:
        if other.bounds != self.bounds:
            raise ValueError("histograms with different bucket bounds do not add up")

    def __add__(self, other: object) -> Histogram:
        if not isinstance(other, Histogram):
            return NotImplemented
        self._check(other)
        counts = tuple(a + b for a, b in zip(self.counts, other.counts, strict=True))
        return Histogram(self.bounds, counts, self.sum + other.sum, self.count + other.count)

    def __sub__(self, other: object) -> Histogram:
        if not isinstance(other, Histogram):
            return NotImplemented
        self._check(other)
        counts = tuple(a - b for a, b in zip(self.counts, other.counts, strict=True))
        return Histogram(self.bounds, counts, self.sum - other.sum, self.count - other.count)

    @property
    def mean(self) -> float:
        """The mean duration (NaN when empty)."""
        return self.sum / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0 to 1), interpolated linearly within its bucket (as
        Prometheus' ``histogram_quantile`` does); NaN when empty. One in the last bucket
        is reported as the largest bound: all that is known is that it is above it."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"a quantile is between 0 and 1, not {q}")
        if self.count <= 0:
            return math.nan
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            if n > 0 and seen + n >= rank:
                if i == len(self.bounds):
                    return self.bounds[-1]
                low = self.bounds[i - 1] if i else 0.0
                return low + (self.bounds[i] - low) * (rank - seen) / n
            seen += n
        return self.bounds[-1]

    def percentiles(self) -> dict[str, float]:
        """``{"p50": ..., "p95": ..., "p99": ...}`` in seconds."""
        return {name: self.quantile(q) for name, q in _QUANTILES.items()}


@dataclass(frozen=True)
class Stats:
    """A snapshot of counters and request latencies.

    ``stats["requests"]`` is the total over all labels; ``stats.by_protocol["s3"]
    ["requests"]`` the count for one. A counter's label is a backend protocol (``s3``,
    ``gs`` ...) or a cache tier (``memory``, ``disk``, ``cache``, ``metadata``), never a
    URL. ``latency[(op, protocol)]`` is the :class:`Histogram` of one operation's
    request durations on one backend.
    """

    counters: Mapping[tuple[str, str], int] = field(default_factory=dict)
    latency: Mapping[tuple[str, str], Histogram] = field(default_factory=dict)

    def __getitem__(self, name: str) -> int:
        return sum(v for (metric, _), v in self.counters.items() if metric == name)

    def get(self, name: str, protocol: str | None = None) -> int:
        if protocol is None:
            return self[name]
        return self.counters.get((name, protocol), 0)

    @property
    def by_protocol(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (metric, proto), value in self.counters.items():
            out.setdefault(proto, {})[metric] = value
        return out

    def requests_by_op(self) -> dict[str, dict[str, int]]:
        """Remote requests by backend protocol, then operation (``get``, ``head`` ...)."""
        out: dict[str, dict[str, int]] = {}
        for (metric, proto), value in sorted(self.counters.items()):
            op = metric[: -len("_requests")] if metric.endswith("_requests") else ""
            if op in OPERATIONS and value:
                out.setdefault(proto, {})[op] = value
        return out

    def percentiles(self, op: str, protocol: str | None = None) -> dict[str, float]:
        """p50, p95 and p99 of ``op``'s request durations in seconds, on ``protocol``
        (on every backend together when ``None``); NaN when none was timed."""
        found = Histogram()
        for (o, proto), hist in self.latency.items():
            if o == op and (protocol is None or proto == protocol):
                found = found + hist
        return found.percentiles()

    @property
    def cost(self) -> Cost:
        """What these requests and bytes cost, and what the cache saved, in US dollars
        at the configured price table (see :func:`mlstore.cost.estimate`)."""
        from mlstore.cost import estimate

        return estimate(self)

    def as_dict(self) -> dict[str, int]:
        """Totals by metric name."""
        return {name: self[name] for name in sorted({m for m, _ in self.counters})}

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __add__(self, other: object) -> Stats:
        if not isinstance(other, Stats):
            return NotImplemented
        counters = dict(self.counters)
        for k, v in other.counters.items():
            counters[k] = counters.get(k, 0) + v
        latency = dict(self.latency)
        for k, h in other.latency.items():
            latency[k] = latency[k] + h if k in latency else h
        return Stats(counters, latency)

    def __sub__(self, other: object) -> Stats:
        if not isinstance(other, Stats):
            return NotImplemented
        keys = set(self.counters) | set(other.counters)
        diff = {k: self.counters.get(k, 0) - other.counters.get(k, 0) for k in keys}
        latency = {}
        for k in set(self.latency) | set(other.latency):
            mine, theirs = self.latency.get(k), other.latency.get(k)
            if mine is None:
                assert theirs is not None
                mine = Histogram(theirs.bounds)
            hist = mine - theirs if theirs is not None else mine
            if hist.count:
                latency[k] = hist
        # keep only what changed, so ``print(after - before)`` shows just the activity
        return Stats({k: v for k, v in diff.items() if v}, latency)

    def table(self) -> str:
        """A plain-text table, one row per label, then request latencies if any."""
        from mlstore.metrics._render import text_table

        return text_table(self)

    def __repr__(self) -> str:
        # The totals by name and which operations were timed; ``str()`` and the
        # notebook view give the full table.
        totals = ", ".join(f"{name}={value}" for name, value in self.as_dict().items() if value)
        timed = sorted(f"{op} {proto}" for (op, proto), h in self.latency.items() if h.count)
        return f"Stats({totals or 'no activity'}; timed: {', '.join(timed) or 'nothing'})"

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        from mlstore.metrics._render import html_tables

        return html_tables(self)
