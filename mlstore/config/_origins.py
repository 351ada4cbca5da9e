"""Where each setting in force came from: :func:`explain`.

``mlstore config`` and ``mlstore doctor`` show it. It reads the same sources, in the
same order, as :meth:`~mlstore.config._sources.Resolved._resolve`, so for a config built
from the environment and the file alone (what the command line builds) it names the
source each value was taken from. Option values are never returned, only their names:
they may be credentials.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from mlstore.config._fields import settings
from mlstore.config._sources import OPTION_ENV_VARS, _from_env, file_section, load_file
from mlstore.config._store import StoreConfig

__all__ = ["Origin", "explain"]

_SECTIONS = (
    ("cache", "cache"),
    ("retry", "retry"),
    ("http", "http"),
    ("cost", "cost"),
    ("", "store"),
)


@dataclass(frozen=True)
class Origin:
    """One setting in force: its dotted ``name``, its ``value`` (``None`` for a backend
    option, whose value is never shown) and its ``source``: ``"default"``,
    ``"environment variable MLSTORE_..."`` or ``"config file <path> [section]"``."""

    name: str
    value: Any
    source: str


def _file_label(section: str) -> str:
    return f"config file {os.environ.get('MLSTORE_CONFIG', '')} [{section}]"


def explain(config: StoreConfig) -> list[Origin]:
    """Every setting of ``config`` with where it came from, in a stable order: the
    cache, retry and http policies, the store's own settings, then mounts and the names
    of the backend options (values withheld)."""
    out: list[Origin] = []
    for attr, section in _SECTIONS:
        obj = getattr(config, attr) if attr else config
        table = file_section(section)
        for name, spec in settings(type(obj)):
            if spec.env and _from_env(spec.env) is not None:
                source = f"environment variable {spec.env}"
            elif name in table:
                source = _file_label(section)
            else:
                source = "default"
            out.append(Origin(f"{attr}.{name}" if attr else name, getattr(obj, name), source))
    file_mounts = load_file().get("mounts", {})
    for mount, urls in sorted(config.mounts.items()):
        source = _file_label("mounts") if mount in file_mounts else "argument"
        out.append(Origin(f"mounts.{mount}", urls, source))
    file_options = load_file().get("options", {})
    by_env = {opt: var for var, opt in OPTION_ENV_VARS.items() if _from_env(var) is not None}
    for protocol, opts in sorted(config.options.items()):
        for key in sorted(opts):
            if (protocol, key) in by_env:
                source = f"environment variable {by_env[protocol, key]}"
            elif key in file_options.get(protocol, {}):
                source = _file_label(f"options.{protocol}")
            else:
                source = "argument"
            out.append(Origin(f"options.{protocol}.{key}", None, source))
    return out
