"""``mlstore cache stats``, run as the real program (``python -m mlstore``) against a
cache directory that real worker processes populated: its JSON is parsed back and its
text names every section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mlstore.cost import usd
from mlstore.metrics import Stats, node_stats
from tests.test_cli_commands import cli, ok
from tests.test_node_stats import run_workers, seed


def cache_stats(*argv: str) -> str:
    return ok(cli("cache", "stats", *argv))


@pytest.fixture
def populated(tmp_path: Path, s3_bucket: str, s3_options: dict[str, object]) -> tuple[Path, Stats]:
    keys = seed(s3_options, s3_bucket, 4)
    node_dir = tmp_path / "node"
    work = run_workers(2, str(s3_options["endpoint_url"]), s3_bucket, keys, node_dir)
    return node_dir, work


def test_the_json_report_holds_the_node_totals(populated: tuple[Path, Stats]) -> None:
    node_dir, work = populated
    report: dict[str, Any] = json.loads(cache_stats("--cache-dir", str(node_dir), "--json"))
    assert report["cache_dir"] == str(node_dir)
    assert report["since"].endswith("Z")
    assert report["requests"]["s3"]["get"] == work.get("get_requests", "s3")
    assert report["requests"]["s3"]["total"] == work.get("requests", "s3")
    for tier in ("memory", "disk"):
        assert report["tiers"][tier]["hits"] == work.get("hits", tier)
        assert report["tiers"][tier]["bytes_served"] == work.get("bytes_served", tier)
    assert report["tiers"]["cache"]["misses"] == work.get("misses", "cache")
    assert report["bytes"]["s3"] == {"down": work.get("bytes_read", "s3"), "up": 0}
    assert report["saved"]["s3"]["requests"] == work.get("saved_requests", "s3") > 0
    get = report["latency"]["get"]["s3"]
    assert get["requests"] == work.latency[("get", "s3")].count
    assert 0 < get["p50"] <= get["p95"] <= get["p99"]
    assert report["dedupe"]["hits"] == work.get("dedupe_hits")
    assert report["cost"]["currency"] == "USD" and report["cost"]["table_version"] == "2026-12"
    assert report["cost"]["spent"] == pytest.approx(work.cost.spent) and work.cost.spent > 0
    assert report["cost"]["saved"] == pytest.approx(work.cost.saved)
    assert work.cost.saved > 0  # the hits


def test_the_text_report_has_every_section(populated: tuple[Path, Stats]) -> None:
    node_dir, work = populated
    text = cache_stats("--cache-dir", str(node_dir))
    assert text.startswith(f"node-wide totals of {node_dir} since ")
    titles = [line.split("  ")[0] for line in text.splitlines() if line and line[0] != " "]
    assert titles[1:] == [
        "cache tiers",
        "remote requests",
        "bytes",
        "saved by the cache",
        "latency",
        "cost (US dollars, list prices; see docs/cost.md)",
    ]
    requests = text.split("remote requests")[1].splitlines()
    assert requests[0].split() == ["get", "total"]  # the workers only read
    assert requests[1].split() == ["s3", str(work.get("get_requests", "s3")), str(work["requests"])]
    cost = text.split("cost (US dollars")[1].splitlines()
    spent = node_stats(str(node_dir)).cost
    assert cost[1].strip().startswith(f"spent {usd(spent.spent)}, saved {usd(spent.saved)}")
    assert spent.spent > 0
    assert cost[2].strip().startswith("s3 (s3-standard): spent")


def test_an_unused_directory_reports_no_activity(tmp_path: Path) -> None:
    text = cache_stats("--cache-dir", str(tmp_path))
    assert "(no activity recorded)" in text
    report = json.loads(cache_stats("--cache-dir", str(tmp_path), "--json"))
    assert report["since"] is None and report["requests"] == {} and report["tiers"] == {}
    assert list(tmp_path.iterdir()) == []  # reading made nothing
