"""The URL policy of the http(s) backend, enforced where connections are made.

:class:`UrlGuard` is the compiled :class:`~mlstore.config.HttpPolicy`: it refuses a host
by name, then every address the name resolves to, including IPv4 addresses carried
inside IPv6 ones (IPv4-mapped, 6to4, Teredo, NAT64). :func:`guarded_pool_manager` builds
the urllib3 pool manager whose connections go only to addresses the guard has checked
(never to a second, unchecked DNS answer), and whose DEBUG request lines mask signed
query strings.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any

from mlstore.config import HttpPolicy, StoreConfig
from mlstore.errors import (
    redact_url,
)

__all__ = ["PolicyRefusedError", "UrlGuard", "guarded_pool_manager", "norm_host"]

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# NAT64 prefixes: the well-known one (RFC 6052) and the local-use block (RFC 8215), in
# which a network picks its own prefix; the IPv4 address is the last 32 bits (a /96 prefix,
# what NAT64 gateways use).
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


class PolicyRefusedError(Exception):
    """The URL policy refused a host or address. Not an ``OSError``, so urllib3 neither
    wraps nor retries it; the backend turns it into :class:`PermissionDeniedError`."""


def norm_host(host: str) -> str:
    return host.lower().strip("[]").rstrip(".")


def _reached(addr: _Address) -> list[_Address]:
    """The addresses a connection to ``addr`` really reaches: an IPv4-mapped IPv6
    address is its IPv4 address; 6to4, Teredo and NAT64 addresses also carry one."""
    if isinstance(addr, ipaddress.IPv4Address):
        return [addr]
    if addr.ipv4_mapped is not None:
        return [addr.ipv4_mapped]
    teredo = addr.teredo[1] if addr.teredo else None
    in_nat64 = any(addr in net for net in _NAT64)
    nat64 = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF) if in_nat64 else None
    return [a for a in (addr, addr.sixtofour, teredo, nat64) if a is not None]


class UrlGuard:
    """The compiled :class:`HttpPolicy`: decides whether a host or address may be reached."""

    def __init__(self, policy: HttpPolicy) -> None:
        self.policy = policy
        self._deny_nets = [ipaddress.ip_network(n, strict=False) for n in policy.deny_networks]
        self._deny_hosts = {norm_host(h) for h in policy.deny_hosts}
        self._allow = {norm_host(h) for h in policy.allow_hosts}

    def check_host(self, host: str) -> None:
        """Refuse a host by name or literal address (before any DNS look-up)."""
        name = norm_host(host)
        if name in self._allow:
            return
        if name in self._deny_hosts:
            raise PolicyRefusedError(f"host {name!r} is refused by the URL policy (deny_hosts)")
        try:
            addr = ipaddress.ip_address(name)
        except ValueError:
            return
        self.check_address(addr, host=name)

    def check_address(self, addr: _Address, *, host: str) -> None:
        """Refuse an address that ``host`` is or resolved to."""
        if norm_host(host) in self._allow or str(addr) in self._allow:
            return
        for reached in _reached(addr):
            for net in self._deny_nets:
                if reached.version == net.version and reached in net:
                    self._refuse(host, reached, f"inside {net}, refused by deny_networks")
            if self.policy.deny_private and not reached.is_global:
                self._refuse(host, reached, "not public, refused by deny_private")

    def _refuse(self, host: str, addr: _Address, why: str) -> None:
        raise PolicyRefusedError(
            f"host {host!r} is the address {addr}, {why} in the URL policy; "
            "allow it with HttpPolicy(allow_hosts=...)"
        )

    def resolve(self, host: str, port: int) -> list[str]:
        """Resolve ``host`` and check every address; return them, all allowed
        (:class:`socket.gaierror` when the name does not resolve)."""
        self.check_host(host)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addrs = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for raw in addrs:
            self.check_address(ipaddress.ip_address(raw.split("%", 1)[0]), host=host)
        return addrs


class _MaskQueries(logging.Filter):
    """urllib3 logs every request line at DEBUG, query string included: mask the signed
    parts (presigned URLs, SAS tokens) as everywhere else mlstore shows a URL."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_url("http://h" + a)[8:] if isinstance(a, str) and "?" in a else a
                for a in record.args
            )
        return True


_MASK_QUERIES = _MaskQueries()


def guarded_pool_manager(guard: UrlGuard, config: StoreConfig) -> Any:
    import urllib3
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

    def guarded(base: Any) -> Any:
        class Guarded(base):  # type: ignore[misc]
            """Connects only to addresses the guard has checked, trying each in turn:
            ``_dns_host`` (what urllib3 connects to) is swapped for one checked address
            at a time; ``host`` (Host header, SNI, certificate name) stays the name."""

            _dns_host: str

            def _new_conn(self) -> Any:
                name = self._dns_host
                try:
                    addrs = guard.resolve(name, self.port)
                except socket.gaierror as exc:
                    raise NewConnectionError(self, "the host name did not resolve") from exc
                error: Exception | None = None
                for addr in addrs:
                    self._dns_host = addr
                    try:
                        return super()._new_conn()
                    except ConnectTimeoutError as exc:  # NewConnectionError included
                        error = exc
                    finally:
                        self._dns_host = name
                raise error or NewConnectionError(self, "the host name has no address")

        return Guarded

    class GuardedHTTPPool(HTTPConnectionPool):
        ConnectionCls = guarded(HTTPConnection)

    class GuardedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = guarded(HTTPSConnection)

    logging.getLogger("urllib3.connectionpool").addFilter(_MASK_QUERIES)  # idempotent
    retry = config.retry
    manager: Any = urllib3.PoolManager(
        num_pools=64,
        maxsize=max(10, config.max_workers),
        retries=False,  # the one retry layer is mlstore's, above the backend
        timeout=urllib3.Timeout(connect=retry.connect_timeout, read=retry.read_timeout),
    )
    manager.pool_classes_by_scheme = {"http": GuardedHTTPPool, "https": GuardedHTTPSPool}
    return manager
