"""A :class:`~mlstore.config.StoreConfig` as a notebook table: every setting, its value
and where it came from (:func:`~mlstore.config.explain`).

Backend options whose names are a credential's show as ``***``, and mount URLs go
through :func:`~mlstore._util.redact.redact_url`. Sizes are shown in KiB/MiB/GiB.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from mlstore._util.html import Markup, human_size, table
from mlstore._util.redact import MASK, SECRET_OPTION, redact_options, redact_url
from mlstore.config._fields import settings

if TYPE_CHECKING:
    from mlstore.config._store import StoreConfig

__all__ = ["config_html", "config_rows"]

_SIZE_SUFFIXES = ("_bytes", "_size", "_threshold")


def _defaults(config: StoreConfig) -> dict[str, object]:
    """Dotted setting name to its default value (parsed, as a field holds it)."""
    out: dict[str, object] = {}
    for attr in ("cache", "retry", "http", "cost", ""):
        obj = getattr(config, attr) if attr else config
        for name, spec in settings(type(obj)):
            try:
                out[f"{attr}.{name}" if attr else name] = spec.parse(spec.default, name)
            except ValueError:  # a default that depends on the machine (obstore missing)
                continue
    return out


def _show(name: str, value: object) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int) and name.endswith(_SIZE_SUFFIXES):
        return human_size(value)
    if name.startswith("mounts.") and isinstance(value, (tuple, list)):
        return ", ".join(redact_url(str(u)) for u in value)
    if isinstance(value, (tuple, list)):
        return ", ".join(str(v) for v in value) or "(none)"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "(none)"
    return str(value)


def _option(key: str, value: object) -> str:
    """An option's value, or the mask when its name (or a nested name) is a credential's."""
    if SECRET_OPTION.search(key):
        return MASK
    if isinstance(value, Mapping):
        return str(redact_options(value, MASK))
    return redact_url(value) if isinstance(value, str) else str(value)


def config_rows(config: StoreConfig) -> Iterator[tuple[str, str, str]]:
    """``(setting, value, source)`` for every setting of ``config``, values made
    readable; option values that look like credentials are masked."""
    from mlstore.config._origins import explain  # it imports the StoreConfig module

    defaults = _defaults(config)
    for origin in explain(config):
        source = origin.source
        # explain() knows the environment and the file; a value that is neither theirs
        # nor the default was given in code.
        if source == "default" and defaults.get(origin.name, origin.value) != origin.value:
            source = "argument"
        if origin.name.startswith("options."):
            _, protocol, key = origin.name.split(".", 2)
            yield origin.name, _option(key, config.options[protocol][key]), source
        elif origin.name == "cache.disk_dir" and origin.value is None:
            yield origin.name, f"{config.cache.resolved_disk_dir} (the default)", source
        else:
            yield origin.name, _show(origin.name, origin.value), source


def config_html(config: StoreConfig) -> Markup:
    """The notebook table of ``config``."""
    return table(
        ([name, value, source] for name, value, source in config_rows(config)),
        header=["setting", "value", "source"],
        caption="StoreConfig",
    )
