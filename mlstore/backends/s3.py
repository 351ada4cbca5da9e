"""``s3://``: Amazon S3 and S3-compatible stores, through s3fs (``pip install mlstore[s3]``).

Object reads, heads and whole-object writes call the aiobotocore client directly, so
they carry ``If-Match`` (version pinning) and mlstore's content hash, and pass through
no hidden retry loop: botocore's and s3fs's retries are off, and the one retry layer
is mlstore's own. Listing, deletion and server-side copy use s3fs. Writes are one
``PutObject`` each, so an object written through mlstore is at most 5 GiB for now.

Options (``Store(options={"s3": {...}})``): ``endpoint_url``, ``region_name``, ``key``,
``secret``, ``token``, ``anon``, ``profile``, ``requester_pays``, and any other
``s3fs.S3FileSystem`` argument. Credentials otherwise come from the usual AWS sources
(environment, shared config, instance role). ``MLSTORE_S3_ENDPOINT_URL`` sets the
endpoint for S3-compatible stores.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

from mlstore.backends._fsspec import FsspecBackend, ShortBodyError, transport_error
from mlstore.backends._hedge import Hedge, hedged
from mlstore.backends.base import InterruptedBodyError, ObjectInfo, Received, find_cause
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
from mlstore.hashing import METADATA_KEY, content_hash
from mlstore.url import URL

__all__ = ["S3Backend"]

_CHUNK = 1 << 20  # body read size: what arrived before a failure can be resumed from


class S3Backend(FsspecBackend):
    protocol = "s3"
    resumable = True
    hedges = True

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

    # ---- errors: the one place where S3 failures become mlstore errors
    def _translate(self, exc: Exception, url: URL, operation: str) -> MlstoreError:
        if isinstance(exc, MlstoreError):
            return exc
        text = str(url)
        from botocore import exceptions as be

        if find_cause(exc, be.FlexibleChecksumError) is not None:
            return CorruptBodyError(
                "the downloaded bytes do not match the checksum S3 sent (corrupted in "
                "transit); fetching again",
                url=text,
                operation=operation,
            )
        client_error = find_cause(exc, be.ClientError)
        if client_error is not None:
            response: Mapping[str, Any] = client_error.response  # type: ignore[attr-defined]
            code = str(response.get("Error", {}).get("Code", ""))
            meta = response.get("ResponseMetadata", {})
            status = int(meta.get("HTTPStatusCode") or 0)
            headers = meta.get("HTTPHeaders", {}) or {}
            return _from_status(status, code, headers, text, operation)
        if find_cause(exc, be.NoCredentialsError, be.PartialCredentialsError) is not None:
            return PermissionDeniedError(
                "no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a "
                "profile, or Store(options={'s3': {'anon': True}}) for public buckets",
                url=text,
                operation=operation,
            )
        transport = transport_error(
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
        if transport is not None:
            return transport
        return super()._translate(exc, url, operation)

    # ---- Backend
    def info(self, url: URL) -> ObjectInfo:
        with self._errors(url, "info"):
            if url.path and not url.path.endswith("/"):
                try:
                    head = self._sync(_head, url.bucket, url.path)
                except Exception as exc:
                    err = self._translate(exc, url, "info")
                    if not isinstance(err, NotFoundError):
                        raise err from exc
                else:
                    return _info_from_head(url, head)
            # A "directory": a prefix with keys below it, or the bucket itself.
            raw = self.fs.info(self._path(url))
            return self._info_from(raw)

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
            if (start is not None and start < 0 and end is None) and start != 0:
                rng: str | None = f"bytes={start}"  # suffix range: the last -start bytes
            else:
                if (start is not None and start < 0) or (end is not None and end < 0):
                    size = self.info(url).size
                    start, end, _ = slice(start, end).indices(size)
                lo = start or 0
                if end is not None and end <= lo:
                    return b""
                rng = (
                    f"bytes={lo}-{'' if end is None else end - 1}"
                    if lo or end is not None
                    else None
                )
            try:
                data: bytes = self._sync(
                    _get, self.hedge, url.bucket, url.path, rng, version, rng is None
                )[0]
            except Exception as exc:
                if _is_invalid_range(exc):
                    return b""
                raise
            return data

    def fetch(self, url: URL, *, received: Received | None = None) -> tuple[bytes, str | None]:
        with self._errors(url, "read", received):
            data, etag = self._sync(_get, self.hedge, url.bucket, url.path, None, None, True)
            return data, etag

    def write(self, url: URL, data: bytes) -> None:
        with self._errors(url, "write"):
            self._sync(_put, url.bucket, url.path, data, {METADATA_KEY: content_hash(data)})

    def mkdir(self, url: URL) -> None:
        if url.path:
            return  # object stores have no directories
        with self._errors(url, "mkdir"):
            if not self.fs.exists(url.bucket):
                self.fs.mkdir(url.bucket)


def _from_status(
    status: int, code: str, headers: Mapping[str, str], url: str, operation: str
) -> MlstoreError:
    if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "NotFound", "404"):
        what = "bucket" if code == "NoSuchBucket" else "object"
        return NotFoundError(f"no such {what}", url=url, operation=operation)
    if status in (401, 403) or code in (
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
    ):
        return PermissionDeniedError(
            f"access denied ({code or status}); check the credentials and the bucket policy",
            url=url,
            operation=operation,
        )
    if status == 412 or code == "PreconditionFailed":
        return PreconditionFailedError(
            "the object changed since it was first read (If-Match failed)",
            url=url,
            operation=operation,
        )
    if status in (429, 503) or code in ("SlowDown", "Throttling", "RequestLimitExceeded"):
        err: TransientError = ThrottledError(
            f"S3 asked to slow down ({code or status})", url=url, operation=operation
        )
    elif status >= 500 or status in (408,) or code in ("InternalError", "RequestTimeout"):
        err = TransientError(f"S3 server error ({code or status})", url=url, operation=operation)
    else:
        return MlstoreError(
            f"S3 refused the request ({code or status})", url=url, operation=operation
        )
    retry_after = {k.lower(): v for k, v in headers.items()}.get("retry-after")
    if retry_after:
        try:
            err.retry_after = float(retry_after)
        except ValueError:
            pass
    return err


def _is_invalid_range(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    err = find_cause(exc, ClientError)
    if err is None:
        return False
    response = err.response  # type: ignore[attr-defined]
    return bool(
        response.get("Error", {}).get("Code") == "InvalidRange"
        or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 416
    )


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
    )


# ---- coroutines run on s3fs's event loop


async def _head(fs: Any, bucket: str, key: str) -> Mapping[str, Any]:
    await fs.set_session()
    s3 = await fs.get_s3(bucket)
    result: Mapping[str, Any] = await s3.head_object(Bucket=bucket, Key=key)
    return result


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
    recorded = (resp.get("Metadata") or {}).get(METADATA_KEY)
    if verify and recorded and content_hash(data) != recorded:
        raise CorruptBodyError(
            "the downloaded bytes do not match the hash recorded when the object was "
            "written (corrupted in transit); fetching again",
            url=f"s3://{bucket}/{key}",
            operation="read",
        )
    return data, etag


async def _put(fs: Any, bucket: str, key: str, data: bytes, metadata: dict[str, str]) -> None:
    await fs.set_session()
    s3 = await fs.get_s3(bucket)
    await s3.put_object(Bucket=bucket, Key=key, Body=data, Metadata=metadata)
