"""Large writes in parts: an object sent as numbered parts and published whole at the end.

A whole-object PUT holds the object in memory and stops at the store's single-request cap
(5 GiB on S3). Above :attr:`~mlstore.config.StoreConfig.multipart_threshold`, a write to
a backend that :attr:`~mlstore.backends.base.Backend.supports_multipart` goes up in parts
instead:

- :class:`StreamedWrite` (``open(url, "wb")``) cuts the bytes written into parts as they
  arrive and sends each part as soon as the next byte shows it is not the last, so a
  file holds about ``multipart_concurrency + 1`` parts, never the object. A file closed
  before it outgrew the threshold is one whole-object write, as before.
- :meth:`Uploader.send` of slices of one buffer (``write_bytes``): no copy of the
  buffer, one copy of each part while it is in flight.

The retry layer stays where it is: starting the upload, each part and the commit are
one call each through :meth:`~mlstore._engine.calls.Calls.call`, retried on transient
errors under the write policy, so a part that fails once is sent again alone. Parts go
up from a small pool of threads (``multipart_concurrency``); a sender waits while that
many are in flight, which is what bounds the memory.

Nothing partial is ever visible at the URL: the store publishes the object only at the
commit. Any failure (a part that kept failing, a ``with`` block that raised, a file
dropped unclosed, ``KeyboardInterrupt``) aborts the upload, and the error raised is the
one that stopped it, naming the URL.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mlstore._engine.calls import Calls
from mlstore._util.redact import redact_url
from mlstore.backends.base import Backend, Upload
from mlstore.config import StoreConfig
from mlstore.errors import MlstoreError
from mlstore.hashing import Hasher
from mlstore.url import URL

__all__ = ["PartPlan", "StreamedWrite", "Uploader"]

log = logging.getLogger("mlstore")

#: The largest part (Azure's largest block; S3 takes 5 GiB).
_MAX_PART = 4000 * 1024 * 1024


@dataclass(frozen=True)
class PartPlan:
    """How large writes are cut (from :class:`~mlstore.config.StoreConfig`).

    Attributes:
        threshold: objects larger than this (and than one part) go up in parts.
        part_size: the size of the first parts.
        concurrency: parts of one write in flight at once.
    """

    threshold: int
    part_size: int
    concurrency: int

    @classmethod
    def of(cls, config: StoreConfig) -> PartPlan:
        return cls(
            config.multipart_threshold,
            config.multipart_part_size,
            config.multipart_concurrency,
        )

    @property
    def cutoff(self) -> int:
        """The largest write that is still one request."""
        return max(self.threshold, self.part_size)

    def size_of(self, number: int, max_parts: int) -> int:
        """The size of part ``number`` (from 1): the part size, doubled after every
        tenth of ``max_parts``, so a stream of unknown length fits the store's limit
        (on S3, 10,000 parts cover 16 TiB from 16 MiB parts)."""
        step = max(1, max_parts // 10)
        doublings = min((number - 1) // step, 16)
        return min(self.part_size << doublings, max(_MAX_PART, self.part_size))

    def cut(self, size: int, max_parts: int) -> list[tuple[int, int]]:
        """The ``[start, end)`` of each part of an object of ``size`` bytes."""
        out: list[tuple[int, int]] = []
        start = 0
        while start < size:
            end = min(size, start + self.size_of(len(out) + 1, max_parts))
            out.append((start, end))
            start = end
        return out


class Uploader:
    """One multipart upload, started when it is made: :meth:`send` each part in order,
    then :meth:`finish` once; :meth:`abort` after anything goes wrong (``finish``
    aborts by itself when it fails).

    Args:
        calls: the process's backends and retried call.
        backend: the backend of ``target`` (one that supports multipart uploads).
        target: the physical URL written.
        plan: the part sizes and how many parts go at once.
        content_hash: the hash of the whole content, when it is known before the first
            part (recorded by every store; see :meth:`Backend.start_upload`).
        block_digests: the per-block digests of the whole content, likewise.
    """

    def __init__(
        self,
        calls: Calls,
        backend: Backend,
        target: URL,
        plan: PartPlan,
        *,
        content_hash: str | None = None,
        block_digests: str | None = None,
    ) -> None:
        self._calls = calls
        self._backend = backend
        self._target = target

        def start() -> Upload:
            return backend.start_upload(
                target, content_hash=content_hash, block_digests=block_digests
            )

        self._upload: Upload = calls.call(backend, start, target, "write", op="upload")
        self._pool = ThreadPoolExecutor(plan.concurrency, thread_name_prefix="mlstore-upload")
        self._slots = threading.Semaphore(plan.concurrency)
        self._parts: list[Future[str]] = []
        self._failed: BaseException | None = None
        self._ended = False

    @property
    def parts(self) -> int:
        """How many parts were handed to :meth:`send`."""
        return len(self._parts)

    def send(self, data: bytes | memoryview) -> None:
        """Send the next part (in the background); waits while the pool is full, and
        raises the error of an earlier part that failed for good."""
        self._raise_failure()
        self._slots.acquire()
        if self._failed is not None:
            self._slots.release()
            self._raise_failure()
        number = len(self._parts) + 1
        future = self._pool.submit(self._put, number, data)
        future.add_done_callback(self._sent)
        self._parts.append(future)

    def _put(self, number: int, data: bytes | memoryview) -> str:
        # A slice of a caller's buffer is copied here, one part at a time: an SDK sends
        # bytes (and replays them on a retry), not a view of memory the caller owns.
        part = data if type(data) is bytes else bytes(data)
        upload = self._upload

        def put() -> str:
            return upload.put_part(number, part)

        return self._calls.call(self._backend, put, self._target, "write", op="upload_part")

    def _sent(self, future: Future[str]) -> None:
        self._slots.release()
        if not future.cancelled() and future.exception() is not None and self._failed is None:
            self._failed = future.exception()

    def _raise_failure(self) -> None:
        if self._failed is not None:
            for future in self._parts:  # the first part that failed, in order
                if future.done() and not future.cancelled() and future.exception():
                    future.result()
            raise self._failed

    def finish(self, content_hash: str) -> str | None:
        """Wait for every part, then publish the object; the version made, if the store
        named it. On any failure the upload is aborted and the error raised."""
        upload = self._upload
        try:
            tokens = [future.result() for future in self._parts]

            def complete() -> str | None:
                return upload.complete(tokens, content_hash=content_hash)

            version = self._calls.call(self._backend, complete, self._target, "write", op="upload")
        except BaseException:
            self.abort()
            raise
        self._ended = True
        self._pool.shutdown()
        return version

    def abort(self) -> None:
        """Stop sending, wait for the parts in flight, and drop the upload (retried; a
        failure to drop it is logged, not raised over the error that caused it)."""
        if self._ended:
            return
        self._ended = True
        for future in self._parts:
            future.cancel()
        self._pool.shutdown(wait=True)
        try:
            self._calls.call(self._backend, self._upload.abort, self._target, "write", op="upload")
        except MlstoreError as exc:
            log.warning(
                "%s: the failed upload could not be aborted (%s); its parts stay stored "
                "until the bucket's lifecycle rules remove them",
                redact_url(str(self._target)),
                exc.reason,
            )


class StreamedWrite(io.RawIOBase):
    """The file ``open(url, "wb")`` gives on a backend that uploads in parts.

    Bytes are cut into parts as they arrive (see :class:`PartPlan`). While the object is
    no larger than the threshold, the parts are kept; a clean close then stores them
    with one whole-object write (``whole``), as for a small file. Once the object
    outgrows it, the upload starts (``start``), the kept parts go, and every later part
    is sent as soon as a byte past it arrives (so the last part is never empty). A
    clean close sends the last part and publishes the object; :meth:`discard` (a
    ``with`` block that raised) aborts.

    Each part is built in an ``io.BytesIO`` whose ``getvalue()`` hands over its bytes
    without a copy.

    Args:
        plan: the part sizes.
        max_parts: the backend's limit on parts.
        start: begins the upload.
        whole: stores a small object with one write.
        made: told the version the upload made (or ``None``) and the content hash.
        name: the URL, for ``repr`` and warnings.
    """

    def __init__(
        self,
        plan: PartPlan,
        max_parts: int,
        *,
        start: Callable[[], Uploader],
        whole: Callable[[bytes], None],
        made: Callable[[str | None, str], None],
        name: str,
    ) -> None:
        super().__init__()
        self._plan = plan
        self._max_parts = max_parts
        self._start = start
        self._whole = whole
        self._made = made
        self.name = name
        self._hasher = Hasher()
        self._kept: list[bytes] = []  # full parts, before the upload starts
        self._uploader: Uploader | None = None
        self._cut = 0  # parts cut so far
        self._part = io.BytesIO()
        self._room = plan.size_of(1, max_parts)

    def __repr__(self) -> str:
        return f"<mlstore write file {redact_url(self.name)!r}>"

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError("write to closed file")
        view = memoryview(data).cast("B")
        self._hasher.update(view)
        pos, n = 0, len(view)
        while pos < n:
            if not self._room:  # the part is full and more follows: it is not the last
                self._next_part()
            k = min(self._room, n - pos)
            self._part.write(view[pos : pos + k])
            self._room -= k
            pos += k
        return n

    def _next_part(self) -> None:
        part = self._part.getvalue()
        self._part = io.BytesIO()
        self._cut += 1
        self._room = self._plan.size_of(self._cut + 1, self._max_parts)
        if self._uploader is not None:
            self._uploader.send(part)
            return
        self._kept.append(part)
        if sum(len(p) for p in self._kept) >= self._plan.cutoff:  # and a byte more comes
            self._uploader = self._start()
            while self._kept:
                self._uploader.send(self._kept.pop(0))

    def close(self) -> None:
        if self.closed:
            return
        try:
            last = self._part.getvalue()
            self._part = io.BytesIO()
            if self._uploader is None:
                self._kept.append(last)
                data = b"".join(self._kept)
                self._kept.clear()
                self._whole(data)
                return
            self._uploader.send(last)
            digest = self._hasher.hexdigest()
            self._made(self._uploader.finish(digest), digest)
        except BaseException:
            if self._uploader is not None:
                self._uploader.abort()
            raise
        finally:
            super().close()

    def __del__(self) -> None:
        # io's finaliser would close(), which publishes: an unclosed file publishes
        # nothing (the CountingWriter over it warns).
        if not self.closed:
            self.discard()

    def discard(self) -> None:
        """Abandon the write: the upload (if one started) is aborted, and the object at
        the URL is left as it was."""
        if self.closed:
            return
        self._kept.clear()
        self._part = io.BytesIO()
        try:
            if self._uploader is not None:
                self._uploader.abort()
        finally:
            super().close()
