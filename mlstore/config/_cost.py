"""How requests and bytes are priced: :class:`CostConfig`.

Only the choices live here (which price file, which price class per protocol, where the
bytes travel); the table itself and the arithmetic are :mod:`mlstore.cost`'s. The price
file is named, not read: it is read when a cost is estimated, so a config object stays
cheap to build and a bad file is reported by the call that needs it, naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from mlstore.config._fields import choice, optional, setting
from mlstore.config._sources import Resolved
from mlstore.errors import ConfigError

__all__ = ["EGRESS_KINDS", "CostConfig"]

#: Where the bytes read travel, cheapest first.
EGRESS_KINDS = ("same-region", "inter-region", "internet", "inter-cloud")


def _path(value: object, name: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be the path of a JSON price file, got {value!r}")
    return os.path.expanduser(value)


def _classes(value: object, name: str) -> Mapping[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigError(
            f"{name} must map a protocol to a price class, such as "
            f"{{'s3': 's3-express'}}, got {value!r}"
        )
    return {k.lower(): v.lower() for k, v in value.items()}


@dataclass(frozen=True)
class CostConfig(Resolved):
    """How :func:`mlstore.cost.estimate` turns counters into money.

    Attributes:
        prices: a JSON file whose entries override or add to the built-in price table
            (``MLSTORE_PRICES``), in the format of the built-in one (the Cost page of
            the docs shows it). Default: none, the built-in table alone.
        classes: the price class of each protocol, over the table's own
            (``{"s3": "s3-express"}``; config file ``[cost.classes]``). Default: none,
            so ``s3`` is ``s3-standard``, ``gs`` ``gcs-standard``, ``az``
            ``azure-hot``, and ``file``, ``memory`` and ``http(s)`` are free.
        egress: where the bytes read travel (``MLSTORE_EGRESS``): ``"same-region"``
            (free), ``"inter-region"``, ``"internet"`` or ``"inter-cloud"``. Default
            ``"same-region"``: training next to its bucket.
    """

    prices: str | None = setting("MLSTORE_PRICES", optional(_path), None)
    classes: Mapping[str, str] = setting(None, _classes, MappingProxyType({}))
    egress: str = setting("MLSTORE_EGRESS", choice(*EGRESS_KINDS), "same-region")

    _section = "cost"

    def __post_init__(self) -> None:
        self._resolve()

    def __repr__(self) -> str:
        return (
            f"CostConfig(prices={self.prices!r}, classes={dict(self.classes)!r}, "
            f"egress={self.egress!r})"
        )
