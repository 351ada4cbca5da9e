"""Byte ranges: from Python slice bounds to what to ask a server for, written once.

``Backend.read`` takes ``start``/``end`` as Python slicing does (either may be ``None``
or negative, ``end`` is exclusive). :func:`wanted` turns them into a slice a request can
carry, and :func:`range_header` into the ``Range`` header that asks for it.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["range_header", "wanted"]


def wanted(
    start: int | None, end: int | None, size: Callable[[], int], *, suffix: bool = True
) -> slice | None:
    """The bytes to request for ``[start:end)``, or ``None`` when none can be in it.

    The slice has a start of 0 or more and a stop above it or ``None`` (to the end),
    except ``[-n:]`` with ``suffix``: ``slice(-n, None)``, the last ``n`` bytes, which
    HTTP asks for without knowing the size (``bytes=-n``). Other negative bounds count
    from the end, so ``size()`` is asked for then, and only then (it may cost a request;
    a pinned read passes the size of the pinned version). Without ``suffix`` (a service
    that has no suffix ranges, or a local file) ``[-n:]`` is resolved against the size
    too.
    """
    if suffix and start is not None and start < 0 and end is None:
        return slice(start, None)
    if (start is not None and start < 0) or (end is not None and end < 0):
        start, end, _ = slice(start, end).indices(size())
    lo = start or 0
    if end is not None and end <= lo:
        return None
    return slice(lo, end)


def range_header(want: slice) -> str | None:
    """The ``Range`` header value that asks for ``want`` (a :func:`wanted` slice), or
    ``None`` for the whole object."""
    if want.start < 0:
        return f"bytes={want.start}"  # a suffix range: the last -start bytes
    if not want.start and want.stop is None:
        return None
    return f"bytes={want.start}-{'' if want.stop is None else want.stop - 1}"
