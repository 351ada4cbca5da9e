"""The URL policy of the http(s) backend: :class:`HttpPolicy` and its default deny lists.

Kept apart from the backend so that the policy can be built, checked and pickled
without importing an HTTP client; the backend enforces it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlstore.config._fields import flag, nonneg, setting, strings, whole
from mlstore.config._sources import Resolved
from mlstore.errors import ConfigError

__all__ = ["DEFAULT_DENY_HOSTS", "DEFAULT_DENY_NETWORKS", "HttpPolicy"]

# Cloud metadata services and link-local ranges: the classic SSRF targets. Azure's
# WireServer (168.63.129.16) hands a VM its goal state and certificates without a token;
# the RFC 8215 local-use NAT64 prefix (64:ff9b:1::/48) can translate to any IPv4
# address, 169.254.169.254 included.
DEFAULT_DENY_NETWORKS = (
    "169.254.0.0/16",
    "fe80::/10",
    "fd00:ec2::254/128",
    "100.100.100.200/32",
    "168.63.129.16/32",
    "64:ff9b:1::/48",
)
DEFAULT_DENY_HOSTS = (
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "metadata.azure.com",
    "instance-data",
    "instance-data.ec2.internal",
)


def _networks(value: object, name: str) -> tuple[str, ...]:
    """A list of CIDR ranges, checked here so the error names where a bad one came from."""
    import ipaddress  # only a process that builds an HttpPolicy needs it

    out = strings(value, name)
    for net in out:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"{name} has {net!r}, which is not a CIDR range") from None
    return out


@dataclass(frozen=True)
class HttpPolicy(Resolved):
    """Which addresses the http(s) backend may reach.

    Hosts are checked by name, then every address they resolve to is checked, and the
    check is repeated on every redirect.

    Attributes:
        deny_networks: CIDR ranges never contacted (``MLSTORE_HTTP_DENY_NETWORKS``,
            comma separated). Default: link-local ranges, cloud metadata addresses,
            Azure's WireServer and the local-use NAT64 prefix.
        deny_hosts: host names never contacted (``MLSTORE_HTTP_DENY_HOSTS``). Default:
            the cloud metadata host names.
        deny_private: also refuse private, loopback and unique-local addresses
            (``MLSTORE_HTTP_DENY_PRIVATE``). Default ``False``.
        allow_hosts: host names or addresses allowed even when a rule above would
            refuse them (``MLSTORE_HTTP_ALLOW_HOSTS``). Default: none.
        max_redirects: redirects followed per request (``MLSTORE_HTTP_MAX_REDIRECTS``).
            Default 5.
    """

    deny_networks: tuple[str, ...] = setting(
        "MLSTORE_HTTP_DENY_NETWORKS", _networks, DEFAULT_DENY_NETWORKS
    )
    deny_hosts: tuple[str, ...] = setting("MLSTORE_HTTP_DENY_HOSTS", strings, DEFAULT_DENY_HOSTS)
    deny_private: bool = setting("MLSTORE_HTTP_DENY_PRIVATE", flag, False)
    allow_hosts: tuple[str, ...] = setting("MLSTORE_HTTP_ALLOW_HOSTS", strings, ())
    max_redirects: int = setting("MLSTORE_HTTP_MAX_REDIRECTS", nonneg(whole), 5)

    _section = "http"

    def __post_init__(self) -> None:
        self._resolve()
