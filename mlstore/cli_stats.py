"""``mlstore cache stats``: the node-wide totals of a cache directory, readable or JSON.

What every process that shared the directory counted (all DataLoader workers, every job
on the node, exited ones too): per tier hits, misses, bytes, evictions and integrity
failures; remote requests by backend and operation; retries, throttles, resumes and
hedges; bytes down and up; what the cache saved; request latency p50/p95/p99.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import IO, TYPE_CHECKING, Any

from mlstore._util.units import human_size

if TYPE_CHECKING:
    from mlstore.metrics import Stats

__all__ = ["add_parser", "run", "summary"]

_TIER_COLUMNS = (
    "hits",
    "misses",
    "bytes_served",
    "bytes_fetched",
    "evictions",
    "integrity_failures",
    "cache_errors",
)
_RELIABILITY = (
    "errors",
    "retries",
    "throttles",
    "give_ups",
    "resumes",
    "restarts",
    "hedges",
    "hedge_wins",
    "failovers",
    "integrity_failures",
)


def add_parser(cache_sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``stats`` to the ``cache`` sub-commands (``args.func(args, out)``)."""
    stats = cache_sub.add_parser(
        "stats", help="node-wide totals of every process that used the cache directory"
    )
    stats.add_argument(
        "--cache-dir", metavar="DIR", help="the cache directory (default: the configured one)"
    )
    stats.add_argument("--json", action="store_true", help="print the totals as JSON")
    stats.set_defaults(func=run, needs_store=False)


def run(args: argparse.Namespace, out: IO[str]) -> int:
    """Print the node's totals; 0."""
    from mlstore.config import CacheConfig
    from mlstore.metrics import node_stats, node_stats_since

    root = getattr(args, "cache_dir", None) or CacheConfig().resolved_disk_dir
    stats = node_stats(root)
    report = summary(stats)
    since = node_stats_since(root)
    head = {
        "cache_dir": root,
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)) if since else None,
    }
    if getattr(args, "json", False):
        body = {**head, **report, "cost": _cost_json(stats)}
        out.write(json.dumps(body, indent=2, sort_keys=True) + "\n")
        return 0
    when = f" since {head['since']}" if head["since"] else ""
    out.write(f"node-wide totals of {root}{when}\n")
    out.write("\n".join(_text(report) + _cost_section(stats)) + "\n")
    return 0


def _cost_section(stats: Stats) -> list[str]:
    """What the requests and bytes cost, and what the cache saved, in money, at the
    configured price table (see ``docs/cost.md``); nothing before any activity."""
    if not stats.counters:
        return []
    lines = str(stats.cost).splitlines()
    return ["", "cost (US dollars, list prices; see docs/cost.md)", *(f"  {ln}" for ln in lines)]


def _cost_json(stats: Stats) -> dict[str, Any]:
    cost = stats.cost
    return {
        "currency": "USD",
        "spent": cost.spent,
        "saved": cost.saved,
        "table_version": cost.table_version,
        "egress": cost.egress,
        "by_backend": {
            proto: {"price_class": b.price_class, "spent": b.spent, "saved": b.saved}
            for proto, b in sorted(cost.by_backend.items())
        },
    }


def _nan_free(value: float) -> float | None:
    return None if math.isnan(value) else value


def summary(stats: Stats) -> dict[str, Any]:
    """The sections of the report, as plain data (what ``--json`` prints)."""
    from mlstore.metrics import TIERS

    rows = stats.by_protocol
    tiers = {
        t: {c: rows[t].get(c, 0) for c in _TIER_COLUMNS} for t in TIERS if any(rows.get(t, {}))
    }
    backends = sorted(p for p in rows if p not in TIERS)
    requests = {
        p: {**ops, "total": rows[p].get("requests", 0)}
        for p, ops in stats.requests_by_op().items()
        if p in backends
    }
    reliability = {
        p: {c: rows[p].get(c, 0) for c in _RELIABILITY}
        for p in backends
        if any(rows[p].get(c, 0) for c in _RELIABILITY)
    }
    transfer = {
        p: {"down": rows[p].get("bytes_read", 0), "up": rows[p].get("bytes_written", 0)}
        for p in backends
        if rows[p].get("bytes_read", 0) or rows[p].get("bytes_written", 0)
    }
    saved = {
        p: {"requests": rows[p].get("saved_requests", 0), "bytes": rows[p].get("saved_bytes", 0)}
        for p in backends
        if rows[p].get("saved_requests", 0)
    }
    dedupe = {
        "hits": stats.get("dedupe_hits"),
        "bytes_saved": stats.get("dedupe_bytes_saved"),
        "copies_skipped": stats.get("copies_skipped"),
        "copy_bytes_skipped": stats.get("copy_bytes_skipped"),
        "uploads_skipped": stats.get("dedupe_uploads_skipped"),
        "upload_bytes_skipped": stats.get("dedupe_bytes_skipped"),
    }
    latency: dict[str, dict[str, dict[str, Any]]] = {}
    for (op, proto), hist in sorted(stats.latency.items()):
        if hist.count:
            pct = {k: _nan_free(v) for k, v in hist.percentiles().items()}
            latency.setdefault(op, {})[proto] = {"requests": hist.count, **pct}
    return {
        "tiers": tiers,
        "requests": requests,
        "reliability": reliability,
        "bytes": transfer,
        "saved": saved,
        "dedupe": dedupe,
        "latency": latency,
    }


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def _table(title: str, columns: list[str], rows: dict[str, list[str]]) -> list[str]:
    """A titled table: one row per label, columns right-aligned (empty: no lines)."""
    if not rows:
        return []
    first = max(len(title), *(len(r) + 2 for r in rows)) + 2
    widths = [max(len(c), *(len(v[i]) for v in rows.values())) + 2 for i, c in enumerate(columns)]

    def line(label: str, cells: list[str]) -> str:
        return label.ljust(first) + "".join(v.rjust(w) for v, w in zip(cells, widths, strict=True))

    return ["", line(title, columns), *(line("  " + k, v) for k, v in rows.items())]


def _cell(name: str, value: int) -> str:
    return human_size(value) if "bytes" in name else str(value)


def _text(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    tiers = report["tiers"]
    lines += _table(
        "cache tiers",
        [c.replace("_", " ") for c in _TIER_COLUMNS],
        {t: [_cell(c, v[c]) for c in _TIER_COLUMNS] for t, v in tiers.items()},
    )
    requests = report["requests"]
    ops = sorted({op for row in requests.values() for op in row if op != "total"})
    lines += _table(
        "remote requests",
        [*ops, "total"],
        {p: [str(row.get(op, 0)) for op in [*ops, "total"]] for p, row in requests.items()},
    )
    lines += _table(
        "errors and retries",
        [c.replace("_", " ") for c in _RELIABILITY],
        {p: [str(row[c]) for c in _RELIABILITY] for p, row in report["reliability"].items()},
    )
    lines += _table(
        "bytes",
        ["down", "up"],
        {p: [human_size(row["down"]), human_size(row["up"])] for p, row in report["bytes"].items()},
    )
    lines += _table(
        "saved by the cache",
        ["requests", "bytes"],
        {p: [str(row["requests"]), human_size(row["bytes"])] for p, row in report["saved"].items()},
    )
    dedupe = report["dedupe"]
    if any(dedupe.values()):
        lines += [
            "",
            f"dedupe: {dedupe['hits']} hits ({human_size(dedupe['bytes_saved'])} not fetched "
            f"or stored twice), {dedupe['copies_skipped']} copies skipped "
            f"({human_size(dedupe['copy_bytes_skipped'])}), {dedupe['uploads_skipped']} uploads "
            f"skipped ({human_size(dedupe['upload_bytes_skipped'])})",
        ]
    latency = {
        f"{op} {proto}": [str(v["requests"]), _ms(v["p50"]), _ms(v["p95"]), _ms(v["p99"])]
        for op, by_proto in report["latency"].items()
        for proto, v in by_proto.items()
    }
    lines += _table("latency", ["requests", "p50", "p95", "p99"], latency)
    return lines or ["", "(no activity recorded)"]
