"""mlstore in IPython and Jupyter.

Nothing needs loading: the objects a notebook shows render as tables
(``Store``, ``store.cache``, ``store.config``, ``store.stats()``, ``Manifest``,
``CopyResult``, :class:`~mlstore.cost.Cost`), and an mlstore error shows the notebook's
own frames, one line per frame inside mlstore, and the typed error with its message
(see :mod:`mlstore._util.tracebacks`). ``%xmode Verbose`` shows every frame in full, as
does :func:`short_tracebacks` with ``False``.

Example:
    >>> import mlstore.notebook
    >>> mlstore.notebook.short_tracebacks(False)   # full tracebacks from now on
    >>> mlstore.notebook.short_tracebacks(True)
"""

from __future__ import annotations

from mlstore._util.tracebacks import set_enabled, short_traceback

__all__ = ["format_error", "short_tracebacks"]


def short_tracebacks(enabled: bool = True) -> None:
    """Show mlstore errors in IPython with mlstore's frames one line each (``True``,
    the default) or as IPython shows any other error (``False``)."""
    set_enabled(enabled)


def format_error(exc: BaseException) -> str:
    """``exc``'s traceback in the short form a notebook shows, as one string (for a log
    or a terminal)."""
    return "\n".join(short_traceback(exc))
