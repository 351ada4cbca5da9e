"""A backend over an fsspec filesystem: the shared body of the memory, local and cloud
backends. Subclasses say how to build the filesystem, how URLs map to its paths, and how
its errors and metadata translate."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from typing import IO, Any

from mlstore._util.files import BufferedWrite
from mlstore._util.process import keep_inherited
from mlstore._util.redact import scrub
from mlstore.backends.base import (
    Backend,
    Hedge,
    ObjectInfo,
    PerProcess,
    Received,
    find_cause,
    keep_received,
    translate_os_error,
)
from mlstore.config import StoreConfig
from mlstore.errors import (
    ConfigError,
    ConnectionLostError,
    IsADirectoryError_,
    MlstoreError,
    NotFoundError,
    StorageTimeoutError,
)
from mlstore.url import URL

__all__ = ["FsspecBackend"]


class FsspecBackend(Backend):
    """Backend whose operations run on an fsspec ``AbstractFileSystem``."""

    buffered_writes = True

    def __init__(
        self, options: Mapping[str, Any], config: StoreConfig, *, hedge: Hedge | None = None
    ) -> None:
        super().__init__(options, config, hedge=hedge)
        # A forked child keeps the filesystem it inherited, untouched: closing the
        # parent's async clients there prints asyncio tracebacks and can harm the parent.
        self._fs = PerProcess(self._make_fs, on_fork=keep_inherited, eager=True)

    # ---- what subclasses provide
    def _make_fs(self) -> Any:
        raise NotImplementedError

    @property
    def fs(self) -> Any:
        try:
            return self._fs.get()
        except ImportError as exc:
            from mlstore.backends.base import install_hint

            raise ConfigError(
                f"the {self.protocol} backend needs {exc.name or 'a package'}, which is not "
                f"installed; {install_hint(self.protocol)}"
            ) from None

    def _sync(self, coro_fn: Any, *args: Any) -> Any:
        """Run ``coro_fn(fs, *args)`` on the async filesystem's event loop."""
        from fsspec.asyn import sync

        fs = self.fs
        return sync(fs.loop, coro_fn, fs, *args)

    def _path(self, url: URL) -> str:
        """The fsspec path of ``url``."""
        return f"{url.bucket}/{url.path}".rstrip("/")

    def _url(self, path: str) -> URL:
        """The URL of an fsspec path."""
        bucket, _, key = path.strip("/").partition("/")
        return URL(self.protocol, bucket, key)

    def _translate(self, exc: Exception, url: URL, operation: str) -> MlstoreError:
        """The one place where this backend's SDK errors become mlstore errors."""
        if isinstance(exc, MlstoreError):
            return exc
        if isinstance(exc, OSError):
            return translate_os_error(exc, url, operation)
        # SDK messages can quote a connection string or a signed URL: mask secrets.
        text = f"{type(exc).__name__}: {scrub(str(exc))}"
        return MlstoreError(text, url=str(url), operation=operation)

    def _version(self, raw: Mapping[str, Any]) -> str | None:
        return None

    def _info_from(self, raw: Mapping[str, Any]) -> ObjectInfo:
        kind = "directory" if raw.get("type") == "directory" else "file"
        return ObjectInfo(
            url=self._url(raw["name"]),
            size=int(raw.get("size") or 0) if kind == "file" else 0,
            type=kind,
            version=self._version(raw) if kind == "file" else None,
            mtime=_mtime(raw),
        )

    @contextlib.contextmanager
    def _errors(self, url: URL, operation: str, received: Received | None = None) -> Iterator[None]:
        """Translate what the block raises (once); fill ``received`` from a broken body.

        An mlstore error that names no URL was raised before one was known (building
        the client from the options): it is raised again naming ``url`` and
        ``operation``.
        """
        try:
            yield
        except MlstoreError as err:
            if err.url is not None:
                raise
            raise type(err)(err.reason, url=str(url), operation=operation) from None
        except Exception as exc:
            raise keep_received(received, self._translate(exc, url, operation), exc) from exc

    # ---- Backend
    def info(self, url: URL) -> ObjectInfo:
        with self._errors(url, "info"):
            return self._info_from(self.fs.info(self._path(url)))

    def read(
        self,
        url: URL,
        start: int | None = None,
        end: int | None = None,
        version: str | None = None,
        *,
        received: Received | None = None,
    ) -> bytes:
        with self._errors(url, "read"):
            path = self._path(url)
            if version is not None:
                self._check_version(url, version)
            try:
                data: bytes = self.fs.cat_file(path, start=start, end=end)
            except FileNotFoundError:
                if path and self.fs.isdir(path):
                    raise IsADirectoryError_.at(url, "read") from None
                raise
            return data

    def _check_version(self, url: URL, version: str) -> None:
        from mlstore.errors import PreconditionFailedError

        current = self.info(url).version
        if current is not None and current != version:
            raise PreconditionFailedError(
                f"the object changed while it was read (version {version} is now {current})",
                url=str(url),
                operation="read",
            )

    def ls(self, url: URL) -> list[ObjectInfo]:
        with self._errors(url, "ls"):
            listed = self._path(url)
            entries = []
            for raw in self.fs.ls(listed, detail=True):
                marker = _is_marker(raw)
                name = str(raw.get("name", ""))
                if (marker or raw.get("type") == "directory") and name.rstrip("/") == listed:
                    continue  # the listed folder itself (its marker): not an entry of it
                entries.append(self._directory_entry(name) if marker else self._info_from(raw))
            return entries

    def find(self, url: URL) -> Iterator[ObjectInfo]:
        with self._errors(url, "find"):
            found = self.fs.find(self._path(url), detail=True)
        for raw in found.values():
            if not _is_marker(raw):  # find lists files; a marker is a folder
                yield self._info_from(raw)

    def _directory_entry(self, path: str) -> ObjectInfo:
        return ObjectInfo(url=self._url(path.rstrip("/")), size=0, type="directory")

    def open_write(self, url: URL) -> IO[bytes]:
        return BufferedWrite(functools.partial(self.write, url), str(url))

    def write(self, url: URL, data: bytes) -> str | None:
        with self._errors(url, "write"):
            self.fs.pipe_file(self._path(url), bytes(data))
        return None

    def rm(self, url: URL, recursive: bool = False) -> None:
        with self._errors(url, "rm"):
            path = self._path(url)
            if not self.fs.exists(path):
                raise NotFoundError("no such object or directory", url=str(url), operation="rm")
            self.fs.rm(path, recursive=recursive)

    def mkdir(self, url: URL) -> None:
        with self._errors(url, "mkdir"):
            self.fs.makedirs(self._path(url), exist_ok=True)

    def copy(self, src: URL, dst: URL) -> None:
        with self._errors(src, "copy"):
            self.fs.cp_file(self._path(src), self._path(dst))


def _is_marker(raw: Mapping[str, Any]) -> bool:
    """A folder marker: a zero-byte object whose key ends with ``/``, as the S3 console,
    Hadoop, Spark and sync tools make for every "folder". It names a directory, never a
    file (a file of that name could not be written to a local disk beside the folder)."""
    name = raw.get("name")
    return (
        isinstance(name, str)
        and name.endswith("/")
        and raw.get("type") != "directory"
        and not int(raw.get("size") or 0)
    )


def _mtime(raw: Mapping[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "updated", "last_modified", "created"):
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        ts = getattr(value, "timestamp", None)
        if callable(ts):
            return float(ts())
    return None


class ShortBodyError(ConnectionError):
    """A response body ended before its announced length (a dropped connection)."""


def transport_error(
    exc: BaseException,
    url: URL,
    operation: str,
    *,
    timeouts: tuple[type[BaseException], ...] = (),
    dropped: tuple[type[BaseException], ...] = (),
) -> MlstoreError | None:
    """A timeout or a dropped connection anywhere in ``exc``'s chain, as the mlstore
    error of that meaning; ``None`` if it is neither. SDK-specific exception types are
    added through ``timeouts`` and ``dropped``; aiohttp's (under every async SDK here)
    are always included."""
    import asyncio

    text = str(url)
    timeout = find_cause(exc, asyncio.TimeoutError, TimeoutError, *timeouts)
    if timeout is not None:
        return StorageTimeoutError(
            f"the request timed out ({type(timeout).__name__})", url=text, operation=operation
        )
    kinds: tuple[type[BaseException], ...] = (ConnectionError, *dropped)
    try:
        import aiohttp

        kinds += (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)
    except ImportError:  # pragma: no cover - every cloud SDK here brings aiohttp
        pass
    lost = find_cause(exc, *kinds)
    if lost is not None:
        return ConnectionLostError(
            f"the connection failed ({type(lost).__name__})", url=text, operation=operation
        )
    return None
