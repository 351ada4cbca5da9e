"""Where a setting comes from when no argument gives it: the environment, then the file.

- :func:`load_file` reads the TOML file named by ``MLSTORE_CONFIG`` (once per version
  of the file);
- :class:`Resolved` is the mixin every config class uses to fill each field left
  :data:`~mlstore.config._fields.UNSET` from its ``MLSTORE_*`` variable, then its key in
  the file's section, then its default, labelling the value with where it came from;
- :data:`OPTION_ENV_VARS` and :func:`env_options` are the variables that set one backend
  option, and :func:`env_table` lists every variable the config classes read.

The precedence between an explicit argument and a config object is the caller's
business (:class:`~mlstore.Store`); by the time a field reaches :meth:`Resolved._resolve`
it is either given or UNSET.
"""

from __future__ import annotations

import os
import sys
from typing import Any, ClassVar

from mlstore.config._fields import UNSET, refuse_unknown, settings
from mlstore.errors import ConfigError

__all__ = ["OPTION_ENV_VARS", "SECTIONS", "Resolved", "env_options", "env_table", "load_file"]

#: The tables a config file may have.
SECTIONS = ("cache", "cost", "http", "mounts", "options", "retry", "store")

#: Environment variables that set one backend option: variable -> (protocol, option).
OPTION_ENV_VARS: dict[str, tuple[str, str]] = {
    "MLSTORE_S3_ENDPOINT_URL": ("s3", "endpoint_url"),
    "MLSTORE_GCS_ENDPOINT_URL": ("gs", "endpoint_url"),
    "MLSTORE_AZURE_ENDPOINT_URL": ("az", "endpoint_url"),
}

# One entry: the file as last read. Every config object built reads the file, so it is
# parsed once and read again only when it changes.
_file_cache: dict[tuple[str, int, int, int], dict[str, Any]] = {}


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
        data = _read_toml(path, named_by)
        refuse_unknown(data, SECTIONS, f"config file {path!r}", "section")
        _file_cache.clear()
        _file_cache[key] = data
    return _file_cache[key]


def _read_toml(path: str, named_by: str) -> dict[str, Any]:
    # Imported here, not at the top: most processes have no config file, and
    # `import mlstore` should not pay for a TOML parser they never use.
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib

    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{named_by} {path!r}, which cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None


def file_section(section: str) -> dict[str, Any]:
    """The config file's ``[section]`` table (empty without a file or that table)."""
    value = load_file().get(section, {})
    if not isinstance(value, dict):
        raise ConfigError(f"config file section [{section}] must be a table")
    return value


def _from_env(env: str | None) -> str | None:
    # An empty variable counts as unset: `VAR= command` is how a shell clears one.
    return (os.environ.get(env) or None) if env else None


def env_options() -> dict[str, dict[str, Any]]:
    """Backend options set by :data:`OPTION_ENV_VARS`, by protocol."""
    out: dict[str, dict[str, Any]] = {}
    for env, (protocol, option) in OPTION_ENV_VARS.items():
        value = _from_env(env)
        if value is not None:
            out.setdefault(protocol, {})[option] = value
    return out


class Resolved:
    """Mixin of the config dataclasses: fill UNSET fields from environment, file, default.

    A subclass names its config file table in ``_section`` and declares its fields with
    :func:`~mlstore.config._fields.setting`; its ``__post_init__`` calls
    :meth:`_resolve`.
    """

    _section: ClassVar[str]

    def _resolve(self) -> None:
        table = file_section(self._section)
        specs = dict(settings(type(self)))
        refuse_unknown(table, specs, f"config file section [{self._section}]", "key")
        for name, spec in specs.items():
            value = getattr(self, name)
            label = f"{type(self).__name__}.{name}"
            if value is UNSET:
                env_value = _from_env(spec.env)
                if env_value is not None:
                    value, label = env_value, f"{label} (environment variable {spec.env})"
                elif name in table:
                    value = table[name]
                    label = f"{label} (config file section [{self._section}], key {name!r})"
                else:
                    value = spec.default
            # The dataclass is frozen to its users; it is filled in before they see it.
            object.__setattr__(self, name, spec.parse(value, label))


def env_table(*classes: type[Resolved]) -> dict[str, str]:
    """Every environment variable that ``classes`` read, and the field it feeds."""
    table: dict[str, str] = {
        "MLSTORE_CONFIG": "path of a TOML config file",
        "MLSTORE_NODE_ID": "mlstore.node_key()",  # not a setting: the node's name
        "MLSTORE_TENANT": "CacheConfig.tenancy",  # not a setting: the tenant's name
    }
    for var, (protocol, option) in OPTION_ENV_VARS.items():
        table[var] = f"StoreConfig.options[{protocol!r}][{option!r}]"
    for cls in classes:
        for name, spec in settings(cls):
            if spec.env:
                table[spec.env] = f"{cls.__name__}.{name}"
    return table
