"""The cache policy: :class:`CacheConfig`, and the per-prefix consistency table it holds.

Read by the tiered cache (memory and disk tiers, block caching, validation against the
store); nothing here knows how the cache works, only what it may be told.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from mlstore.config._fields import (
    GiB,
    MiB,
    choice,
    directory,
    flag,
    nonneg,
    positive,
    seconds,
    setting,
    size,
)
from mlstore.config._prefixes import longest_prefix, prefix_tables
from mlstore.config._sources import Resolved
from mlstore.errors import ConfigError

__all__ = ["CacheConfig"]

# Shared by the fields and by each prefix's entry in `policies`, so both accept the same.
_VALIDATE = choice("never", "ttl", "always")
_TTL = nonneg(seconds)

#: The subdirectory of the cache directory that holds one directory per tenant.
TENANTS_DIR = "tenants"
#: A tenant name: a Kubernetes namespace name (a DNS label), which is safe as a file name.
_TENANT_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
_TENANT_VARIABLES = ("MLSTORE_TENANT", "POD_NAMESPACE")


def tenant_name(tenancy: str) -> str | None:
    """This process's tenant under ``tenancy``: ``uid-<uid>``, ``ns-<namespace>``, or
    ``None`` for ``"none"`` (one cache tree, as without tenancy).

    Raises:
        ConfigError: ``"namespace"`` with neither variable set, or set to a value that
            is not a namespace name (the message names the variable).
    """
    if tenancy == "uid":
        if not hasattr(os, "getuid"):
            raise ConfigError("CacheConfig.tenancy 'uid' needs a POSIX system (it keys on the uid)")
        return f"uid-{os.getuid()}"
    if tenancy != "namespace":
        return None
    for variable in _TENANT_VARIABLES:
        value = os.environ.get(variable)
        if not value:
            continue
        if not _TENANT_NAME.fullmatch(value):
            raise ConfigError(
                f"{variable}={value[:80]!r} is not a tenant name: use lower-case letters, "
                "digits and '-', at most 63 characters, starting and ending with a letter "
                "or digit (a Kubernetes namespace name)"
            )
        return f"ns-{value}"
    raise ConfigError(
        "CacheConfig.tenancy is 'namespace' (MLSTORE_CACHE_TENANCY) but neither "
        "MLSTORE_TENANT nor POD_NAMESPACE is set: set MLSTORE_TENANT, or give the pod its "
        "namespace as POD_NAMESPACE through the downward API (fieldRef: metadata.namespace)"
    )


def _absolute_directory(value: object, name: str) -> str | None:
    """A directory as :func:`directory` reads it, made absolute against the working
    directory of the moment the config is resolved.

    A relative path left as it is would be re-read against whatever the working
    directory is later: a launcher that changes directory (Hydra does) would make reads
    fail, or open a second cache somewhere else.
    """
    path = directory(value, name)
    return None if path is None else os.path.abspath(path)


def _policies(value: object, name: str) -> dict[str, dict[str, Any]]:
    return prefix_tables(
        value,
        name,
        key_rule="a URL prefix such as 's3://bucket/'",
        key_ok=lambda key: "://" in key,
        fields={"validate": _VALIDATE, "ttl": _TTL},
    )


@dataclass(frozen=True)
class CacheConfig(Resolved):
    """How reads are cached.

    Attributes:
        enabled: cache reads at all (``MLSTORE_CACHE``). Default ``True``.
        memory_bytes: budget of the per-process memory tier (``MLSTORE_MEMORY_BYTES``).
            Default 512 MiB. ``0`` turns the memory tier off.
        disk_dir: directory of the node-wide disk tier (``MLSTORE_CACHE_DIR``).
            Default: ``$XDG_CACHE_HOME/mlstore`` or ``~/.cache/mlstore``. A relative
            path is made absolute once, against the working directory at the time the
            config is made, so a later ``os.chdir`` does not move the cache.
        disk_bytes: budget of the disk tier (``MLSTORE_DISK_BYTES``). Default 10 GiB.
            A hard limit: blobs plus fills in progress never exceed it; a fill that
            finds no room is skipped (``disk_skips``). ``0`` turns the disk tier off.
        disk_cap: what ``disk_bytes`` holds (``MLSTORE_DISK_CAP``): ``"blobs"`` (the
            default), the cached bytes and fills in progress; or ``"all"``, those plus
            every other file of the cache directory (the SQLite index with its WAL,
            the metadata tier, the node's stats), for a node cache on a volume that
            must never fill. The files' sizes count, not their rounding up to blocks.
        metadata_bytes: budget of the node-wide metadata tier, ``info``, ``exists``
            and ``ls`` answers shared by every process on the node in ``disk_dir/meta/``
            (``MLSTORE_METADATA_BYTES``). Default 64 MiB (some 150,000 answers). ``0``,
            or ``disk_bytes=0``, keeps metadata in each process only.
        block_size: block size for large objects (``MLSTORE_BLOCK_SIZE``). Default 8 MiB.
        block_threshold: objects larger than this are cached as blocks
            (``MLSTORE_BLOCK_THRESHOLD``). Default 64 MiB.
        validate: when a cached object is checked against the store: ``"never"``
            (immutable data), ``"ttl"`` (one HEAD after ``ttl`` seconds) or
            ``"always"`` (``MLSTORE_VALIDATE``). Default ``"ttl"``.
        ttl: seconds a cached object is trusted under ``validate="ttl"``
            (``MLSTORE_TTL``). Default 300.
        stale_while_revalidate: seconds past the ttl during which a cached copy is
            still served, at once, while one process on the node checks it with the
            store in the background (``MLSTORE_STALE_WHILE_REVALIDATE``). A copy older
            than ``ttl`` plus this is checked before it is served, as is every copy
            when this is ``0`` (the opt-out). Default 60: under ``validate="ttl"`` a
            copy may be up to ``ttl + 60`` seconds behind a change made by another
            tool (writes through mlstore on the node are seen at once, always).
        verify: re-hash disk-tier blobs on read: ``"always"`` or ``"never"``
            (``MLSTORE_VERIFY``). Default ``"always"``. With ``"never"`` fills are
            also fsync'ed, since no hash check would catch a file torn by a power loss.
        policies: consistency per URL prefix, overriding ``validate`` and ``ttl``:
            ``{"s3://datasets/imagenet/": {"validate": "never"}}``; the longest
            matching prefix wins (config file: ``[cache.policies."s3://..."]``).
            Default: none.
        write_through: a ``write_bytes`` through this Store also leaves a copy of what
            it wrote in the node's disk tier, keyed by the version the store named, so
            the next reader on the node (a pinned read, or a read after one HEAD) makes
            no GET (``MLSTORE_WRITE_THROUGH``). Default off: most written data (a
            checkpoint, an export) is not read back on the node that wrote it.
        tenancy: how processes of different users share ``disk_dir``
            (``MLSTORE_CACHE_TENANCY``). ``"none"`` (the default): one tree, private to
            its owner, as always. ``"uid"``: the disk tier (blobs, index, metadata, node
            stats) lives in ``disk_dir/tenants/uid-<uid>/``, 0700 and owned by that uid,
            so no tenant can read another's bytes; ``"namespace"``: the same, in
            ``tenants/ns-<name>/``, named by ``MLSTORE_TENANT`` or ``POD_NAMESPACE``.
            Under both, ``disk_bytes`` is the budget of the whole node, shared by its
            tenants (see :mod:`mlstore.cache.tenancy`).
    """

    enabled: bool = setting("MLSTORE_CACHE", flag, True)
    memory_bytes: int = setting("MLSTORE_MEMORY_BYTES", nonneg(size), 512 * MiB)
    disk_dir: str | None = setting("MLSTORE_CACHE_DIR", _absolute_directory, None)
    disk_bytes: int = setting("MLSTORE_DISK_BYTES", nonneg(size), 10 * GiB)
    disk_cap: str = setting("MLSTORE_DISK_CAP", choice("blobs", "all"), "blobs")
    metadata_bytes: int = setting("MLSTORE_METADATA_BYTES", nonneg(size), 64 * MiB)
    block_size: int = setting("MLSTORE_BLOCK_SIZE", positive(size), 8 * MiB)
    block_threshold: int = setting("MLSTORE_BLOCK_THRESHOLD", nonneg(size), 64 * MiB)
    validate: str = setting("MLSTORE_VALIDATE", _VALIDATE, "ttl")
    ttl: float = setting("MLSTORE_TTL", _TTL, 300.0)
    stale_while_revalidate: float = setting("MLSTORE_STALE_WHILE_REVALIDATE", _TTL, 60.0)
    write_through: bool = setting("MLSTORE_WRITE_THROUGH", flag, False)
    verify: str = setting("MLSTORE_VERIFY", choice("always", "never"), "always")
    policies: Mapping[str, Mapping[str, Any]] = setting(None, _policies, MappingProxyType({}))
    tenancy: str = setting("MLSTORE_CACHE_TENANCY", choice("none", "uid", "namespace"), "none")

    _section = "cache"

    def __post_init__(self) -> None:
        self._resolve()
        tenant_name(self.tenancy)  # a missing or bad tenant name fails here, not at first read

    def policy_for(self, url: str) -> tuple[str, float]:
        """``(validate, ttl)`` for ``url``: its longest matching prefix's, or the defaults."""
        best = longest_prefix(url, self.policies) if self.policies else None
        if best is None:
            return self.validate, self.ttl
        chosen = self.policies[best]
        return chosen.get("validate", self.validate), chosen.get("ttl", self.ttl)

    @property
    def resolved_disk_dir(self) -> str:
        """The disk tier's directory, with the platform default filled in: under a
        ``tenancy``, this process's tenant directory below :attr:`node_cache_dir`."""
        tenant = self.tenant
        return self.node_cache_dir if tenant is None else os.path.join(self.tenants_dir, tenant)

    @property
    def caps_all(self) -> bool:
        """Whether ``disk_bytes`` also holds the cache directory's index, metadata and
        stats files (``disk_cap="all"``)."""
        return self.disk_cap == "all"

    @property
    def tenant(self) -> str | None:
        """This process's tenant under ``tenancy`` (``uid-1001``, ``ns-team-a``), or
        ``None`` without one."""
        return tenant_name(self.tenancy)

    @property
    def tenants_dir(self) -> str:
        """The directory of the node's tenants, below :attr:`node_cache_dir`."""
        return os.path.join(self.node_cache_dir, TENANTS_DIR)

    @property
    def node_cache_dir(self) -> str:
        """``disk_dir`` with the platform default filled in: the directory every tenant
        of the node shares (the disk tier's own, without a ``tenancy``)."""
        if self.disk_dir:
            return self.disk_dir
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "mlstore")
