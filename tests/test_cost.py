"""Counters priced in dollars: mlstore.cost, its price table and its configuration."""

from __future__ import annotations

import html.parser
import json
import pickle
from pathlib import Path

import pytest

import mlstore
from mlstore.config import ConfigError, CostConfig, StoreConfig
from mlstore.cost import TABLE_VERSION, Cost, PriceTable, estimate, usd
from mlstore.metrics import Stats

GiB = 2**30


@pytest.fixture
def table() -> PriceTable:
    return PriceTable.load()


def write_prices(tmp_path: Path, doc: object, name: str = "prices.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc, encoding="utf-8")
    return path


# ------------------------------------------------------------------ exact dollars


def test_s3_requests_by_operation(table: PriceTable) -> None:
    stats = Stats(
        {
            ("get_requests", "s3"): 10_000,  # class B: $0.0004 / 1,000
            ("head_requests", "s3"): 2_500,
            ("put_requests", "s3"): 1_000,  # class A: $0.005 / 1,000
            ("list_requests", "s3"): 200,
            ("upload_part_requests", "s3"): 400,
            ("delete_requests", "s3"): 50,  # free
            ("requests", "s3"): 14_150,
        }
    )
    cost = estimate(stats, table)
    s3 = cost.by_backend["s3"]
    assert s3.price_class == "s3-standard"
    assert s3.request_usd == {
        "get": 0.004,
        "head": 0.001,
        "put": 0.005,
        "list": 0.001,
        "upload_part": 0.002,
        "delete": 0.0,
    }
    assert cost.spent == 0.013
    assert cost.saved == 0.0
    assert cost.table_version == TABLE_VERSION
    assert not s3.only_totals


def test_gcs_and_azure_classes(table: PriceTable) -> None:
    stats = Stats(
        {
            ("get_requests", "gs"): 1_000,  # class B
            ("put_requests", "gs"): 1_000,  # class A
            ("put_requests", "az"): 10_000,  # write: $0.055 / 10,000
            ("get_requests", "az"): 10_000,  # read: $0.0044 / 10,000
            ("list_requests", "az"): 10_000,  # list and create container
        }
    )
    cost = estimate(stats, table)
    assert cost.by_backend["gs"].spent == 0.0054
    assert cost.by_backend["az"].spent == 0.1144
    assert cost.spent == 0.1198


def test_egress_is_priced_by_where_the_bytes_travel(table: PriceTable) -> None:
    stats = Stats({("get_requests", "s3"): 1_000, ("bytes_read", "s3"): 10 * GiB})
    assert estimate(stats, table).spent == 0.0004  # same region: the bytes are free
    assert estimate(stats, table.choose(egress="inter-region")).spent == 0.2004
    internet = estimate(stats, table.choose(egress="internet"))
    assert internet.spent == 0.9004
    assert internet.by_backend["s3"].egress_usd == 0.9
    assert internet.egress == "internet"
    gcs = Stats({("bytes_read", "gs"): GiB, ("bytes_read", "az"): GiB})
    assert estimate(gcs, table.choose(egress="inter-cloud")).spent == 0.207


def test_uploads_are_free_but_for_express(table: PriceTable) -> None:
    stats = Stats(
        {
            ("get_requests", "s3"): 1_000_000,
            ("put_requests", "s3"): 1_000,
            ("bytes_read", "s3"): GiB,
            ("bytes_written", "s3"): GiB,
        }
    )
    assert estimate(stats, table).spent == 0.405
    express = estimate(stats, table.choose({"s3": "s3-express"})).by_backend["s3"]
    assert express.price_class == "s3-express"
    # 1M GETs x $0.00003/1000 + 1,000 PUTs x $0.00113/1000 + retrieval + upload per GB
    assert express.request_usd == {"get": 0.03, "put": 0.00113}
    assert express.transfer_usd == 0.0038
    assert express.spent == 0.03493


def test_savings_of_the_cache_dedupe_and_skipped_copies(table: PriceTable) -> None:
    stats = Stats(
        {
            ("saved_requests", "s3"): 100_000,  # GETs the cache answered
            ("saved_bytes", "s3"): 5 * GiB,
            ("dedupe_uploads_skipped", "s3"): 2_000,  # PUTs not sent
            ("dedupe_bytes_skipped", "s3"): GiB,
            ("copies_skipped", "s3"): 1_000,
            ("copy_bytes_skipped", "s3"): GiB,
        }
    )
    same = estimate(stats, table)
    assert same.spent == 0.0
    assert same.by_backend["s3"].saved_usd == {
        "cache_requests": 0.04,
        "dedupe_uploads": 0.01,
        "copies_skipped": 0.005,
    }
    assert same.saved == 0.055
    far = estimate(stats, table.choose(egress="inter-region"))
    assert far.by_backend["s3"].saved_usd["cache_bytes"] == 0.1
    assert far.saved == 0.155


def test_only_total_requests_are_priced_as_gets(table: PriceTable) -> None:
    """A Store that counts no operations: every request at a GET's price, said so."""
    stats = Stats({("requests", "s3"): 1_000, ("bytes_read", "s3"): GiB})
    cost = estimate(stats, table)
    s3 = cost.by_backend["s3"]
    assert s3.only_totals and s3.requests == {"get": 1_000}
    assert cost.spent == 0.0004
    assert "priced as GETs" in str(cost)


def test_requests_beyond_the_operations_are_priced_as_other(table: PriceTable) -> None:
    stats = Stats({("requests", "s3"): 1_500, ("put_requests", "s3"): 1_000})
    s3 = estimate(stats, table).by_backend["s3"]
    assert s3.requests == {"put": 1_000, "other": 500}
    assert s3.spent == 0.0052
    assert not s3.only_totals


def test_unknown_protocols_are_free_and_unknown_counters_ignored(table: PriceTable) -> None:
    stats = Stats(
        {
            ("requests", "ftp"): 10,
            ("requests", "file"): 99,
            ("hits", "disk"): 7,  # a cache tier, not a protocol
            ("bytes_served", "memory"): 1_000,
            ("latency_whatever", "s3"): 3,
            ("get_requests", "s3"): 1_000,
        }
    )
    cost = estimate(stats, table)
    assert set(cost.by_backend) == {"ftp", "file", "s3"}
    assert cost.by_backend["ftp"].price_class is None and cost.by_backend["ftp"].spent == 0
    assert cost.by_backend["file"].price_class == "free"
    assert cost.spent == 0.0004
    assert "ftp (not priced)" in str(cost)


def test_a_difference_of_snapshots_prices_what_happened_between(table: PriceTable) -> None:
    before = Stats({("get_requests", "s3"): 1_000})
    after = Stats({("get_requests", "s3"): 3_500})
    assert estimate(after - before, table).spent == 0.001


# ------------------------------------------------------------------ views


class Checker(html.parser.HTMLParser):
    """Fails on a closing tag that does not match; collects the text."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: object) -> None:
        self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_cost_renders_as_text_and_html(table: PriceTable) -> None:
    stats = Stats({("get_requests", "s3"): 10_000, ("bytes_read", "s3"): 3 * GiB})
    cost = estimate(stats, table.choose(egress="internet"))
    assert repr(cost) == (
        "Cost(spent=$0.274, saved=$0, table_version='2026-12', egress='internet')"
    )
    assert str(cost).splitlines()[0] == "spent $0.274, saved $0 (prices 2026-12, egress internet)"
    checker = Checker()
    checker.feed(cost._repr_html_())
    checker.close()
    assert checker.stack == []
    text = " ".join(checker.text)
    assert "s3-standard" in text and "3.0 GiB" in text and "$0.274" in text


def test_usd_shows_small_sums_with_their_digits() -> None:
    assert usd(0) == "$0"
    assert usd(12345.678) == "$12,345.68"
    assert usd(0.5) == "$0.5"
    assert usd(0.00113) == "$0.00113"
    assert usd(0.0000004) == "$0.0000004"


# ------------------------------------------------------------------ overrides


def test_a_price_file_changes_one_price_and_keeps_the_rest(
    tmp_path: Path, table: PriceTable
) -> None:
    path = write_prices(
        tmp_path,
        {"version": "2026-12+acme", "classes": {"s3-standard": {"requests": {"get": 0.00035}}}},
    )
    custom = PriceTable.load(path)
    stats = Stats({("get_requests", "s3"): 1_000_000, ("put_requests", "s3"): 1_000})
    assert estimate(stats, table).spent == 0.405
    cost = estimate(stats, custom)
    assert cost.spent == 0.355
    assert cost.table_version == "2026-12+acme"
    assert custom.files == (f"{TABLE_VERSION}.json", str(path))


def test_a_price_file_adds_a_class_and_moves_a_protocol(tmp_path: Path) -> None:
    path = write_prices(
        tmp_path,
        {
            "classes": {
                "onprem": {"requests": {"other": 0.001}, "egress_per_gb": {"same-region": 0.01}}
            },
            "protocols": {"s3": "onprem", "HTTPS": "onprem"},
        },
    )
    stats = Stats({("get_requests", "s3"): 1_000, ("bytes_read", "https"): GiB})
    cost = estimate(stats, PriceTable.load(path))
    assert cost.by_backend["s3"].price_class == "onprem"
    assert cost.by_backend["https"].price_class == "onprem"
    assert cost.spent == 0.011


def test_the_environment_and_the_config_file_choose_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stats = Stats({("get_requests", "s3"): 1_000_000, ("bytes_read", "s3"): GiB})
    assert estimate(stats).spent == 0.4
    path = write_prices(tmp_path, {"classes": {"s3-standard": {"requests": {"get": 0.001}}}})
    monkeypatch.setenv("MLSTORE_PRICES", str(path))
    monkeypatch.setenv("MLSTORE_EGRESS", "internet")
    assert estimate(stats).spent == 1.09
    config = tmp_path / "mlstore.toml"
    config.write_text('[cost]\negress = "inter-region"\n[cost.classes]\ns3 = "s3-express"\n')
    monkeypatch.delenv("MLSTORE_EGRESS")
    monkeypatch.setenv("MLSTORE_CONFIG", str(config))
    cost = estimate(stats)
    assert cost.by_backend["s3"].price_class == "s3-express"
    assert cost.spent == 0.0506  # 1M express GETs, 1 GiB between regions, retrieval
    assert StoreConfig().cost.classes == {"s3": "s3-express"}


def test_a_cost_config_is_part_of_the_store_config() -> None:
    config = StoreConfig(cost={"egress": "internet", "classes": {"S3": "S3-Express"}})
    assert config.cost == CostConfig(egress="internet", classes={"s3": "s3-express"})
    assert "egress='internet'" in repr(config)
    assert pickle.loads(pickle.dumps(config.cost)) == config.cost
    assert estimate(Stats({("bytes_read", "s3"): GiB}), config.cost).spent == 0.0906


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (
            {"classes": {"s3-standard": {"requests": {"get": -1}}}},
            "classes.s3-standard.requests.get",
        ),
        ({"classes": {"s3-standard": {"requests": {"get": "cheap"}}}}, "requests.get"),
        ({"classes": {"s3-standard": {"requests": {"gets": 0.1}}}}, "unknown key(s) ['gets']"),
        ({"classes": {"s3-standard": {"read_per_gb": True}}}, "classes.s3-standard.read_per_gb"),
        ({"classes": {"s3-standard": {"egress_per_gb": {"moon": 1}}}}, "['moon']"),
        ({"classes": {"s3-standard": {"price": 1}}}, "unknown key(s) ['price']"),
        ({"classes": ["s3-standard"]}, "classes must be a JSON object"),
        ({"protocols": {"s3": "s3-platinum"}}, "protocols.s3 names price class 's3-platinum'"),
        ({"versoin": "x"}, "unknown key(s) ['versoin']"),
        ({"version": 7}, "version must be a string"),
        ("{not json", "is not valid JSON"),
    ],
)
def test_a_bad_price_file_names_the_file_and_the_entry(
    tmp_path: Path, doc: object, field: str
) -> None:
    path = write_prices(tmp_path, doc)
    with pytest.raises(ConfigError) as info:
        PriceTable.load(path)
    message = str(info.value)
    assert f"price file {str(path)!r}" in message
    assert field in message


def test_a_missing_price_file_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nope.json"
    monkeypatch.setenv("MLSTORE_PRICES", str(missing))
    StoreConfig()  # named, not read: building a config does not fail
    with pytest.raises(ConfigError, match=r"nope\.json.*cannot be read"):
        estimate(Stats({("get_requests", "s3"): 1}))


def test_bad_cost_settings_name_their_field(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"CostConfig\.classes.*'s3'.*s3-gold"):
        estimate(Stats(), CostConfig(classes={"s3": "s3-gold"}))
    with pytest.raises(ConfigError, match=r"CostConfig\.egress"):
        CostConfig(egress="moon")
    monkeypatch.setenv("MLSTORE_EGRESS", "moon")
    with pytest.raises(ConfigError, match="MLSTORE_EGRESS"):
        CostConfig()
    with pytest.raises(ConfigError, match=r"CostConfig\.classes"):
        CostConfig(classes=["s3"])  # type: ignore[arg-type]


def test_an_unknown_cost_key_in_the_config_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "mlstore.toml"
    config.write_text('[cost]\negres = "internet"\n')
    monkeypatch.setenv("MLSTORE_CONFIG", str(config))
    with pytest.raises(ConfigError, match=r"\[cost\].*egres"):
        StoreConfig()


# ------------------------------------------------------------------ a real Store


@pytest.mark.s3
def test_a_store_reading_s3_through_its_cache_costs_and_saves(
    s3_bucket: str, s3_options: dict[str, object], table: PriceTable
) -> None:
    """Against moto: reads cost money; a cache hit saves some when the Store counts
    savings (``saved_requests``); without per-operation counters every request is
    priced as a GET."""
    url = f"s3://{s3_bucket}/train/shard-0.bin"
    with mlstore.Store(options={"s3": s3_options}) as store:
        store.write_bytes(url, b"x" * 100_000)
        before = store.stats()
        for _ in range(3):
            assert store.read_bytes(url) == b"x" * 100_000
        stats = store.stats() - before
    cost: Cost = estimate(stats, table.choose(egress="internet"))
    s3 = cost.by_backend["s3"]
    assert cost.spent > 0 and s3.spent > 0
    assert s3.bytes_read == stats.get("bytes_read", "s3") > 0
    assert s3.egress_usd == pytest.approx(stats.get("bytes_read", "s3") * 0.09 / GiB)
    if stats.get("get_requests", "s3"):
        assert not s3.only_totals
    else:  # only the totals are counted: all of them priced as GETs
        assert s3.only_totals and s3.requests == {"get": stats.get("requests", "s3")}
    if ("saved_requests", "s3") in stats.counters:
        assert cost.saved > 0
    else:
        assert cost.saved == 0
