""":class:`~mlstore.metrics.Stats` as text and as HTML (for notebooks)."""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING

from mlstore._util.units import human_size
from mlstore.metrics._stats import OPERATIONS, TIERS

if TYPE_CHECKING:
    from mlstore.metrics._stats import Stats

__all__ = ["html_tables", "latency_rows", "seconds", "text_table"]

_MIN_WIDTH = 15  # of a counter column in the text table
_GAP = 2  # spaces at least between two columns of the text table


def seconds(value: float) -> str:
    """A duration as ``"3.2 ms"`` (``"-"`` when unknown)."""
    if math.isnan(value):
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1e3:.1f} ms"
    return f"{value:.2f} s"


def latency_rows(stats: Stats) -> list[tuple[str, str, int, dict[str, float]]]:
    """``(op, protocol, count, percentiles)`` of every timed operation, sorted."""
    return [
        (op, proto, hist.count, hist.percentiles())
        for (op, proto), hist in sorted(stats.latency.items())
        if hist.count
    ]


def _columns(header: list[str], rows: list[list[str]]) -> list[str]:
    """Right-aligned columns (the first left-aligned), each as wide as its longest cell
    plus a gap, and 15 at least (a fixed width ran long names into their neighbour)."""
    first = max(len(header[0]), *(len(r[0]) for r in rows)) + _GAP
    widths = [
        max(_MIN_WIDTH, len(h) + _GAP, *(len(r[i + 1]) + _GAP for r in rows))
        for i, h in enumerate(header[1:])
    ]

    def line(cells: list[str]) -> str:
        return cells[0].ljust(first) + "".join(
            v.rjust(w) for v, w in zip(cells[1:], widths, strict=True)
        )

    return [line(header), *(line(r) for r in rows)]


def text_table(stats: Stats) -> str:
    """Counters, one row per label (protocol or tier), then request latencies."""
    rows = stats.by_protocol
    if not rows and not stats.latency:
        return "(no activity)"
    lines: list[str] = []
    if rows:
        names = sorted({m for m, _ in stats.counters})
        cells = [[p, *(str(rows[p].get(n, 0)) for n in names)] for p in sorted(rows)]
        lines += _columns(["protocol", *names], cells)
    timed = latency_rows(stats)
    if timed:
        if lines:
            lines.append("")
        cells = [
            [f"{op} {proto}", str(n), *(seconds(v) for v in pct.values())]
            for op, proto, n, pct in timed
        ]
        lines += _columns(["latency", "requests", "p50", "p95", "p99"], cells)
    return "\n".join(lines)


def _cell(name: str, value: int) -> str:
    text = human_size(value) if "bytes" in name else f"{value:,}"
    return f'<td style="text-align:right">{html.escape(text)}</td>'


def _table(title: str, first: str, names: list[str], rows: dict[str, dict[str, int]]) -> str:
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(
        f"<tr><td>{html.escape(label)}</td>"
        + "".join(_cell(n, rows[label].get(n, 0)) for n in names)
        + "</tr>"
        for label in sorted(rows)
    )
    caption = f'<caption style="text-align:left"><b>{html.escape(title)}</b></caption>'
    return f"<table>{caption}<tr><th>{html.escape(first)}</th>{head}</tr>{body}</table>"


def html_tables(stats: Stats) -> str:
    """Grouped HTML tables: cache tiers, backends (sizes human-readable), requests by
    operation, and request latencies."""
    by_label = stats.by_protocol
    op_counters = {f"{op}_requests" for op in OPERATIONS}
    tiers = {label: row for label, row in by_label.items() if label in TIERS}
    backends = {
        label: {n: v for n, v in row.items() if n not in op_counters}
        for label, row in by_label.items()
        if label not in TIERS
    }
    parts: list[str] = []
    if tiers:
        names = sorted({n for row in tiers.values() for n in row})
        parts.append(_table("Cache tiers", "tier", names, tiers))
    backends = {label: row for label, row in backends.items() if row}
    if backends:
        names = sorted({n for row in backends.values() for n in row})
        parts.append(_table("Backends", "backend", names, backends))
    by_op = stats.requests_by_op()
    if by_op:
        ops = [op for op in OPERATIONS if any(op in row for row in by_op.values())]
        parts.append(_table("Requests by operation", "backend", ops, by_op))
    timed = latency_rows(stats)
    if timed:
        body = "".join(
            f"<tr><td>{html.escape(op)}</td><td>{html.escape(proto)}</td>"
            f'<td style="text-align:right">{n:,}</td>'
            + "".join(f'<td style="text-align:right">{seconds(v)}</td>' for v in pct.values())
            + "</tr>"
            for op, proto, n, pct in timed
        )
        parts.append(
            '<table><caption style="text-align:left"><b>Request latency</b></caption>'
            "<tr><th>op</th><th>backend</th><th>requests</th><th>p50</th><th>p95</th>"
            f"<th>p99</th></tr>{body}</table>"
        )
    if not parts:
        return "<p>(no activity)</p>"
    return "<div>" + "".join(parts) + "</div>"
