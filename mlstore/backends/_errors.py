"""What an error answer from a storage service means, written once for every backend.

Each SDK hands back a failed request in its own shape (a botocore ``ClientError``, an
Azure ``HttpResponseError``, a gcsfs exception, a urllib3 response). A backend reduces it
to an :class:`Answer` (status, service error code, headers) and :func:`status_error`
turns that into the mlstore error of the same meaning, through one status table. What
differs between services is data, a :class:`Service`: the error codes it sends, what it
calls a bucket, and what to check when access is denied.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

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
from mlstore.hashing import stale_metadata
from mlstore.url import URL

__all__ = [
    "Answer",
    "HashMismatchError",
    "Service",
    "http_date",
    "refuse_corrupt",
    "retry_after",
    "status_error",
]

# What a status means when the service sent no error code this module knows. A 5xx
# not listed is transient; any other status is refused for good (MlstoreError).
_BY_STATUS: dict[int, type[MlstoreError]] = {
    **dict.fromkeys((401, 403, 407), PermissionDeniedError),
    **dict.fromkeys((404, 410), NotFoundError),
    **dict.fromkeys((429, 503), ThrottledError),
    408: TransientError,
    412: PreconditionFailedError,
    416: ConfigError,
}

# Retry-After headers, most precise first: Azure sends milliseconds beside the seconds.
_DELAY_HEADERS = (("retry-after-ms", 1e-3), ("x-ms-retry-after-ms", 1e-3), ("retry-after", 1.0))


@dataclass(frozen=True)
class Service:
    """How one storage service words its errors (data for :func:`status_error`).

    Attributes:
        name: how messages name the service (``"S3"``; ``"the server"`` for http).
        access_hint: what to check when access is denied.
        pin: the precondition a pinned read sends (named when it fails).
        bucket: what the service calls a bucket (``"container"`` on Azure).
        codes: the service's error codes that say more than the status; S3 sends
            ``RequestTimeout`` with a 400, for instance.
        missing: what a "not found" code says is missing (``NoSuchBucket``: the bucket).
    """

    name: str
    access_hint: str
    pin: str = "If-Match"
    bucket: str = "bucket"
    codes: Mapping[str, type[MlstoreError]] = field(default_factory=dict)
    missing: Mapping[str, str] = field(default_factory=dict)

    def bucket_is_missing(self, code: str) -> bool:
        """Whether ``code`` says the bucket itself is missing (so no key below it can
        be a "directory" either)."""
        return self.missing.get(code) == self.bucket


@dataclass(frozen=True)
class Answer:
    """A failed request, as much of it as the SDK kept.

    Attributes:
        status: the HTTP status (0 if the SDK did not keep it).
        code: the service's error code (``NoSuchKey``, ``ServerBusy``), if it sent one.
        reason: the server's own short message, if the SDK kept it.
        headers: the answer's headers (for ``Retry-After``).
    """

    status: int
    code: str = ""
    reason: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)


def status_error(answer: Answer, url: URL, operation: str, service: Service) -> MlstoreError:
    """The mlstore error that ``answer`` means: the service's error code decides when the
    service sent one this module knows, the status otherwise. Transient errors carry the
    server's ``Retry-After``."""
    kind = service.codes.get(answer.code) or _BY_STATUS.get(answer.status)
    if kind is None:
        kind = TransientError if answer.status >= 500 else MlstoreError
    status = f"HTTP {answer.status}" if answer.status else ""
    detail = ", ".join(part for part in (answer.code, status, answer.reason) if part)
    if kind is NotFoundError:
        noun = service.missing.get(answer.code) or ("object" if url.path else service.bucket)
        message = f"no such {noun}"
    elif kind is PermissionDeniedError:
        message = f"access denied ({detail}); {service.access_hint}"
    elif kind is PreconditionFailedError:
        message = f"the object changed since it was first read ({service.pin} failed)"
    elif kind is ThrottledError:
        message = f"{service.name} asked to slow down ({detail})"
    elif kind is TransientError:
        message = f"{service.name} reported a temporary error ({detail})"
    elif kind is ConfigError:
        message = f"the requested range is outside the object ({detail})"
    else:
        message = f"{service.name} refused the request ({detail})"
    err = kind(message, url=str(url), operation=operation)
    if isinstance(err, TransientError):
        err.retry_after = retry_after(answer.headers)
    return err


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """How long the server asked the client to wait, in seconds, or ``None``.

    ``retry-after-ms`` and ``x-ms-retry-after-ms`` (Azure) count milliseconds;
    ``Retry-After`` is a number of seconds or an HTTP date. A wait in the past is 0.
    """
    if not headers:
        return None
    lowered = {str(name).lower(): str(value) for name, value in headers.items()}
    for name, scale in _DELAY_HEADERS:
        value = lowered.get(name, "").strip()
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            pass
        when = http_date(value) if name == "retry-after" else None
        if when is not None:
            return max(0.0, when - time.time())
    return None


def http_date(value: str | None) -> float | None:
    """An HTTP date (``Last-Modified``, ``Retry-After``) as a POSIX timestamp, or
    ``None`` if it is not one."""
    try:
        return email.utils.parsedate_to_datetime(value or "").timestamp()
    except (TypeError, ValueError):
        return None


class HashMismatchError(CorruptBodyError):
    """A whole download whose bytes do not match the hash in the object's metadata.

    Either the body was damaged in transit, or the metadata is stale: a tool rewrote the
    object and carried its old metadata over. The server's own checksum, where it sent
    one, tells them apart at once; otherwise a second download does
    (:meth:`~mlstore.backends._cloud.ObjectStoreBackend.fetch`): the same bytes twice
    are what the store holds, and the metadata is what is wrong.
    """

    def __init__(self, data: bytes, version: str | None, url: URL | str) -> None:
        super().__init__(
            "the downloaded bytes do not match the hash recorded in the object's "
            "metadata (corrupted in transit, or metadata left over from an older "
            "version); fetching again",
            url=str(url),
            operation="read",
        )
        self.data = data
        self.version = version
        self.body_hash = _hash(data)


def refuse_corrupt(
    data: bytes,
    recorded: str | None,
    url: URL | str,
    *,
    version: str | None = None,
    served: Mapping[str, str | None] | None = None,
) -> None:
    """Refuse a whole-object download whose bytes do not match the hash mlstore recorded
    in the object's metadata, unless a checksum the server sent with this response
    (``served``: ``{"md5": hex or base64}``) vouches for the bytes (then the metadata is
    stale and the bytes are served). Objects mlstore did not write have no such hash
    and pass.

    Raises:
        HashMismatchError: with the bytes and their ``version``, for a second look.
    """
    if not recorded or _hash(data) == recorded:
        return
    if _vouched(data, served or {}):
        stale_metadata(url, "content hash")
        return
    raise HashMismatchError(data, version, url)


def _hash(data: bytes) -> str:
    from mlstore.hashing import content_hash

    return content_hash(data)


def _vouched(data: bytes, served: Mapping[str, str | None]) -> bool:
    """Whether an MD5 the server sent for this body is the MD5 of ``data`` (hex, as in
    a single-part S3 ETag, or base64, as GCS and Azure send it)."""
    sent = served.get("md5")
    if not sent:
        return False
    digest = hashlib.md5(data, usedforsecurity=False).digest()
    sent = sent.strip('"')
    return sent.lower() == digest.hex() or sent == base64.b64encode(digest).decode("ascii")
