"""``az://``: Azure Blob Storage, through adlfs (``pip install mlstore[azure]``).

URLs are ``az://<container>/<blob path>`` (``abfs://container@account.../path`` is
normalised to that form by :mod:`mlstore.url`).

adlfs resolves the credentials and builds the asynchronous ``BlobServiceClient``; this
backend then replaces that client with an identical one whose Azure SDK retry policy
makes exactly one attempt (``retry_total=0``) and whose connect/read timeouts come from
:class:`~mlstore.config.RetryPolicy`: mlstore is the one retry layer. Object reads,
heads, whole-object writes, listings, deletes and copies call the SDK directly, so reads
carry ``If-Match`` (version pinning) and writes carry mlstore's content hash.

Options (``Store(options={"az": {...}})``): ``account_name``, ``account_key``,
``connection_string``, ``sas_token``, ``credential``, ``anon``, ``account_host``,
``client_id``/``client_secret``/``tenant_id`` and any other
``adlfs.AzureBlobFileSystem`` argument, plus ``endpoint_url`` (the blob service URL,
e.g. ``http://127.0.0.1:10000/devstoreaccount1`` for Azurite; also
``MLSTORE_AZURE_ENDPOINT_URL``). Otherwise adlfs reads ``AZURE_STORAGE_CONNECTION_STRING``,
``AZURE_STORAGE_ACCOUNT_NAME``, ``AZURE_STORAGE_ACCOUNT_KEY``, ``AZURE_STORAGE_SAS_TOKEN``,
``AZURE_STORAGE_CLIENT_ID``/``_SECRET``/``TENANT_ID`` and ``AZURE_STORAGE_ANON``, then
falls back to ``DefaultAzureCredential``. Credentials passed as options are never
pickled: worker processes started with spawn/forkserver re-read them from the
environment.

A large write goes up in blocks: Put Block for each part, then Put Block List with the
blob's metadata (see :class:`AzureUpload`).

The content hash is stored in the blob metadata under ``mlstore_xxh3``
(:data:`AZURE_METADATA_KEY`): Azure metadata names must be C# identifiers, so the
hyphen of :data:`mlstore.hashing.METADATA_KEY` is not allowed (the service answers
``400 InvalidMetadata``).
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from mlstore._util.redact import redact_options, scrub
from mlstore.backends import _azure_client
from mlstore.backends._cloud import CloudUpload, ObjectStoreBackend
from mlstore.backends._errors import Answer, Service, refuse_corrupt
from mlstore.backends._fsspec import ShortBodyError, transport_error
from mlstore.backends._ranges import range_header
from mlstore.backends.base import InterruptedBodyError, ObjectInfo, PerProcess, find_cause
from mlstore.errors import (
    ConfigError,
    ConnectionLostError,
    MlstoreError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionFailedError,
    ThrottledError,
    TransientError,
)
from mlstore.hashing import BLOCKS_KEY, METADATA_KEY
from mlstore.url import URL

__all__ = ["AZURE_METADATA_KEY", "AzureBackend", "AzureUpload"]

#: The metadata name of mlstore's xxh3-128 on Azure: ``mlstore-xxh3`` with the hyphen,
#: which Azure metadata names may not contain, replaced by an underscore.
AZURE_METADATA_KEY = METADATA_KEY.replace("-", "_")
AZURE_BLOCKS_KEY = BLOCKS_KEY.replace("-", "_")

# Metadata that marks a blob as a directory (ADLS Gen2 / hierarchical namespace, adlfs).
_DIR_MARKERS = (("hdi_isfolder", "true"), ("is_directory", "true"))

# Deletes in flight at once during a recursive rm.
_DELETE_CONCURRENCY = 16

# Azure's error codes, by meaning, and what a "not found" code says is missing.
_CODES = {
    **dict.fromkeys(("ContainerNotFound", "BlobNotFound", "ResourceNotFound"), NotFoundError),
    "ConditionNotMet": PreconditionFailedError,
    "ServerBusy": ThrottledError,
    "OperationTimedOut": TransientError,
}
_MISSING = {"ContainerNotFound": "container", "BlobNotFound": "blob"}
_CANNOT_SIGN = (
    "the account key cannot sign requests (it must be the base64 key of the storage account)"
)
_NO_CREDENTIALS = (
    "no usable Azure credentials; give a connection_string, an account_key, a sas_token or a "
    "credential, set AZURE_STORAGE_CONNECTION_STRING, or use "
    "Store(options={'az': {'anon': True}}) for public containers"
)


class AzureBackend(ObjectStoreBackend):
    protocol = "az"
    identity_env = (
        "MLSTORE_AZURE_ENDPOINT_URL",
        "AZURE_STORAGE_CONNECTION_STRING",
        "AZURE_STORAGE_ACCOUNT_NAME",
        "AZURE_STORAGE_ACCOUNT_KEY",
        "AZURE_STORAGE_KEY",
        "AZURE_STORAGE_SAS_TOKEN",
        "AZURE_STORAGE_CLIENT_ID",
        "AZURE_STORAGE_CLIENT_SECRET",
        "AZURE_STORAGE_TENANT_ID",
        "AZURE_STORAGE_ANON",
        "AZURE_CLIENT_ID",
        "AZURE_CLIENT_SECRET",
        "AZURE_TENANT_ID",
    )
    service = Service(
        "Azure",
        "check the account key, SAS token or credential and the container's access policy",
        bucket="container",
        codes=_CODES,
        missing=_MISSING,
    )
    hash_key = AZURE_METADATA_KEY
    blocks_key = AZURE_BLOCKS_KEY
    suffix_ranges = False  # Azure has no suffix ranges: [-n:] asks for the size first
    max_parts = 50_000  # blocks in one blob
    #: Closes the client this process made (set when it is made; see _azure_client).
    _closer: weakref.finalize[Any, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A pickled backend carries no credentials (keys, SAS, connection strings).
        state = dict(self.__dict__)
        state["options"] = redact_options(self.options)
        state["_closer"] = None
        state["_fs"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fs = PerProcess(self._make_fs)

    # ---- the client
    def _make_fs(self) -> Any:
        import adlfs

        opts = dict(self.options)
        endpoint = opts.pop("endpoint_url", None) or os.environ.get("MLSTORE_AZURE_ENDPOINT_URL")
        try:
            fs = adlfs.AzureBlobFileSystem(
                skip_instance_cache=True, use_listings_cache=False, **opts
            )
        except TypeError as exc:
            raise ConfigError(f"invalid az option: {scrub(str(exc))}") from None
        except ValueError as exc:
            raise ConfigError(
                "could not configure the Azure client "
                f"({scrub(str(exc))}); give a connection_string, or an "
                "account_name with account_key, sas_token or credential, or set "
                "AZURE_STORAGE_CONNECTION_STRING"
            ) from None
        explicit = any(opts.get(k) for k in ("account_key", "sas_token", "credential"))
        if explicit and not opts.get("connection_string") and fs.connection_string:
            # adlfs prefers AZURE_STORAGE_CONNECTION_STRING over credentials given in
            # code; an explicit option wins over the environment.
            fs.connection_string = None
            try:
                fs.do_connect()
            except ValueError as exc:
                raise ConfigError(
                    f"could not configure the Azure client ({scrub(str(exc))})"
                ) from None
        given = bool(self.options.get("credential"))
        self._closer = _azure_client.adopt(fs, self.config, endpoint, given)
        return fs

    def _sync(self, coro_fn: Any, *args: Any) -> Any:
        from fsspec.asyn import sync

        fs = self.fs
        return sync(fs.loop, coro_fn, fs.service_client, *args)

    def close(self) -> None:
        closer, self._closer = self._closer, None
        self._fs = PerProcess(self._make_fs)
        if closer is not None:
            closer()  # closes the client, and only in the process that made it

    def _version(self, raw: Mapping[str, Any]) -> str | None:
        return _azure_client.etag(raw.get("etag"))

    # ---- errors: the one place where Azure failures become mlstore errors
    def _answer(self, exc: BaseException) -> Answer | None:
        from azure.core.exceptions import HttpResponseError, IncompleteReadError

        err = find_cause(exc, HttpResponseError)
        status = int(getattr(err, "status_code", 0) or 0)
        # IncompleteReadError is an HttpResponseError too, but it means a body cut short.
        if err is None or not status or isinstance(err, IncompleteReadError):
            return None
        code = getattr(err, "error_code", None)
        headers = getattr(getattr(err, "response", None), "headers", None) or {}
        if not code:
            code = headers.get("x-ms-error-code", "")
        return Answer(status, code=str(getattr(code, "value", code) or ""), headers=headers)

    def _sdk_error(self, exc: Exception, url: URL, operation: str) -> MlstoreError | None:
        from azure.core import exceptions as ae

        where = {"url": str(url), "operation": operation}
        lost = find_cause(exc, ShortBodyError, ae.IncompleteReadError)
        if lost is not None:
            why = f"the connection failed mid-body ({type(lost).__name__})"
            return ConnectionLostError(why, **where)
        # Looked for before the transport errors: a credential chain that failed, even
        # for want of a connection to its token endpoint, is a credential problem.
        auth = find_cause(exc, ae.ClientAuthenticationError)
        if auth is not None:
            signing = type(auth).__name__ == "AzureSigningError"
            return PermissionDeniedError(_CANNOT_SIGN if signing else _NO_CREDENTIALS, **where)
        return transport_error(
            exc,
            url,
            operation,
            timeouts=(ae.ServiceRequestTimeoutError, ae.ServiceResponseTimeoutError),
            dropped=(ae.ServiceRequestError, ae.ServiceResponseError),
        )

    # ---- the requests
    def _stat(self, url: URL) -> ObjectInfo:
        return _info_from_properties(url, self._sync(_properties, url.bucket, url.path))

    def _has_below(self, url: URL) -> bool:
        return bool(self._sync(_is_directory, url.bucket, self._key(url)))

    def _download(self, url: URL, want: slice, version: str | None) -> tuple[bytes, str | None]:
        got: tuple[bytes, str | None] = self._sync(_get, url.bucket, url.path, want, version)
        return got

    def _upload(self, url: URL, data: bytes, metadata: dict[str, str]) -> str | None:
        version: str | None = self._sync(_azure_client.put, url.bucket, url.path, data, metadata)
        return version

    def _begin(self, url: URL, metadata: dict[str, str]) -> AzureUpload:
        return AzureUpload(self, url, metadata)

    def _create_bucket(self, bucket: str) -> None:
        self._sync(_create_container, bucket)

    # ---- listing, deleting, copying: the SDK directly
    def ls(self, url: URL) -> list[ObjectInfo]:
        with self._errors(url, "ls"):
            entries = self._sync(_walk, url.bucket, self._key(url))
            out = [self._entry(url.bucket, e) for e in entries]
            if out:
                return out
            info = self.info(url)  # a file lists itself; an empty container lists nothing
            return [info] if info.type == "file" else []

    def find(self, url: URL) -> Iterator[ObjectInfo]:
        with self._errors(url, "find"):
            blob = self._key(url)
            entries = self._sync(_list, url.bucket, f"{blob}/" if blob else None)
            out = [self._entry(url.bucket, e) for e in entries]
            found = [e for e in out if e.type == "file"]
            if not found and blob and not url.path.endswith("/"):
                try:
                    info = self.info(url)
                except NotFoundError:
                    info = None
                if info is not None and info.type == "file":
                    found = [info]
        yield from found

    def _entry(self, container: str, raw: Any) -> ObjectInfo:
        from azure.storage.blob import BlobProperties

        name = str(raw.name)
        if not isinstance(raw, BlobProperties):  # a BlobPrefix: a "directory"
            return ObjectInfo(
                url=URL(self.protocol, container, name.rstrip("/")), size=0, type="directory"
            )
        info = _info_from_properties(URL(self.protocol, container, name.rstrip("/")), raw)
        if name.endswith("/") and info.type == "file" and info.size == 0:
            return ObjectInfo(url=info.url, size=0, type="directory")
        return info

    def rm(self, url: URL, recursive: bool = False) -> None:
        with self._errors(url, "rm"):
            if not recursive:
                self._refuse_directory(url, "rm")
                self._sync(_delete, url.bucket, url.path)
                return
            blob = self._key(url)
            entries = self._sync(_list, url.bucket, f"{blob}/" if blob else None)
            names = [str(e.name) for e in entries]
            if blob and not names:
                # Not a prefix: the blob itself, or nothing at all.
                self._sync(_delete, url.bucket, blob)
                return
            if blob:
                names.append(blob)  # a directory marker named like the prefix, if any
            self._sync(_delete_many, url.bucket, names)

    def copy(self, src: URL, dst: URL) -> None:
        with self._errors(src, "copy"):
            self._sync(
                _copy, src.bucket, src.path, dst.bucket, dst.path, self.config.retry.deadline
            )


class AzureUpload(CloudUpload):
    """An Azure upload in blocks: each part is one Put Block (staged under an id made of
    this upload's own random prefix and the part number, so a block sent again replaces
    the first and two writers never mix blocks), and ``complete`` is one Put Block List
    with the blob's metadata, so a streamed blob records its content hash too.

    Staged blocks are invisible: the blob keeps its old content (or stays absent) until
    the commit. Azure has no request that drops them; ``abort`` sends none, and the
    service discards uncommitted blocks after a week, or at the blob's next commit.
    """

    records_at_commit = True

    def __init__(self, backend: AzureBackend, url: URL, metadata: dict[str, str]) -> None:
        super().__init__(backend, url, metadata)
        self.azure = backend
        self._tag = uuid.uuid4().hex[:24]

    def _put(self, number: int, data: bytes) -> str:
        raw = f"{self._tag}-{number:06d}".encode("ascii")  # every id the same length
        block_id = base64.b64encode(raw).decode("ascii")
        self.azure._sync(_azure_client.stage, self.url.bucket, self.url.path, block_id, data)
        return block_id

    def _complete(self, parts: Sequence[str], metadata: dict[str, str]) -> str | None:
        made: str | None = self.azure._sync(
            _azure_client.commit, self.url.bucket, self.url.path, list(parts), metadata
        )
        return made

    def _abort(self) -> None:
        """Nothing to send (see the class docstring)."""


# ------------------------------------------------------------------- properties


def _info_from_properties(url: URL, props: Any) -> ObjectInfo:
    metadata = {str(k).lower(): str(v) for k, v in (props.metadata or {}).items()}
    if any(metadata.get(k) == v for k, v in _DIR_MARKERS):
        return ObjectInfo(url=url, size=0, type="directory")
    checksums: dict[str, str] = {}
    settings = getattr(props, "content_settings", None)
    md5 = getattr(settings, "content_md5", None)
    if md5:
        checksums["md5"] = base64.b64encode(bytes(md5)).decode("ascii")
    modified = getattr(props, "last_modified", None)
    return ObjectInfo(
        url=url,
        size=int(props.size or 0),
        version=_azure_client.etag(props.etag),
        mtime=modified.timestamp() if modified is not None else None,
        checksums=checksums,
        content_hash=metadata.get(AZURE_METADATA_KEY) or metadata.get(METADATA_KEY),
        block_digests=metadata.get(AZURE_BLOCKS_KEY),
    )


# ------------------------------------------------------- coroutines on adlfs's loop


async def _properties(service: Any, container: str, blob: str) -> Any:
    return await service.get_blob_client(container, blob).get_blob_properties()


async def _is_directory(service: Any, container: str, prefix: str) -> bool:
    """Whether ``prefix`` has blobs below it (or, if empty, the container exists)."""
    cc = service.get_container_client(container)
    if not prefix:
        await cc.get_container_properties()  # ContainerNotFound -> NotFoundError
        return True
    async for _ in cc.list_blobs(name_starts_with=prefix.rstrip("/") + "/", results_per_page=1):
        return True
    return False


async def _walk(service: Any, container: str, prefix: str) -> list[Any]:
    """The blobs and prefixes directly below ``prefix``."""
    cc = service.get_container_client(container)
    start = f"{prefix}/" if prefix else None
    out = []
    async for item in cc.walk_blobs(name_starts_with=start, include=["metadata"], delimiter="/"):
        if item.name != start:  # a directory marker blob named like the prefix
            out.append(item)
    return out


async def _list(service: Any, container: str, prefix: str | None) -> list[Any]:
    """Every blob below ``prefix``; ``ContainerNotFound`` if the container is missing."""
    cc = service.get_container_client(container)
    return [b async for b in cc.list_blobs(name_starts_with=prefix, include=["metadata"])]


async def _get(
    service: Any, container: str, blob: str, want: slice, if_match: str | None
) -> tuple[bytes, str | None]:
    """One GET of the bytes ``want`` of ``blob`` (with ``If-Match`` when pinned), the
    body read to the end; the bytes and the ETag they belong to.

    This calls the SDK's generated operation rather than ``download_blob``: the
    ``StorageStreamDownloader`` behind ``download_blob`` re-sends a request up to three
    times when a body breaks off, a retry loop that no policy turns off. Here one call
    is one request, and a short body is reported, not retried.
    """
    from azure.storage.blob._generated.models import ModifiedAccessConditions

    client = service.get_blob_client(container, blob)
    conditions = ModifiedAccessConditions(if_match=if_match) if if_match else None
    rng = range_header(want)

    def keep(pipeline_response: Any, body: Any, headers: Any) -> tuple[Any, Any]:
        return pipeline_response.http_response, body

    response, body = await client._client.blob.download(
        range=rng, modified_access_conditions=conditions, decompress=False, cls=keep
    )
    etag = _azure_client.etag(response.headers.get("ETag"))
    expected = response.headers.get("Content-Length")
    length = int(expected) if expected is not None else None
    # A 200 to a range request means the range was ignored: offsets would not line up.
    honoured = not (rng and response.status_code == 200)
    chunks: list[bytes] = []
    try:
        async for chunk in body:
            chunks.append(chunk)
    except Exception as exc:
        # The SDK leaves a response that broke off open: close its connection.
        internal = getattr(response, "internal_response", None)
        if internal is not None:
            internal.close()
        if not honoured:
            raise
        # What arrived, so the Store can resume from there pinned to this ETag.
        raise InterruptedBodyError(b"".join(chunks), etag, length) from exc
    data = b"".join(chunks)
    if length is not None and len(data) != length:
        short = ShortBodyError(f"the body ended after {len(data)} of {expected} bytes")
        if not honoured:
            raise short
        raise InterruptedBodyError(data, etag, length) from short
    if not honoured:
        data = data[want]
    elif not rng:
        recorded = response.headers.get(f"x-ms-meta-{AZURE_METADATA_KEY}")
        served = {"md5": response.headers.get("Content-MD5")}
        refuse_corrupt(data, recorded, f"az://{container}/{blob}", version=etag, served=served)
    return data, etag


async def _delete(service: Any, container: str, blob: str) -> None:
    await service.get_blob_client(container, blob).delete_blob()


async def _delete_many(service: Any, container: str, names: list[str]) -> None:
    """Delete ``names``, a few at a time, deepest first (a hierarchical-namespace account
    refuses to delete a directory marker before the directory is empty); blobs already
    gone are fine."""
    from azure.core.exceptions import ResourceNotFoundError

    cc = service.get_container_client(container)
    gate = asyncio.Semaphore(_DELETE_CONCURRENCY)

    async def one(name: str) -> None:
        async with gate:
            try:
                await cc.delete_blob(name)
            except ResourceNotFoundError:
                pass

    by_depth: dict[int, list[str]] = {}
    for name in names:
        by_depth.setdefault(name.rstrip("/").count("/"), []).append(name)
    for depth in sorted(by_depth, reverse=True):
        await asyncio.gather(*(one(n) for n in by_depth[depth]))


async def _create_container(service: Any, container: str) -> None:
    from azure.core.exceptions import ResourceExistsError

    try:
        await service.get_container_client(container).create_container()
    except ResourceExistsError:
        pass


async def _copy(
    service: Any, src_container: str, src: str, dst_container: str, dst: str, deadline: float
) -> None:
    """A server-side copy, waited for: Azure may finish a copy after the call returns."""
    source = service.get_blob_client(src_container, src)
    target = service.get_blob_client(dst_container, dst)
    result = await target.start_copy_from_url(source.url)
    status = result.get("copy_status")
    delay = 0.05
    give_up = time.monotonic() + deadline
    while status == "pending":
        if time.monotonic() > give_up:
            raise TimeoutError(f"the server-side copy was still pending after {deadline:g}s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)
        props = await target.get_blob_properties()
        status = props.copy.status
    if status not in (None, "success"):
        raise ConnectionError(f"the server-side copy ended with status {status!r}")
