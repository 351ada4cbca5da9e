"""The exceptions mlstore raises.

Every error mlstore raises derives from :class:`MlstoreError` and, where Python has a
builtin with the same meaning, from that builtin too, so ``except FileNotFoundError``
keeps working in code that does not know mlstore::

    MlstoreError
    ├── NotFoundError            (FileNotFoundError)
    ├── NotInManifestError       (KeyError)     a URL a Manifest does not hold
    ├── PermissionDeniedError    (PermissionError)
    ├── PreconditionFailedError       the object changed (version / ETag mismatch)
    ├── IntegrityError                bytes do not match their recorded hash or length
    ├── ConfigError              (ValueError)   bad URL, option or setting
    ├── UnsupportedOperation     (io.UnsupportedOperation)
    ├── IsADirectoryError_       (IsADirectoryError)
    ├── CheckpointError               not a checkpoint, or one missing chunks
    │   └── CheckpointBusyError  (TimeoutError)  a collector or saver held the store too long
    └── TransientError                worth retrying
        ├── ThrottledError            503 SlowDown, 429 Too Many Requests
        ├── StorageTimeoutError  (TimeoutError)
        ├── ConnectionLostError  (ConnectionError)
        └── CorruptBodyError          (also an IntegrityError) a download failed its check

Errors carry the ``url`` and the ``operation`` they concern. The message names both and,
where it can, what to do next. Messages never contain credentials: URLs are passed
through :func:`redact_url` before they are stored.
"""

from __future__ import annotations

import io
from typing import ClassVar

from mlstore._util.redact import MASK, redact_url

__all__ = [
    "CheckpointBusyError",
    "CheckpointError",
    "ConfigError",
    "ConnectionLostError",
    "CorruptBodyError",
    "IntegrityError",
    "IsADirectoryError_",
    "MlstoreError",
    "NotFoundError",
    "NotInManifestError",
    "PermissionDeniedError",
    "PreconditionFailedError",
    "StorageTimeoutError",
    "ThrottledError",
    "TransientError",
    "UnsupportedOperation",
    "redact_url",
]

REDACTED = MASK


class MlstoreError(Exception):
    """Base of every error mlstore raises.

    Attributes:
        url: the URL the operation concerned (credentials removed), or ``None``.
        operation: what mlstore was doing, e.g. ``"read"``, ``"write"``, ``"info"``.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        operation: str | None = None,
    ) -> None:
        self.url = redact_url(url) if url else None
        self.operation = operation
        self.reason = message
        super().__init__(self._render())

    def _render(self) -> str:
        where = ""
        if self.operation and self.url:
            where = f"{self.operation} {self.url}: "
        elif self.url:
            where = f"{self.url}: "
        elif self.operation:
            where = f"{self.operation}: "
        return where + self.reason

    def __str__(self) -> str:
        return self._render()

    def _render_traceback_(self) -> list[str]:
        # IPython and Jupyter show this in place of their traceback: the caller's frames,
        # one line per mlstore frame, then this error (see mlstore._util.tracebacks).
        from mlstore._util.tracebacks import render

        return render(self)

    def __reduce__(self) -> tuple[object, ...]:
        # Keep the keyword-only attributes, and any set later (``retry_after``),
        # across pickling: DataLoader workers send exceptions back to the parent.
        # Private attributes (the bytes of an interrupted body) stay in this process.
        extra = {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("url", "operation", "reason") and not k.startswith("_")
        }
        return (_rebuild, (type(self), self.reason, self.url, self.operation), extra or None)


def _rebuild(
    cls: type[MlstoreError], reason: str, url: str | None, operation: str | None
) -> MlstoreError:
    return cls(reason, url=url, operation=operation)


class NotFoundError(MlstoreError, FileNotFoundError):
    """The object or directory does not exist."""


class NotInManifestError(MlstoreError, KeyError):
    """A :class:`~mlstore.Manifest` was asked for a URL it does not hold."""


class PermissionDeniedError(MlstoreError, PermissionError):
    """The credentials do not allow the operation, or a policy refused the URL."""


class PreconditionFailedError(MlstoreError):
    """The object changed while it was being read (its version no longer matches)."""


class IntegrityError(MlstoreError):
    """Bytes did not match their recorded hash or their announced length."""


class ConfigError(MlstoreError, ValueError):
    """An invalid URL, option or setting. The message names the field."""


class UnsupportedOperation(MlstoreError, io.UnsupportedOperation):  # noqa: N818 - as in io
    """The backend cannot do this (for example, writing to an http URL)."""


class IsADirectoryError_(MlstoreError, IsADirectoryError):  # noqa: N801, N818
    """A file operation was asked of a directory."""

    #: What to do instead, by operation; other operations get ``"use ls() to list it"``.
    HINTS: ClassVar[dict[str, str]] = {
        "write": "cannot write a file over it",
        "rm": "pass recursive=True to delete everything below it",
        "copy": "pass recursive=True to copy everything below it",
    }

    @classmethod
    def at(cls, url: object, operation: str, hint: str | None = None) -> IsADirectoryError_:
        """The error for ``operation`` on the directory ``url``: "this is a directory"
        and what to do instead (``hint``, else the one :attr:`HINTS` gives)."""
        hint = hint or cls.HINTS.get(operation, "use ls() to list it")
        return cls(f"this is a directory; {hint}", url=str(url), operation=operation)


class CheckpointError(MlstoreError):
    """The URL holds no checkpoint mlstore can read, or one whose chunks are missing."""


class CheckpointBusyError(CheckpointError, TimeoutError):
    """A checkpoint's chunk store stayed locked by another saver or collector for longer
    than the caller would wait."""


class TransientError(MlstoreError):
    """A failure that may succeed if tried again (5xx, timeouts, dropped connections).

    Attributes:
        retry_after: seconds the server asked the client to wait, if it said.
    """

    retry_after: float | None = None


class ThrottledError(TransientError):
    """The service asked the client to slow down (503 SlowDown, 429)."""


class StorageTimeoutError(TransientError, TimeoutError):
    """A connect or read timed out."""


class ConnectionLostError(TransientError, ConnectionError):
    """The connection failed or was reset."""


class CorruptBodyError(IntegrityError, TransientError):
    """A downloaded body failed its check (the object's recorded hash, or its announced
    length); it is fetched again, and raised only when every attempt failed."""
