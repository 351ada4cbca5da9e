"""``file://`` and plain paths: the local file system.

Writes are atomic: bytes go to a temporary file in the destination's directory, are
flushed to disk, and the file is renamed over the destination, so a reader sees either
the old content or the new, never a part.
"""

from __future__ import annotations

import io
import os
import secrets
import stat
from collections.abc import Mapping
from typing import IO, Any, cast

from mlstore.backends._fsspec import FsspecBackend
from mlstore.backends._ranges import wanted
from mlstore.backends.base import ObjectInfo, Received
from mlstore.errors import IsADirectoryError_, PreconditionFailedError
from mlstore.url import URL

__all__ = ["TEMP_SUFFIX", "AtomicFile", "LocalBackend"]

#: Suffix of in-progress writes; a crash can leave one behind, never a partial file.
TEMP_SUFFIX = ".mlstore-tmp"


class LocalBackend(FsspecBackend):
    protocol = "file"
    buffered_writes = False  # writes stream to a temporary file, renamed at close

    def _make_fs(self) -> Any:
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem()

    def _path(self, url: URL) -> str:
        return url.path

    def _url(self, path: str) -> URL:
        return URL("file", "", os.path.abspath(path))

    def _version(self, raw: Mapping[str, Any]) -> str | None:
        try:
            st = os.stat(raw["name"])
        except OSError:
            return None
        return f"{st.st_mtime_ns}-{st.st_size}"

    def open_read(self, url: URL, info: ObjectInfo) -> IO[bytes] | None:
        # Unbuffered: the Store buffers it with the buffer size the caller asked for.
        with self._errors(url, "open"):
            return cast(IO[bytes], _LocalReader(url.path))

    def read(
        self,
        url: URL,
        start: int | None = None,
        end: int | None = None,
        version: str | None = None,
        *,
        received: Received | None = None,
    ) -> bytes:
        with self._errors(url, "read"), open(url.path, "rb") as fh:
            st = os.fstat(fh.fileno())
            # Checked on the open file, so a rename in between cannot slip past.
            if version is not None and f"{st.st_mtime_ns}-{st.st_size}" != version:
                raise PreconditionFailedError(
                    f"the object changed (version {version} is now {st.st_mtime_ns}-{st.st_size})",
                    url=str(url),
                    operation="read",
                )
            want = wanted(start, end, lambda: st.st_size, suffix=False)
            if want is None:
                return b""
            lo, hi, _ = want.indices(st.st_size)
            if lo:
                fh.seek(lo)
            return fh.read(max(0, hi - lo))

    def open_write(self, url: URL) -> IO[bytes]:
        with self._errors(url, "write"):
            if os.path.isdir(url.path):
                raise IsADirectoryError_.at(url, "write")
            os.makedirs(os.path.dirname(url.path) or ".", exist_ok=True)
            return cast(IO[bytes], AtomicFile(url.path))

    def write(self, url: URL, data: bytes) -> None:
        with self.open_write(url) as fh:
            fh.write(data)

    def copy(self, src: URL, dst: URL) -> None:
        with self._errors(src, "copy"), open(src.path, "rb") as fin, self.open_write(dst) as fout:
            while chunk := fin.read(8 * 1024 * 1024):
                fout.write(chunk)


class _LocalReader(io.FileIO):
    """A read-only local file whose ``seek`` behaves like :class:`io.BytesIO` and the
    ranged files of the other backends: a position before the start is clamped to 0
    (``SEEK_CUR``, ``SEEK_END``), a negative absolute position is a ``ValueError``, and
    only ``whence`` 0, 1 and 2 are accepted."""

    def __init__(self, path: str) -> None:
        super().__init__(path, "rb")

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            if offset < 0:
                raise ValueError(f"negative seek value {offset}")
            return super().seek(offset)
        if whence == io.SEEK_CUR:
            base = super().tell()
        elif whence == io.SEEK_END:
            base = os.fstat(self.fileno()).st_size
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        return super().seek(max(0, base + offset))


class AtomicFile(io.RawIOBase):
    """A binary file written to a temporary sibling and renamed into place on close.

    ``close()`` after a clean write publishes the file (flush, fsync, rename, fsync of
    the directory). Leaving a ``with`` block through an exception, or calling
    :meth:`discard`, removes the temporary file and leaves the destination untouched.
    A writer that is garbage-collected without ``close()`` publishes nothing.
    """

    def __init__(self, path: str, mode: int = 0o666) -> None:
        super().__init__()
        self.path = path
        self.name = path
        directory = os.path.dirname(path) or "."
        prefix = "." + os.path.basename(path)[:100] + "."
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        while True:
            # Created with ``mode`` so the kernel applies the umask, as a plain open()
            # does (reading the umask would mean changing it, for every thread).
            self._tmp = os.path.join(directory, prefix + secrets.token_hex(6) + TEMP_SUFFIX)
            try:
                fd = os.open(self._tmp, flags, mode)
                break
            except FileExistsError:
                continue
        try:
            # Replacing a file keeps its permissions, as rewriting it in place would.
            os.fchmod(fd, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            os.unlink(self._tmp)
            raise
        self._fh = os.fdopen(fd, "wb")

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return self._fh.write(data)

    def tell(self) -> int:
        return self._fh.tell()

    def fileno(self) -> int:
        return self._fh.fileno()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self._cleanup()
            raise
        finally:
            super().close()
        _fsync_dir(os.path.dirname(self.path) or ".")

    def discard(self) -> None:
        """Abandon the write: the destination keeps its old content (or stays absent)."""
        if not self.closed:
            self._cleanup()
            super().close()

    def _cleanup(self) -> None:
        try:
            self._fh.close()
        finally:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def __del__(self) -> None:
        if hasattr(self, "_fh") and not self.closed:
            self.discard()


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
