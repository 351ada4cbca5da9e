"""``http://`` and ``https://``: read-only access to objects served over HTTP.

Reads use ``Range`` requests and are pinned to the version seen first with ``If-Match``
(ETag) or ``If-Unmodified-Since`` (Last-Modified). ``info`` uses ``HEAD``.

Every request passes the URL policy (:class:`~mlstore.config.HttpPolicy`): the host name
is checked, every address it resolves to is checked before a socket is opened, and both
checks run again for each redirect, so a redirect or a DNS answer cannot lead mlstore to
a cloud metadata service. A refused URL raises
:class:`~mlstore.errors.PermissionDeniedError`.

Options (``Store(options={"http": {...}})``): ``headers`` (a dict sent with every
request, for example an ``Authorization`` header; never logged or shown).
"""

from __future__ import annotations

import email.utils
import ipaddress
import socket
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit

from mlstore.backends.base import Backend, ObjectInfo, PerProcess
from mlstore.config import HttpPolicy, StoreConfig
from mlstore.errors import (
    ConfigError,
    ConnectionLostError,
    MlstoreError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionFailedError,
    StorageTimeoutError,
    ThrottledError,
    TransientError,
    UnsupportedOperation,
)
from mlstore.url import URL

__all__ = ["HttpBackend", "UrlGuard"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class PolicyRefusal(Exception):
    """Raised inside a connection when the URL policy refuses an address.

    Deliberately not an ``OSError``, so urllib3 does not wrap it or retry it; the
    backend turns it into :class:`PermissionDeniedError`.
    """


class UrlGuard:
    """The compiled :class:`HttpPolicy`: decides whether a host or address may be reached."""

    def __init__(self, policy: HttpPolicy) -> None:
        self.policy = policy
        self._deny_nets: list[_Network] = [
            ipaddress.ip_network(n, strict=False) for n in policy.deny_networks
        ]
        self._deny_hosts = {h.lower().rstrip(".") for h in policy.deny_hosts}
        self._allow = {h.lower().rstrip(".") for h in policy.allow_hosts}

    def check_host(self, host: str) -> None:
        """Refuse a host by name (before any DNS look-up)."""
        name = host.lower().strip("[]").rstrip(".")
        if name in self._allow:
            return
        if name in self._deny_hosts:
            raise PolicyRefusal(f"host {name!r} is refused by the URL policy (deny_hosts)")
        try:
            addr = ipaddress.ip_address(name)
        except ValueError:
            return
        self.check_address(addr, host=name)

    def check_address(self, addr: _Address, *, host: str) -> None:
        """Refuse an address that a host resolved to."""
        if host.lower() in self._allow or str(addr) in self._allow:
            return
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        for net in self._deny_nets:
            if addr.version == net.version and addr in net:
                raise PolicyRefusal(
                    f"host {host!r} resolves to {addr}, inside {net}, which the URL policy "
                    "refuses (deny_networks); allow it with HttpPolicy(allow_hosts=...)"
                )
        if self.policy.deny_private and (addr.is_private or addr.is_loopback):
            raise PolicyRefusal(
                f"host {host!r} resolves to the private address {addr}, which the URL "
                "policy refuses (deny_private)"
            )

    def resolve(self, host: str, port: int) -> list[str]:
        """Resolve ``host`` and check every address; return them, all allowed."""
        self.check_host(host)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            return [host]  # let the connection raise its own name-resolution error
        addrs: list[str] = []
        for info in infos:
            raw = info[4][0]
            addr = ipaddress.ip_address(str(raw).split("%", 1)[0])
            self.check_address(addr, host=host)
            if str(raw) not in addrs:
                addrs.append(str(raw))
        return addrs


def _guarded_pool_manager(guard: UrlGuard, config: StoreConfig) -> Any:
    import urllib3
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class _Guarded:
        _dns_host: str
        port: int

        def _new_conn(self) -> Any:
            host = self._dns_host
            addrs = guard.resolve(host, self.port)
            self._dns_host = addrs[0]
            try:
                return super()._new_conn()  # type: ignore[misc]
            finally:
                self._dns_host = host

    class GuardedHTTPConnection(_Guarded, HTTPConnection):
        pass

    class GuardedHTTPSConnection(_Guarded, HTTPSConnection):
        pass

    class GuardedHTTPPool(HTTPConnectionPool):
        ConnectionCls = GuardedHTTPConnection

    class GuardedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = GuardedHTTPSConnection

    retry = config.retry
    manager = urllib3.PoolManager(
        num_pools=64,
        maxsize=max(10, config.max_workers),
        retries=False,
        timeout=urllib3.Timeout(connect=retry.connect_timeout, read=retry.read_timeout),
    )
    manager.pool_classes_by_scheme = {"http": GuardedHTTPPool, "https": GuardedHTTPSPool}
    return manager


class HttpBackend(Backend):
    """Read-only backend for http(s) URLs."""

    protocol = "https"
    read_only = True

    def __init__(self, options: Mapping[str, Any], config: StoreConfig) -> None:
        super().__init__(options, config)
        unknown = sorted(set(self.options) - {"headers"})
        if unknown:
            raise ConfigError(f"unknown http option(s) {unknown}; known: ['headers']")
        headers = self.options.get("headers", {})
        if not isinstance(headers, Mapping):
            raise ConfigError("the http option 'headers' must be a dict of header names to values")
        self._headers = {str(k): str(v) for k, v in headers.items()}
        self.guard = UrlGuard(config.http)
        self._pool = PerProcess(lambda: _guarded_pool_manager(self.guard, self.config))

    # ---- requests
    def _request(
        self, method: str, url: URL, headers: Mapping[str, str], operation: str
    ) -> Any:
        """Send one request, following redirects by hand so each hop is checked."""
        target = str(url)
        send = {**self._headers, **headers}
        pool = self._pool.get()
        for _hop in range(self.config.http.max_redirects + 1):
            parts = urlsplit(target)
            if parts.scheme not in ("http", "https"):
                raise PermissionDeniedError(
                    f"a redirect led to the scheme {parts.scheme!r}; only http and https "
                    "are followed",
                    url=str(url),
                    operation=operation,
                )
            try:
                self.guard.check_host(parts.hostname or "")
                resp = pool.request(
                    method, target, headers=send, redirect=False, preload_content=False
                )
            except PolicyRefusal as exc:
                raise PermissionDeniedError(str(exc), url=str(url), operation=operation) from None
            except Exception as exc:  # noqa: BLE001 - translated
                raise _translate_transport(exc, url, operation) from None
            if resp.status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                location = urljoin(target, resp.headers["Location"])
                resp.drain_conn()
                resp.release_conn()
                if urlsplit(location).netloc != parts.netloc:
                    # Never forward credentials to another host.
                    send = {k: v for k, v in send.items() if k.lower() != "authorization"}
                target = location
                continue
            return resp
        raise MlstoreError(
            f"more than {self.config.http.max_redirects} redirects",
            url=str(url),
            operation=operation,
        )

    def _raise_for_status(self, resp: Any, url: URL, operation: str) -> None:
        status = resp.status
        if status < 400:
            return
        resp.drain_conn()
        resp.release_conn()
        text = str(url)
        if status == 404 or status == 410:
            raise NotFoundError("no such object (HTTP %d)" % status, url=text, operation=operation)
        if status in (401, 403):
            raise PermissionDeniedError(
                f"access denied (HTTP {status}); check the credentials or headers",
                url=text,
                operation=operation,
            )
        if status == 412:
            raise PreconditionFailedError(
                "the object changed while it was read (HTTP 412)", url=text, operation=operation
            )
        if status == 416:
            raise ConfigError(
                "the requested range is outside the object (HTTP 416)", url=text, operation=operation
            )
        if status in (429, 503):
            err: TransientError = ThrottledError(
                f"the server asked to slow down (HTTP {status})", url=text, operation=operation
            )
        elif status >= 500 or status == 408:
            err = TransientError(f"server error (HTTP {status})", url=text, operation=operation)
        else:
            raise MlstoreError(f"HTTP {status}", url=text, operation=operation)
        err.retry_after = _retry_after(resp.headers.get("Retry-After"))
        raise err

    # ---- Backend
    def info(self, url: URL) -> ObjectInfo:
        resp = self._request("HEAD", url, {}, "info")
        if resp.status == 405:  # HEAD not allowed: ask for the first byte instead
            resp.release_conn()
            resp = self._request("GET", url, {"Range": "bytes=0-0"}, "info")
        self._raise_for_status(resp, url, "info")
        try:
            size = _size_from(resp.headers)
        finally:
            resp.drain_conn()
            resp.release_conn()
        if size is None:
            raise MlstoreError(
                "the server reports no size (no Content-Length)", url=str(url), operation="info"
            )
        return ObjectInfo(
            url=url,
            size=size,
            version=_version_from(resp.headers),
            mtime=_http_date(resp.headers.get("Last-Modified")),
            checksums=_checksums(resp.headers),
        )

    def read(
        self, url: URL, start: int | None = None, end: int | None = None, version: str | None = None
    ) -> bytes:
        headers: dict[str, str] = {}
        if version is not None:
            headers.update(_precondition(version))
        lo, hi = start, end
        if (lo is not None and lo < 0) or (hi is not None and hi < 0):
            size = self.info(url).size
            lo, hi, _ = slice(start, end).indices(size)
        lo = lo or 0
        if hi is not None and hi <= lo:
            return b""
        if lo or hi is not None:
            headers["Range"] = f"bytes={lo}-{'' if hi is None else hi - 1}"
        resp = self._request("GET", url, headers, "read")
        if resp.status == 416:
            resp.drain_conn()
            resp.release_conn()
            return b""  # a range that starts at or past the end: empty, like a slice
        self._raise_for_status(resp, url, "read")
        try:
            data: bytes = resp.read()
        except Exception as exc:  # noqa: BLE001 - translated
            raise _translate_transport(exc, url, "read") from None
        finally:
            resp.release_conn()
        if resp.status == 200 and "Range" in headers:
            # The server ignored Range and sent everything: slice it here.
            data = data[lo:hi]
        return data

    def ls(self, url: URL) -> list[ObjectInfo]:
        return [self.info(url)]

    def find(self, url: URL) -> Iterator[ObjectInfo]:
        yield self.info(url)

    def copy(self, src: URL, dst: URL) -> None:
        raise UnsupportedOperation(
            "the http backend is read-only", url=str(dst), operation="copy"
        )

    def close(self) -> None:
        pool = self._pool.get()
        pool.clear()


def _translate_transport(exc: Exception, url: URL, operation: str) -> MlstoreError:
    """urllib3/socket failures -> mlstore's transient errors."""
    import urllib3.exceptions as ue

    text = str(url)
    cause = exc
    if isinstance(exc, ue.MaxRetryError) and exc.reason is not None:
        cause = exc.reason
    if isinstance(cause, PolicyRefusal):
        return PermissionDeniedError(str(cause), url=text, operation=operation)
    if isinstance(cause, ue.NameResolutionError):
        return ConnectionLostError(
            "the host name could not be resolved", url=text, operation=operation
        )
    if isinstance(cause, (ue.TimeoutError, TimeoutError, socket.timeout)):
        return StorageTimeoutError("the request timed out", url=text, operation=operation)
    if isinstance(cause, (ue.ProtocolError, ue.NewConnectionError, ConnectionError, OSError)):
        return ConnectionLostError(
            f"the connection failed ({type(cause).__name__})", url=text, operation=operation
        )
    if isinstance(cause, ue.HTTPError):
        return ConnectionLostError(
            f"the HTTP exchange failed ({type(cause).__name__})", url=text, operation=operation
        )
    return MlstoreError(f"{type(cause).__name__}: {cause}", url=text, operation=operation)


def _size_from(headers: Mapping[str, str]) -> int | None:
    content_range = headers.get("Content-Range")
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        if total.isdigit():
            return int(total)
    length = headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _version_from(headers: Mapping[str, str]) -> str | None:
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    modified = headers.get("Last-Modified")
    if modified:
        return "lm:" + modified
    return None


def _precondition(version: str) -> dict[str, str]:
    if version.startswith("lm:"):
        return {"If-Unmodified-Since": version[3:]}
    return {"If-Match": version}


def _http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    when = _http_date(value)
    if when is None:
        return None
    import time

    return max(0.0, when - time.time())


def _checksums(headers: Mapping[str, str]) -> dict[str, str]:
    out = {}
    md5 = headers.get("Content-MD5")
    if md5:
        out["md5"] = md5
    return out
