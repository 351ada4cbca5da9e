"""The small HTML and text renderer behind mlstore's notebook views (``_repr_html_``).

Every view is a table: :func:`table` builds one from rows of cells, escaping each cell
unless it is :class:`Markup` (a table nested in a cell, made here). Sizes go through
:func:`human_size`. The caller chooses what is shown; secrets are the caller's to keep
out (URLs through :func:`~mlstore._util.redact.redact_url`, options by name only).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence

from mlstore._util import units

__all__ = [
    "Markup",
    "copy_result_html",
    "copy_result_repr",
    "fields",
    "human_size",
    "table",
]


class Markup(str):
    """A string that is HTML already (not escaped again by :func:`table`)."""

    __slots__ = ()


def human_size(n: float | None) -> str:
    """``n`` bytes for a reader, in powers of 1024 (:func:`mlstore._util.units.human_size`);
    ``None``, a figure not known, is ``-``.

    >>> human_size(0), human_size(1536), human_size(10 * 2**30), human_size(None)
    ('0 B', '1.5 KiB', '10.0 GiB', '-')
    """
    return "-" if n is None else units.human_size(n)


def _cell(value: object) -> str:
    if isinstance(value, Markup):
        return value
    return html.escape("" if value is None else str(value))


def table(
    rows: Iterable[Sequence[object]],
    *,
    header: Sequence[str] | None = None,
    caption: str | None = None,
) -> Markup:
    """An HTML table of ``rows`` (each a sequence of cells, escaped unless
    :class:`Markup`), with an optional ``header`` row and ``caption``.

    >>> table([["a<b", 1]], header=["name", "n"])
    '<table><thead><tr><th>name</th><th>n</th></tr></thead><tbody><tr><td>a&lt;b</td><td>1</td></tr></tbody></table>'
    """
    out = ["<table>"]
    if caption:
        out.append(f"<caption>{html.escape(caption)}</caption>")
    if header:
        out.append(
            "<thead><tr>" + "".join(f"<th>{_cell(h)}</th>" for h in header) + "</tr></thead>"
        )
    out.append("<tbody>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return Markup("".join(out))


def fields(pairs: Iterable[tuple[str, object]], *, caption: str | None = None) -> Markup:
    """A two-column table of ``(name, value)`` pairs (a dataclass, a summary)."""
    return table(([name, value] for name, value in pairs), caption=caption)


def copy_result_html(
    written: Sequence[str], skipped: Sequence[str], copied_bytes: int, skipped_bytes: int
) -> Markup:
    """The notebook view of a copy's result: what was written and what was left alone,
    with the first few URLs of each (credentials in URLs masked)."""
    from mlstore._util.redact import redact_url

    def first(urls: Sequence[str]) -> str:
        shown = ", ".join(redact_url(u) for u in urls[:_FIRST])
        return shown + (f", ... {len(urls) - _FIRST:,} more" if len(urls) > _FIRST else "")

    return table(
        [
            ["copied", f"{len(written):,}", human_size(copied_bytes), first(written)],
            [
                "skipped (same content)",
                f"{len(skipped):,}",
                human_size(skipped_bytes),
                first(skipped),
            ],
        ],
        header=["", "objects", "bytes", "urls"],
        caption="CopyResult",
    )


def copy_result_repr(written: Sequence[str], skipped: Sequence[str], skipped_bytes: int) -> str:
    """``CopyResult([first URLs, ...N more], skipped=... objects / ... bytes)``."""
    from mlstore._util.redact import redact_url

    urls = [repr(redact_url(u)) for u in written[:_FIRST]]
    if len(written) > _FIRST:
        urls.append(f"... {len(written) - _FIRST:,} more")
    return (
        f"CopyResult([{', '.join(urls)}], skipped={len(skipped)} objects / {skipped_bytes} bytes)"
    )


_FIRST = 5  # URLs a CopyResult view names
