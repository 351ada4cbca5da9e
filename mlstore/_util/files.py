"""Read files over ranged reads.

:class:`RangeReader` is a raw, seekable binary stream whose bytes come from a ``fetch``
function (``fetch(start, end) -> bytes``). :func:`open_ranged` wraps it in
:class:`io.BufferedReader`, which gives ``read``, ``readinto``, ``readline``, ``peek``
and iteration with the exact semantics of a local file.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from mlstore._util.redact import redact_url
from mlstore.errors import IntegrityError

__all__ = [
    "BufferedWrite",
    "CountingReader",
    "CountingWriter",
    "QuietReadFile",
    "RangeReader",
    "SeekableRaw",
    "TextWriter",
    "open_ranged",
]

Fetch = Callable[[int, int], bytes]


class SeekableRaw(io.RawIOBase):
    """A raw, seekable, read-only stream of ``size`` bytes with a position: the
    seek/tell rules every mlstore read file shares (those of a local file)."""

    size: int
    _pos: int = 0

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file.")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        if whence == io.SEEK_SET:
            if offset < 0:
                raise ValueError(f"negative seek value {offset}")
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = max(0, self._pos + offset)
        elif whence == io.SEEK_END:
            pos = max(0, self.size + offset)
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        self._pos = pos
        return pos


class RangeReader(SeekableRaw):
    """A raw seekable stream of ``size`` bytes fetched on demand.

    Args:
        fetch: returns bytes ``[start, end)``; must return exactly ``end - start`` bytes.
        size: the object's length.
        name: the URL, shown in ``repr`` and available as ``.name`` with its user info
            and signature masked (a file object is printed, logged and pickled by
            consumers that know nothing of credentials).
    """

    def __init__(self, fetch: Fetch, size: int, name: str) -> None:
        super().__init__()
        self._fetch = fetch
        self.size = size
        self.name = redact_url(name)
        self._pos = 0

    def __repr__(self) -> str:
        return f"<mlstore read file {self.name!r} size={self.size}>"

    def readinto(self, buffer: Any) -> int:
        self._check_open()
        view = memoryview(buffer).cast("B")
        want = min(len(view), self.size - self._pos)
        if want <= 0:
            return 0
        data = self._fetch(self._pos, self._pos + want)
        if len(data) != want:
            raise IntegrityError(
                f"expected {want} bytes at offset {self._pos}, got {len(data)}",
                url=self.name,
                operation="read",
            )
        view[:want] = data
        self._pos += want
        return want

    def readall(self) -> bytes:
        self._check_open()
        if self._pos >= self.size:
            return b""
        data = self._fetch(self._pos, self.size)
        if len(data) != self.size - self._pos:
            raise IntegrityError(
                f"expected {self.size - self._pos} bytes at offset {self._pos}, got {len(data)}",
                url=self.name,
                operation="read",
            )
        self._pos = self.size
        return data


class CountingReader(io.RawIOBase):
    """A raw seekable stream that passes every call to ``inner`` and reports the bytes
    it reads to ``count`` (how a native local file feeds ``Store.stats()``)."""

    def __init__(self, inner: io.RawIOBase, count: Callable[[int], None]) -> None:
        super().__init__()
        self._inner = inner
        self._count = count
        self.name = getattr(inner, "name", "")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._inner.fileno()

    def tell(self) -> int:
        return self._inner.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._inner.seek(offset, whence)

    def readinto(self, buffer: Any) -> int | None:
        n = self._inner.readinto(buffer)
        if n:
            self._count(n)
        return n

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            super().close()


class ReadFile(io.BufferedReader):
    """A buffered, seekable read file that also knows its URL, size and info."""

    raw: RangeReader

    def __init__(self, raw: RangeReader, buffer_size: int, info: Any = None) -> None:
        super().__init__(raw, buffer_size=buffer_size)
        self.info = info

    @property
    def size(self) -> int:
        return self.raw.size

    @property
    def url(self) -> str:
        return self.raw.name

    def __repr__(self) -> str:
        return f"<mlstore read file {self.raw.name!r} size={self.raw.size}>"


def open_ranged(
    fetch: Fetch, size: int, name: str, *, buffer_size: int = 1 << 20, info: Any = None
) -> ReadFile:
    """A buffered read file over ``fetch``; a read of a few bytes fetches ``buffer_size``."""
    return ReadFile(RangeReader(fetch, size, name), max(1, min(buffer_size, size or 1)), info)


class _Discarding:
    """The promise every mlstore write file keeps: leaving a ``with`` block through an
    exception discards the write, and so does being garbage-collected unclosed (with a
    ``ResourceWarning``); only a clean ``close()`` publishes it."""

    if TYPE_CHECKING:  # provided by the classes this is mixed into

        def discard(self) -> None: ...

        def close(self) -> None: ...

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None:
            self.discard()
        else:
            self.close()


def _discard_unclosed(raw: CountingWriter | None) -> None:
    # Discard before warning, so a warning turned into an error cannot skip the discard.
    if raw is not None and not getattr(raw, "closed", True):
        raw.discard()
        warnings.warn(
            f"write file {raw.name!r} was never closed; its content was discarded",
            ResourceWarning,
            stacklevel=2,
        )


class CountingWriter(_Discarding, io.RawIOBase):
    """A write file that counts bytes and commits the inner atomic writer on close."""

    def __init__(self, inner: IO[bytes], count: Callable[[int], None]) -> None:
        super().__init__()
        self._inner = inner
        self._count = count
        self._written = 0
        self.name = getattr(inner, "name", "")

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = self._inner.write(data)
        n = len(memoryview(data)) if n is None else n
        self._written += n
        return n

    def tell(self) -> int:
        return self._written

    def discard(self) -> None:
        """Abandon the write; the destination is left as it was."""
        if not self.closed:
            discard = getattr(self._inner, "discard", None)
            if discard is not None:
                discard()
            super().close()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._inner.close()
            self._count(self._written)
        finally:
            super().close()

    def __del__(self) -> None:
        _discard_unclosed(self)


class TextWriter(_Discarding, io.TextIOWrapper):
    """Text mode over a :class:`CountingWriter`, with the same promise."""

    buffer: CountingWriter

    def discard(self) -> None:
        """Abandon the write; the destination is left as it was."""
        self.buffer.discard()

    def __del__(self) -> None:
        _discard_unclosed(getattr(self, "buffer", None))


class BufferedWrite(io.BytesIO):
    """Collects bytes and hands them to ``commit`` on a clean close: one whole-object
    write, which the caller may wrap (the Store passes its retried write).

    If the surrounding ``with`` block raises, or :meth:`discard` is called, nothing is
    written.
    """

    def __init__(self, commit: Callable[[bytes], None], name: str) -> None:
        super().__init__()
        self._commit = commit
        self._failed = False
        self.name = name

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._failed = exc_type is not None
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        data = self.getvalue()
        super().close()
        if not self._failed:
            self._commit(data)

    def discard(self) -> None:
        """Drop what was written; nothing reaches the store."""
        self._failed = True
        self.close()


class QuietReadFile(io.BufferedIOBase):
    """A read file closed quietly if it is garbage-collected while open, as fsspec's own
    files are: consumers such as pyarrow drop the input files they open without closing
    them, which would otherwise raise ``ResourceWarning`` (the fsspec protocol wraps the
    Store's read files in it)."""

    def __init__(self, inner: IO[bytes]) -> None:
        super().__init__()
        self._inner = inner
        self.name = redact_url(str(getattr(inner, "url", None) or getattr(inner, "name", "")))
        size = getattr(inner, "size", None)
        if not isinstance(size, int):
            try:
                size = os.fstat(inner.fileno()).st_size
            except (OSError, ValueError):
                size = None
        self.size: int | None = size

    def __repr__(self) -> str:
        return f"<mlstore read file {self.name!r} size={self.size}>"

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        return self._inner.read(-1 if size is None else size)

    def read1(self, size: int = -1) -> bytes:
        read1 = getattr(self._inner, "read1", None)
        data: bytes = read1(size) if read1 is not None else self._inner.read(size)
        return data

    def readinto(self, buffer: Any) -> int:
        n: int = self._inner.readinto(buffer)  # type: ignore[attr-defined]
        return n

    def readline(self, size: int | None = -1) -> bytes:
        return self._inner.readline(-1 if size is None else size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    def fileno(self) -> int:
        return self._inner.fileno()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._inner.close()
        finally:
            super().close()
