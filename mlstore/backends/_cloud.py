"""What S3, GCS and Azure share: an object store of buckets and keys.

An object store has no directories: a URL names a "directory" when it is the bucket, ends
with ``/``, or is a prefix that has objects below it. This base class holds the rules
that follow from that, once:

- ``info`` asks for the object first, and only when there is none looks for objects
  below the prefix (a missing *bucket* ends the search);
- reads and writes of a directory URL raise ``IsADirectoryError_`` before any request,
  and a read that finds no object says "directory" when the URL is a prefix (S3 opts
  out: there a missing key stays one request);
- a read turns ``[start:end)`` into one ranged GET; a range that starts past the end
  is empty, as a slice is; a whole-object GET is checked against the hash mlstore
  recorded when it wrote the object;
- a body that breaks off fills the caller's ``Received``, so the Store resumes it;
- writes record mlstore's content hash in the object's metadata, and the per-block
  digests of an object larger than one digest block;
- ``mkdir`` of a bucket URL creates the bucket; of a key, it does nothing;
- a large write may go up in parts (:meth:`ObjectStoreBackend.start_upload`): each
  cloud provides a :class:`CloudUpload` whose requests are translated here, once, and
  whose metadata is recorded by the rule of :meth:`CloudUpload.complete`.

A cloud backend provides the requests (``_stat``, ``_has_below``, ``_download``,
``_upload``), the error answer its SDK kept (``_answer``, mapped through
:func:`mlstore.backends._errors.status_error` with the backend's
:class:`~mlstore.backends._errors.Service`) and what its other exceptions mean
(``_sdk_error``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from mlstore.backends._errors import (
    Answer,
    HashMismatchError,
    Service,
    refuse_corrupt,
    status_error,
)
from mlstore.backends._fsspec import FsspecBackend
from mlstore.backends._ranges import wanted
from mlstore.backends.base import ObjectInfo, Received, Upload, keep_received
from mlstore.errors import IsADirectoryError_, MlstoreError, NotFoundError
from mlstore.hashing import (
    BLOCKS_KEY,
    METADATA_KEY,
    block_digests,
    content_hash,
    stale_metadata,
)
from mlstore.url import URL

__all__ = ["CloudUpload", "ObjectStoreBackend"]


class CloudUpload(Upload):
    """A multipart upload of a cloud backend: the cloud provides the three requests
    (:meth:`_put`, :meth:`_complete`, :meth:`_abort`); this class translates what they
    raise through the backend's one translation, and decides the metadata.

    Metadata: what :meth:`ObjectStoreBackend.start_upload` was given (the hash and
    block digests of content known up front) is recorded by every store. A store whose
    commit request takes metadata (:attr:`records_at_commit`: GCS compose, Azure Put
    Block List) also records the content hash computed while the parts were sent. S3
    fixes an upload's metadata when it starts, so a streamed S3 object carries no hash:
    never a wrong one.
    """

    #: Whether the commit request takes the object's metadata.
    records_at_commit: ClassVar[bool] = False

    def __init__(self, backend: ObjectStoreBackend, url: URL, metadata: dict[str, str]) -> None:
        self.backend = backend
        self.url = url
        self.metadata = metadata

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    # ---- what each cloud provides
    def _put(self, number: int, data: bytes) -> str:
        raise NotImplementedError

    def _complete(self, parts: Sequence[str], metadata: dict[str, str]) -> str | None:
        raise NotImplementedError

    def _abort(self) -> None:
        raise NotImplementedError

    # ---- Upload
    def put_part(self, number: int, data: bytes | bytearray | memoryview) -> str:
        with self.backend._errors(self.url, "write"):
            return self._put(number, data if type(data) is bytes else bytes(data))

    def complete(self, parts: Sequence[str], *, content_hash: str) -> str | None:
        metadata = dict(self.metadata)
        if self.records_at_commit:
            metadata[self.backend.hash_key] = content_hash
        with self.backend._errors(self.url, "write"):
            return self._complete(parts, metadata)

    def abort(self) -> None:
        with self.backend._errors(self.url, "write"):
            self._abort()


class ObjectStoreBackend(FsspecBackend):
    """An fsspec-based backend for a bucket-and-key object store."""

    resumable = True
    supports_multipart = True
    #: How the service words its errors.
    service: ClassVar[Service]
    #: The metadata name under which a write records mlstore's content hash.
    hash_key: ClassVar[str] = METADATA_KEY
    blocks_key: ClassVar[str] = BLOCKS_KEY
    #: Whether the service answers suffix ranges (``bytes=-n``) without the size.
    suffix_ranges: ClassVar[bool] = True

    # ---- what each cloud provides
    def _answer(self, exc: BaseException) -> Answer | None:
        """The failed request in ``exc``'s chain, if the SDK kept one."""
        return None

    def _sdk_error(self, exc: Exception, url: URL, operation: str) -> MlstoreError | None:
        """What else the SDK's exception means (credentials, timeouts, dropped
        connections), or ``None`` for the generic translation."""
        return None

    def _stat(self, url: URL) -> ObjectInfo:
        """The object at ``url`` (one request; the SDK's error is raised as it is)."""
        raise NotImplementedError

    def _has_below(self, url: URL) -> bool:
        """Whether any object is below the prefix ``url`` (for a bucket URL: whether the
        bucket exists)."""
        raise NotImplementedError

    def _download(self, url: URL, want: slice, version: str | None) -> tuple[bytes, str | None]:
        """One GET of ``want`` (see :func:`~mlstore.backends._ranges.wanted`), pinned to
        ``version`` if given: the bytes and the version they are. A body that stops
        early raises :class:`~mlstore.backends.base.InterruptedBodyError`; a whole
        object is checked against its recorded hash."""
        raise NotImplementedError

    def _upload(self, url: URL, data: bytes, metadata: dict[str, str]) -> str | None:
        """Replace the object at ``url`` with ``data``, with ``metadata``; the version
        made, if the answer names it (as :meth:`info` would report it)."""
        raise NotImplementedError

    def _begin(self, url: URL, metadata: dict[str, str]) -> CloudUpload:
        """Start a multipart upload to ``url`` (a request, where the store keeps one)."""
        raise NotImplementedError

    def _create_bucket(self, bucket: str) -> None:
        if not self.fs.exists(bucket):
            self.fs.mkdir(bucket)

    def _size(self, url: URL, version: str | None) -> int:
        """The object's size, to resolve a range counted from the end."""
        return self.info(url).size

    # ---- shared rules
    def _translate(self, exc: Exception, url: URL, operation: str) -> MlstoreError:
        """mlstore's own errors as they are; an error answer through the status table;
        then what the SDK's exception says; then the generic translation."""
        if isinstance(exc, MlstoreError):
            return exc
        answer = self._answer(exc)
        if answer is not None:
            return status_error(answer, url, operation, self.service)
        return self._sdk_error(exc, url, operation) or super()._translate(exc, url, operation)

    def _answer_in(self, exc: BaseException) -> Answer | None:
        # mlstore's own errors carry no SDK answer (and the SDK may not even be there).
        return None if isinstance(exc, MlstoreError) else self._answer(exc)

    def _status(self, exc: BaseException) -> int:
        answer = self._answer_in(exc)
        return answer.status if answer is not None else 0

    def _may_be_prefix(self, exc: BaseException) -> bool:
        """Whether a "not found" leaves room for a prefix: not when the bucket is what
        is missing."""
        answer = self._answer_in(exc)
        return answer is None or not self.service.bucket_is_missing(answer.code)

    @staticmethod
    def _key(url: URL) -> str:
        """The key of ``url`` as a prefix: without a trailing ``/``."""
        return url.path.rstrip("/")

    @staticmethod
    def _refuse_directory(url: URL, operation: str) -> None:
        """A bucket URL, or one that ends with ``/``, names a directory."""
        if not url.path or url.path.endswith("/"):
            raise IsADirectoryError_.at(url, operation)

    # ---- Backend: reading
    def info(self, url: URL) -> ObjectInfo:
        with self._errors(url, "info"):
            if url.path and not url.path.endswith("/"):
                try:
                    return self._stat(url)
                except Exception as exc:  # translated here: no object may still be a prefix
                    err = self._translate(exc, url, "info")
                    if not isinstance(err, NotFoundError) or not self._may_be_prefix(exc):
                        raise err from exc
            return self._directory(url)

    def _directory(self, url: URL) -> ObjectInfo:
        """The "directory" ``url`` names: the bucket, or a prefix with objects below it."""
        if self._has_below(url):
            return ObjectInfo(url=self._url(self._path(url)), size=0, type="directory")
        raise NotFoundError("no such object or directory", url=str(url), operation="info")

    def read(
        self,
        url: URL,
        start: int | None = None,
        end: int | None = None,
        version: str | None = None,
        *,
        received: Received | None = None,
    ) -> bytes:
        with self._errors(url, "read", received):
            self._refuse_directory(url, "read")
            suffix = self.suffix_ranges
            try:
                want = wanted(start, end, lambda: self._size(url, version), suffix=suffix)
                if want is None:
                    return b""
                return self._download(url, want, version)[0]
            except Exception as exc:  # translated here
                if self._status(exc) == 416:  # the range starts at or past the end
                    return b""
                raise self._read_error(exc, url, version, received) from exc

    def fetch(self, url: URL, *, received: Received | None = None) -> tuple[bytes, str | None]:
        """One GET: the whole object and the version the server says it is."""
        with self._errors(url, "read", received):
            self._refuse_directory(url, "read")
            try:
                try:
                    return self._download(url, slice(0, None), None)
                except HashMismatchError as first:
                    return self._second_look(url, first)
            except Exception as exc:  # translated here
                raise self._read_error(exc, url, None, received) from exc

    def check_resumed(self, url: URL, data: bytes, version: str | None) -> None:
        """A whole download is checked against the hash mlstore recorded in the
        object's metadata (or the server's MD5), a ranged one is not: so an object put
        together from an interrupted body and the rest of it is checked here, with one
        HEAD (after a resume only). An object that changed since is left unchecked:
        nothing describes those bytes any more."""
        info = self.info(url)
        if info.version == version:
            served = {"md5": info.checksums.get("md5")}
            refuse_corrupt(data, info.content_hash, url, version=version, served=served)

    def _second_look(self, url: URL, first: HashMismatchError) -> tuple[bytes, str | None]:
        """A download that disagreed with the object's recorded hash, downloaded again:
        the same bytes twice are what the store holds (the metadata is stale: serve
        them); other bytes were damaged in transit, once or twice (fetched again by the
        retry policy)."""
        try:
            return self._download(url, slice(0, None), None)
        except HashMismatchError as second:
            if second.body_hash != first.body_hash:
                raise
            stale_metadata(url, "content hash")
            return second.data, second.version

    def _read_error(
        self, exc: Exception, url: URL, version: str | None, received: Received | None
    ) -> MlstoreError:
        err = self._translate(exc, url, "read")
        if isinstance(err, NotFoundError) and err is not exc:  # (info has looked already)
            err = self._missing_on_read(url, version, err, exc)
        return keep_received(received, err, exc)

    def _missing_on_read(
        self, url: URL, version: str | None, err: NotFoundError, exc: BaseException
    ) -> MlstoreError:
        """A read found no object: if the URL is a prefix, it names a directory."""
        if not self._may_be_prefix(exc):
            return err
        try:
            below = self._has_below(url)
        except Exception:  # noqa: BLE001 - no listing permission or no bucket: the 404 stands
            return err
        return IsADirectoryError_.at(url, "read") if below else err

    # ---- Backend: writing
    def write(self, url: URL, data: bytes) -> str | None:
        with self._errors(url, "write"):
            self._refuse_directory(url, "write")
            payload = bytes(data)
            metadata = {self.hash_key: content_hash(payload)}
            blocks = block_digests(payload)
            if blocks is not None:
                metadata[self.blocks_key] = blocks
            return self._upload(url, payload, metadata)

    def start_upload(
        self, url: URL, *, content_hash: str | None = None, block_digests: str | None = None
    ) -> Upload:
        with self._errors(url, "write"):
            self._refuse_directory(url, "write")
            metadata = {self.hash_key: content_hash} if content_hash else {}
            if block_digests:
                metadata[self.blocks_key] = block_digests
            return self._begin(url, metadata)

    def mkdir(self, url: URL) -> None:
        if url.path:
            return  # object stores have no directories
        with self._errors(url, "mkdir"):
            self._create_bucket(url.bucket)
