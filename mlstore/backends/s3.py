"""``s3://``: Amazon S3 and S3-compatible stores, through s3fs (``pip install mlstore[s3]``).

Object reads, heads and whole-object writes call the aiobotocore client directly, so
they carry ``If-Match`` (version pinning) and mlstore's content hash, and pass through
no hidden retry loop: botocore's and s3fs's retries are off, and the one retry layer
is mlstore's own. Listing, deletion and server-side copy use s3fs. A write is one
``PutObject``, or for a large object a multipart upload (``CreateMultipartUpload``, one
``UploadPart`` per part, ``CompleteMultipartUpload``; ``AbortMultipartUpload`` when it
fails), driven part by part by the engine (see :class:`S3Upload`).

Options (``Store(options={"s3": {...}})``): ``endpoint_url``, ``region_name``, ``key``,
``secret``, ``token``, ``anon``, ``profile``, ``requester_pays``, and any other
``s3fs.S3FileSystem`` argument. Credentials otherwise come from the usual AWS sources
(environment, shared config, instance role). ``MLSTORE_S3_ENDPOINT_URL`` sets the
endpoint for S3-compatible stores.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from mlstore._util.files import ViewReader
from mlstore.backends._cloud import CloudUpload, ObjectStoreBackend
from mlstore.backends._errors import Answer, Service, refuse_corrupt
from mlstore.backends._fsspec import ShortBodyError, transport_error
from mlstore.backends._hedge import Hedge, hedged
from mlstore.backends._ranges import range_header
from mlstore.backends.base import InterruptedBodyError, ObjectInfo, find_cause
from mlstore.errors import (
    ConfigError,
    CorruptBodyError,
    MlstoreError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionFailedError,
    ThrottledError,
    TransientError,
)
from mlstore.hashing import BLOCKS_KEY, METADATA_KEY
from mlstore.url import URL

__all__ = ["S3Backend", "S3Upload"]

_CHUNK = 1 << 20  # body read size: what arrived before a failure can be resumed from

# S3's error codes, by meaning; S3 sends some with a status that says less (a 400 for
# RequestTimeout, a bodiless 404 for a HEAD).
_CODES = {
    **dict.fromkeys(("NoSuchKey", "NoSuchBucket", "NotFound", "404"), NotFoundError),
    **dict.fromkeys(
        ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"),
        PermissionDeniedError,
    ),
    "PreconditionFailed": PreconditionFailedError,
    **dict.fromkeys(("SlowDown", "Throttling", "RequestLimitExceeded"), ThrottledError),
    **dict.fromkeys(("InternalError", "RequestTimeout"), TransientError),
}
_NO_CREDENTIALS = (
    "no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or "
    "Store(options={'s3': {'anon': True}}) for public buckets"
)


class S3Backend(ObjectStoreBackend):
    protocol = "s3"
    identity_env = (
        "MLSTORE_S3_ENDPOINT_URL",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    )
    hedges = True
    service = Service(
        "S3",
        "check the credentials and the bucket policy",
        codes=_CODES,
        missing={"NoSuchBucket": "bucket"},
    )

    def _make_fs(self) -> Any:
        import s3fs

        opts = dict(self.options)
        endpoint = opts.pop("endpoint_url", None) or os.environ.get("MLSTORE_S3_ENDPOINT_URL")
        client_kwargs = dict(opts.pop("client_kwargs", {}) or {})
        if "region_name" in opts:
            client_kwargs["region_name"] = opts.pop("region_name")
        retry = self.config.retry
        config_kwargs = {
            **(opts.pop("config_kwargs", {}) or {}),
            # mlstore is the one retry layer: botocore makes exactly one attempt.
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            "connect_timeout": retry.connect_timeout,
            "read_timeout": retry.read_timeout,
            "max_pool_connections": max(10, self.config.max_workers),
        }
        known = {*inspect.signature(s3fs.S3FileSystem.__init__).parameters, "profile"}
        unknown = sorted(set(opts) - known - {"self", "kwargs"})
        if unknown:
            raise ConfigError(
                f"unknown s3 option(s) {unknown}; see s3fs.S3FileSystem for the accepted ones "
                "(e.g. endpoint_url, region_name, key, secret, token, anon, profile)"
            )
        try:
            fs = s3fs.S3FileSystem(
                endpoint_url=endpoint or None,
                client_kwargs=client_kwargs,
                config_kwargs=config_kwargs,
                skip_instance_cache=True,
                use_listings_cache=False,
                **opts,
            )
        except TypeError as exc:
            raise ConfigError(f"invalid s3 option: {exc}") from None
        fs.retries = 1  # s3fs's own retry loop: one attempt
        fs.connect_timeout = retry.connect_timeout
        fs.read_timeout = retry.read_timeout
        return fs

    def _version(self, raw: Mapping[str, Any]) -> str | None:
        etag = raw.get("ETag")
        return str(etag) if etag else None

    def _info_from(self, raw: Mapping[str, Any]) -> ObjectInfo:
        """A listed object: a single-part ETag is the MD5 of the content, so a listing
        already proves content equal to a local file's (no HEAD per object)."""
        info = super()._info_from(raw)
        etag = info.version
        if etag and "-" not in etag and not info.is_dir:
            return replace(info, checksums={"md5": etag.strip('"')})
        return info

    # ---- errors: the one place where S3 failures become mlstore errors
    def _answer(self, exc: BaseException) -> Answer | None:
        from botocore.exceptions import ClientError

        err = find_cause(exc, ClientError)
        if err is None:
            return None
        response: Mapping[str, Any] = err.response  # type: ignore[attr-defined]
        meta = response.get("ResponseMetadata", {})
        return Answer(
            int(meta.get("HTTPStatusCode") or 0),
            code=str(response.get("Error", {}).get("Code", "")),
            headers=meta.get("HTTPHeaders", {}) or {},
        )

    def _sdk_error(self, exc: Exception, url: URL, operation: str) -> MlstoreError | None:
        from botocore import exceptions as be

        if find_cause(exc, be.FlexibleChecksumError) is not None:
            return CorruptBodyError(
                "the downloaded bytes do not match the checksum S3 sent (corrupted in "
                "transit); fetching again",
                url=str(url),
                operation=operation,
            )
        if find_cause(exc, be.NoCredentialsError, be.PartialCredentialsError) is not None:
            return PermissionDeniedError(_NO_CREDENTIALS, url=str(url), operation=operation)
        return transport_error(
            exc,
            url,
            operation,
            timeouts=(be.ConnectTimeoutError, be.ReadTimeoutError),
            dropped=(
                be.EndpointConnectionError,
                be.ConnectionClosedError,
                be.ResponseStreamingError,
                be.IncompleteReadError,
            ),
        )

    # ---- the requests
    def _stat(self, url: URL) -> ObjectInfo:
        return _info_from_head(url, self._sync(_head, url.bucket, url.path))

    def _has_below(self, url: URL) -> bool:
        return bool(self._sync(_has_below, url.bucket, self._key(url)))

    def _download(self, url: URL, want: slice, version: str | None) -> tuple[bytes, str | None]:
        rng = range_header(want)
        got: tuple[bytes, str | None] = self._sync(
            _get, self.hedge, url.bucket, url.path, rng, version, rng is None
        )
        return got

    def _upload(self, url: URL, data: bytes, metadata: dict[str, str]) -> str | None:
        version: str | None = self._sync(_put, url.bucket, url.path, data, metadata)
        return version

    def _begin(self, url: URL, metadata: dict[str, str]) -> S3Upload:
        upload_id: str = self._sync(_create_upload, url.bucket, url.path, metadata)
        return S3Upload(self, url, metadata, upload_id)

    def _missing_on_read(
        self, url: URL, version: str | None, err: NotFoundError, exc: BaseException
    ) -> MlstoreError:
        # A missing key stays one request (R4 in docs/reliability.md): S3 reads do not
        # list the prefix to tell a "directory" from nothing.
        return err


class S3Upload(CloudUpload):
    """An S3 multipart upload. S3 fixes the metadata at ``CreateMultipartUpload``, so
    an object streamed in parts carries no content hash (it cannot be known then).

    A part sent again replaces the first copy (same part number). A complete whose
    answer was lost is sent again and finds the upload gone (``NoSuchUpload``); the
    object it made is recognised by its ETag, which S3 derives from the parts' ETags
    (the MD5 of their MD5s, ``-<count>``), so the write still succeeds.
    """

    def __init__(
        self, backend: S3Backend, url: URL, metadata: dict[str, str], upload_id: str
    ) -> None:
        super().__init__(backend, url, metadata)
        self.upload_id = upload_id

    def _call(self, coro_fn: Any, *args: Any) -> Any:
        return self.backend._sync(coro_fn, self.url.bucket, self.url.path, self.upload_id, *args)

    def _put(self, number: int, data: bytes) -> str:
        etag: str = self._call(_upload_part, number, data)
        return etag

    def _complete(self, parts: Sequence[str], metadata: dict[str, str]) -> str | None:
        try:
            made: str | None = self._call(_complete_upload, list(parts))
        except Exception as exc:
            answer = self.backend._answer(exc)
            if answer is None or answer.code != "NoSuchUpload":
                raise
            expected = _multipart_etag(parts)
            head = self.backend._sync(_head, self.url.bucket, self.url.path)
            if expected is None or str(head.get("ETag") or "").strip('"') != expected:
                raise
            return str(head["ETag"])
        return made

    def _abort(self) -> None:
        self._call(_abort_upload)


def _multipart_etag(parts: Sequence[str]) -> str | None:
    """The ETag S3 gives the object completed from parts with these ETags (``None`` when
    a part's ETag is not an MD5, as with SSE-KMS: then it cannot be predicted)."""
    digests = []
    for etag in parts:
        text = etag.strip('"')
        try:
            digests.append(bytes.fromhex(text))
        except ValueError:
            return None
    whole = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
    return f"{whole}-{len(parts)}"


def _info_from_head(url: URL, head: Mapping[str, Any]) -> ObjectInfo:
    etag = str(head.get("ETag") or "")
    checksums: dict[str, str] = {}
    if etag and "-" not in etag:
        checksums["md5"] = etag.strip('"')
    for algo in ("CRC32", "CRC32C", "SHA1", "SHA256", "CRC64NVME"):
        value = head.get(f"Checksum{algo}")
        if value:
            checksums[algo.lower()] = str(value)
    modified = head.get("LastModified")
    metadata = head.get("Metadata") or {}
    return ObjectInfo(
        url=url,
        size=int(head.get("ContentLength") or 0),
        version=etag or None,
        mtime=modified.timestamp() if modified is not None else None,
        checksums=checksums,
        content_hash=metadata.get(METADATA_KEY),
        block_digests=metadata.get(BLOCKS_KEY),
    )


# ---- coroutines run on s3fs's event loop


async def _head(fs: Any, bucket: str, key: str) -> Mapping[str, Any]:
    await fs.set_session()
    s3 = await fs.get_s3(bucket)
    result: Mapping[str, Any] = await s3.head_object(Bucket=bucket, Key=key)
    return result


async def _has_below(fs: Any, bucket: str, key: str) -> bool:
    """Whether any key starts with ``key/`` (for no key: whether the bucket exists)."""
    await fs.set_session()
    s3 = await fs.get_s3(bucket)
    if not key:
        await s3.head_bucket(Bucket=bucket)
        return True
    listing = await s3.list_objects_v2(Bucket=bucket, Prefix=key + "/", MaxKeys=1)
    return bool(listing.get("Contents") or listing.get("CommonPrefixes"))


async def _get(
    fs: Any,
    hedge: Hedge | None,
    bucket: str,
    key: str,
    rng: str | None,
    if_match: str | None,
    verify: bool = False,
) -> tuple[bytes, str | None]:
    """One GET, hedged under the Store's policy if it has one."""
    return await hedged(
        hedge, lambda: _get_with_etag(fs, bucket, key, rng, if_match, verify=verify)
    )


async def _get_with_etag(
    fs: Any,
    bucket: str,
    key: str,
    rng: str | None = None,
    if_match: str | None = None,
    *,
    verify: bool = False,
) -> tuple[bytes, str | None]:
    """One GET. The body is read in chunks so that, if it stops early (a reset, a
    stall past the read timeout, a short body), what arrived is handed to the Store to
    resume from, pinned to this response's ETag. With ``verify`` (a whole-object GET),
    a body that does not match the hash mlstore recorded in the metadata is refused."""
    await fs.set_session()
    s3 = await fs.get_s3(bucket)
    kw: dict[str, str] = {"Bucket": bucket, "Key": key}
    if rng:
        kw["Range"] = rng
    if if_match:
        kw["IfMatch"] = if_match
    resp = await s3.get_object(**kw)
    body = resp["Body"]
    etag = str(resp["ETag"]) if resp.get("ETag") else None
    expected = resp.get("ContentLength")
    chunks: list[bytes] = []
    try:
        while chunk := await body.read(_CHUNK):
            chunks.append(chunk)
    except Exception as exc:
        raise InterruptedBodyError(b"".join(chunks), etag, expected) from exc
    finally:
        body.close()
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if expected is not None and len(data) != int(expected):
        short = ShortBodyError(f"the body ended after {len(data)} of {expected} bytes")
        raise InterruptedBodyError(data, etag, expected) from short
    if verify:
        refuse_corrupt(
            data,
            (resp.get("Metadata") or {}).get(METADATA_KEY),
            f"s3://{bucket}/{key}",
            version=etag,
            served={"md5": etag} if etag and "-" not in etag else None,  # single-part
        )
    return data, etag


async def _put(fs: Any, bucket: str, key: str, data: bytes, metadata: dict[str, str]) -> str | None:
    """One PUT; the ETag it made (the version ``info`` reports)."""
    await fs.set_session()
    s3 = await fs.get_s3(bucket)
    resp = await s3.put_object(Bucket=bucket, Key=key, Body=data, Metadata=metadata)
    etag = resp.get("ETag")
    return str(etag) if etag else None


async def _create_upload(fs: Any, bucket: str, key: str, metadata: dict[str, str]) -> str:
    await fs.set_session()
    s3 = await fs.get_s3(bucket)
    resp = await s3.create_multipart_upload(Bucket=bucket, Key=key, Metadata=metadata)
    return str(resp["UploadId"])


async def _upload_part(
    fs: Any, bucket: str, key: str, upload_id: str, number: int, data: bytes
) -> str:
    s3 = await fs.get_s3(bucket)
    # A file over the part (see ViewReader): no second copy of each part in flight.
    with ViewReader(data) as body:
        resp = await s3.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
        )
    return str(resp["ETag"])


async def _complete_upload(
    fs: Any, bucket: str, key: str, upload_id: str, etags: list[str]
) -> str | None:
    s3 = await fs.get_s3(bucket)
    parts = [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, 1)]
    resp = await s3.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
    )
    etag = resp.get("ETag")
    return str(etag) if etag else None


async def _abort_upload(fs: Any, bucket: str, key: str, upload_id: str) -> None:
    s3 = await fs.get_s3(bucket)
    await s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
