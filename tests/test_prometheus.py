"""The Prometheus exporter and textfile, parsed back with prometheus_client's own parser
after four worker processes did real reads: the exported totals are the sum of the
workers' work, and no label value comes from outside its closed set."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import mlstore.metrics
from mlstore.metrics import OPERATIONS, TIERS, Stats
from tests.test_node_stats import REPO, run_workers, seed

BACKENDS = {"s3", "gs", "az", "http", "https", "file", "memory", "unknown", "other"}


def samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, dict(sample.labels), sample.value


def total(text: str, name: str, **match: str) -> float:
    return sum(
        value
        for n, labels, value in samples(text)
        if n == name and all(labels.get(k) == v for k, v in match.items())
    )


def check(text: str, work: Stats) -> None:
    """``text`` holds the totals of ``work``, and only closed-set label values."""
    assert total(text, "mlstore_requests_total") == work["requests"] > 0
    for op, count in work.requests_by_op()["s3"].items():
        assert total(text, "mlstore_requests_total", backend="s3", op=op) == count
    for tier in ("memory", "disk", "metadata"):
        assert total(text, "mlstore_cache_hits_total", tier=tier) == work.get("hits", tier)
    assert total(text, "mlstore_cache_misses_total", tier="cache") == work.get("misses", "cache")
    assert total(text, "mlstore_bytes_read_total", backend="s3") == work.get("bytes_read", "s3")
    assert total(text, "mlstore_saved_requests_total", backend="s3") == work.get(
        "saved_requests", "s3"
    )
    get = work.latency[("get", "s3")]
    name = "mlstore_request_duration_seconds"
    assert total(text, f"{name}_count", backend="s3", op="get") == get.count
    assert total(text, f"{name}_sum", backend="s3", op="get") == pytest.approx(get.sum)
    assert total(text, f"{name}_bucket", backend="s3", op="get", le="+Inf") == get.count
    for n, labels, _ in samples(text):
        assert n.startswith("mlstore_")
        assert set(labels) <= {"tier", "backend", "op", "le"}
        assert labels.get("tier", "memory") in TIERS
        assert labels.get("backend", "s3") in BACKENDS
        assert labels.get("op", "get") in (*OPERATIONS, "other")
        assert all("/" not in v and ":" not in v for v in labels.values())  # no URL


@pytest.fixture
def four_workers(
    tmp_path: Path, s3_bucket: str, s3_options: dict[str, object]
) -> tuple[Path, Stats]:
    keys = seed(s3_options, s3_bucket, 8)
    node_dir = tmp_path / "node"
    work = run_workers(4, str(s3_options["endpoint_url"]), s3_bucket, keys, node_dir)
    return node_dir, work


def test_the_exporter_serves_the_sum_of_four_workers(
    four_workers: tuple[Path, Stats], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    node_dir, work = four_workers
    # set for an application's own metrics: changes nothing for mlstore's
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    exporter = mlstore.metrics.serve(0, cache_dir=str(node_dir))
    try:
        url = f"http://127.0.0.1:{exporter.port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            text = response.read().decode()
    finally:
        exporter.close()
    check(text, work)


def test_the_textfile_holds_the_same_totals_written_atomically(
    four_workers: tuple[Path, Stats], tmp_path: Path
) -> None:
    node_dir, work = four_workers
    path = tmp_path / "out" / "mlstore.prom"
    path.parent.mkdir()
    path.write_text("old")
    mlstore.metrics.write_textfile(str(path), cache_dir=str(node_dir))
    check(path.read_text(), work)
    assert [p.name for p in path.parent.iterdir()] == ["mlstore.prom"]  # no temp left


def test_labels_outside_the_closed_sets_are_folded() -> None:
    from mlstore.metrics.prometheus import families

    stats = Stats(
        {
            ("requests", "weird-proto"): 3,
            ("get_requests", "weird-proto"): 2,
            ("hits", "memory"): 1,
            ("requests", "memory"): 4,  # memory:// the backend, not the tier
            ("put_requests", "memory"): 4,
        }
    )
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families(stats)
        for s in family.samples
    }
    assert found[("mlstore_requests_total", (("backend", "other"), ("op", "get")))] == 2
    assert found[("mlstore_requests_total", (("backend", "other"), ("op", "other")))] == 1
    assert found[("mlstore_requests_total", (("backend", "memory"), ("op", "put")))] == 4
    assert found[("mlstore_cache_hits_total", (("tier", "memory"),))] == 1


def test_prometheus_client_is_imported_only_when_exporting(tmp_path: Path) -> None:
    code = (
        "import sys, mlstore, mlstore.metrics\n"
        "store = mlstore.Store()\n"
        "store.write_bytes('memory://x/y', b'1')\n"
        "store.stats(node=True)\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    env = {**os.environ, "MLSTORE_CACHE_DIR": str(tmp_path), "PYTHONPATH": REPO}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False"
