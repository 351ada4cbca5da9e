"""Counters kept by a Store, and the :class:`Stats` snapshot that ``stats()`` returns.

Counters are plain integers behind one lock, keyed by a metric name and a protocol
label (never by URL, so no key or secret reaches a label). A snapshot is an immutable
copy; subtracting two snapshots gives what happened in between::

    before = store.stats()
    ...
    print(store.stats() - before)
"""

from __future__ import annotations

import html
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

__all__ = ["Metrics", "Stats"]

#: Metric names and what they count.
METRICS: dict[str, str] = {
    "requests": "calls made to a storage backend",
    "bytes_read": "bytes received from a storage backend",
    "bytes_written": "bytes sent to a storage backend",
    "errors": "backend calls that raised",
}

_MIN_WIDTH = 15  # of a counter column in Stats.table
_GAP = 2  # spaces at least between two columns of Stats.table


@dataclass(frozen=True)
class Stats:
    """A snapshot of a Store's counters.

    ``stats["requests"]`` is the total over all protocols;
    ``stats.by_protocol["s3"]["requests"]`` the count for one.
    """

    counters: Mapping[tuple[str, str], int] = field(default_factory=dict)

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

    def as_dict(self) -> dict[str, int]:
        """Totals by metric name."""
        return {name: self[name] for name in sorted({m for m, _ in self.counters})}

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __sub__(self, other: object) -> Stats:
        if not isinstance(other, Stats):
            return NotImplemented
        keys = set(self.counters) | set(other.counters)
        diff = {k: self.counters.get(k, 0) - other.counters.get(k, 0) for k in keys}
        # keep only what changed, so ``print(after - before)`` shows just the activity
        return Stats({k: v for k, v in diff.items() if v})

    def table(self) -> str:
        """A plain-text table, one row per protocol.

        Each column is as wide as its longest cell plus a two-space gap (15 at least,
        so short tables look as they always did): a fixed width ran long names such as
        ``dedupe_bytes_saved`` into their neighbour.
        """
        rows = self.by_protocol
        names = sorted({m for m, _ in self.counters})
        if not rows:
            return "(no activity)"
        cells = {p: [str(rows[p].get(n, 0)) for n in names] for p in sorted(rows)}
        first = max(len("protocol"), *(len(p) for p in rows)) + 2
        widths = [
            max(_MIN_WIDTH, len(n) + _GAP, *(len(c[i]) + _GAP for c in cells.values()))
            for i, n in enumerate(names)
        ]

        def line(label: str, values: list[str]) -> str:
            return label.ljust(first) + "".join(
                v.rjust(w) for v, w in zip(values, widths, strict=True)
            )

        return "\n".join([line("protocol", names), *(line(p, c) for p, c in cells.items())])

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        names = sorted({m for m, _ in self.counters})
        rows = self.by_protocol
        head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
        body = "".join(
            f"<tr><td>{html.escape(p)}</td>"
            + "".join(f"<td>{rows[p].get(n, 0)}</td>" for n in names)
            + "</tr>"
            for p in sorted(rows)
        )
        return f"<table><tr><th>protocol</th>{head}</tr>{body}</table>"


class Metrics:
    """Thread-safe counters. One per Store; not shared across processes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()

    def add(self, name: str, protocol: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[(name, protocol)] += amount

    def served(self, tier: str, nbytes: int) -> None:
        """One hit of ``tier`` that served ``nbytes`` (``hits`` and ``bytes_served``,
        counted together: the hot path takes the lock once)."""
        with self._lock:
            counts = self._counts
            counts[("hits", tier)] += 1
            counts[("bytes_served", tier)] += nbytes

    def snapshot(self) -> Stats:
        with self._lock:
            return Stats(dict(self._counts))

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
