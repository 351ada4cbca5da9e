"""``mlstore config``: the effective settings, where each came from, and what mlstore reads.

Values are shown as the library would use them, after the precedence rules (argument >
``MLSTORE_*`` environment > config file > default). Nothing secret is printed: URLs
(mount prefixes, the keys of per-prefix policies) have user info and signatures masked,
and backend options are listed by name only, since their values may be credentials.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Any

from mlstore._util.redact import redact_url
from mlstore.cli import _shown

if TYPE_CHECKING:
    from mlstore import Store

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    """Add ``config`` to the ``mlstore`` sub-command parsers ``sub``."""
    config = sub.add_parser("config", help="show the effective configuration")
    config.add_argument("--env", action="store_true", help="also list the environment variables")
    config.add_argument("--json", action="store_true", help="print one JSON object")
    config.set_defaults(func=_cmd_config)


def _cmd_config(store: Store, args: argparse.Namespace, out: IO[str]) -> int:
    from mlstore.config import ENV_VARS, explain

    if args.json:
        out.write(json.dumps(_config_record(store, args.env), indent=2, sort_keys=True) + "\n")
        return 0
    out.write("# effective settings (argument > MLSTORE_* environment > config file > default)\n")
    for origin in explain(store.config):
        if origin.name.startswith(("mounts.", "options.")):
            continue
        note = "" if origin.source == "default" else f"  # {origin.source}"
        out.write(f"{origin.name} = {_shown(origin.value)!r}{note}\n")
    for name, urls in sorted(store.config.mounts.items()):
        out.write(f"mount {name} = {', '.join(redact_url(u) for u in urls)}\n")
    for proto, opts in sorted(store.config.options.items()):
        # option values may be credentials: names only
        out.write(f"options.{proto}: {', '.join(sorted(opts)) or '(none)'}\n")
    if args.env:
        out.write("\n# environment variables mlstore reads\n")
        for var, field_name in sorted(ENV_VARS.items()):
            state = "set" if os.environ.get(var) else "unset"
            out.write(f"{var:32} {field_name:32} {state}\n")
    return 0


def _config_record(store: Store, env: bool) -> dict[str, object]:
    """``mlstore config --json``: the same facts as the text, with the same masking."""
    from mlstore.config import ENV_VARS, explain

    settings = [
        {"name": o.name, "value": _jsonable(_shown(o.value)), "source": o.source}
        for o in explain(store.config)
        if not o.name.startswith(("mounts.", "options."))
    ]
    record: dict[str, object] = {
        "settings": settings,
        "mounts": {n: [redact_url(u) for u in urls] for n, urls in store.config.mounts.items()},
        # option values may be credentials: names only
        "options": {p: sorted(opts) for p, opts in store.config.options.items()},
    }
    if env:
        record["environment"] = [
            {"variable": var, "field": name, "set": bool(os.environ.get(var))}
            for var, name in sorted(ENV_VARS.items())
        ]
    return record


def _jsonable(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
