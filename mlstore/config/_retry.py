"""The retry policy: :class:`RetryPolicy`, its hedging rule and its per-call overrides.

Read by the one retry layer (:mod:`mlstore.retry`) and by the backends, which set the
timeouts and hedging on their clients when they are built. That split is why only some
fields may be overridden per URL prefix or operation.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from mlstore.config._fields import nonneg, optional, positive, seconds, setting, settings, whole
from mlstore.config._prefixes import longest_prefix, prefix_tables
from mlstore.config._sources import Resolved
from mlstore.errors import ConfigError

__all__ = ["RetryPolicy"]

_OPERATIONS = ("read", "write")
_OPERATION_PREFIXES = tuple(f"{op}:" for op in _OPERATIONS)
#: Fields an override may change: the retry layer reads them on every call.
_PER_CALL = ("max_attempts", "deadline", "backoff_base", "backoff_max")
#: Fields fixed when a backend's client is built, so they cannot vary per call.
_PER_CLIENT = ("connect_timeout", "read_timeout", "hedge_after")
_PER_CLIENT_REASON = (
    "cannot differ per prefix or operation (it is set on each backend's client); "
    "set it on the RetryPolicy itself"
)

_HEDGE_SECONDS = positive(optional(seconds))


def _hedge(value: object, name: str) -> float | str | None:
    """Seconds, ``"p95"`` (a percentile of observed latency, p50-p99), or off."""
    if isinstance(value, str) and value.strip().lower().startswith("p"):
        text = value.strip().lower()
        if not re.fullmatch(r"p\d{2}", text) or not 50 <= int(text[1:]) <= 99:
            raise ConfigError(
                f"{name} must be seconds (0.5) or a latency percentile 'p50'..'p99' "
                f"(hedge after the p95 latency: 'p95'), got {value!r}"
            )
        return text
    return _HEDGE_SECONDS(value, name)


def _override_key(key: str) -> bool:
    if key in _OPERATIONS:
        return True
    prefix = key.partition(":")[2] if key.startswith(_OPERATION_PREFIXES) else key
    return "://" in prefix


def _overrides(value: object, name: str) -> dict[str, dict[str, Any]]:
    specs = dict(settings(RetryPolicy))
    return prefix_tables(
        value,
        name,
        key_rule="'read', 'write', a URL prefix such as 's3://bucket/', "
        "or 'read:'/'write:' and a prefix",
        key_ok=_override_key,
        fields={field: specs[field].parse for field in _PER_CALL},
        refused=dict.fromkeys(_PER_CLIENT, _PER_CLIENT_REASON),
    )


@dataclass(frozen=True)
class RetryPolicy(Resolved):
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

    max_attempts: int = setting("MLSTORE_MAX_ATTEMPTS", positive(whole), 5)
    deadline: float = setting("MLSTORE_DEADLINE", positive(seconds), 120.0)
    backoff_base: float = setting("MLSTORE_BACKOFF_BASE", nonneg(seconds), 0.2)
    backoff_max: float = setting("MLSTORE_BACKOFF_MAX", nonneg(seconds), 20.0)
    hedge_after: float | str | None = setting("MLSTORE_HEDGE_AFTER", _hedge, None)
    connect_timeout: float = setting("MLSTORE_CONNECT_TIMEOUT", positive(seconds), 10.0)
    read_timeout: float = setting("MLSTORE_READ_TIMEOUT", positive(seconds), 60.0)
    overrides: Mapping[str, Mapping[str, Any]] = setting(None, _overrides, MappingProxyType({}))

    _section = "retry"

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
        keys = self.overrides
        tagged = f"{operation}:"
        # A key is an operation ("write"), a bare prefix, or "operation:prefix".
        plain = [k for k in keys if k not in _OPERATIONS and not k.startswith(_OPERATION_PREFIXES)]
        bare = longest_prefix(url, plain)
        both = longest_prefix(url, [k[len(tagged) :] for k in keys if k.startswith(tagged)])
        return (
            *((operation,) if operation in keys else ()),
            *((bare,) if bare is not None else ()),
            *((tagged + both,) if both is not None else ()),
        )

    def resolved(self, keys: tuple[str, ...]) -> RetryPolicy:
        """This policy with the overrides ``keys`` applied in order."""
        changed: dict[str, Any] = {"overrides": {}}
        for key in keys:
            changed.update(self.overrides[key])
        return dataclasses.replace(self, **changed)
