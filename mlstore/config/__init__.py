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

The package is split by concern: ``_fields`` (what a setting is, the value parsers),
``_sources`` (environment and config file), ``_prefixes`` (per-URL-prefix tables), one
module per config class (``_cache``, ``_retry``, ``_http``, ``_cost``, ``_store``). Import from
``mlstore.config`` itself: the submodules are private.
"""

from __future__ import annotations

# typing.get_type_hints() resolves the classes' string annotations in the module their
# __module__ names, which is this one (below): these are the names they use.
from collections.abc import Mapping  # noqa: F401
from typing import Any  # noqa: F401

from mlstore._util.redact import SECRET_OPTION, redact_options
from mlstore.config._cache import CacheConfig
from mlstore.config._cost import EGRESS_KINDS, CostConfig
from mlstore.config._fields import UNSET, GiB, MiB, parse_size
from mlstore.config._http import DEFAULT_DENY_HOSTS, DEFAULT_DENY_NETWORKS, HttpPolicy
from mlstore.config._origins import Origin, explain
from mlstore.config._retry import RetryPolicy
from mlstore.config._sources import OPTION_ENV_VARS, load_file
from mlstore.config._store import ENV_VARS, StoreConfig
from mlstore.errors import ConfigError

__all__ = [
    "DEFAULT_DENY_HOSTS",
    "DEFAULT_DENY_NETWORKS",
    "EGRESS_KINDS",
    "ENV_VARS",
    "OPTION_ENV_VARS",
    "SECRET_OPTION",
    "UNSET",
    "CacheConfig",
    "ConfigError",
    "CostConfig",
    "GiB",
    "HttpPolicy",
    "MiB",
    "Origin",
    "RetryPolicy",
    "StoreConfig",
    "explain",
    "load_file",
    "parse_size",
    "redact_options",
]

# The classes are public here, and a pickle names a class by its __module__: this keeps
# pickles (a Store's crosses to every DataLoader worker) naming mlstore.config.CacheConfig
# and so on, loadable by versions before and after the split into submodules.
for _cls in (CacheConfig, RetryPolicy, HttpPolicy, CostConfig, StoreConfig):
    _cls.__module__ = __name__
del _cls
