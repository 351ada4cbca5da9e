"""The arguments of the ``mlstore`` fsspec filesystem: the one spelling every consumer's
spelling comes down to, which arguments are the Store's and which fsspec's own, and what
of them may leave the process (pickles, ``to_json``/``to_dict``): never an option whose
name says it is a credential.

Consumers pass a chained URL's options in several spellings, all meaning the same Store:

* fsspec: ``url_to_fs("mlstore::s3://b/k", s3={...}, mlstore={...})``, which arrives as
  ``target_protocol="s3", target_options={...}, fo="b/k"`` plus the Store arguments;
  fsspec's caching filesystems build the same arguments themselves;
* Hugging Face ``datasets``: it takes the bare ``mlstore`` hop for a local path, so the
  options it gives that hop arrive as ``file={...}``; it copies a flat
  ``storage_options`` dict into every hop, so Store arguments also arrive among the
  target's options; and it appends the inner hop again to every file a pattern matched
  (``mlstore::s3://b/k::s3://b/k``), which nests a second ``target_protocol`` /
  ``target_options`` / ``fo`` of the same protocol inside ``target_options``.

:func:`canonical_arguments` turns each into ``target_protocol``, flat
``target_options`` and the Store arguments, before fsspec derives the instance's
identity from them: every spelling of one Store setup shares one filesystem, and no
per-path ``fo`` stays in it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fsspec.spec import _Cached

from mlstore._util.redact import redact_options, redact_protocol_options
from mlstore.config import StoreConfig
from mlstore.errors import ConfigError, UnsupportedOperation
from mlstore.url import SCHEMES

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
        "transport",
    }
)
#: Keyword arguments fsspec's AbstractFileSystem itself understands.
_FSSPEC_KWARGS = frozenset(
    {"use_listings_cache", "listings_expiry_time", "max_paths", "asynchronous", "loop"}
)


#: The keyword under which ``datasets`` passes the options of the bare ``mlstore`` hop.
_HOP_OPTIONS = "file"


def _protocol(name: Any) -> str:
    return SCHEMES.get(str(name).lower(), str(name).lower())


def _one_hop(target: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """``target_options`` with the repeated hops of the same protocol folded in."""
    out = dict(options)
    while "target_protocol" in out or "target_options" in out:
        inner = out.pop("target_protocol", None)
        nested = out.pop("target_options", None) or {}
        out.pop("fo", None)  # the repeated hop's path: the same file
        if inner is not None and _protocol(inner) != _protocol(target):
            raise ConfigError(
                f"mlstore cannot chain to {target!r} through {inner!r}: an mlstore URL "
                f"has one protocol after 'mlstore::' (mlstore::{target}://bucket/key)"
            )
        out.update(nested)
    return out


def canonical_arguments(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The filesystem's arguments in their one spelling (see the module docstring).

    Store arguments given in several places keep the value given at the top level
    (``mlstore={...}`` or bare keywords) first. Nothing is dropped silently: an option
    that is neither a Store argument nor the target's ends up where it is refused, by
    name, with a :class:`~mlstore.errors.ConfigError`.
    """
    out = dict(kwargs)
    target = out.get("target_protocol")
    if target is None:
        return dict(sorted(out.items()))
    options = out.get("target_options")
    if options is not None and not isinstance(options, Mapping):
        raise ConfigError(f"target_options must be a mapping, got {type(options).__name__}")
    merged = _one_hop(target, options or {})
    hop = out.get(_HOP_OPTIONS)
    if _protocol(target) != "file" and isinstance(hop, Mapping):
        del out[_HOP_OPTIONS]
        # datasets copied the same flat dict here and into the target's options
        merged = {**{k: v for k, v in hop.items() if k not in _STORE_KWARGS}, **merged}
        for name in _STORE_KWARGS & hop.keys():
            out.setdefault(name, hop[name])
    for name in _STORE_KWARGS & merged.keys():
        out.setdefault(name, merged.pop(name))
    if options is not None or merged:
        out["target_options"] = dict(sorted(merged.items()))
    # fsspec's instance token is the text of the arguments, so their order counts too
    return dict(sorted(out.items()))


class _OneSpelling(_Cached):  # type: ignore[misc]
    """fsspec's instance cache, fed the canonical arguments: fsspec derives an instance's
    identity (and ``storage_options``) from what reaches ``__call__``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **canonical_arguments(kwargs))


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
