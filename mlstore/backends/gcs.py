"""``gs://``: Google Cloud Storage, through gcsfs (``pip install mlstore[gcs]``).

Object reads, metadata reads and whole-object writes are single JSON/media API requests
that mlstore builds itself: a read pinned to a version asks for exactly that object
generation (``generation=N``), and a write records mlstore's content hash in the
object's metadata. Listing, deletion, server-side copy (``rewriteTo``) and bucket
creation use gcsfs. Every request makes one attempt: gcsfs's retry loops (the
``retry_request`` decorator, batch-delete resubmission) are replaced by single-attempt
versions, so the one retry layer is mlstore's own.

mlstore uses gcsfs's core ``GCSFileSystem`` (the JSON API over HTTP), not the
experimental gRPC-based filesystem gcsfs 2025.x+ selects by default, whose bucket-type
probes carry their own retry policy.

Options (``Store(options={"gs": {...}})``): ``endpoint_url``, ``project``, ``token``
(``"anon"``, ``"google_default"``, ``"cloud"``, a service-account file path, a
credentials dict or object), ``anon`` (``True`` for anonymous access; unlike ``token``
it is not a secret, so it reaches spawned workers), ``requester_pays``, ``access``,
``session_kwargs``, and any other ``gcsfs.GCSFileSystem`` argument. Credentials otherwise
come from Application Default Credentials (``GOOGLE_APPLICATION_CREDENTIALS``, the
gcloud login, the metadata server). ``MLSTORE_GCS_ENDPOINT_URL`` sets the endpoint;
gcsfs also honours ``STORAGE_EMULATOR_HOST``, and when that is set and no ``token`` is
given, access is anonymous (as with Google's own client library).
"""

from __future__ import annotations

import email.utils
import io
import json
import os
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from mlstore.backends._fsspec import FsspecBackend, ShortBodyError, transport_error
from mlstore.backends.base import (
    InterruptedBodyError,
    ObjectInfo,
    Received,
    find_cause,
    keep_received,
)
from mlstore.errors import (
    ConfigError,
    CorruptBodyError,
    IsADirectoryError_,
    MlstoreError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionFailedError,
    ThrottledError,
    TransientError,
)
from mlstore.hashing import METADATA_KEY, content_hash
from mlstore.url import URL

__all__ = ["GCSBackend"]

# Attributes set on the exceptions raised for an HTTP error answer (see _fs_class):
# gcsfs raises FileNotFoundError, OSError, FileExistsError, ValueError or HttpError
# depending on the status, and keeps neither the status nor the headers.
_CHUNK = 1 << 20  # media bodies are read in chunks: what arrived can be resumed from
_STATUS = "_mlstore_status"
_RETRY_AFTER = "_mlstore_retry_after"
_REASON = "_mlstore_reason"


class _SetupError(Exception):
    """The filesystem could not be built from the options (becomes a ConfigError that
    names the URL and operation that needed it)."""


class GCSBackend(FsspecBackend):
    protocol = "gs"
    resumable = True

    def _make_fs(self) -> Any:
        import aiohttp

        opts = dict(self.options)
        endpoint = opts.pop("endpoint_url", None) or os.environ.get("MLSTORE_GCS_ENDPOINT_URL")
        anon = bool(opts.pop("anon", False))
        if anon:
            if opts.get("token") not in (None, "anon"):
                raise _SetupError("give either the gs option 'anon' or 'token', not both")
            opts["token"] = "anon"
        elif opts.get("token") is None and os.environ.get("STORAGE_EMULATOR_HOST"):
            opts["token"] = "anon"  # an emulator: no credentials to find or send
        if opts.get("token") is None:
            opts.pop("token", None)
        retry = self.config.retry
        opts.setdefault(
            "requests_timeout",
            aiohttp.ClientTimeout(
                total=None, sock_connect=retry.connect_timeout, sock_read=retry.read_timeout
            ),
        )
        cls = _fs_class()
        try:
            fs = cls(
                endpoint_url=endpoint or None,
                skip_instance_cache=True,
                use_listings_cache=False,
                **opts,
            )
        except TypeError as exc:
            raise _SetupError(f"invalid gs option: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - credential set-up; the text may hold secrets
            raise _SetupError(
                f"could not set up GCS credentials ({type(exc).__name__}); check the gs "
                "option 'token' or GOOGLE_APPLICATION_CREDENTIALS"
            ) from None
        return fs

    def _version(self, raw: Mapping[str, Any]) -> str | None:
        generation = raw.get("generation")
        return str(generation) if generation else None

    def _info_from(self, raw: Mapping[str, Any]) -> ObjectInfo:
        info = super()._info_from(raw)
        if info.is_dir:
            return info
        checksums = {
            name: str(raw[field])
            for name, field in (("md5", "md5Hash"), ("crc32c", "crc32c"))
            if raw.get(field)
        }
        metadata = raw.get("metadata") or {}
        return replace(info, checksums=checksums, content_hash=metadata.get(METADATA_KEY))

    # ---- errors: the one place where GCS failures become mlstore errors
    def _translate(self, exc: Exception, url: URL, operation: str) -> MlstoreError:
        if isinstance(exc, MlstoreError):
            return exc
        text = str(url)
        if isinstance(exc, _SetupError):
            return ConfigError(str(exc), url=text, operation=operation)
        status, retry_after, reason = _status_of(exc)
        if status:
            return _from_status(status, reason, retry_after, url, operation)
        import google.auth.exceptions as gae

        transport = transport_error(
            exc, url, operation, dropped=(ShortBodyError, gae.TransportError)
        )
        if transport is not None:
            return transport
        if find_cause(exc, gae.GoogleAuthError) is not None:
            return PermissionDeniedError(
                "the GCS credentials could not be used; set GOOGLE_APPLICATION_CREDENTIALS, "
                "log in with gcloud, or pass Store(options={'gs': {'anon': True}}) for "
                "public buckets",
                url=text,
                operation=operation,
            )
        return super()._translate(exc, url, operation)

    # ---- Backend
    def info(self, url: URL) -> ObjectInfo:
        with self._errors(url, "info"):
            if not url.path:  # the bucket itself
                return self._info_from(self.fs.info(url.bucket))
            if not url.path.endswith("/"):
                try:
                    raw = self._sync(_metadata, url.bucket, url.path, None)
                except Exception as exc:  # translated below
                    err = self._translate(exc, url, "info")
                    if not isinstance(err, NotFoundError):
                        raise err from exc
                else:
                    return self._info_from(self.fs._process_object(url.bucket, raw))
            # A "directory": a prefix with objects below it.
            if self._sync(_is_prefix, url.bucket, url.path):
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
        with self._errors(url, "read"):
            if not url.path or url.path.endswith("/"):
                raise IsADirectoryError_(
                    "this is a directory; use ls() to list it", url=str(url), operation="read"
                )
            try:
                return self._read(url, start, end, version)
            except Exception as exc:  # translated below
                err = self._translate(exc, url, "read")
                if isinstance(err, NotFoundError):
                    raise self._not_found_on_read(url, version, err) from exc
                raise keep_received(received, err, exc) from exc

    def fetch(self, url: URL, *, received: Received | None = None) -> tuple[bytes, str | None]:
        """One GET: the bytes and the generation the server says they are."""
        with self._errors(url, "read"):
            if not url.path or url.path.endswith("/"):
                raise IsADirectoryError_(
                    "this is a directory; use ls() to list it", url=str(url), operation="read"
                )
            try:
                _, headers, data = self._sync(_media, url.bucket, url.path, None, None)
            except Exception as exc:  # translated below
                err = self._translate(exc, url, "read")
                if isinstance(err, NotFoundError):
                    raise self._not_found_on_read(url, None, err) from exc
                raise keep_received(received, err, exc) from exc
            _check_recorded_hash(url, headers, data)
            return bytes(data), headers.get("x-goog-generation")

    def _read(self, url: URL, start: int | None, end: int | None, version: str | None) -> bytes:
        if start is not None and start < 0 and end is None:
            rng: str | None = f"bytes={start}"  # suffix range: the last -start bytes
        else:
            if (start is not None and start < 0) or (end is not None and end < 0):
                # The size of the generation being read, not of whatever is live now.
                raw = self._sync(_metadata, url.bucket, url.path, version)
                start, end, _ = slice(start, end).indices(int(raw.get("size") or 0))
            lo = start or 0
            if end is not None and end <= lo:
                return b""
            rng = f"bytes={lo}-{'' if end is None else end - 1}" if lo or end is not None else None
        try:
            status, headers, data = self._sync(_media, url.bucket, url.path, rng, version)
        except Exception as exc:  # re-raised unless "range not satisfiable"
            if not isinstance(exc, MlstoreError) and _status_of(exc)[0] == 416:
                return b""
            raise
        served = headers.get("x-goog-generation")
        if version is not None and served and served != version:
            raise PreconditionFailedError(
                f"generation {version} was asked for, but generation {served} was served",
                url=str(url),
                operation="read",
            )
        if rng is None:
            _check_recorded_hash(url, headers, data)
        elif status == 200:
            # The server ignored the Range header and sent the whole object.
            return bytes(data[slice(start, end)])
        return bytes(data)

    def _not_found_on_read(self, url: URL, version: str | None, err: NotFoundError) -> MlstoreError:
        """A 404 on a read. Pinned: if the object still exists, the pinned generation is
        gone (replaced), never to be read as another generation. Not pinned: the URL may
        name a directory. Otherwise the object is missing."""
        if version is not None:
            try:
                raw = self._sync(_metadata, url.bucket, url.path, None)
            except Exception as exc:  # translated below
                check = self._translate(exc, url, "read")
                if isinstance(check, NotFoundError):
                    return err  # deleted, not replaced
                raise check from exc
            return PreconditionFailedError(
                f"the object changed while it was read (generation {version} is now "
                f"{raw.get('generation')})",
                url=str(url),
                operation="read",
            )
        try:
            is_dir = self._sync(_is_prefix, url.bucket, url.path)
        except Exception:  # noqa: BLE001 - no listing permission or no bucket: the 404 stands
            return err
        if is_dir:
            return IsADirectoryError_(
                "this is a directory; use ls() to list it", url=str(url), operation="read"
            )
        return err

    def write(self, url: URL, data: bytes) -> None:
        with self._errors(url, "write"):
            if not url.path or url.path.endswith("/"):
                raise IsADirectoryError_(
                    "cannot write to a bucket or a directory URL", url=str(url), operation="write"
                )
            payload = bytes(data)
            self.fs.pipe_file(
                self._path(url), payload, metadata={METADATA_KEY: content_hash(payload)}
            )

    def mkdir(self, url: URL) -> None:
        if url.path:
            return  # object stores have no directories
        with self._errors(url, "mkdir"):
            if self.fs.exists(url.bucket):
                return
            try:
                self.fs.mkdir(url.bucket)
            except Exception as exc:  # 409: created meanwhile
                if _status_of(exc)[0] != 409:
                    raise


def _from_status(
    status: int, reason: str, retry_after: str | None, url: URL, operation: str
) -> MlstoreError:
    text = str(url)
    detail = f"{status}: {reason}" if reason else str(status)
    if status == 404:
        what = "object" if url.path else "bucket"
        return NotFoundError(f"no such {what}", url=text, operation=operation)
    if status in (401, 403):
        return PermissionDeniedError(
            f"access denied ({detail}); check the credentials and the bucket's IAM policy",
            url=text,
            operation=operation,
        )
    if status == 412:
        return PreconditionFailedError(
            "the object changed since it was first read (generation precondition failed)",
            url=text,
            operation=operation,
        )
    if status in (429, 503):
        err: TransientError = ThrottledError(
            f"GCS asked to slow down ({detail})", url=text, operation=operation
        )
    elif status >= 500 or status == 408:
        err = TransientError(f"GCS server error ({detail})", url=text, operation=operation)
    else:
        return MlstoreError(f"GCS refused the request ({detail})", url=text, operation=operation)
    seconds = _parse_retry_after(retry_after)
    if seconds is not None:
        err.retry_after = seconds
    return err


def _parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _status_of(exc: BaseException | None) -> tuple[int, str | None, str]:
    """(HTTP status, Retry-After, server message) of the first error answer in ``exc``'s
    chain, or ``(0, None, "")``."""
    from gcsfs.retry import HttpError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        status = getattr(exc, _STATUS, None)
        if isinstance(status, int):
            return status, getattr(exc, _RETRY_AFTER, None), getattr(exc, _REASON, "")
        if isinstance(exc, HttpError):
            try:
                code = int(exc.code)
            except (TypeError, ValueError):
                code = 0
            if code:
                return code, None, ""
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return 0, None, ""


def _error_reason(contents: bytes) -> str:
    """The server's short error message, from a JSON error body."""
    try:
        error = json.loads(contents)["error"]
        message = error if isinstance(error, str) else error.get("message", "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return ""
    return str(message)[:200]


_FS_CLASS: Any = None


def _fs_class() -> Any:
    """gcsfs's core ``GCSFileSystem`` with every request made exactly once.

    gcsfs wraps ``_request`` (all JSON/media API calls) and its download helpers in
    ``retry_request`` with six attempts fixed when the class is defined, so setting
    ``retries`` on an instance changes nothing; and its batch delete resubmits failed
    entries up to five times. This subclass replaces ``_request`` with a single attempt
    that also records the status and ``Retry-After`` on the error it raises, unwraps the
    download helpers, and deletes objects one request each.
    """
    global _FS_CLASS
    if _FS_CLASS is not None:
        return _FS_CLASS
    from fsspec import asyn
    from gcsfs.core import GCSFileSystem
    from gcsfs.retry import validate_response

    def _unwrapped(name: str) -> Any:
        fn = getattr(GCSFileSystem, name)
        return getattr(fn, "__wrapped__", fn)

    class OneAttemptGCSFileSystem(GCSFileSystem):  # type: ignore[misc]
        retries = 1

        async def _request(
            self,
            method: str,
            path: str,
            *args: Any,
            headers: Mapping[str, str] | None = None,
            json: Any = None,
            data: Any = None,
            cache_type: Any = None,
            cache_source: Any = None,
            sink: _Body | None = None,
            **kwargs: Any,
        ) -> tuple[int, Any, Any, bytes]:
            await self._set_session()
            if isinstance(data, (bytes, bytearray, memoryview)) and len(data) > 2**20:
                # aiohttp warns that a large raw-bytes body may block the event loop and
                # asks for a file object; BytesIO shares a bytes buffer without a copy.
                data = io.BytesIO(data)
            elif hasattr(data, "seek"):
                data.seek(0)
            extra = {}
            if cache_type is not None or cache_source is not None:
                extra = {"cache_type": cache_type, "cache_source": cache_source}
            async with self.session.request(
                method=method,
                url=self._format_path(path, args),
                params=self._get_params(kwargs),
                json=json,
                headers=self._get_headers(headers, **extra),
                data=data,
                timeout=self.requests_timeout,
            ) as r:
                status = r.status
                out_headers = r.headers
                info = r.request_info
                if sink is not None and status < 400:
                    # Read in chunks so that, if the body stops early, what arrived
                    # can be resumed from (see _media).
                    sink.headers, sink.status = out_headers, status
                    async for chunk in r.content.iter_chunked(_CHUNK):
                        sink.chunks.append(chunk)
                    contents = b"".join(sink.chunks)
                else:
                    contents = await r.read()
            if status >= 400:
                try:
                    validate_response(status, contents, path, args)
                except Exception as exc:
                    setattr(exc, _STATUS, status)
                    setattr(exc, _RETRY_AFTER, out_headers.get("Retry-After"))
                    setattr(exc, _REASON, _error_reason(contents))
                    raise
            return status, out_headers, info, contents

        _get_file_request = _unwrapped("_get_file_request")
        _get_file_concurrent = _unwrapped("_get_file_concurrent")

        async def _delete_files(self, files: list[str], batchsize: int) -> list[Any]:
            # Not the batch endpoint: gcsfs resubmits failed batch entries itself.
            out: list[Any] = await asyn._run_coros_in_chunks(
                [self._rm_file(f) for f in files], return_exceptions=True, batch_size=32
            )
            return out

    _FS_CLASS = OneAttemptGCSFileSystem
    return _FS_CLASS


# ---- coroutines run on gcsfs's event loop


async def _metadata(fs: Any, bucket: str, key: str, generation: str | None) -> Mapping[str, Any]:
    """The object resource (JSON API ``objects.get``)."""
    _, _, _, contents = await fs._request("GET", "b/{}/o/{}", bucket, key, generation=generation)
    result: Mapping[str, Any] = json.loads(contents)
    return result


async def _is_prefix(fs: Any, bucket: str, key: str) -> bool:
    """Whether any object's name starts with ``key/`` (a "directory")."""
    prefix = key.rstrip("/") + "/"
    _, _, _, contents = await fs._request(
        "GET", "b/{}/o", bucket, prefix=prefix, delimiter="/", maxResults=1
    )
    listing = json.loads(contents)
    return bool(listing.get("items") or listing.get("prefixes"))


def _check_recorded_hash(url: URL, headers: Mapping[str, str], data: bytes) -> None:
    """Refuse a whole-object body that does not match the hash mlstore recorded in the
    object's metadata when it wrote it (GCS sends it as ``x-goog-meta-mlstore-xxh3``)."""
    recorded = headers.get(f"x-goog-meta-{METADATA_KEY}")
    if recorded and content_hash(data) != recorded:
        raise CorruptBodyError(
            "the downloaded bytes do not match the hash recorded when the object was "
            "written (corrupted in transit); fetching again",
            url=str(url),
            operation="read",
        )


class _Body:
    """What a media download has received so far (filled by ``_request``)."""

    def __init__(self) -> None:
        self.headers: Mapping[str, str] | None = None
        self.status = 0
        self.chunks: list[bytes] = []


async def _media(
    fs: Any, bucket: str, key: str, rng: str | None, generation: str | None
) -> tuple[int, Mapping[str, str], bytes]:
    """The object's bytes (``alt=media``), a range of them, of one generation if given.

    A body that stops early raises :class:`InterruptedBodyError` with what arrived and
    the generation it belongs to, so the Store resumes with a range of that generation.
    """
    path = fs._location + "/download/storage/v1/b/{}/o/{}"
    headers = {"Range": rng} if rng else {}
    body = _Body()
    try:
        status, got, _, data = await fs._request(
            "GET", path, bucket, key, headers=headers, alt="media", generation=generation, sink=body
        )
    except Exception as exc:
        # Resumable only if the bytes line up: not decompressed, and the range (if one
        # was asked for) honoured rather than answered with the whole object.
        honoured = not rng or body.status == 206
        if body.headers is not None and honoured and not body.headers.get("Content-Encoding"):
            length = body.headers.get("Content-Length")
            raise InterruptedBodyError(
                b"".join(body.chunks),
                body.headers.get("x-goog-generation"),
                int(length) if length is not None else None,
            ) from exc
        raise
    expected = got.get("Content-Length")
    if expected is not None and not got.get("Content-Encoding") and len(data) != int(expected):
        short = ShortBodyError(f"the body ended after {len(data)} of {expected} bytes")
        if rng and status != 206:
            raise short
        raise InterruptedBodyError(data, got.get("x-goog-generation"), int(expected)) from short
    return status, got, data
