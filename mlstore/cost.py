"""What the requests and bytes a Store counted cost in money, and what the cache saved.

:func:`estimate` prices a :class:`~mlstore.metrics.Stats` snapshot with a
:class:`PriceTable`: the built-in table (list prices of late 2026, shipped as
``mlstore/prices/2026-12.json``), with the entries of the JSON file named by
``MLSTORE_PRICES`` over it, and the choices of :class:`~mlstore.config.CostConfig`
(the price class of each protocol, where the bytes travel)::

    cost = mlstore.cost.estimate(store.stats())
    print(cost)            # spent and saved, per backend

What is priced, per protocol (the label of the counters):

- requests by operation, ``("get_requests", "s3")`` and its siblings, each at its
  class's price (S3 class A: put, copy, list, upload, upload_part, mkdir; class B:
  get, head; delete free). A Store that counts only ``("requests", proto)`` has every
  request priced as a GET (the cheapest class, so a lower bound), and the estimate says
  so; requests beyond the per-operation counts are priced as ``other`` (a GET's price);
- bytes read (``bytes_read``) as egress of the configured kind, plus the per-GB
  retrieval charge of the class (S3 Express One Zone), and bytes written at the class's
  per-GB upload charge;
- savings: reads the cache served without a remote GET (``saved_requests`` and
  ``saved_bytes``) as the GETs and the egress they avoided; uploads skipped because the
  destination held the same content (``dedupe_uploads_skipped``,
  ``dedupe_bytes_skipped``) as the PUTs and upload charges avoided; copies skipped
  (``copies_skipped``) as the COPY requests avoided.

Storage at rest, minimum storage durations, free tiers and volume discounts are not
priced: the counters say nothing of them. Unknown counters are ignored; a protocol the
table has no class for is listed, at no cost.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import resources
from typing import TYPE_CHECKING, Any

from mlstore._util.html import table
from mlstore.config import EGRESS_KINDS, CostConfig
from mlstore.errors import ConfigError

if TYPE_CHECKING:
    from mlstore.metrics import Stats

__all__ = [
    "OPERATIONS",
    "TABLE_VERSION",
    "BackendCost",
    "Cost",
    "PriceClass",
    "PriceTable",
    "estimate",
    "usd",
]

#: The version of the built-in table (``mlstore/prices/<version>.json``).
TABLE_VERSION = "2026-12"

#: The operations a price class may price; each is counted as ``f"{op}_requests"``.
#: ``other`` prices requests counted without an operation.
OPERATIONS = (
    "get",
    "head",
    "put",
    "list",
    "delete",
    "copy",
    "mkdir",
    "upload_part",
    "upload",
    "other",
)

_GB = Decimal(2**30)  # the clouds bill a "GB" of 2^30 bytes
_THOUSAND = Decimal(1000)
_ZERO = Decimal(0)
_TOP_KEYS = ("version", "currency", "notes", "protocols", "classes")
_CLASS_KEYS = ("source", "requests", "read_per_gb", "write_per_gb", "egress_per_gb")


# ----------------------------------------------------------------------- the table


@dataclass(frozen=True)
class PriceClass:
    """The prices of one class (``s3-standard``, ``azure-hot``, ...), in USD.

    Attributes:
        requests: operation to USD per 1,000 requests.
        read_per_gb: per GB read, besides egress (S3 Express One Zone's retrieval).
        write_per_gb: per GB written (S3 Express One Zone's upload charge).
        egress_per_gb: egress kind to USD per GB read.
        source: the price page the figures come from.
    """

    requests: Mapping[str, Decimal]
    read_per_gb: Decimal
    write_per_gb: Decimal
    egress_per_gb: Mapping[str, Decimal]
    source: str = ""

    def request(self, op: str) -> Decimal:
        """USD per 1,000 requests of ``op`` (an unpriced operation costs what ``other`` does)."""
        return self.requests.get(op, self.requests.get("other", _ZERO))


_EMPTY = PriceClass({}, _ZERO, _ZERO, dict.fromkeys(EGRESS_KINDS, _ZERO))


def _price(value: object, where: str, name: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise ConfigError(f"{where}: {name} must be a price in USD (a number), got {value!r}")
    out = Decimal(str(value))
    if not out.is_finite() or out < 0:
        raise ConfigError(f"{where}: {name} must be a price of 0 or more, got {value!r}")
    return out


def _table(value: object, where: str, name: str, known: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {name} must be a JSON object, got {value!r}")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigError(f"{where}: {name} has unknown key(s) {unknown}; known: {list(known)}")
    return value


def _merge_class(base: PriceClass, raw: object, where: str, name: str) -> PriceClass:
    """``base`` with the entries of ``raw`` (one class of a price file) over it."""
    entry = _table(raw, where, name, _CLASS_KEYS)
    requests = dict(base.requests)
    for op, price in _table(
        entry.get("requests", {}), where, f"{name}.requests", OPERATIONS
    ).items():
        requests[op] = _price(price, where, f"{name}.requests.{op}")
    egress = dict(base.egress_per_gb)
    raw_egress = _table(
        entry.get("egress_per_gb", {}), where, f"{name}.egress_per_gb", EGRESS_KINDS
    )
    for kind, price in raw_egress.items():
        egress[kind] = _price(price, where, f"{name}.egress_per_gb.{kind}")
    read = entry.get("read_per_gb")
    write = entry.get("write_per_gb")
    source = entry.get("source", base.source)
    return PriceClass(
        requests,
        base.read_per_gb if read is None else _price(read, where, f"{name}.read_per_gb"),
        base.write_per_gb if write is None else _price(write, where, f"{name}.write_per_gb"),
        egress,
        source if isinstance(source, str) else base.source,
    )


@dataclass(frozen=True)
class PriceTable:
    """Prices per price class, the class of each protocol, and where bytes travel.

    Build one with :meth:`load` (the built-in table, a file's entries over it) or
    :meth:`from_config`. Immutable; :meth:`with_file` and :meth:`choose` return new
    tables.

    Attributes:
        version: the table's version (the built-in one's, or the override file's).
        classes: price class name to its prices.
        protocols: protocol to price class name.
        egress: ``"same-region"``, ``"inter-region"``, ``"internet"`` or
            ``"inter-cloud"``.
        files: the files the table was read from, built-in first.
    """

    version: str
    classes: Mapping[str, PriceClass]
    protocols: Mapping[str, str]
    egress: str = "same-region"
    files: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> PriceTable:
        """The built-in table, with the entries of the JSON file ``path`` over it."""
        base = _built_in()
        return base if path is None else base.with_file(path)

    @classmethod
    def from_config(cls, config: CostConfig | None = None) -> PriceTable:
        """The table ``config`` asks for (default: ``CostConfig()``, from the
        environment and the config file)."""
        config = config if config is not None else CostConfig()
        return cls.load(config.prices).choose(config.classes, config.egress)

    def with_file(self, path: str | os.PathLike[str]) -> PriceTable:
        """This table with the entries of the JSON price file ``path`` over it."""
        where = f"price file {os.fspath(path)!r}"
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise ConfigError(f"{where} cannot be read ({exc.strerror})") from None
        return self.with_text(text, os.fspath(path))

    def with_text(self, text: str, name: str) -> PriceTable:
        """This table with the entries of the JSON document ``text`` (read from ``name``)."""
        where = f"price file {name!r}"
        try:
            raw = json.loads(text, parse_float=Decimal)
        except ValueError as exc:
            raise ConfigError(f"{where} is not valid JSON: {exc}") from None
        doc = _table(raw, where, "the document", _TOP_KEYS)
        classes = dict(self.classes)
        for cname, entry in _items(doc.get("classes", {}), where, "classes"):
            base = classes.get(cname, _EMPTY)
            classes[cname] = _merge_class(base, entry, where, f"classes.{cname}")
        protocols = dict(self.protocols)
        for proto, cname in _items(doc.get("protocols", {}), where, "protocols"):
            if not isinstance(cname, str) or cname not in classes:
                raise ConfigError(
                    f"{where}: protocols.{proto} names price class {cname!r}, which the "
                    f"table does not have; known: {sorted(classes)}"
                )
            protocols[proto.lower()] = cname
        version = doc.get("version", self.version)
        if not isinstance(version, str):
            raise ConfigError(f"{where}: version must be a string, got {version!r}")
        return PriceTable(version, classes, protocols, self.egress, (*self.files, name))

    def choose(
        self, classes: Mapping[str, str] | None = None, egress: str | None = None
    ) -> PriceTable:
        """This table with protocols moved to other price classes (``{"s3":
        "s3-express"}``) and bytes travelling as ``egress``."""
        protocols = dict(self.protocols)
        for proto, cname in (classes or {}).items():
            if cname not in self.classes:
                raise ConfigError(
                    f"CostConfig.classes[{proto!r}] names price class {cname!r}, which the "
                    f"table does not have; known: {sorted(self.classes)}"
                )
            protocols[proto.lower()] = cname
        kind = self.egress if egress is None else egress
        if kind not in EGRESS_KINDS:
            raise ConfigError(
                f"CostConfig.egress must be one of {list(EGRESS_KINDS)}, got {kind!r}"
            )
        return PriceTable(self.version, self.classes, protocols, kind, self.files)

    def class_of(self, protocol: str) -> str | None:
        """The price class of ``protocol`` (``None``: the table has none, it is free)."""
        return self.protocols.get(protocol.lower())


@functools.cache
def _built_in() -> PriceTable:
    """The table shipped in the package (read once per process)."""
    text = resources.files("mlstore").joinpath("prices", f"{TABLE_VERSION}.json").read_text("utf-8")
    return PriceTable("", {}, {}).with_text(text, f"{TABLE_VERSION}.json")


def _items(value: object, where: str, name: str) -> list[tuple[str, Any]]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {name} must be a JSON object, got {value!r}")
    return list(value.items())


# ----------------------------------------------------------------------- the estimate


def usd(amount: float) -> str:
    """``amount`` dollars for a reader: cents for large sums, more digits for small ones.

    >>> usd(1234.5), usd(0.0123), usd(0.0000004)
    ('$1,234.50', '$0.0123', '$0.0000004')
    """
    if amount == 0:
        return "$0"
    if abs(amount) >= 1:
        return f"${amount:,.2f}"
    digits = max(4, 2 - math.floor(math.log10(abs(amount))))  # 3 significant at least
    return f"${amount:.{digits}f}".rstrip("0").rstrip(".")


@dataclass(frozen=True)
class BackendCost:
    """What one protocol's counters cost, and what the cache saved on it.

    Attributes:
        protocol: the counters' label (``"s3"``, ``"gs"``, ``"az"``, ...).
        price_class: the price class applied, ``None`` for a protocol the table does
            not price (free).
        requests: requests by operation, as priced.
        request_usd: USD by operation.
        bytes_read: bytes downloaded (egress of the configured kind).
        bytes_written: bytes uploaded (free, but for a class with a per-GB upload charge).
        egress_usd: USD of the bytes read leaving the region or cloud.
        spent: USD spent: requests, egress and transfer charges.
        transfer_usd: USD of the class's per-GB retrieval and upload charges.
        saved_usd: USD avoided, by source: ``"cache_requests"`` (GETs the cache
            answered), ``"cache_bytes"`` (their egress and retrieval),
            ``"dedupe_uploads"`` (PUTs and upload charges skipped),
            ``"copies_skipped"`` (COPY requests skipped).
        saved: their sum.
        only_totals: the Store counted no requests by operation, so every request was
            priced as a GET (a lower bound).
    """

    protocol: str
    price_class: str | None
    requests: Mapping[str, int] = field(default_factory=dict)
    request_usd: Mapping[str, float] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    egress_usd: float = 0.0
    transfer_usd: float = 0.0
    spent: float = 0.0
    saved_usd: Mapping[str, float] = field(default_factory=dict)
    saved: float = 0.0
    only_totals: bool = False


@dataclass(frozen=True)
class Cost:
    """What a :class:`~mlstore.metrics.Stats` snapshot cost, from :func:`estimate`.

    Attributes:
        spent: USD spent on requests and bytes moved.
        saved: USD the cache (and skipped uploads and copies) avoided.
        by_backend: protocol to its :class:`BackendCost`.
        table_version: the price table's version (``"2026-12"``).
        egress: where the bytes read were priced as travelling.
    """

    spent: float
    saved: float
    by_backend: Mapping[str, BackendCost]
    table_version: str
    egress: str = "same-region"

    def __str__(self) -> str:
        lines = [
            f"spent {usd(self.spent)}, saved {usd(self.saved)} "
            f"(prices {self.table_version}, egress {self.egress})"
        ]
        for proto, b in sorted(self.by_backend.items()):
            ops = ", ".join(f"{n:,} {op}" for op, n in sorted(b.requests.items()) if n)
            price_class = b.price_class or "not priced"
            lines.append(
                f"  {proto} ({price_class}): spent {usd(b.spent)}, saved {usd(b.saved)}; "
                f"{ops or 'no requests'}" + (" (all priced as GETs)" if b.only_totals else "")
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"Cost(spent={usd(self.spent)}, saved={usd(self.saved)}, "
            f"table_version={self.table_version!r}, egress={self.egress!r})"
        )

    def _repr_html_(self) -> str:
        from mlstore._util.html import human_size

        rows = [
            [
                proto,
                b.price_class or "not priced",
                ", ".join(f"{n:,} {op}" for op, n in sorted(b.requests.items()) if n)
                + (" (as GETs)" if b.only_totals else ""),
                human_size(b.bytes_read),
                usd(b.spent),
                usd(b.saved),
            ]
            for proto, b in sorted(self.by_backend.items())
        ]
        rows.append(["total", "", "", "", usd(self.spent), usd(self.saved)])
        return table(
            rows,
            header=["protocol", "price class", "requests", "read", "spent", "saved"],
            caption=f"Cost (prices {self.table_version}, egress {self.egress})",
        )


#: Metrics that name a protocol (others, such as cache tiers' hits, are not priced).
_PRICED = {
    "requests",
    "bytes_read",
    "bytes_written",
    "saved_requests",
    "saved_bytes",
    "dedupe_uploads_skipped",
    "dedupe_bytes_skipped",
    "copies_skipped",
    "copy_bytes_skipped",
    *(f"{op}_requests" for op in OPERATIONS),
}


def estimate(stats: Stats, prices: PriceTable | CostConfig | None = None) -> Cost:
    """What the counters of ``stats`` cost with ``prices``.

    Args:
        stats: a snapshot (``store.stats()``, or the difference of two).
        prices: a :class:`PriceTable`, a :class:`~mlstore.config.CostConfig` to build
            one from, or ``None`` for the table the environment and config file
            configure (``MLSTORE_PRICES``, ``MLSTORE_EGRESS``, ``[cost]``).

    Raises:
        ConfigError: the price file cannot be read or has a bad entry (the message
            names the file and the entry), or a protocol names an unknown class.

    Example:
        >>> from mlstore.metrics import Stats
        >>> stats = Stats({("get_requests", "s3"): 10_000, ("put_requests", "s3"): 1_000})
        >>> estimate(stats, PriceTable.load()).spent   # 10 x $0.0004 + 1 x $0.005
        0.009
    """
    table_ = prices if isinstance(prices, PriceTable) else PriceTable.from_config(prices)
    counts: dict[str, dict[str, int]] = {}
    for (metric, proto), value in stats.counters.items():
        if metric in _PRICED and value:
            counts.setdefault(proto, {})[metric] = value
    by_backend: dict[str, BackendCost] = {}
    spent = saved = _ZERO
    for proto, c in sorted(counts.items()):
        by_backend[proto], spent_one, saved_one = _backend(proto, c, table_)
        spent, saved = spent + spent_one, saved + saved_one
    return Cost(float(spent), float(saved), by_backend, table_.version, table_.egress)


def _backend(
    proto: str, c: Mapping[str, int], prices: PriceTable
) -> tuple[BackendCost, Decimal, Decimal]:
    """One protocol's cost, with its exact spent and saved sums (floats only at the end)."""
    name = prices.class_of(proto)
    cls = prices.classes[name] if name is not None else _EMPTY
    ops = {op: c[f"{op}_requests"] for op in OPERATIONS if c.get(f"{op}_requests")}
    total = c.get("requests", 0)
    only_totals = not ops and total > 0
    if only_totals:
        ops = {"get": total}  # the cheapest class: a lower bound
    elif total > sum(ops.values()):
        ops["other"] = ops.get("other", 0) + total - sum(ops.values())
    request_usd = {op: n * cls.request(op) / _THOUSAND for op, n in ops.items()}
    read, written = c.get("bytes_read", 0), c.get("bytes_written", 0)
    egress = cls.egress_per_gb.get(prices.egress, _ZERO)
    saved_bytes = c.get("saved_bytes", 0)
    saved = {
        "cache_requests": c.get("saved_requests", 0) * cls.request("get") / _THOUSAND,
        "cache_bytes": saved_bytes * (egress + cls.read_per_gb) / _GB,
        "dedupe_uploads": c.get("dedupe_uploads_skipped", 0) * cls.request("put") / _THOUSAND
        + c.get("dedupe_bytes_skipped", 0) * cls.write_per_gb / _GB,
        "copies_skipped": c.get("copies_skipped", 0) * cls.request("copy") / _THOUSAND,
    }
    egress_usd = read * egress / _GB
    transfer_usd = (read * cls.read_per_gb + written * cls.write_per_gb) / _GB
    spent = sum(request_usd.values(), _ZERO) + egress_usd + transfer_usd
    saved_sum = sum(saved.values(), _ZERO)
    cost = BackendCost(
        protocol=proto,
        price_class=name,
        requests=ops,
        request_usd={op: float(v) for op, v in request_usd.items()},
        bytes_read=read,
        bytes_written=written,
        egress_usd=float(egress_usd),
        transfer_usd=float(transfer_usd),
        spent=float(spent),
        saved_usd={k: float(v) for k, v in saved.items() if v},
        saved=float(saved_sum),
        only_totals=only_totals,
    )
    return cost, spent, saved_sum
