"""Read files over ranged reads.

:class:`RangeReader` is a raw, seekable binary stream whose bytes come from a ``fetch``
function (``fetch(start, end) -> bytes``). :func:`open_ranged` wraps it in
:class:`io.BufferedReader`, which gives ``read``, ``readinto``, ``readline``, ``peek``
and iteration with the exact semantics of a local file.
"""

from __future__ import annotations

import io
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
    "ViewReader",
    "as_buffer",
    "as_bytes",
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

    def readinto(self, buffer: Any) -> int:
        # Without this, io.RawIOBase's read() and readline() raise NotImplementedError;
        # a file not open for reading refuses with io.UnsupportedOperation, as a local one.
        raise io.UnsupportedOperation("read: the file is open for writing only")

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

    def __init__(self, commit: Callable[[bytes], object], name: str) -> None:
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


class ViewReader(io.RawIOBase):
    """A seekable read-only file over bytes already in memory, without a copy.

    It is how an upload hands a large body to an HTTP client: given ``bytes``, aiohttp
    keeps them whole until the socket takes them (asyncio copies the unsent rest into
    its transport buffer), and given an ``io.BytesIO`` it copies the buffer first. A
    generic file is read in small chunks as the socket drains, and can be rewound for a
    re-signed or retried send.
    """

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def __len__(self) -> int:
        return len(self._view)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = (0, self._pos, len(self._view))[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        n = max(0, min(len(out), len(self._view) - self._pos))
        out[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def readall(self) -> bytes:
        data = bytes(self._view[self._pos :])
        self._pos = len(self._view)
        return data

    def close(self) -> None:
        # Let go of the bytes at once: an HTTP client's request objects can outlive the
        # request (in reference cycles) and would keep a whole part alive until the
        # garbage collector runs.
        self._view = memoryview(b"")
        super().close()


class QuietReadFile(io.BufferedIOBase):
    """The read file the fsspec protocol hands out: a Store read file plus what fsspec's
    own files offer and its helpers and caches rely on.

    * It is closed quietly if it is garbage-collected while open, as fsspec's own files
      are: consumers such as pyarrow drop the input files they open without closing them,
      which would otherwise raise ``ResourceWarning``.
    * ``size`` is the object's length, whatever backend or cache tier serves the bytes
      (``read_block(path, offset, None)`` and ``get_file``'s progress read it);
      ``path``, ``fs``, ``loc`` and ``blocksize`` are those of fsspec's
      ``AbstractBufferedFile``.
    * fsspec's ``blockcache``/``cached`` filesystems fetch missing blocks with
      :meth:`_fetch_range` and install their block cache as ``cache``; reads then go
      through that cache, as they do on fsspec's own files.
    * A seek to a position before the start is a ``ValueError``, as fsspec's own files
      refuse it, rather than the start of the file.

    Args:
        inner: the Store's read file (seekable, positioned at 0).
        path: the path the file was opened with, in the filesystem's own form.
        fs: the filesystem that opened it.
        blocksize: the block size reported to fsspec's block caches.
    """

    def __init__(
        self, inner: IO[bytes], path: str = "", fs: Any = None, blocksize: int = 5 * 2**20
    ) -> None:
        super().__init__()
        self._inner = inner
        self._reader: IO[bytes] = inner  # where reads go: ``inner`` or an fsspec cache
        self._cache: Any = None
        self.name = redact_url(str(getattr(inner, "url", None) or getattr(inner, "name", "")))
        self.size: int = _length(inner)
        self.path = path
        self.fs = fs
        self.blocksize = blocksize

    def __repr__(self) -> str:
        return f"<mlstore read file {self.name!r} size={self.size}>"

    @property
    def closed(self) -> bool:
        """Whether the file is closed; fsspec's caches also set it after closing."""
        return super().closed

    @closed.setter
    def closed(self, value: bool) -> None:
        # fsspec's CachingFileSystem replaces ``close`` on the instance, and after that
        # closes the file (through the original method) and sets ``closed = True``.
        if value:
            QuietReadFile.close(self)

    @property
    def loc(self) -> int:
        """The position (fsspec's name for it)."""
        return self.tell()

    @property
    def cache(self) -> Any:
        """The block cache an fsspec caching layer installed, or ``None``."""
        return self._cache

    @cache.setter
    def cache(self, cache: Any) -> None:
        # fsspec's cached filesystems build the cache over _fetch_range and expect every
        # later read to go through it (that is how they record which blocks are local).
        pos = self._reader.tell()
        fetch: Callable[[int, int], bytes] = cache._fetch
        self._reader = open_ranged(fetch, self.size, self.name, buffer_size=self.blocksize)
        self._reader.seek(pos)
        self._cache = cache

    def _fetch_range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the Store's file, for fsspec's block caches."""
        pos = self._inner.tell()
        try:
            self._inner.seek(start)
            return self._inner.read(max(0, end - start))
        finally:
            self._inner.seek(pos)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        return self._reader.read(-1 if size is None else size)

    def read1(self, size: int = -1) -> bytes:
        read1 = getattr(self._reader, "read1", None)
        data: bytes = read1(size) if read1 is not None else self._reader.read(size)
        return data

    def readinto(self, buffer: Any) -> int:
        n: int = self._reader.readinto(buffer)  # type: ignore[attr-defined]
        return n

    def readline(self, size: int | None = -1) -> bytes:
        return self._reader.readline(-1 if size is None else size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if not self.closed and whence in (io.SEEK_SET, io.SEEK_CUR, io.SEEK_END):
            base = (0, self._reader.tell(), self.size)[whence]
            if base + offset < 0:
                raise ValueError(f"seek to {base + offset}, before the start of the file")
        return self._reader.seek(offset, whence)

    def tell(self) -> int:
        return self._reader.tell()

    def fileno(self) -> int:
        return self._reader.fileno()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._inner.close()
            if self._reader is not self._inner:
                self._reader.close()
        finally:
            super().close()


def _length(fh: IO[bytes]) -> int:
    """The length of a seekable read file positioned at 0: its ``size`` when it keeps one
    (the ranged and block files), else where its end is (in-memory and disk copies,
    native local files), which needs no request."""
    size = getattr(fh, "size", None)
    if isinstance(size, int):
        return size
    end = fh.seek(0, io.SEEK_END)
    fh.seek(0)
    return end


def as_bytes(data: object, call: str, url: object) -> bytes:
    """``data`` as ``bytes`` (no copy when it already is), or ``TypeError`` naming the
    call and the URL (credentials masked) when it is not bytes-like.

    Checked before any request: ``bytes()`` would turn an int into that many zero bytes
    and a list of ints into a small object, writing garbage without complaint.
    """
    from mlstore._util.redact import redact_url

    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{call}({redact_url(str(url))!r}): data must be bytes-like (bytes, bytearray, "
            f"memoryview or another object supporting the buffer protocol), "
            f"not {type(data).__name__}"
        ) from None
    return data if type(data) is bytes else bytes(view)


def as_buffer(data: object, call: str, url: object) -> bytes | memoryview:
    """``data`` itself when it is ``bytes``, else a byte view of it (no copy), or the
    ``TypeError`` of :func:`as_bytes`. A buffer that is not contiguous is copied."""
    if type(data) is bytes:
        return data
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        return as_bytes(data, call, url)  # raises
    return view.cast("B") if view.c_contiguous else bytes(view)
