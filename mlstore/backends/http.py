"""``http://`` and ``https://``: read-only access to objects served over HTTP.

An object's version is its strong ETag, and reads are pinned to it with ``If-Match``; the
answer's own ETag and ``Content-Range`` are checked too, so a server that ignores those
headers still cannot return another version or range. An object with only a weak ETag or
a ``Last-Modified`` date has no version (``None``): a date has one second of resolution and
a weak ETag may stay the same when the bytes change, so neither can prove two answers are
of the same bytes. Such an object is not pinned; it is read whole, in one ``GET``, wherever
ranges would have to agree (``open()``, the cache), and the cache never trusts a copy of
it on the word of a ``HEAD``. Bodies are read as sent (``Accept-Encoding: identity``,
never decoded), so sizes and ranges agree. ``info`` uses ``HEAD`` (or a one-byte ranged
``GET`` where ``HEAD`` is refused or gives no size).

Bodies are streamed and bounded: a read keeps only the bytes it asked for, stops reading
once it has them (a server that ignores ``Range`` costs the bytes up to the range's end,
not the whole object), and refuses with :class:`~mlstore.errors.IntegrityError` a body
longer than its ``Content-Range`` or, when it announces no length, than the object's size;
such a connection is closed, never drained.

The URL policy (:class:`~mlstore.config.HttpPolicy`) checks the host name, then every
address it resolves to, and the socket is opened to one of those checked addresses (never
to a second, unchecked DNS answer); both checks run again on each redirect. IPv4 addresses
inside IPv6 ones (``::ffff:a.b.c.d``, 6to4, Teredo, NAT64 ``64:ff9b::/96`` and the
local-use ``64:ff9b:1::/48``) are checked as IPv4. A refused
URL raises :class:`~mlstore.errors.PermissionDeniedError` before any connection.

Options (``Store(options={"https": {...}})``; ``http`` URLs share them): ``headers``, a dict
sent with every request, e.g. ``Authorization`` (never logged or shown). User info in the
URL (``https://user:pw@host/x``) is sent as Basic auth. A redirect to another origin
carries only the headers in :data:`CROSS_ORIGIN_HEADERS` (``Range``, the version
preconditions, ``Accept``, ``Accept-Encoding``, ``User-Agent``): ``Authorization`` and every
other header of the ``headers`` option stay with the origin they were given for.
"""

from __future__ import annotations

import base64
import re
import socket
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

from mlstore.backends._errors import Answer, Service, http_date, status_error
from mlstore.backends._ranges import range_header, wanted
from mlstore.backends._urlguard import (
    PolicyRefusedError,
    UrlGuard,
    guarded_pool_manager,
    norm_host,
)
from mlstore.backends.base import Backend, ObjectInfo, PerProcess, Received
from mlstore.config import StoreConfig
from mlstore.errors import (
    ConfigError,
    ConnectionLostError,
    IntegrityError,
    MlstoreError,
    PermissionDeniedError,
    PreconditionFailedError,
    StorageTimeoutError,
    UnsupportedOperation,
)
from mlstore.url import URL

__all__ = ["CROSS_ORIGIN_HEADERS", "HttpBackend", "PolicyRefusedError", "UrlGuard"]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Redirects are followed by hand (each hop checked); bodies are streamed and never decoded.
_RAW = {"redirect": False, "preload_content": False, "decode_content": False}
#: The only request headers that follow a redirect to another origin (names in lower
#: case). An allow-list, not a pattern for credential-like names: a credential can hide
#: under any name (Artifactory's ``X-JFrog-Art-Api``, a proxy's ``X-Forwarded-User``),
#: and a presigned target needs none of the caller's headers. These describe only what is
#: asked for (the range, the pinned version, the encoding), so the answer stays the same.
CROSS_ORIGIN_HEADERS = frozenset(
    {
        "accept",
        "accept-encoding",
        "range",
        "if-match",
        "if-none-match",
        "if-unmodified-since",
        "if-modified-since",
        "user-agent",
    }
)
# RFC 9110 token characters: anything else in a header name is refused up front.
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# How errors are worded: a server sends no error codes mlstore knows.
_SERVICE = Service("the server", "check the credentials or the 'headers' option")
# A shorter rest of a body is read so the connection can be reused; a longer one is not.
_DRAIN_LIMIT = 64 * 1024
# Bodies are read in pieces of this size: what a read holds beyond the bytes it keeps.
_PIECE = 1024 * 1024


class HttpBackend(Backend):
    """Read-only backend for http(s) URLs."""

    protocol = "https"
    read_only = True

    def __init__(self, options: Mapping[str, Any], config: StoreConfig) -> None:
        super().__init__(options, config)
        unknown = sorted(set(self.options) - {"headers"})
        if unknown:
            raise ConfigError(f"unknown http option(s) {unknown}; known: ['headers']")
        self._headers = _checked_headers(self.options.get("headers", {}))
        self.guard = UrlGuard(config.http)
        self._pool = PerProcess(lambda: guarded_pool_manager(self.guard, self.config))

    # ---- requests
    def _request(self, method: str, url: URL, headers: Mapping[str, str], operation: str) -> Any:
        """Send one request, following redirects by hand so each hop is checked.
        Returns the final response, unread: the caller must :func:`_finish` it."""
        where = {"url": str(url), "operation": operation}
        target = urlsplit(str(url))
        send = _merge(self._headers, {"Accept-Encoding": "identity"})
        if target.username is not None and "authorization" not in {k.lower() for k in send}:
            pair = f"{unquote(target.username)}:{unquote(target.password or '')}"
            send["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        send = _merge(send, headers)
        limit = self.config.http.max_redirects
        for _hop in range(limit + 1):
            if target.scheme not in ("http", "https"):
                raise PermissionDeniedError(
                    f"a redirect led to a {target.scheme!r} URL; only http(s) is followed", **where
                )
            try:
                self.guard.check_host(target.hostname or "")
                resp = self._pool.get().request(method, target.geturl(), headers=send, **_RAW)
            except Exception as exc:  # noqa: BLE001 - translated, policy refusals included
                raise _translate_transport(exc, url, operation) from None
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECTS or not location:
                return resp
            _finish(resp)
            try:
                after = urlsplit(urljoin(target.geturl(), location))
                if _origin(after) != _origin(target):  # another origin: harmless headers only
                    send = {k: v for k, v in send.items() if k.lower() in CROSS_ORIGIN_HEADERS}
            except ValueError:
                raise MlstoreError("the server redirected to a malformed URL", **where) from None
            target = after
        raise MlstoreError(
            f"more than {limit} redirects; raise HttpPolicy.max_redirects to follow more", **where
        )

    def _probe(self, url: URL, method: str) -> Mapping[str, str] | None:
        """The headers of a HEAD, or of a one-byte GET; ``None`` if HEAD is refused."""
        extra = {"Range": "bytes=0-0"} if method == "GET" else {}
        resp = self._request(method, url, extra, "info")
        try:
            if method == "HEAD" and resp.status in (405, 501):
                return None
            if resp.status != 416:  # an empty object answers "bytes=0-0" with 416
                _raise_for_status(resp, url, "info")
            headers: Mapping[str, str] = resp.headers
            return headers
        finally:
            _finish(resp)

    # ---- Backend
    def info(self, url: URL) -> ObjectInfo:
        headers = self._probe(url, "HEAD")
        if headers is None or _size_from(headers) is None:
            headers = self._probe(url, "GET")
        assert headers is not None
        if (size := _size_from(headers)) is None:
            why = "the server reports no size (no Content-Length or Content-Range)"
            raise MlstoreError(why, url=str(url), operation="info")
        return ObjectInfo(
            url=url,
            size=size,
            version=_version_from(headers),
            mtime=http_date(headers.get("Last-Modified")),
            checksums={"md5": md5} if (md5 := headers.get("Content-MD5")) else {},
        )

    def read(
        self,
        url: URL,
        start: int | None = None,
        end: int | None = None,
        version: str | None = None,
        *,
        received: Received | None = None,
    ) -> bytes:
        if version is not None and not _strong(version):
            raise UnsupportedOperation(
                f"http reads are pinned only by a strong ETag, and {version!r} is not one: an "
                "object without a strong ETag has no version and cannot be pinned (read it "
                "without version=)",
                url=str(url),
                operation="read",
            )
        return self._get(url, start, end, version, None)

    def fetch(self, url: URL, *, received: Received | None = None) -> tuple[bytes, str | None]:
        """The whole object, pinned to the version ``info`` saw, and never more bytes than
        the size ``info`` reported when the answer itself announces no length."""
        try:
            found = self.info(url)
        except MlstoreError as exc:
            exc.operation = "read"  # the caller asked to read; say so
            raise
        return self._get(url, None, None, found.version, found.size), found.version

    def _get(
        self, url: URL, start: int | None, end: int | None, version: str | None, size: int | None
    ) -> bytes:
        """Bytes ``[start:end)`` of ``url``, streamed and bounded.

        The body is read piece by piece and never past what was asked for: a server that
        ignores ``Range`` has its body skipped up to the range and abandoned after it
        (the connection is closed unless a short rest is left), and a body that runs past
        the length it is bound to (its ``Content-Range``, or the object's size when it
        announces no length) is refused, so a hostile or broken server cannot make one
        read buffer an unbounded amount. ``size``, when known, is the object's size at
        ``version``.
        """
        known = size

        def object_size() -> int:
            nonlocal known, version
            if known is None:
                found = self.info(url)
                version = version or found.version  # the range must be of this object
                known = found.size
            return known

        want = wanted(start, end, object_size)
        if want is None:
            return b""
        rng = range_header(want)
        headers = {"Range": rng} if rng else {}
        if version is not None:
            headers.update(_precondition(version))
        resp = self._request("GET", url, headers, "read")
        reuse = False
        try:
            if resp.status == 416 and rng:
                reuse = True
                return b""  # a range that starts at or past the end: empty, like a slice
            _raise_for_status(resp, url, "read")
            _check_version(resp.headers, version, url)
            if resp.status == 206:
                length = _check_range(resp.headers, want, url)
                data = _read_body(resp, url, 0, length, final=True)
                if len(data) != length:
                    why = f"the server announced {length} bytes but sent {len(data)}"
                    raise IntegrityError(why, url=str(url), operation="read")
            else:
                # The whole object: the range was not asked for, or the server ignored it.
                total = _announced_length(resp.headers)
                if total is None and (rng is None or want.start < 0 or want.stop is None):
                    total = known if known is not None else self.info(url).size
                if total is None:  # a bounded range of a body of unknown length
                    lo, hi = want.start, want.stop
                else:
                    lo, hi, _ = want.indices(total)
                if lo >= hi:
                    return b""  # nothing of the body is wanted: read none of it
                data = _read_body(resp, url, lo, hi - lo, final=want.stop is None)
                if lo == 0 and total is not None and hi == total:
                    _check_whole(resp.headers, data, total, url)
            reuse = True
        except Exception as exc:  # noqa: BLE001 - translated
            raise _translate_transport(exc, url, "read") from None
        finally:
            _finish(resp, reuse=reuse)
        return data

    def ls(self, url: URL) -> list[ObjectInfo]:
        return [self.info(url)]

    def find(self, url: URL) -> Iterator[ObjectInfo]:
        yield self.info(url)

    def copy(self, src: URL, dst: URL) -> None:
        raise UnsupportedOperation("the http backend is read-only", url=str(dst), operation="copy")

    def close(self) -> None:
        self._pool.get().clear()


# ------------------------------------------------------------------------ helpers


def _raise_for_status(resp: Any, url: URL, operation: str) -> None:
    if not 200 <= resp.status < 300:
        raise status_error(Answer(resp.status, headers=resp.headers), url, operation, _SERVICE)


def _checked_headers(value: object) -> dict[str, str]:
    """The ``headers`` option, validated without ever echoing a value."""
    if not isinstance(value, Mapping):
        raise ConfigError("the http option 'headers' must be a dict of header names to values")
    out = {str(name): str(raw) for name, raw in value.items()}
    for name, text in out.items():
        if not _HEADER_NAME.match(name) or any(c in text for c in "\r\n\0"):
            raise ConfigError(
                f"the http option 'headers' has an invalid header {name!r}: names are "
                "letters, digits and -, values hold no line break or NUL"
            )
    return out


def _merge(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """``base`` updated with ``extra``, header names compared case-insensitively."""
    replaced = {k.lower() for k in extra}
    return {**{k: v for k, v in base.items() if k.lower() not in replaced}, **extra}


def _origin(parts: SplitResult) -> tuple[str, str, int]:
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, norm_host(parts.hostname or ""), port


def _finish(resp: Any, *, reuse: bool = True) -> None:
    """Give the response's connection back to the pool: drain a short remainder,
    close the connection on a long or unknown one (never leave unread bytes on it), or
    on an answer that broke the protocol (``reuse=False``: its remainder is not read)."""
    remaining = resp.length_remaining
    if reuse and remaining is not None and remaining <= _DRAIN_LIMIT:
        resp.drain_conn()
    else:
        resp.close()
    resp.release_conn()


def _translate_transport(cause: Exception, url: URL, operation: str) -> MlstoreError:
    """urllib3/socket failures -> mlstore errors. Messages name the failure's type, never
    its text, which can hold signed URLs or header values."""
    import ssl

    import urllib3.exceptions as ue

    where = {"url": str(url), "operation": operation}
    kind = type(cause).__name__
    if isinstance(cause, MlstoreError):
        return cause
    if isinstance(cause, PolicyRefusedError):
        return PermissionDeniedError(str(cause), **where)
    if isinstance(cause, ue.NewConnectionError):  # a subclass of ConnectTimeoutError
        if isinstance(cause.__cause__, socket.gaierror):
            return ConnectionLostError("the host name could not be resolved", **where)
        return ConnectionLostError("the connection could not be established", **where)
    if isinstance(cause, (ue.TimeoutError, TimeoutError)):
        return StorageTimeoutError(f"the request timed out ({kind})", **where)
    if isinstance(cause, ue.SSLError) and isinstance(
        cause.args[0] if cause.args else None, ssl.SSLCertVerificationError
    ):
        return MlstoreError(
            "the server's TLS certificate could not be verified; fix the certificate or "
            "trust its CA (SSL_CERT_FILE)",
            **where,
        )
    if isinstance(cause, ValueError):  # malformed URL or header (LocationValueError too)
        return ConfigError(f"the request could not be built ({kind})", **where)
    if isinstance(cause, (ue.HTTPError, OSError)):
        return ConnectionLostError(f"the connection failed ({kind})", **where)
    return MlstoreError(f"the HTTP request failed ({kind})", **where)


def _check_version(headers: Mapping[str, str], version: str | None, url: URL) -> None:
    """Refuse an answer that is not of the pinned version (for servers that ignore
    ``If-Match``): one with another ETag, or with none, which cannot show it is of it."""
    if version is None:
        return
    seen = headers.get("ETag")
    if seen is None:
        why = f"the answer carries no ETag, so it cannot be shown to be version {version}"
        raise PreconditionFailedError(why, url=str(url), operation="read")
    if seen != version:
        why = "the object changed while it was read (the server sent another version)"
        raise PreconditionFailedError(why, url=str(url), operation="read")


def _check_range(headers: Mapping[str, str], want: slice, url: URL) -> int:
    """The length of a 206 answer, once its ``Content-Range`` is exactly the range asked
    for and its ``Content-Length`` (if any) agrees; refused before any of the body is read
    otherwise, so a wrong or oversized answer costs no download."""
    content_range = headers.get("Content-Range")
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", content_range or "")
    if m is not None:
        first, last = int(m.group(1)), int(m.group(2))
        total = int(m.group(3)) if m.group(3) != "*" else last + 1
        lo, hi, _ = want.indices(total)
        announced = _announced_length(headers)
        if (first, last + 1) == (lo, hi) and announced in (None, hi - lo):
            return hi - lo
        if (first, last + 1) == (lo, hi):
            why = (
                f"the server answered {content_range!r} but announced a body of "
                f"{announced} bytes, longer or shorter than the {hi - lo} asked for"
            )
            raise IntegrityError(why, url=str(url), operation="read")
    why = f"the server answered {content_range!r}: not the range asked for"
    raise IntegrityError(why, url=str(url), operation="read")


def _check_whole(headers: Mapping[str, str], data: bytes, total: int, url: URL) -> None:
    """Refuse a whole body shorter than its length (announced, or the object's size), or
    one that does not match the ``Content-MD5`` sent with it."""
    if len(data) != total:
        why = f"the server sent {len(data)} bytes of a {total}-byte object"
        raise IntegrityError(why, url=str(url), operation="read")
    md5 = (headers.get("Content-MD5") or "").strip()
    if md5:
        import hashlib

        digest = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        if digest != md5:
            why = "the body does not match the Content-MD5 the server sent with it"
            raise IntegrityError(why, url=str(url), operation="read")


def _announced_length(headers: Mapping[str, str]) -> int | None:
    """The body length the answer announces (``Content-Length``), if any."""
    value = (headers.get("Content-Length") or "").strip()
    return int(value) if value.isdigit() else None


def _read_body(resp: Any, url: URL, skip: int, count: int, *, final: bool) -> bytes:
    """``count`` bytes of the body after the first ``skip`` (which are read and dropped,
    never kept), fewer only where the body ends.

    The body is read in pieces of at most :data:`_PIECE` bytes, so memory holds what is
    kept and one piece. With ``final`` the body must end there: one byte more means it
    is longer than it may be, and :class:`IntegrityError` is raised without reading on
    (the caller closes the connection instead of draining it, which could take forever).
    """
    left = skip
    while left > 0:
        dropped = resp.read(min(left, _PIECE), decode_content=False)
        if not dropped:
            return b""  # the body ended before the range began: empty, like a slice
        left -= len(dropped)
    parts: list[bytes] = []
    got = 0
    while got < count:
        piece = resp.read(min(count - got, _PIECE), decode_content=False)
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    if final and got == count and resp.read(1, decode_content=False):
        why = (
            f"the server sent a body longer than the {skip + count} bytes expected; "
            "the connection was closed"
        )
        raise IntegrityError(why, url=str(url), operation="read")
    return b"".join(parts)


def _size_from(headers: Mapping[str, str]) -> int | None:
    """The object's size: the total of a ``Content-Range``, else ``Content-Length``."""
    total = (headers.get("Content-Range") or "").rpartition("/")[2].strip()
    size = total if total.isdigit() else headers.get("Content-Length", "")
    return int(size) if size.isdigit() else None


def _version_from(headers: Mapping[str, str]) -> str | None:
    """The strong ETag, or ``None``: a weak ETag or a Last-Modified date is no version,
    since the bytes can change while it stays the same (within one second, for a date)."""
    etag = headers.get("ETag")
    return etag if etag and _strong(etag) else None


def _strong(version: str) -> bool:
    """Whether ``version`` can be a strong ETag: not weak (``W/``), and not the
    ``lm:<date>`` that earlier releases reported for an object without one."""
    return not version.startswith(("W/", "lm:"))


def _precondition(version: str) -> dict[str, str]:
    return {"If-Match": version}
