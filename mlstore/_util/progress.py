"""Progress bars for long copies, syncs, warms and cache scans, drawn by tqdm.

One helper, :func:`progress`, decides whether a bar is shown and hands back an object
with ``update(n)`` and ``close()`` either way, so callers never branch on it:

- in a Jupyter kernel the bar is a widget (``tqdm.auto`` picks it);
- in a terminal it is tqdm's text bar on stderr;
- anywhere else (CI logs, a pipe, a Kubernetes initContainer) nothing is drawn unless
  the caller asks (``enabled=True``, the CLI's ``--progress``).

Bars go to stderr and never to stdout: a command's output stays parseable while the bar
moves. A disabled bar costs a counter: tqdm is imported only when a bar is drawn, so
``import mlstore`` and a command run in a pipe never load it.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["Progress", "Transfer", "bar_for", "in_notebook", "progress"]


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (IPython's ZMQ shell). Looks only at
    modules already imported: it never imports IPython itself."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # noqa: BLE001 - an odd IPython is simply not a notebook
        return False
    return type(shell).__name__ == "ZMQInteractiveShell"


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


class _Closing:
    """Closes the bar it holds once (from any thread), also as a context manager."""

    _bar: Any
    _lock: threading.Lock

    def close(self) -> None:
        with self._lock:
            bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Progress(_Closing):
    """A progress count, drawn as a bar when enabled (see :func:`progress`).

    ``update`` may be called from several threads. ``done`` is the count so far, bar
    or no bar; ``shown`` says whether a bar is drawn. Closing twice is harmless.
    """

    def __init__(self, total: int | None, desc: str, unit: str, bar: Any | None) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.done = 0
        #: Whether a bar is drawn (stays true once it is closed).
        self.shown = bar is not None
        self._bar = bar
        self._lock = threading.Lock()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)

    def __enter__(self) -> Progress:
        return self

    def __repr__(self) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        return f"<Progress {self.desc!r} {self.done}{of} {self.unit}>"


def progress(
    total: int | None, *, desc: str, unit: str = "obj", enabled: bool | None = None
) -> Progress:
    """A progress bar on stderr for ``total`` steps of ``unit`` (``None``: unknown).

    Args:
        total: how many steps the work has, if known.
        desc: the label in front of the bar.
        unit: what a step is (``"obj"``; ``"B"`` scales to KiB, MiB ... by 1024).
        enabled: ``True`` draws the bar, ``False`` never does, ``None`` (the default)
            draws it in a Jupyter kernel (as a widget) or when stderr is a terminal.

    Use it as a context manager, or call ``close()``::

        with progress(len(urls), desc="warm") as bar:
            for url in urls:
                ...
                bar.update()

    >>> with progress(3, desc="quiet", enabled=False) as bar:
    ...     bar.update(2)
    >>> bar.done, bar.shown
    (2, False)
    """
    notebook = in_notebook()
    if enabled is None:
        enabled = notebook or _stderr_is_terminal()
    if not enabled:
        return Progress(total, desc, unit, None)
    if notebook:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    bar = tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=True,
    )
    return Progress(total, desc, unit, bar)


class Transfer(_Closing):
    """A ``progress(done_bytes, total_bytes)`` callback, as :meth:`mlstore.Store.copy`,
    ``sync`` and ``checkpoint.flush`` take, drawn as a byte bar (see :func:`progress`
    for ``enabled``). The bar opens on the first call, when the total is known; call
    ``close()`` (or use it as a context manager) when the work ends.

    >>> with Transfer("copy", enabled=False) as bar:
    ...     bar(10, 30)
    ...     bar(30, 30)
    >>> bar.done
    30
    """

    def __init__(self, desc: str, *, enabled: bool | None = None) -> None:
        self.desc = desc
        self.enabled = enabled
        self.done = 0
        self._bar: Progress | None = None
        self._lock = threading.Lock()

    def __call__(self, done: int, total: int) -> None:
        with self._lock:
            if self._bar is None:
                self._bar = progress(total, desc=self.desc, unit="B", enabled=self.enabled)
            self._bar.update(done - self.done)
            self.done = done

    def __enter__(self) -> Transfer:
        return self


def bar_for(
    progress: Callable[[int, int], None] | bool | None, desc: str
) -> contextlib.AbstractContextManager[Callable[[int, int], None] | None]:
    """The ``progress(done, total)`` callback a copy runs with, as a context manager:
    the caller's own callable, or a :class:`Transfer` bar (``True``: always; ``None``:
    in Jupyter or on a terminal), or none (``False``)."""
    if progress is False:
        return contextlib.nullcontext(None)
    if progress is None or progress is True:
        return Transfer(desc, enabled=progress)
    return contextlib.nullcontext(progress)
