"""Settings that differ by URL prefix: the shape both prefix tables share.

:attr:`CacheConfig.policies <mlstore.config.CacheConfig.policies>` and
:attr:`RetryPolicy.overrides <mlstore.config.RetryPolicy.overrides>` map keys naming
URL prefixes to small tables of field values, and both pick the longest prefix a URL
starts with. The checking of such a table and the longest-prefix rule are written once
here; which keys and fields are allowed is up to each class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

from mlstore.config._fields import Parser, refuse_unknown
from mlstore.errors import ConfigError

__all__ = ["longest_prefix", "prefix_tables"]


def prefix_tables(
    value: object,
    name: str,
    *,
    key_rule: str,
    key_ok: Callable[[str], bool],
    fields: Mapping[str, Parser[Any]],
    refused: Mapping[str, str] = MappingProxyType({}),
) -> dict[str, dict[str, Any]]:
    """Check a mapping of keys to non-empty tables of ``fields``.

    Args:
        value: the raw mapping.
        name: the label of the whole setting (field and source).
        key_rule: what a key must be, for the error message.
        key_ok: whether a (string) key is one.
        fields: the parser of each field a table may set.
        refused: fields that exist but may not be set in a table, and why not.

    Returns:
        A new dict of new dicts, every value parsed.
    """
    known = sorted(fields)
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{name} must be a dict from keys ({key_rule}) to dicts of {known}, "
            f"not {type(value).__name__}"
        )
    out: dict[str, dict[str, Any]] = {}
    for key, table in value.items():
        label = f"{name}[{key!r}]"
        if not isinstance(key, str) or not key_ok(key):
            raise ConfigError(f"{label}: a key must be {key_rule}")
        if not isinstance(table, Mapping) or not table:
            raise ConfigError(f"{label} must be a non-empty dict with keys from {known}")
        for field in table:
            if field in refused:
                raise ConfigError(f"{label}: {field!r} {refused[field]}")
        refuse_unknown(table, fields, label, "key")
        out[key] = {k: fields[k](v, f"{label}[{k!r}]") for k, v in table.items()}
    return out


def longest_prefix(url: str, prefixes: Iterable[str]) -> str | None:
    """The longest of ``prefixes`` that ``url`` starts with, or ``None``."""
    matches = [p for p in prefixes if url.startswith(p)]
    return max(matches, key=len) if matches else None
