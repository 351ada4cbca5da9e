"""mlstore: one URL API for ML data on any storage, with a tiered cache and one retry layer.

>>> import mlstore
>>> mlstore.write_bytes("memory://example/a.bin", b"abc")
>>> mlstore.read_bytes("memory://example/a.bin")
b'abc'

The module-level functions use a default :class:`Store` configured from ``MLSTORE_*``
environment variables and the ``MLSTORE_CONFIG`` file; build your own ``Store`` for
anything else.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any

from mlstore.backends.base import Backend, ObjectInfo, register_backend
from mlstore.cluster import node_key, node_share, plan
from mlstore.config import CacheConfig, HttpPolicy, RetryPolicy, StoreConfig
from mlstore.errors import (
    CheckpointBusyError,
    CheckpointError,
    ConfigError,
    ConnectionLostError,
    CorruptBodyError,
    IntegrityError,
    MlstoreError,
    NotFoundError,
    NotInManifestError,
    PermissionDeniedError,
    PreconditionFailedError,
    StorageTimeoutError,
    ThrottledError,
    TransientError,
    UnsupportedOperation,
)
from mlstore.manifest import Manifest, ManifestEntry
from mlstore.metrics import Stats
from mlstore.store import CopyResult, Store, SyncResult, default_store, set_default_store
from mlstore.url import URL, parse_url

if TYPE_CHECKING:
    from mlstore.fsspec import MLStoreFileSystem

__version__ = "0.1.0"

__all__ = [
    "URL",
    "Backend",
    "CacheConfig",
    "CheckpointBusyError",
    "CheckpointError",
    "ConfigError",
    "ConnectionLostError",
    "CopyResult",
    "CorruptBodyError",
    "HttpPolicy",
    "IntegrityError",
    "Manifest",
    "ManifestEntry",
    "MlstoreError",
    "NotFoundError",
    "NotInManifestError",
    "ObjectInfo",
    "PermissionDeniedError",
    "PreconditionFailedError",
    "RetryPolicy",
    "Stats",
    "StorageTimeoutError",
    "Store",
    "StoreConfig",
    "SyncResult",
    "ThrottledError",
    "TransientError",
    "UnsupportedOperation",
    "__version__",
    "copy",
    "default_store",
    "exists",
    "filesystem",
    "find",
    "glob",
    "info",
    "ls",
    "node_key",
    "node_share",
    "open",
    "parse_url",
    "plan",
    "read_bytes",
    "read_many",
    "register_backend",
    "rm",
    "set_default_store",
    "stats",
    "sync",
    "write_bytes",
]

_Url = str | os.PathLike[str] | URL


def read_bytes(url: _Url, start: int | None = None, end: int | None = None, **kw: Any) -> bytes:
    """Read ``url`` (or ``[start:end)`` of it) with the default Store."""
    return default_store().read_bytes(url, start, end, **kw)


def write_bytes(url: _Url, data: bytes | bytearray | memoryview) -> None:
    """Replace the object at ``url`` with ``data``, atomically, with the default Store."""
    default_store().write_bytes(url, data)


def open(url: _Url, mode: str = "rb", **kw: Any) -> IO[Any]:  # noqa: A001 - mirrors builtins.open
    """Open ``url`` as a file with the default Store (see :meth:`Store.open`)."""
    return default_store().open(url, mode, **kw)


def ls(url: _Url, detail: bool = False) -> list[Any]:
    """List ``url`` with the default Store."""
    return default_store().ls(url, detail)


def find(url: _Url, detail: bool = False) -> list[Any]:
    """Every file below ``url`` (URLs, or :class:`ObjectInfo` with ``detail``), with
    the default Store."""
    return default_store().find(url, detail)


def info(url: _Url) -> ObjectInfo:
    """Metadata of ``url`` with the default Store."""
    return default_store().info(url)


def exists(url: _Url) -> bool:
    """Whether ``url`` exists, with the default Store."""
    return default_store().exists(url)


def glob(pattern: _Url) -> list[str]:
    """URLs matching ``pattern``, with the default Store."""
    return default_store().glob(pattern)


def rm(url: _Url, recursive: bool = False) -> None:
    """Delete ``url`` with the default Store."""
    default_store().rm(url, recursive)


def copy(src: _Url, dst: _Url, **kw: Any) -> CopyResult:
    """Copy ``src`` to ``dst`` with the default Store."""
    return default_store().copy(src, dst, **kw)


def sync(src: _Url, dst: _Url, **kw: Any) -> SyncResult:
    """Make ``dst`` hold what ``src`` holds with the default Store (see :meth:`Store.sync`)."""
    return default_store().sync(src, dst, **kw)


def read_many(urls: Iterable[_Url], **kw: Any) -> list[bytes]:
    """Read many objects concurrently with the default Store."""
    return default_store().read_many(urls, **kw)


def stats(node: bool = False) -> Stats:
    """Counters of the default Store (with ``node=True``: the totals of every process
    that shares its cache directory)."""
    return default_store().stats(node=node)


def filesystem(protocol: str | None = None, **settings: Any) -> MLStoreFileSystem:
    """An fsspec filesystem that reads and writes through a :class:`Store` built from
    ``settings`` (the Store's keyword arguments), for libraries that take a filesystem
    object rather than a URL: ``ray.data.read_parquet(..., filesystem=...)``,
    ``pyarrow.dataset.dataset(..., filesystem=...)``.

    Such libraries often strip the scheme before they hand a path over
    (``s3://bucket/key`` becomes ``bucket/key``); ``protocol`` says which store those
    bare paths belong to (``"s3"``, ``"gs"``, ``"az"`` ...). Without it, bare paths name
    mounts (``mlstore://<mount>/<key>``). Full URLs work either way.

    The filesystem pickles (to Ray and Dask workers) without any credential among
    ``settings``: each copy finds its own in its environment, as any mlstore process does.
    """
    from mlstore.fsspec import MLStoreFileSystem

    return MLStoreFileSystem(target_protocol=protocol, **settings)
