"""The whole configuration of a Store: :class:`StoreConfig`, and :data:`ENV_VARS`.

It holds the three policies (cache, retry, http), the mounts and the backend options,
and the few settings of the Store itself. Mounts and options are merged key by key
over the config file (and, for options, over :data:`~mlstore.config.OPTION_ENV_VARS`)
rather than replacing them, so they have their own parsers here instead of a
:func:`~mlstore.config._fields.setting`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mlstore._util.redact import redact_options, redact_url
from mlstore.config._cache import CacheConfig
from mlstore.config._cost import CostConfig
from mlstore.config._fields import (
    MiB,
    choice,
    nonneg,
    optional,
    positive,
    refuse_unknown,
    seconds,
    setting,
    size,
    whole,
)
from mlstore.config._http import HttpPolicy
from mlstore.config._retry import RetryPolicy
from mlstore.config._sources import Resolved, env_options, env_table, load_file
from mlstore.errors import REDACTED, ConfigError
from mlstore.url import parse_url

__all__ = ["ENV_VARS", "StoreConfig"]

_MOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _mounts(value: object, name: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must map a mount name to a list of URLs, got {value!r}")
    out: dict[str, tuple[str, ...]] = {}
    for key, urls in value.items():
        if not isinstance(key, str) or not _MOUNT_NAME.fullmatch(key):
            raise ConfigError(
                f"{name}: mount name {key!r} must be letters, digits, '.', '_' or '-'"
            )
        if isinstance(urls, str):
            urls = [urls]
        if (
            not isinstance(urls, (list, tuple))
            or not urls
            or not all(isinstance(u, str) for u in urls)
        ):
            raise ConfigError(f"{name}[{key!r}] must be a non-empty list of URLs")
        for u in urls:
            try:
                target = parse_url(u)
            except ConfigError as exc:
                raise ConfigError(f"{name}[{key!r}]: {exc}") from None
            if target.protocol == "mlstore":
                raise ConfigError(
                    f"{name}[{key!r}] points at another mount ({u}); mounts must name "
                    "physical URLs such as s3://bucket/prefix"
                )
        out[key] = tuple(u.rstrip("/") for u in urls)
    return out


def _options(value: object, name: str) -> dict[str, dict[str, Any]]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Mapping) for k, v in value.items()
    ):
        raise ConfigError(
            f"{name} must map a protocol (e.g. 's3') to a dict of options, got a "
            f"{type(value).__name__}"
        )
    return {k: dict(v) for k, v in value.items()}


_TRANSPORTS = choice("fsspec", "obstore")


def _transport(value: object, name: str) -> str:
    """``"fsspec"`` or ``"obstore"``; obstore only when it is installed (looked up, not
    imported: ``import mlstore`` stays light)."""
    import importlib.util

    chosen = _TRANSPORTS(value, name)
    if chosen == "obstore":
        try:
            found = importlib.util.find_spec("obstore") is not None
        except (ImportError, ValueError):  # a blocked or half-removed package
            found = False
        if not found:
            raise ConfigError(
                f"{name} is 'obstore', but obstore is not installed; install it with: "
                "pip install 'mlstore[fast]'"
            )
    return chosen


#: The smallest part: S3 refuses a smaller one (except the last).
_MIN_PART = 5 * MiB
#: The largest part: Azure's largest block (S3 takes up to 5 GiB).
_MAX_PART = 4000 * MiB


def _part_size(value: object, name: str) -> int:
    """A size from 5 MiB (S3's smallest part) to 4000 MiB (Azure's largest block)."""
    out = size(value, name)
    if not _MIN_PART <= out <= _MAX_PART:
        raise ConfigError(
            f"{name} must be from 5MiB (the smallest part S3 accepts) to 4000MiB (the "
            f"largest block Azure accepts), got {value!r}"
        )
    return out


def _build(cls: type[Any], values: Mapping[str, Any], name: str) -> Any:
    """``cls(**values)``, refusing a misspelt field by name rather than with a TypeError."""
    refuse_unknown(values, [f.name for f in dataclasses.fields(cls)], name, "field")
    return cls(**values)


@dataclass(frozen=True)
class StoreConfig(Resolved):
    """Everything a :class:`~mlstore.Store` is built from.

    Attributes:
        cache: the cache policy.
        retry: the retry policy.
        http: the URL policy of the http(s) backend.
        cost: how requests and bytes are priced (:func:`mlstore.cost.estimate`).
        mounts: logical mount names to one or more physical URL prefixes (replicas),
            merged over the config file's ``[mounts]``.
        options: per-protocol backend options (``{"s3": {"endpoint_url": ...}}``),
            merged key by key over the variables of :data:`~mlstore.config.OPTION_ENV_VARS`
            (``MLSTORE_S3_ENDPOINT_URL`` and its GCS and Azure siblings), then the config
            file's ``[options.<protocol>]``.
        max_workers: threads used by ``read_many``, and objects a recursive ``copy``
            copies at once (``MLSTORE_MAX_WORKERS``). Default 32.
        replica_failures: consecutive transient failures after which a mount's
            replica is skipped for ``replica_cooldown`` seconds
            (``MLSTORE_REPLICA_FAILURES``). Default 3.
        replica_cooldown: seconds a failing replica is skipped
            (``MLSTORE_REPLICA_COOLDOWN``). Default 30.
        transport: how the s3, gs and az backends reach their service
            (``MLSTORE_TRANSPORT``): ``"fsspec"`` (s3fs, gcsfs, adlfs) or ``"obstore"``
            (object reads, heads and writes through obstore, ``pip install
            'mlstore[fast]'``; see :mod:`mlstore.backends._obstore`). It changes no
            cache key: both transports name the same objects. Default ``"fsspec"``.
        multipart_threshold: writes to s3, gs and az larger than this (and than one
            part) go up in parts, streamed: ``open(url, "wb")`` sends each part as it
            fills instead of holding the object in memory, and ``write_bytes`` sends
            slices of its buffer (``MLSTORE_MULTIPART_THRESHOLD``). Smaller writes are
            one request. Default 64 MiB.
        multipart_part_size: the size of each part, from 5 MiB to 4000 MiB
            (``MLSTORE_MULTIPART_PART_SIZE``). It doubles after every tenth of the
            store's part limit (1,000 parts on S3), so a stream of unknown length never
            runs out of parts. Default 16 MiB.
        multipart_concurrency: parts of one write sent at once
            (``MLSTORE_MULTIPART_CONCURRENCY``). A file open for writing holds about
            this many parts plus one. Default 4.
        dedupe_writes: a ``write_bytes`` of at least this many bytes first asks the
            store what the destination holds (one HEAD), and sends nothing when that is
            already the same content: the same size and the same mlstore content hash
            recorded in its metadata (``MLSTORE_DEDUPE_WRITES``; ``"off"`` never asks).
            Counted as ``dedupe_uploads_skipped`` and ``dedupe_bytes_skipped``.
            Default 8 MiB: below it the HEAD costs about what the upload would.
    """

    cache: CacheConfig = field(default_factory=CacheConfig)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    http: HttpPolicy = field(default_factory=HttpPolicy)
    cost: CostConfig = field(default_factory=CostConfig)
    mounts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    max_workers: int = setting("MLSTORE_MAX_WORKERS", positive(whole), 32)
    replica_failures: int = setting("MLSTORE_REPLICA_FAILURES", positive(whole), 3)
    replica_cooldown: float = setting("MLSTORE_REPLICA_COOLDOWN", nonneg(seconds), 30.0)
    transport: str = setting("MLSTORE_TRANSPORT", _transport, "fsspec")
    multipart_threshold: int = setting("MLSTORE_MULTIPART_THRESHOLD", positive(size), 64 * MiB)
    multipart_part_size: int = setting("MLSTORE_MULTIPART_PART_SIZE", _part_size, 16 * MiB)
    multipart_concurrency: int = setting("MLSTORE_MULTIPART_CONCURRENCY", positive(whole), 4)
    dedupe_writes: int | None = setting("MLSTORE_DEDUPE_WRITES", optional(nonneg(size)), 8 * MiB)

    _section = "store"

    def __post_init__(self) -> None:
        policies = (("cache", CacheConfig), ("retry", RetryPolicy), ("http", HttpPolicy))
        for name, cls in (*policies, ("cost", CostConfig)):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, _build(cls, value, f"StoreConfig.{name}"))
            elif not isinstance(value, cls):
                raise ConfigError(
                    f"StoreConfig.{name} must be a {cls.__name__} or a dict, "
                    f"got {type(value).__name__}"
                )
        file_mounts = _mounts(load_file().get("mounts", {}), "config file [mounts]")
        mounts = {**file_mounts, **_mounts(self.mounts, "StoreConfig.mounts")}
        object.__setattr__(self, "mounts", mounts)
        file_opts = _options(load_file().get("options", {}), "config file [options]")
        env_opts = env_options()
        given = _options(self.options, "StoreConfig.options")
        merged = {
            p: {**file_opts.get(p, {}), **env_opts.get(p, {}), **given.get(p, {})}
            for p in {*file_opts, *env_opts, *given}
        }
        object.__setattr__(self, "options", merged)
        self._resolve()

    def updated(self, **given: Any) -> StoreConfig:
        """This configuration with the fields in ``given`` replaced (``None`` values are
        ignored): ``mounts`` are added to this one's, and ``options`` are merged into
        this one's protocol by protocol, key by key."""
        changes = {name: value for name, value in given.items() if value is not None}
        if "mounts" in changes:
            added = {
                name: [prefixes] if isinstance(prefixes, str) else list(prefixes)
                for name, prefixes in changes["mounts"].items()
            }
            changes["mounts"] = {**self.mounts, **added}
        if "options" in changes:
            merged = {proto: dict(opts) for proto, opts in self.options.items()}
            for proto, opts in changes["options"].items():
                merged[proto] = {**merged.get(proto, {}), **opts}
            changes["options"] = merged
        return dataclasses.replace(self, **changes) if changes else self

    def _repr_html_(self) -> str:
        from mlstore.config._display import config_html  # it reads explain(), which imports us

        return config_html(self)

    def __repr__(self) -> str:
        # Options may hold credentials and mount URLs may be presigned: mask both.
        mounts = {k: tuple(redact_url(u) for u in v) for k, v in self.mounts.items()}
        return (
            f"StoreConfig(cache={self.cache!r}, retry={self.retry!r}, http={self.http!r}, "
            f"cost={self.cost!r}, mounts={mounts!r}, "
            f"options={redact_options(self.options, REDACTED)!r}, "
            f"max_workers={self.max_workers!r}, replica_failures={self.replica_failures!r}, "
            f"replica_cooldown={self.replica_cooldown!r}, transport={self.transport!r}, "
            f"multipart_threshold={self.multipart_threshold!r}, "
            f"multipart_part_size={self.multipart_part_size!r}, "
            f"multipart_concurrency={self.multipart_concurrency!r}, "
            f"dedupe_writes={self.dedupe_writes!r})"
        )


#: Every environment variable mlstore reads, and the setting it feeds.
ENV_VARS: dict[str, str] = env_table(CacheConfig, RetryPolicy, HttpPolicy, CostConfig, StoreConfig)
