"""Reads from the storage itself: locate an object, fetch it whole, read a range of it,
open it as a file. No cache here (see :mod:`.cached`, which is handed a :class:`Reader`).

Every body is read under the retry policy and resumed when it breaks off: the bytes that
arrived come back through the backend's ``received=`` argument
(:class:`~mlstore.backends.base.Received`), and the next attempt asks only for the rest,
with a range request pinned to the version the first response came from (If-Match /
generation). If the object changed meanwhile, a read the caller pinned raises
:class:`~mlstore.errors.PreconditionFailedError`; an unpinned read starts over on the
new version. Versions are never stitched together: an object without a version (an http
object without a strong ETag) is opened by reading it whole, in one request.
"""

from __future__ import annotations

import functools
import io
from typing import IO, cast

from mlstore._engine.calls import Calls
from mlstore._engine.replicas import Replicas, Resolved
from mlstore._util.files import CountingReader, open_ranged
from mlstore._util.redact import redact_url
from mlstore.backends.base import Backend, ObjectInfo, Received
from mlstore.errors import (
    CorruptBodyError,
    IsADirectoryError_,
    PreconditionFailedError,
    TransientError,
    UnsupportedOperation,
)
from mlstore.url import URL

__all__ = ["Reader"]


class Reader:
    """Uncached reads of resolved URLs, each on the replica that answers.

    Args:
        calls: this process's backends and the retried call.
        replicas: the failover sweep.
    """

    def __init__(self, calls: Calls, replicas: Replicas) -> None:
        self.calls = calls
        self.replicas = replicas

    def locate(self, where: Resolved) -> tuple[URL, ObjectInfo]:
        """The replica that answers for ``where`` and the object's info there."""
        call = self.calls.call

        def info(target: URL, backend: Backend) -> tuple[URL, ObjectInfo]:
            return target, call(backend, functools.partial(backend.info, target), target, op="head")

        return self.replicas.run(where, info)

    def fetch_whole(self, where: Resolved, version: str | None = None) -> tuple[bytes, str | None]:
        """The whole object and the version those bytes are (pinned to ``version``,
        when given: a changed object raises ``PreconditionFailedError``)."""
        whole = version is None
        return self.replicas.run(
            where, lambda target, backend: self.read(backend, target, None, None, version, whole)
        )

    def read_range(
        self, where: Resolved, start: int | None, end: int | None, version: str | None
    ) -> bytes:
        """Bytes ``[start:end)`` (slice semantics), pinned to ``version`` if given."""
        return self.replicas.run(
            where, lambda target, backend: self.read(backend, target, start, end, version)[0]
        )

    def read_pinned(self, target: URL, start: int, end: int, version: str | None) -> bytes:
        """Bytes ``[start, end)`` of one physical URL, pinned to ``version``."""
        backend = self.calls.backend(target.protocol)
        return self.read(backend, target, start, end, version)[0]

    def open(
        self, where: Resolved, *, buffer_size: int | None, version: str | None, block_size: int
    ) -> IO[bytes]:
        """A seekable read file whose every range is pinned to the version seen now (or to
        ``version``: an object that is no longer that version is refused). An object
        without a version has no ranges that could be pinned: it is read whole, now."""
        target, info = self.locate(where)
        backend = self.calls.backend(target.protocol)
        if info.is_dir:
            raise IsADirectoryError_.at(target, "open")
        if version is not None and info.version is None:
            raise UnsupportedOperation(
                f"version {version} was asked for, but the object has no version to pin "
                "a read to (an http object without a strong ETag); open it without version=",
                url=str(target),
                operation="open",
            )
        if version is not None and version != info.version:
            raise PreconditionFailedError(
                f"version {version} was asked for, but the object is now {info.version}",
                url=str(target),
                operation="open",
            )
        native = backend.open_read(target, info)
        if isinstance(native, io.RawIOBase):
            # An unbuffered native file (local disk) gets the buffer size asked for, and
            # its reads are counted like ranged ones.
            raw = CountingReader(native, functools.partial(self.calls.count, backend, "bytes_read"))
            return cast(IO[bytes], io.BufferedReader(raw, buffer_size or io.DEFAULT_BUFFER_SIZE))
        if native is not None:
            return native
        pinned = info.version
        if pinned is None:
            whole = io.BytesIO(self.read(backend, target, None, None, None)[0])
            whole.name = redact_url(str(target))  # shown by repr(): never credentials
            return whole

        def fetch(start: int, end: int) -> bytes:
            return self.read(backend, target, start, end, pinned)[0]

        size_hint = buffer_size or min(block_size, 4 * 1024 * 1024)
        return open_ranged(fetch, info.size, str(target), buffer_size=size_hint, info=info)

    def read(
        self,
        backend: Backend,
        target: URL,
        start: int | None,
        end: int | None,
        version: str | None,
        whole: bool = False,
    ) -> tuple[bytes, str | None]:
        """One read under the retry policy (the whole object when ``whole``, else
        ``[start, end)`` pinned to ``version``) that resumes an interrupted body."""
        resume = _Resume(start, end, version)
        resumable = backend.resumable
        count = self.calls.count

        def first(got: Received | None) -> tuple[bytes, str | None]:
            if whole:
                return backend.fetch(target, received=got) if got else backend.fetch(target)
            if got is None:
                return backend.read(target, start, end, version), version
            return backend.read(target, start, end, version, received=got), version

        def attempt() -> tuple[bytes, str | None]:
            got = Received() if resumable else None
            try:
                if not resume.parts:
                    return first(got)
                try:
                    rest = backend.read(
                        target, resume.offset, resume.end, resume.version, received=got
                    )
                except PreconditionFailedError:
                    if version is not None:
                        raise  # the caller pinned the version that is gone
                    resume.restart()  # changed under us: start over, all on the new one
                    count(backend, "restarts")
                    return first(got)
                data = b"".join([*resume.parts, rest])
                if not start and end is None:  # a whole object put together: check it
                    self.calls.count_request(backend, "head")
                    try:
                        backend.check_resumed(target, data, resume.version)
                    except CorruptBodyError:
                        resume.restart()  # no start to build on: the next attempt starts over
                        count(backend, "integrity_failures")
                        raise
                return data, resume.version
            except TransientError:
                if got is not None and resume.keep(got):
                    count(backend, "resumes")
                raise

        data, got_version = self.calls.call(backend, attempt, target)
        count(backend, "bytes_read", len(data))
        return data, got_version


class _Resume:
    """What an interrupted read of ``[start, end)`` has received so far, and where to go
    on from. A suffix read (negative ``start``) is never resumed: it starts over."""

    __slots__ = ("_asked", "end", "offset", "parts", "version")

    def __init__(self, start: int | None, end: int | None, version: str | None) -> None:
        self._asked = (start, end, version)
        self.restart()

    def restart(self) -> None:
        """Back to what was asked: forget what arrived (its version is gone)."""
        start, self.end, self.version = self._asked
        self.offset = start or 0
        self.parts: list[bytes] = []

    def keep(self, got: Received) -> bool:
        """Keep the bytes that arrived before the body broke off; True if the next
        attempt resumes from them."""
        if not got.data or (self._asked[0] or 0) < 0:
            return False
        version = self.version or got.version
        if version is None:
            return False  # nothing to pin the rest to: start over
        if self.end is None and got.length is not None:
            self.end = self.offset + int(got.length)
        self.version = version
        self.parts.append(got.data)
        self.offset += len(got.data)
        return True
