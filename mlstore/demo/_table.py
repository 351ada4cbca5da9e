"""The demo's result as plain, aligned text (``--json`` prints the report itself)."""

from __future__ import annotations

from typing import Any

from mlstore._util.units import human_size
from mlstore.cost import usd

__all__ = ["render", "speedup"]

_HEADER = (
    "contender", "epoch", "time", "samples/s", "GETs", "requests", "fetched", "hit mem/disk", "cost"
)  # fmt: skip


def speedup(report: dict[str, Any], epoch: int = 1) -> float | None:
    """How many times faster mlstore read epoch ``epoch`` (0-based) than plain s3fs."""
    found = report.get("contenders", {})
    try:
        mine = found["mlstore"]["epochs"][epoch]["seconds"]
        theirs = found["s3fs"]["epochs"][epoch]["seconds"]
    except (KeyError, IndexError):
        return None
    return float(theirs / mine) if mine > 0 else None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _or_na(value: Any, fmt: Any = str) -> str:
    return "n/a" if value is None else str(fmt(value))


def _row(name: str, n: int, e: dict[str, Any]) -> tuple[str, ...]:
    ratio = e.get("hit_ratio")
    hits = f"{ratio['memory']:.0%} / {ratio['disk']:.0%}" if ratio else "-"
    return (
        name if n == 0 else "",
        str(n + 1),
        f"{e['seconds']:.2f} s",
        _or_na(e["samples_per_s"], lambda v: f"{v:,.0f}"),
        _or_na(e["gets"], lambda v: f"{v:,}"),
        _or_na(e["requests"], lambda v: f"{v:,}"),
        _or_na(e["bytes_fetched"], human_size),
        hits,
        _or_na(e.get("cost_usd", e.get("spent_usd")), usd),
    )


def render(report: dict[str, Any]) -> str:
    """The table and the lines under it."""
    rows: list[tuple[str, ...]] = [_HEADER]
    for name, found in report["contenders"].items():
        rows += [_row(name, n, e) for n, e in enumerate(found["epochs"])]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADER))]
    lines = []
    for i, row in enumerate(rows):
        cells = [
            c.ljust(w) if j == 0 else c.rjust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    data = report["dataset"]
    lines[:0] = [
        f"{data['objects']} objects of {human_size(data['object_size'])} "
        f"({human_size(data['bytes'])}, {_count(data['duplicates'], 'duplicate')}) "
        f"at {data['url']}, "
        f"{report['epochs']} epochs, {report['workers']} reads in flight"
        + (f", {report['latency'] * 1000:g} ms first-byte latency" if report["latency"] else ""),
        "",
    ]
    lines.append("")
    for name, found in report["contenders"].items():
        lines.append(f"{name}: {found['how']}")
    lines += _notes(report)
    return "\n".join(lines) + "\n"


def _notes(report: dict[str, Any]) -> list[str]:
    notes = []
    mine = report["contenders"].get("mlstore")
    if mine:
        dedupe = sum(e["dedupe_bytes_saved"] for e in mine["epochs"])
        hits = sum(e["dedupe_hits"] for e in mine["epochs"])
        saved = sum(e["saved_usd"] for e in mine["epochs"])
        served = f", {hits} reads served by a cached blob of the same content" if hits else ""
        notes.append(
            f"mlstore dedupe: {human_size(dedupe)} of repeated content stored once{served}; "
            f"its cache saved {usd(saved)} of requests"
        )
    if report["counted_by"] == "proxy":
        notes.append(
            "GETs and bytes fetched: counted by the proxy in front of the emulator, the same "
            "for every contender; cost: those requests and bytes at S3 list prices"
        )
    else:
        notes.append(
            "GETs and bytes fetched: mlstore's own counters; the other contenders were not "
            "counted against a real bucket (n/a)"
        )
    fold = speedup(report)
    if fold is not None:
        notes.append(f"speed-up epoch 2 vs s3fs: {fold:.1f}x")
    for name, found in report["contenders"].items():
        if found["cache_dir"]:
            fate = "kept (--keep)" if report["kept"] else "removed at exit; --keep to keep it"
            notes.append(f"{name} cache lives in {found['cache_dir']} ({fate})")
    return notes
