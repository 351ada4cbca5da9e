"""The arguments of the ``mlstore`` fsspec filesystem: which ones are the Store's, which
fsspec's own, and what of them may leave the process (pickles, ``to_json``/``to_dict``):
never an option whose name says it is a credential."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mlstore._util.redact import redact_options, redact_protocol_options
from mlstore.config import StoreConfig
from mlstore.errors import UnsupportedOperation

#: Keyword arguments the Store takes.
_STORE_KWARGS = frozenset(
    {
        "config",
        "cache",
        "retry",
        "http",
        "mounts",
        "options",
        "max_workers",
        "replica_failures",
        "replica_cooldown",
    }
)
#: Keyword arguments fsspec's AbstractFileSystem itself understands.
_FSSPEC_KWARGS = frozenset(
    {"use_listings_cache", "listings_expiry_time", "max_paths", "asynchronous", "loop"}
)


class _AppendUnsupported(UnsupportedOperation, NotImplementedError):  # noqa: N818 - as in io
    """Append mode is refused as fsspec filesystems refuse it (``NotImplementedError``,
    which pyarrow's ``open_append_stream`` passes on), and as mlstore refuses any
    unsupported mode (:class:`~mlstore.errors.UnsupportedOperation`)."""


def _without_secrets(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor arguments minus every option whose name looks like a credential."""
    out = dict(kwargs)
    if isinstance(out.get("target_options"), Mapping):
        out["target_options"] = redact_options(out["target_options"])
    if isinstance(out.get("options"), Mapping):
        out["options"] = redact_protocol_options(out["options"])
    config = out.get("config")
    if isinstance(config, StoreConfig):
        options = redact_protocol_options(config.options)
        out["config"] = dataclasses.replace(config, options=options)
    return out
