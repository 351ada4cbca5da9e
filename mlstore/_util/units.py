"""Sizes for people: ``human_size(3_500_000) == "3.3 MiB"`` (binary units, as ``ls -h``)."""

from __future__ import annotations

__all__ = ["human_size"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps the figure under 1024 (whole
    bytes, one decimal place above).

    >>> human_size(512), human_size(8_178_892)
    ('512 B', '7.8 MiB')
    """
    for unit in _UNITS[:-1]:
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} {_UNITS[-1]}"
