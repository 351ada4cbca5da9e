"""Short tracebacks for mlstore's errors in IPython and Jupyter.

A failed read in a notebook used to show some forty frames of mlstore, tenacity and
the cloud SDK before the one line that matters. IPython asks an exception for its own
rendering first: ``InteractiveShell.showtraceback`` calls the exception's
``_render_traceback_()`` when it has one, and shows the list of strings it returns in
place of its own traceback (ipykernel sends that list to the front end as the error's
traceback). :class:`~mlstore.errors.MlstoreError` defines it with :func:`render`, so no
extension needs loading and no custom handler of the shell is replaced; ``%debug``,
``%pdb`` and ``sys.last_traceback`` work as before, since the shell still records the
real traceback.

What :func:`short_traceback` shows: the caller's frames as Python shows them (file,
line, source), one line per mlstore frame, one line for each run of library frames
below the first mlstore frame (tenacity, concurrent.futures, the SDK), the
exception's cause in one line, and the typed error with its message. Frames of IPython
itself, above the cell, are dropped, as IPython drops them.

``%xmode Verbose`` shows the full traceback, as IPython renders it;
:func:`set_enabled` (``mlstore.notebook.short_tracebacks(False)``) turns the short
form off for the process.
"""

from __future__ import annotations

import linecache
import os
import sys
import sysconfig
import traceback
from types import TracebackType
from typing import Any

__all__ = ["is_enabled", "render", "set_enabled", "short_traceback"]

_enabled = True
_MLSTORE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHELL_MODULES = ("IPython.", "ipykernel.")


def set_enabled(enabled: bool) -> None:
    """Use the short form for mlstore errors in IPython (``True``, the default) or not."""
    global _enabled
    _enabled = bool(enabled)


def is_enabled() -> bool:
    return _enabled


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    found = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return tuple(os.path.abspath(p) + os.sep for p in sorted(found))


def _is_mlstore(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_MLSTORE_DIR + os.sep)


def _where(filename: str) -> str:
    """A frame's file for the one-line form: relative to mlstore's package, or its base name."""
    path = os.path.abspath(filename)
    parent = os.path.dirname(_MLSTORE_DIR)
    if path.startswith(parent + os.sep):
        return os.path.relpath(path, parent)
    return os.path.basename(filename)


def _frames(tb: TracebackType | None) -> list[tuple[str, int, str, dict[str, Any]]]:
    out = []
    while tb is not None:
        frame = tb.tb_frame
        code = frame.f_code
        out.append((code.co_filename, tb.tb_lineno, code.co_name, frame.f_globals))
        tb = tb.tb_next
    return out


def _message(exc: BaseException) -> str:
    from mlstore._util.redact import scrub

    text = scrub(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def short_traceback(exc: BaseException) -> list[str]:
    """The lines of ``exc``'s short traceback (IPython's "structured traceback": a list
    of strings it joins with newlines)."""
    frames = _frames(exc.__traceback__)
    while frames and str(frames[0][3].get("__name__", "")).startswith(_SHELL_MODULES):
        frames.pop(0)  # IPython's run_code, above the cell
    libraries = _library_dirs()
    lines = ["Traceback (most recent call last; mlstore's frames one line each):"]
    inside = False  # below the first mlstore frame, libraries are folded too
    folded: list[str] = []  # library modules of the run being folded

    def fold() -> None:
        if folded:
            names = ", ".join(dict.fromkeys(folded))
            lines.append(f"  - ({len(folded)} frame{'s' * (len(folded) > 1)} in {names})")
            folded.clear()

    for filename, lineno, name, globals_ in frames:
        mine = _is_mlstore(filename)
        inside = inside or mine
        if inside and not mine and os.path.abspath(filename).startswith(libraries):
            folded.append(str(globals_.get("__name__", "?")).split(".")[0])
            continue
        fold()
        if mine:
            lines.append(f"  - {_where(filename)}:{lineno} in {name}")
            continue
        lines.append(f'  File "{filename}", line {lineno}, in {name}')
        source = linecache.getline(filename, lineno).strip()
        if source:
            lines.append(f"    {source}")
    fold()
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if cause is not None:
        lines.append(f"  caused by {_message(cause)}")
    lines.append(_message(exc))
    if inside:
        lines.append("(%xmode Verbose shows every frame in full)")
    return lines


def _shell() -> Any:
    """The running IPython shell, if IPython is loaded and one runs (never imports it)."""
    module = sys.modules.get("IPython")
    get = getattr(module, "get_ipython", None)
    return get() if callable(get) else None


def render(exc: BaseException) -> list[str]:
    """What IPython shows for ``exc`` (``MlstoreError._render_traceback_``): the short
    form, or IPython's own full traceback under ``%xmode Verbose`` or when turned off."""
    shell = _shell()
    verbose = shell is not None and getattr(shell.InteractiveTB, "mode", "") == "Verbose"
    if shell is not None and (verbose or not _enabled):
        stb: list[str] = shell.InteractiveTB.structured_traceback(type(exc), exc, exc.__traceback__)
        return stb
    if not _enabled:
        return traceback.format_exception(type(exc), exc, exc.__traceback__)
    return short_traceback(exc)
