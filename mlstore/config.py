"""Configuration: cache, retry and URL policies, and where their values come from.

Every setting resolves with one precedence, highest first:

1. an explicit argument (``CacheConfig(memory_bytes=...)``, ``Store(mounts=...)``);
2. a config object handed to the :class:`~mlstore.Store`;
3. an ``MLSTORE_*`` environment variable (see :data:`ENV_VARS`);
4. the TOML file named by ``MLSTORE_CONFIG``;
5. the default documented on the field.

A field left out of a constructor call is filled from steps 3-5 when the object is
created, so ``CacheConfig(memory_bytes=2**30)`` still honours ``MLSTORE_CACHE_DIR``.

Sizes accept integers or strings such as ``"512MiB"``, ``"10GB"``; durations are
seconds. An invalid value raises :class:`~mlstore.errors.ConfigError` naming the field
and where the value came from.

Example TOML file::

    [cache]
    memory_bytes = "1GiB"
    disk_dir = "/mnt/nvme/mlstore"

    [retry]
    max_attempts = 8

    [mounts]
    imagenet = ["s3://bucket-a/imagenet", "gs://bucket-b/imagenet"]

    [options.s3]
    endpoint_url = "http://127.0.0.1:9000"
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar

from mlstore._util.redact import redact_options, redact_url
from mlstore.errors import REDACTED, ConfigError
from mlstore.url import parse_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "ENV_VARS",
    "CacheConfig",
    "HttpPolicy",
    "RetryPolicy",
    "StoreConfig",
    "load_file",
    "parse_size",
    "redact_options",
]


class _Unset:
    """Marker for a constructor argument that was not given."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)b?\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(value: object, *, name: str = "size") -> int:
    """Turn ``1024``, ``"64KiB"``, ``"1.5GB"`` or ``"10G"`` into a number of bytes.

    ``KiB``/``K`` style units are powers of 1024; ``KB`` style units powers of 1000.

    >>> parse_size("64KiB"), parse_size("1GB"), parse_size(5)
    (65536, 1000000000, 5)
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a size in bytes, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            number, unit, binary = m.groups()
            unit = unit.lower()
            # "10G" and "10GiB" are binary; "10GB" is decimal.
            base = 1024 if (binary or (unit and not value.strip().lower().endswith("b"))) else 1000
            return int(Fraction(number) * base ** _POWERS[unit])
    raise ConfigError(f"{name} must be a size such as 1048576, '512MiB' or '10GB', got {value!r}")


def _parse_float(value: object, name: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}")
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}") from None
    if math.isnan(out):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}")
    return out


def _parse_int(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    try:
        as_float = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a whole number, got {value!r}") from None
    if not as_float.is_integer():
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    return int(as_float)


def _parse_optional_float(value: object, name: str) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    return _parse_float(value, name)


def _parse_hedge(value: object, name: str) -> float | str | None:
    """Seconds, ``"p95"`` (a percentile of observed latency, p50-p99), or off."""
    if isinstance(value, str) and value.strip().lower().startswith("p"):
        text = value.strip().lower()
        if not re.fullmatch(r"p\d{2}", text) or not 50 <= int(text[1:]) <= 99:
            raise ConfigError(
                f"{name} must be seconds (0.5) or a latency percentile 'p50'..'p99' "
                f"(hedge after the p95 latency: 'p95'), got {value!r}"
            )
        return text
    out = _parse_optional_float(value, name)
    if out is not None and out <= 0:
        raise ConfigError(f"{name} must be greater than zero, got {value!r}")
    return out


def _parse_str_tuple(value: object, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{name} must be a list of strings, got {value!r}")


def _parse_optional_path(value: object, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        return os.path.expanduser(value) if value else None
    raise ConfigError(f"{name} must be a directory path, got {value!r}")


def _parse_bool(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


# --------------------------------------------------------------------------- file

_file_cache: dict[tuple[str, int, int, int], dict[str, Any]] = {}
_SECTIONS = ("cache", "http", "mounts", "options", "retry", "store")


def load_file(path: str | None = None) -> dict[str, Any]:
    """Read the TOML config file (``MLSTORE_CONFIG`` unless ``path`` is given).

    Returns an empty dict when no file is configured. A missing or malformed file is a
    :class:`ConfigError`: a setting the user asked for is never silently ignored.
    """
    named_by = "config file" if path is not None else "MLSTORE_CONFIG names"
    path = path if path is not None else os.environ.get("MLSTORE_CONFIG")
    if not path:
        return {}
    path = os.path.expanduser(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{named_by} {path!r}, which cannot be read ({exc.strerror})") from None
    # mtime alone can miss a rewrite within the file system's timestamp granularity.
    key = (path, st.st_mtime_ns, st.st_size, st.st_ino)
    if key not in _file_cache:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(
                f"{named_by} {path!r}, which cannot be read ({exc.strerror})"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
        unknown = sorted(set(data) - set(_SECTIONS))
        if unknown:
            raise ConfigError(
                f"config file {path!r} has unknown section(s) {unknown}; "
                f"known sections are {list(_SECTIONS)}"
            )
        _file_cache.clear()
        _file_cache[key] = data
    return _file_cache[key]


def _file_section(section: str) -> dict[str, Any]:
    value = load_file().get(section, {})
    if not isinstance(value, dict):
        raise ConfigError(f"config file section [{section}] must be a table")
    return value


# ------------------------------------------------------------------ field sourcing


class _Resolved:
    """Mixin: fill UNSET fields from environment, then file, then default."""

    _section: ClassVar[str]
    # field name -> (env variable, parser, default)
    _sources: ClassVar[dict[str, tuple[str | None, Any, Any]]]

    def _resolve(self) -> None:
        section = _file_section(self._section)
        unknown = sorted(set(section) - set(self._sources))
        if unknown:
            raise ConfigError(
                f"config file section [{self._section}] has unknown key(s) {unknown}; "
                f"known keys are {sorted(self._sources)}"
            )
        for name, (env, parser, default) in self._sources.items():
            value = getattr(self, name)
            label = f"{type(self).__name__}.{name}"
            if value is UNSET:
                if env and os.environ.get(env, "") != "":
                    value, label = os.environ[env], f"{label} (environment variable {env})"
                elif name in section:
                    value = section[name]
                    label = f"{label} (config file section [{self._section}], key {name!r})"
                else:
                    value = default() if callable(default) else default
            object.__setattr__(self, name, parser(value, label))


def _policies(value: object, name: str) -> dict[str, dict[str, Any]]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must map URL prefixes to {{'validate': ..., 'ttl': ...}}")
    out: dict[str, dict[str, Any]] = {}
    for prefix, policy in value.items():
        label = f"{name}[{prefix!r}]"
        if not isinstance(prefix, str) or "://" not in prefix:
            raise ConfigError(f"{label}: a policy prefix must be a URL such as 's3://bucket/'")
        if not isinstance(policy, Mapping) or not policy:
            raise ConfigError(f"{label} must be a dict with 'validate' and/or 'ttl'")
        unknown = sorted(set(policy) - {"validate", "ttl"})
        if unknown:
            raise ConfigError(f"{label} has unknown key(s) {unknown}; known: ['ttl', 'validate']")
        entry: dict[str, Any] = {}
        if "validate" in policy:
            entry["validate"] = _choice("never", "ttl", "always")(
                policy["validate"], f"{label}['validate']"
            )
        if "ttl" in policy:
            entry["ttl"] = _nonneg(_parse_float)(policy["ttl"], f"{label}['ttl']")
        out[prefix] = entry
    return out


#: RetryPolicy fields an override may change, and those fixed per backend client.
_PER_CALL = ("max_attempts", "deadline", "backoff_base", "backoff_max")
_CLIENT_WIDE = ("connect_timeout", "read_timeout", "hedge_after")


def _retry_overrides(value: object, name: str) -> dict[str, dict[str, Any]]:
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{name} must map 'read', 'write', URL prefixes or 'write:<prefix>' to "
            "dicts of RetryPolicy fields"
        )
    out: dict[str, dict[str, Any]] = {}
    for key, fields in value.items():
        label = f"{name}[{key!r}]"
        prefix = key.partition(":")[2] if str(key).startswith(("read:", "write:")) else key
        if not isinstance(key, str) or (key not in ("read", "write") and "://" not in prefix):
            raise ConfigError(
                f"{label}: a key is 'read', 'write', a URL prefix such as 's3://bucket/', "
                "or 'read:'/'write:' and a prefix"
            )
        if not isinstance(fields, Mapping) or not fields:
            raise ConfigError(f"{label} must be a non-empty dict of RetryPolicy fields")
        entry: dict[str, Any] = {}
        for field_name, raw in fields.items():
            source = RetryPolicy._sources.get(field_name)
            if field_name in _CLIENT_WIDE:
                raise ConfigError(
                    f"{label}: {field_name!r} cannot differ per prefix or operation (it is "
                    "set on each backend's client); set it on the RetryPolicy itself"
                )
            if source is None or field_name == "overrides":
                known = sorted(_PER_CALL)
                raise ConfigError(f"{label} has unknown field {field_name!r}; known: {known}")
            entry[field_name] = source[1](raw, f"{label}[{field_name!r}]")
        out[key] = entry
    return out


def _choice(*choices: str) -> Any:
    def parse(value: object, name: str) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
        return value.lower()

    return parse


def _nonneg(parser: Any) -> Any:
    def parse(value: object, name: str) -> Any:
        out = parser(value, name)
        if out is not None and out < 0:
            raise ConfigError(f"{name} must not be negative, got {value!r}")
        return out

    return parse


def _positive(parser: Any) -> Any:
    def parse(value: object, name: str) -> Any:
        out = parser(value, name)
        if out is not None and out <= 0:
            raise ConfigError(f"{name} must be greater than zero, got {value!r}")
        return out

    return parse


def _size(value: object, name: str) -> int:
    return parse_size(value, name=name)


MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass(frozen=True)
class CacheConfig(_Resolved):
    """How reads are cached.

    Attributes:
        enabled: cache reads at all (``MLSTORE_CACHE``). Default ``True``.
        memory_bytes: budget of the per-process memory tier (``MLSTORE_MEMORY_BYTES``).
            Default 512 MiB. ``0`` turns the memory tier off.
        disk_dir: directory of the node-wide disk tier (``MLSTORE_CACHE_DIR``).
            Default: ``$XDG_CACHE_HOME/mlstore`` or ``~/.cache/mlstore``.
        disk_bytes: budget of the disk tier (``MLSTORE_DISK_BYTES``). Default 10 GiB.
            ``0`` turns the disk tier off.
        block_size: block size for large objects (``MLSTORE_BLOCK_SIZE``). Default 8 MiB.
        block_threshold: objects larger than this are cached as blocks
            (``MLSTORE_BLOCK_THRESHOLD``). Default 64 MiB.
        validate: when a cached object is checked against the store: ``"never"``
            (immutable data), ``"ttl"`` (one HEAD after ``ttl`` seconds) or
            ``"always"`` (``MLSTORE_VALIDATE``). Default ``"ttl"``.
        ttl: seconds a cached object is trusted under ``validate="ttl"``
            (``MLSTORE_TTL``). Default 300.
        verify: re-hash disk-tier blobs on read: ``"always"`` or ``"never"``
            (``MLSTORE_VERIFY``). Default ``"always"``. With ``"never"`` fills are
            also fsync'ed, since no hash check would catch a file torn by a power loss.
        policies: consistency per URL prefix, overriding ``validate`` and ``ttl``:
            ``{"s3://datasets/imagenet/": {"validate": "never"}}``; the longest
            matching prefix wins (config file: ``[cache.policies."s3://..."]``).
            Default: none.
    """

    enabled: bool = UNSET
    memory_bytes: int = UNSET
    disk_dir: str | None = UNSET
    disk_bytes: int = UNSET
    block_size: int = UNSET
    block_threshold: int = UNSET
    validate: str = UNSET
    ttl: float = UNSET
    verify: str = UNSET
    policies: Mapping[str, Mapping[str, Any]] = UNSET

    _section: ClassVar[str] = "cache"
    _sources: ClassVar[dict[str, tuple[str | None, Any, Any]]] = {
        "enabled": ("MLSTORE_CACHE", _parse_bool, True),
        "memory_bytes": ("MLSTORE_MEMORY_BYTES", _nonneg(_size), 512 * MiB),
        "disk_dir": ("MLSTORE_CACHE_DIR", _parse_optional_path, None),
        "disk_bytes": ("MLSTORE_DISK_BYTES", _nonneg(_size), 10 * GiB),
        "block_size": ("MLSTORE_BLOCK_SIZE", _positive(_size), 8 * MiB),
        "block_threshold": ("MLSTORE_BLOCK_THRESHOLD", _nonneg(_size), 64 * MiB),
        "validate": ("MLSTORE_VALIDATE", _choice("never", "ttl", "always"), "ttl"),
        "ttl": ("MLSTORE_TTL", _nonneg(_parse_float), 300.0),
        "verify": ("MLSTORE_VERIFY", _choice("always", "never"), "always"),
        "policies": (None, lambda value, name: _policies(value, name), dict),
    }

    def __post_init__(self) -> None:
        self._resolve()

    def policy_for(self, url: str) -> tuple[str, float]:
        """``(validate, ttl)`` for ``url``: its longest matching prefix's, or the defaults."""
        best = ""
        for prefix in self.policies:
            if url.startswith(prefix) and len(prefix) > len(best):
                best = prefix
        if not best:
            return self.validate, self.ttl
        chosen = self.policies[best]
        return chosen.get("validate", self.validate), chosen.get("ttl", self.ttl)

    @property
    def resolved_disk_dir(self) -> str:
        """The disk tier's directory, with the platform default filled in."""
        if self.disk_dir:
            return self.disk_dir
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "mlstore")


@dataclass(frozen=True)
class RetryPolicy(_Resolved):
    """How failed requests are retried (the one retry layer).

    Attributes:
        max_attempts: attempts in all, the first included (``MLSTORE_MAX_ATTEMPTS``).
            Default 5.
        deadline: seconds after which no new attempt starts (``MLSTORE_DEADLINE``).
            Default 120.
        backoff_base: first backoff ceiling in seconds; full jitter draws the delay
            uniformly below ``min(backoff_max, backoff_base * 2**n)``
            (``MLSTORE_BACKOFF_BASE``). Default 0.2.
        backoff_max: largest backoff ceiling in seconds (``MLSTORE_BACKOFF_MAX``).
            Default 20.
        hedge_after: when a second copy of a slow read is sent: after this many
            seconds, or ``"p95"`` (``"p50"``..``"p99"``) of the latencies observed so
            far; ``None`` for no hedging (``MLSTORE_HEDGE_AFTER``). The first answer
            wins and the other request is cancelled; hedges are capped at 5% of reads.
            S3 reads only for now. Default ``None``.
        connect_timeout: seconds to establish a connection
            (``MLSTORE_CONNECT_TIMEOUT``). Default 10.
        read_timeout: seconds without a byte before a read is abandoned
            (``MLSTORE_READ_TIMEOUT``): the stall detector. Default 60.
        overrides: other values of ``max_attempts``, ``deadline``, ``backoff_base`` and
            ``backoff_max`` for some calls (the timeouts and hedging are set per
            client, so they cannot differ), by key: ``"read"`` or
            ``"write"`` (every read or write), a URL prefix (``"s3://ckpt/"``), or both
            (``"write:s3://ckpt/"``). The most specific match wins: an operation alone,
            then the longest prefix, then operation and prefix. Config file: a
            ``[retry.overrides."write:s3://ckpt/"]`` table. Default: none.

    Example::

        RetryPolicy(max_attempts=5, overrides={
            "write": {"max_attempts": 3},                 # fail writes sooner
            "s3://hot-bucket/": {"deadline": 600},        # wait out a scaling prefix
            "write:gs://checkpoints/": {"max_attempts": 10},
        })
    """

    max_attempts: int = UNSET
    deadline: float = UNSET
    backoff_base: float = UNSET
    backoff_max: float = UNSET
    hedge_after: float | str | None = UNSET
    connect_timeout: float = UNSET
    read_timeout: float = UNSET
    overrides: Mapping[str, Mapping[str, Any]] = UNSET

    _section: ClassVar[str] = "retry"
    _sources: ClassVar[dict[str, tuple[str | None, Any, Any]]] = {
        "max_attempts": ("MLSTORE_MAX_ATTEMPTS", _positive(_parse_int), 5),
        "deadline": ("MLSTORE_DEADLINE", _positive(_parse_float), 120.0),
        "backoff_base": ("MLSTORE_BACKOFF_BASE", _nonneg(_parse_float), 0.2),
        "backoff_max": ("MLSTORE_BACKOFF_MAX", _nonneg(_parse_float), 20.0),
        "hedge_after": ("MLSTORE_HEDGE_AFTER", _parse_hedge, None),
        "connect_timeout": ("MLSTORE_CONNECT_TIMEOUT", _positive(_parse_float), 10.0),
        "read_timeout": ("MLSTORE_READ_TIMEOUT", _positive(_parse_float), 60.0),
        "overrides": (None, lambda value, name: _retry_overrides(value, name), dict),
    }

    def __post_init__(self) -> None:
        self._resolve()
        if self.backoff_max < self.backoff_base:
            raise ConfigError(
                f"RetryPolicy.backoff_max ({self.backoff_max}) must not be smaller "
                f"than backoff_base ({self.backoff_base})"
            )

    def matching(self, url: str, operation: str) -> tuple[str, ...]:
        """The override keys that apply to ``operation`` (``"read"``/``"write"``) on
        ``url``, least specific first (empty: this policy as it is)."""
        if not self.overrides:
            return ()
        by_prefix: tuple[int, str] = (-1, "")
        by_both: tuple[int, str] = (-1, "")
        for key in self.overrides:
            if key in ("read", "write"):
                continue
            op, _, prefix = key.partition(":")
            if op not in ("read", "write"):  # a bare URL prefix ("s3://...")
                op, prefix = "", key
            if not url.startswith(prefix):
                continue
            if not op and len(prefix) > by_prefix[0]:
                by_prefix = (len(prefix), key)
            elif op == operation and len(prefix) > by_both[0]:
                by_both = (len(prefix), key)
        chosen = [operation] if operation in self.overrides else []
        return (*chosen, *(k for _, k in (by_prefix, by_both) if k))

    def resolved(self, keys: tuple[str, ...]) -> RetryPolicy:
        """This policy with the overrides ``keys`` applied in order."""
        values: dict[str, Any] = {
            name: getattr(self, name) for name in self._sources if name != "overrides"
        }
        for key in keys:
            values.update(self.overrides[key])
        return RetryPolicy(**values, overrides={})


# Cloud metadata services and link-local ranges: the classic SSRF targets.
DEFAULT_DENY_NETWORKS = (
    "169.254.0.0/16",
    "fe80::/10",
    "fd00:ec2::254/128",
    "100.100.100.200/32",
)
DEFAULT_DENY_HOSTS = (
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "metadata.azure.com",
    "instance-data",
    "instance-data.ec2.internal",
)


@dataclass(frozen=True)
class HttpPolicy(_Resolved):
    """Which addresses the http(s) backend may reach.

    Hosts are checked by name, then every address they resolve to is checked, and the
    check is repeated on every redirect.

    Attributes:
        deny_networks: CIDR ranges never contacted (``MLSTORE_HTTP_DENY_NETWORKS``,
            comma separated). Default: link-local ranges and cloud metadata addresses.
        deny_hosts: host names never contacted (``MLSTORE_HTTP_DENY_HOSTS``). Default:
            the cloud metadata host names.
        deny_private: also refuse private, loopback and unique-local addresses
            (``MLSTORE_HTTP_DENY_PRIVATE``). Default ``False``.
        allow_hosts: host names or addresses allowed even when a rule above would
            refuse them (``MLSTORE_HTTP_ALLOW_HOSTS``). Default: none.
        max_redirects: redirects followed per request (``MLSTORE_HTTP_MAX_REDIRECTS``).
            Default 5.
    """

    deny_networks: tuple[str, ...] = UNSET
    deny_hosts: tuple[str, ...] = UNSET
    deny_private: bool = UNSET
    allow_hosts: tuple[str, ...] = UNSET
    max_redirects: int = UNSET

    _section: ClassVar[str] = "http"
    _sources: ClassVar[dict[str, tuple[str | None, Any, Any]]] = {
        "deny_networks": ("MLSTORE_HTTP_DENY_NETWORKS", _parse_str_tuple, DEFAULT_DENY_NETWORKS),
        "deny_hosts": ("MLSTORE_HTTP_DENY_HOSTS", _parse_str_tuple, DEFAULT_DENY_HOSTS),
        "deny_private": ("MLSTORE_HTTP_DENY_PRIVATE", _parse_bool, False),
        "allow_hosts": ("MLSTORE_HTTP_ALLOW_HOSTS", _parse_str_tuple, ()),
        "max_redirects": ("MLSTORE_HTTP_MAX_REDIRECTS", _nonneg(_parse_int), 5),
    }

    def __post_init__(self) -> None:
        self._resolve()
        import ipaddress

        for net in self.deny_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(
                    f"HttpPolicy.deny_networks has {net!r}, which is not a CIDR range"
                ) from None


def _mounts(value: object, name: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must map a mount name to a list of URLs, got {value!r}")
    out: dict[str, tuple[str, ...]] = {}
    for key, urls in value.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", key):
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


@dataclass(frozen=True)
class StoreConfig(_Resolved):
    """Everything a :class:`~mlstore.Store` is built from.

    Attributes:
        cache: the cache policy.
        retry: the retry policy.
        http: the URL policy of the http(s) backend.
        mounts: logical mount names to one or more physical URL prefixes (replicas),
            merged over the config file's ``[mounts]``.
        options: per-protocol backend options (``{"s3": {"endpoint_url": ...}}``),
            merged key by key over the variables of :data:`OPTION_ENV_VARS`
            (``MLSTORE_S3_ENDPOINT_URL`` and its GCS and Azure siblings), then the config
            file's ``[options.<protocol>]``.
        max_workers: threads used by ``read_many`` (``MLSTORE_MAX_WORKERS``).
            Default 32.
        replica_failures: consecutive transient failures after which a mount's
            replica is skipped for ``replica_cooldown`` seconds
            (``MLSTORE_REPLICA_FAILURES``). Default 3.
        replica_cooldown: seconds a failing replica is skipped
            (``MLSTORE_REPLICA_COOLDOWN``). Default 30.
    """

    cache: CacheConfig = field(default_factory=CacheConfig)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    http: HttpPolicy = field(default_factory=HttpPolicy)
    mounts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    max_workers: int = UNSET
    replica_failures: int = UNSET
    replica_cooldown: float = UNSET

    _section: ClassVar[str] = "store"
    _sources: ClassVar[dict[str, tuple[str | None, Any, Any]]] = {
        "max_workers": ("MLSTORE_MAX_WORKERS", _positive(_parse_int), 32),
        "replica_failures": ("MLSTORE_REPLICA_FAILURES", _positive(_parse_int), 3),
        "replica_cooldown": ("MLSTORE_REPLICA_COOLDOWN", _nonneg(_parse_float), 30.0),
    }

    def __post_init__(self) -> None:
        for name, cls in (("cache", CacheConfig), ("retry", RetryPolicy), ("http", HttpPolicy)):
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
        env_opts: dict[str, dict[str, Any]] = {}
        for env, (protocol, option) in OPTION_ENV_VARS.items():
            if os.environ.get(env, ""):
                env_opts.setdefault(protocol, {})[option] = os.environ[env]
        given = _options(self.options, "StoreConfig.options")
        merged = {
            p: {**file_opts.get(p, {}), **env_opts.get(p, {}), **given.get(p, {})}
            for p in {*file_opts, *env_opts, *given}
        }
        object.__setattr__(self, "options", merged)
        self._resolve()

    def __repr__(self) -> str:
        # Options may hold credentials and mount URLs may be presigned: mask both.
        mounts = {k: tuple(redact_url(u) for u in v) for k, v in self.mounts.items()}
        return (
            f"StoreConfig(cache={self.cache!r}, retry={self.retry!r}, http={self.http!r}, "
            f"mounts={mounts!r}, options={redact_options(self.options, REDACTED)!r}, "
            f"max_workers={self.max_workers!r}, replica_failures={self.replica_failures!r}, "
            f"replica_cooldown={self.replica_cooldown!r})"
        )


def _build(cls: type[Any], values: Mapping[str, Any], name: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{name} has unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


#: Environment variables that set one backend option: variable -> (protocol, option).
OPTION_ENV_VARS: dict[str, tuple[str, str]] = {
    "MLSTORE_S3_ENDPOINT_URL": ("s3", "endpoint_url"),
    "MLSTORE_GCS_ENDPOINT_URL": ("gs", "endpoint_url"),
    "MLSTORE_AZURE_ENDPOINT_URL": ("az", "endpoint_url"),
}


def _env_table() -> dict[str, str]:
    table: dict[str, str] = {"MLSTORE_CONFIG": "path of a TOML config file"}
    for var, (protocol, option) in OPTION_ENV_VARS.items():
        table[var] = f"StoreConfig.options[{protocol!r}][{option!r}]"
    for cls in (CacheConfig, RetryPolicy, HttpPolicy, StoreConfig):
        for name, (env, _parser, _default) in cls._sources.items():
            if env:
                table[env] = f"{cls.__name__}.{name}"
    return table


#: Every environment variable mlstore reads, and the setting it feeds.
ENV_VARS: dict[str, str] = _env_table()
