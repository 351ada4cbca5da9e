"""The obstore transport: object reads, heads and writes of s3, gs and az through
obstore (Rust's ``object_store``), for ``StoreConfig.transport = "obstore"``
(``pip install 'mlstore[fast]'``).

Why a second transport: a cold ``read_many`` of small objects spends most of its CPU in
the Python layers of s3fs/aiobotocore (request signing, response parsing, one event loop
shared by every thread). obstore does that work in Rust, without the GIL, so the Store's
threads overlap their requests. What it replaces is small on purpose: the requests the
read path makes (:meth:`_stat`, :meth:`_download`) and the whole-object write
(:meth:`_upload`). Everything else (listing, deletion, copies, bucket creation, the
"is this prefix a directory" probe) stays on the fsspec backend each transport class
derives from, so the rules of :mod:`mlstore.backends._cloud` (directories, ranges,
recorded-hash checks, resume) are the same code under both transports.

How the invariants are kept:

- One retry layer: every store is built with ``retry_config={"max_retries": 0}``
  (object_store's retry loop then returns the first error; the tests count requests at
  the fault proxy to prove a 503 is sent once). Its own overall request timeout (30 s by
  default, which would cut off large downloads) is lifted; the connect timeout and the
  per-read stall timeout come from :class:`~mlstore.config.RetryPolicy`.
- Version pinning: a pinned read sends ``If-Match`` (S3, Azure: the version is the
  ETag) or asks for the generation (GCS); the version the answer names is checked too.
- Recorded hashes: whole-object reads go through the same ``refuse_corrupt`` check as
  the fsspec backends, with the hash read from the answer's metadata (obstore's
  "attributes"), and writes record it under the same metadata name, so objects written
  by one transport are verified by the other.
- Errors: obstore keeps no status code on its exceptions, only in their text
  (``... non-2xx status code: 503 ...`` and the service's ``<Code>``); :func:`answer`
  reads them back into an :class:`~mlstore.backends._errors.Answer`, so the one status
  table of :mod:`mlstore.backends._errors` decides what a failure means. The server's
  ``Retry-After`` is not kept by obstore, so the retry layer's own backoff applies.
- Resume: bodies are streamed in 1 MiB chunks; a body that breaks off raises
  :class:`~mlstore.backends.base.InterruptedBodyError` with what arrived.
- Fork and spawn: obstore's clients are not fork-safe, so they live in a
  :class:`~mlstore._util.process.PerProcess` (one store per bucket per process); a
  forked child builds its own and never touches (or frees) the parent's. That is not
  enough: obstore runs its requests on one process-wide Rust (tokio) runtime, started by
  the first request, whose threads do not survive a fork; a child forked after that
  hangs on its first request (checked on these machines with obstore 0.12). So
  :func:`runtime_usable` records which process started the runtime, and in a forked
  child of it these backends make their requests through the fsspec half instead
  (same results, same invariants, fsspec's speed). A child forked before any request,
  and every spawned or forkserver worker, uses obstore.
- Secrets: obstore stores show only their bucket in a repr; credentials stay in the
  options (masked by :class:`~mlstore.backends.base.Backend`) and error texts are
  scrubbed before they reach an mlstore error.

Hedged reads (``RetryPolicy.hedge_after``) are an fsspec-transport feature for now: the
obstore backends do not hedge.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from mlstore._util.process import PerProcess, keep_inherited
from mlstore._util.redact import scrub
from mlstore.backends._cloud import ObjectStoreBackend
from mlstore.backends._errors import Answer, refuse_corrupt
from mlstore.backends._fsspec import ShortBodyError, transport_error
from mlstore.backends.base import Hedge, InterruptedBodyError, ObjectInfo
from mlstore.config import StoreConfig
from mlstore.errors import (
    ConfigError,
    ConnectionLostError,
    MlstoreError,
    PermissionDeniedError,
    PreconditionFailedError,
    StorageTimeoutError,
)
from mlstore.hashing import BLOCKS_KEY, METADATA_KEY
from mlstore.url import URL

if TYPE_CHECKING:  # obstore's option types exist for type checkers only
    from obstore import GetOptions
    from obstore.store import ClientConfig, RetryConfig

__all__ = [
    "ObstoreTransport",
    "answer",
    "client_options",
    "refuse_options",
    "runtime_usable",
]

_CHUNK = 1 << 20  # body chunks: what arrived before a failure can be resumed from
# Writes above this size are multipart uploads (S3) or staged blocks (Azure).
_SINGLE_PUT = 64 * 1024 * 1024
_PART = 8 * 1024 * 1024
#: obstore's own retry loop, off: mlstore is the one retry layer.
NO_RETRIES: RetryConfig = {"max_retries": 0}

# The process whose obstore runtime runs (see the module docstring), once one does.
_RUNTIME_PID: int | None = None

_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>\s*([A-Za-z]+)\s*</Code>")


def client_options(config: StoreConfig, endpoint: str | None) -> ClientConfig:
    """obstore's HTTP client settings: mlstore's timeouts, plain HTTP for an
    ``http://`` endpoint (emulators), no overall cap on a request's duration (a large
    download may take long; a stall is caught by the read timeout)."""
    retry = config.retry
    out: ClientConfig = {
        "connect_timeout": timedelta(seconds=retry.connect_timeout),
        "read_timeout": timedelta(seconds=retry.read_timeout),
        "timeout": timedelta(days=1),
        "pool_max_idle_per_host": str(max(10, config.max_workers)),
        "user_agent": "mlstore",
    }
    if endpoint and endpoint.startswith("http://"):
        out["allow_http"] = True
    return out


def refuse_options(protocol: str, given: Mapping[str, Any], unusable: tuple[str, ...]) -> None:
    """Refuse the options of ``given`` that the obstore transport cannot honour (they
    would make its requests reach another account, or as someone else, than the fsspec
    half of the same backend)."""
    found = sorted(k for k in given if k in unusable and given[k] not in (None, False, ""))
    if found:
        raise ConfigError(
            f"the obstore transport cannot use the {protocol} option(s) {found}; "
            "use transport='fsspec' for them, or give the credentials another way"
        )


def runtime_usable() -> bool:
    """Whether this process may make obstore requests: not in a forked child of a
    process whose obstore runtime had started (its threads did not come along)."""
    global _RUNTIME_PID
    pid = os.getpid()
    if _RUNTIME_PID is None:
        _RUNTIME_PID = pid  # (a race between threads sets the same pid)
    return pid == _RUNTIME_PID


def _raised_by_obstore(exc: BaseException | None) -> BaseException | None:
    """The first exception in ``exc``'s chain that obstore raised, or ``None``."""
    import obstore.exceptions as oe

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, oe.BaseError):
            return exc
        # obstore raises a plain FileNotFoundError for a 404, with its request in the text
        if isinstance(exc, FileNotFoundError) and "Error performing" in str(exc):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def answer(exc: BaseException | None) -> Answer | None:
    """The error answer an obstore exception in ``exc``'s chain reports: the status and
    the service's error code, read from its text (obstore keeps no other record)."""
    found = _raised_by_obstore(exc)
    if found is None:
        return None
    text = _summary(found)
    status = _STATUS.search(text)
    if status is None:
        return None
    code = _CODE.search(text)
    return Answer(int(status.group(1)), code=code.group(1) if code else "")


def _summary(exc: BaseException) -> str:
    """An obstore exception's message without the debug dump that follows it (which
    names settings such as ``retry_timeout``, not what happened)."""
    return str(exc).split("Debug source:", 1)[0]


def _transport_failure(found: BaseException, url: URL, operation: str) -> MlstoreError | None:
    """What an obstore exception without an error answer means."""
    import obstore.exceptions as oe

    where = {"url": str(url), "operation": operation}
    if isinstance(found, (oe.PermissionDeniedError, oe.UnauthenticatedError)):
        return PermissionDeniedError(
            f"the credentials were refused ({type(found).__name__}); check the options "
            "or the environment variables that give them",
            **where,
        )
    if isinstance(found, (oe.InvalidPathError, oe.NotSupportedError)):
        return ConfigError(f"the request cannot be made ({scrub(str(found))[:200]})", **where)
    text = _summary(found).lower()
    if "timed out" in text or "timeout" in text:
        return StorageTimeoutError("the request timed out", **where)
    if any(s in text for s in ("error sending request", "http error", "connection", "body")):
        return ConnectionLostError("the connection failed (obstore)", **where)
    return None


class ObstoreTransport(ObjectStoreBackend):
    """The obstore half of a cloud backend (see the module docstring); listed before
    the fsspec backend class in a transport class's bases.

    A subclass builds a store for a bucket (:meth:`_new_store`) and says how the
    service names a version (:attr:`version_field`) and pins a read to one
    (:attr:`pin_field`).
    """

    hedges = False
    #: Where obstore's answers carry mlstore's version (``"e_tag"``, or ``"version"``:
    #: the GCS generation).
    version_field: ClassVar[str] = "e_tag"
    #: The get option that pins a read to a version (``"if_match"``, or ``"version"``).
    pin_field: ClassVar[str] = "if_match"

    def __init__(
        self, options: Mapping[str, Any], config: StoreConfig, *, hedge: Hedge | None = None
    ) -> None:
        super().__init__(options, config, hedge=None)
        # bucket -> store, this process's own; a forked child leaves the parent's alone.
        self._stores: PerProcess[dict[str, Any]] = PerProcess(
            dict, on_fork=keep_inherited, eager=True
        )

    # ---- what each cloud provides
    def _new_store(self, bucket: str) -> Any:
        """An obstore store for ``bucket``, built from this backend's options."""
        raise NotImplementedError

    def _store(self, bucket: str) -> Any:
        stores = self._stores.get()
        found = stores.get(bucket)
        if found is None:
            found = stores.setdefault(bucket, self._new_store(bucket))
        return found

    def _version_of(self, meta: Mapping[str, Any]) -> str | None:
        value = meta.get(self.version_field)
        return str(value) if value else None

    def _info_of(
        self, url: URL, meta: Mapping[str, Any], attributes: Mapping[str, str]
    ) -> ObjectInfo:
        """An object's info from obstore's metadata and attributes (its user metadata)."""
        etag = str(meta.get("e_tag") or "")
        modified = meta.get("last_modified")
        return ObjectInfo(
            url=url,
            size=int(meta.get("size") or 0),
            version=self._version_of(meta),
            mtime=modified.timestamp() if modified is not None else None,
            checksums=_md5_of(etag),
            content_hash=attributes.get(self.hash_key) or attributes.get(METADATA_KEY),
            block_digests=attributes.get(self.blocks_key) or attributes.get(BLOCKS_KEY),
        )

    # ---- errors: obstore's first, then the fsspec half's
    def _answer(self, exc: BaseException) -> Answer | None:
        found = answer(exc)
        if found is not None or _raised_by_obstore(exc) is not None:
            return found
        return super()._answer(exc)

    def _sdk_error(self, exc: Exception, url: URL, operation: str) -> MlstoreError | None:
        found = _raised_by_obstore(exc)
        if found is not None:
            return _transport_failure(found, url, operation)
        if isinstance(exc, InterruptedBodyError):  # a short body (ShortBodyError below)
            return transport_error(exc, url, operation)
        return super()._sdk_error(exc, url, operation)

    # ---- the requests
    def _stat(self, url: URL) -> ObjectInfo:
        if not runtime_usable():
            return super()._stat(url)
        import obstore

        got = obstore.get(self._store(url.bucket), url.path, options={"head": True})
        return self._info_of(url, got.meta, got.attributes)

    def _download(self, url: URL, want: slice, version: str | None) -> tuple[bytes, str | None]:
        if not runtime_usable():
            return super()._download(url, want, version)
        import obstore

        options: GetOptions = {}
        whole = want.start == 0 and want.stop is None
        if not whole:
            options["range"] = _range(want)
        if version is not None and self.pin_field == "version":
            options["version"] = version
        elif version is not None:
            options["if_match"] = version
        got = obstore.get(self._store(url.bucket), url.path, options=options)
        meta = got.meta
        served = self._version_of(meta)
        if version is not None and served and served != version:
            raise PreconditionFailedError(
                f"version {version} was asked for, but {served} was served",
                url=str(url),
                operation="read",
            )
        start, stop = got.range
        length = stop - start
        data = _body(got, served, length)
        if whole:
            refuse_corrupt(
                data,
                got.attributes.get(self.hash_key),
                url,
                version=served,
                served=_md5_of(str(meta.get("e_tag") or "")),
            )
        return data, served

    def _upload(self, url: URL, data: bytes, metadata: dict[str, str]) -> str | None:
        if not runtime_usable():
            return super()._upload(url, data, metadata)
        import obstore

        made = obstore.put(
            self._store(url.bucket),
            url.path,
            data,
            attributes=metadata,
            use_multipart=len(data) > _SINGLE_PUT,
            chunk_size=_PART,
            max_concurrency=4,
        )
        return self._version_of(made)


def _range(want: slice) -> Any:
    """obstore's range option for a :func:`~mlstore.backends._ranges.wanted` slice."""
    if want.start < 0:
        return {"suffix": -want.start}
    if want.stop is None:
        return {"offset": want.start}
    return (want.start, want.stop)


def _body(got: Any, version: str | None, length: int) -> bytes:
    """The body of a get result, read in chunks: if it stops early, what arrived is
    raised in an InterruptedBodyError, to resume from pinned to ``version``."""
    chunks: list[bytes] = []
    try:
        for chunk in got.stream(min_chunk_size=_CHUNK):
            chunks.append(chunk)
    except Exception as exc:
        raise InterruptedBodyError(b"".join(chunks), version, length) from exc
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if len(data) != length:
        short = ShortBodyError(f"the body ended after {len(data)} of {length} bytes")
        raise InterruptedBodyError(data, version, length) from short
    return data


def _md5_of(etag: str) -> dict[str, str]:
    """A single-part ETag is the body's MD5 (S3; GCS's XML API): a checksum that
    vouches for a body. Other ETags (multipart, Azure's) never match an MD5, so they
    vouch for nothing."""
    etag = etag.strip('"')
    return {"md5": etag} if etag and "-" not in etag and not etag.startswith("0x") else {}
