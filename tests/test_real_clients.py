"""Real fsspec consumers read through mlstore the way their users write it: Hugging Face
``datasets`` with ``storage_options`` and Polars, against the session's moto_server.

Each consumer spells chained options its own way; the ``mlstore`` filesystem maps every
spelling onto the same Store config (and the same instance), and refuses what it does
not know with a :class:`~mlstore.ConfigError` naming the option.
"""

from __future__ import annotations

import io
import pickle
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import fsspec
import pandas as pd
import pytest

import mlstore
from mlstore.errors import ConfigError
from mlstore.fsspec import MLStoreFileSystem

pytestmark = pytest.mark.s3

# Where an S3 request goes if the endpoint given through storage_options got lost on
# the way: a closed loopback port, so such a test fails instead of leaving the machine.
_NOWHERE = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """No request leaves the machine: S3 requests without the endpoint given through
    storage_options go to a closed loopback port, and a connection to any address other
    than loopback fails the test."""
    monkeypatch.setenv("MLSTORE_S3_ENDPOINT_URL", _NOWHERE)
    monkeypatch.setenv("AWS_ENDPOINT_URL", _NOWHERE)
    real = socket.socket.connect

    def connect(sock: socket.socket, address: Any) -> None:
        inet = sock.family in (socket.AF_INET, socket.AF_INET6)
        if inet and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a test of real clients connected to {address}")
        real(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def hf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[ModuleType]:
    """``datasets``, offline, with no telemetry and its caches under ``tmp_path``."""
    home = tmp_path / "hf-home"
    for name, value in {
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(home),
        "HF_DATASETS_CACHE": str(home / "datasets"),
    }.items():
        monkeypatch.setenv(name, value)
    import datasets
    import huggingface_hub.constants

    # Both read the environment once, at import: another test may have imported them.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_CACHE_HOME", str(home))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    monkeypatch.setattr(datasets.config, "HF_MODULES_CACHE", home / "modules")
    yield datasets


def _allow_downloads(monkeypatch: pytest.MonkeyPatch, datasets: ModuleType) -> None:
    """In offline mode ``datasets`` refuses to download any remote data file, S3 ones
    included, so ``load_dataset`` without ``streaming=True`` needs its own switch on;
    the Hub stays offline (``huggingface_hub`` refuses every request to it)."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)


def _frame(start: int, n: int) -> pd.DataFrame:
    return pd.DataFrame({"id": list(range(start, start + n)), "label": [f"r{i}" for i in range(n)]})


def _put_parquet(s3_options: dict[str, Any], url: str, frame: pd.DataFrame) -> None:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    with mlstore.Store(options={"s3": s3_options}) as s:
        s.write_bytes(url, buf.getvalue())


@pytest.fixture
def table(s3_options: dict[str, Any], s3_bucket: str) -> str:
    """``s3://<bucket>/d/train.parquet`` with ids 0..9."""
    url = f"s3://{s3_bucket}/d/train.parquet"
    _put_parquet(s3_options, url, _frame(0, 10))
    return url


def _hf_spellings(endpoint: str) -> dict[str, dict[str, Any]]:
    """``storage_options`` as Hugging Face users write them for an S3 bucket."""
    creds = {"key": "testing", "secret": "testing", "endpoint_url": endpoint}
    return {
        "keyed": {"s3": creds},
        "flat": creds,
        "keyed+store": {"s3": creds, "max_workers": 4},
        "flat+store": {**creds, "max_workers": 4},
    }


# ------------------------------------------------------------------ Hugging Face


@pytest.mark.parametrize("spelling", ["keyed", "flat", "keyed+store", "flat+store"])
def test_hf_load_dataset_reads_a_chained_s3_url(
    hf: ModuleType,
    s3_options: dict[str, Any],
    table: str,
    tmp_path: Path,
    spelling: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _allow_downloads(monkeypatch, hf)
    options = _hf_spellings(str(s3_options["endpoint_url"]))[spelling]
    ds = hf.load_dataset(
        "parquet",
        data_files="mlstore::" + table,
        storage_options=options,
        split="train",
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert ds.to_dict() == _frame(0, 10).to_dict(orient="list")


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_load_dataset_globs_a_mount(
    hf: ModuleType,
    s3_options: dict[str, Any],
    s3_bucket: str,
    tmp_path: Path,
    streaming: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not streaming:
        _allow_downloads(monkeypatch, hf)
    _put_parquet(s3_options, f"s3://{s3_bucket}/d/part-0.parquet", _frame(0, 3))
    _put_parquet(s3_options, f"s3://{s3_bucket}/d/part-1.parquet", _frame(3, 4))
    ds = hf.load_dataset(
        "parquet",
        data_files="mlstore://tables/d/*.parquet",
        storage_options={"mounts": {"tables": f"s3://{s3_bucket}"}, "options": {"s3": s3_options}},
        split="train",
        streaming=streaming,
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert sorted(row["id"] for row in ds) == list(range(7))


# ------------------------------------------------- every spelling, one Store config


def _hf_url_to_fs(url: str, storage_options: dict[str, Any]) -> MLStoreFileSystem:
    """The filesystem ``datasets`` builds for ``url``: its own preparation of the
    options, then fsspec's ``url_to_fs``, as ``datasets.data_files`` does."""
    from datasets import DownloadConfig
    from datasets.utils.file_utils import _prepare_path_and_storage_options

    config = DownloadConfig(storage_options=storage_options)
    url, prepared = _prepare_path_and_storage_options(url, download_config=config)
    fs, _ = fsspec.core.url_to_fs(url, **prepared)
    assert isinstance(fs, MLStoreFileSystem)
    return fs


def test_every_spelling_maps_to_one_store_config(hf: ModuleType) -> None:
    s3 = {"endpoint_url": "http://127.0.0.1:1", "region_name": "eu-west-1"}
    url = "mlstore::s3://bucket/d/train.parquet"
    # datasets appends the inner hop again to every file a pattern matched.
    matched = url + "::s3://bucket/d/train.parquet"
    built = {
        "mlstore=": fsspec.core.url_to_fs(url, s3=s3, mlstore={"max_workers": 4})[0],
        "top-level store kwargs": fsspec.core.url_to_fs(url, s3=s3, max_workers=4)[0],
        "target_protocol/target_options/fo": fsspec.filesystem(
            "mlstore", target_protocol="s3", target_options=s3, fo="bucket/k", max_workers=4
        ),
        "simplecache in front": fsspec.core.url_to_fs(
            "simplecache::" + url, s3=s3, mlstore={"max_workers": 4}
        )[0].fs,
    }
    for spelling, options in {
        "keyed": {"s3": s3, "max_workers": 4},
        "flat": {**s3, "max_workers": 4},
    }.items():
        built[f"datasets {spelling}"] = _hf_url_to_fs(url, options)
        built[f"datasets {spelling}, matched"] = _hf_url_to_fs(matched, options)
    for spelling, fs in built.items():
        assert fs.target_protocol == "s3", spelling
        assert fs.store.config.options["s3"] == s3, spelling
        assert fs.store.config.max_workers == 4, spelling
        assert "fo" not in fs.storage_options, spelling
        assert fs is built["mlstore="], f"{spelling}: the same Store setup, another instance"


def test_paths_matched_by_datasets_share_one_filesystem(hf: ModuleType) -> None:
    options = {"s3": {"endpoint_url": "http://127.0.0.1:1"}}
    first = _hf_url_to_fs("mlstore::s3://bucket/a.parquet::s3://bucket/a.parquet", options)
    second = _hf_url_to_fs("mlstore::s3://bucket/b.parquet::s3://bucket/b.parquet", options)
    assert first is second
    assert first is _hf_url_to_fs("mlstore::s3://bucket/c.parquet", options)


def test_the_datasets_spelling_pickles_without_credentials(hf: ModuleType) -> None:
    canary = "HFCANARY" + uuid.uuid4().hex
    options = {"key": "AKIDEXAMPLE", "secret": canary, "endpoint_url": "http://127.0.0.1:1"}
    fs = _hf_url_to_fs("mlstore::s3://bucket/a.parquet::s3://bucket/a.parquet", options)
    assert fs.store.config.options["s3"]["secret"] == canary
    blob = pickle.dumps(fs)
    assert canary.encode() not in blob
    assert canary not in fs.to_json()
    assert pickle.loads(blob).store.config.options["s3"]["endpoint_url"] == "http://127.0.0.1:1"


def test_unknown_options_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        fsspec.filesystem("mlstore", target_protocol="s3", bogus=1)
    with pytest.raises(ConfigError, match="'file'"):
        fsspec.filesystem("mlstore", file={"max_workers": 2})  # no chain: nothing to map
    with pytest.raises(ConfigError, match="gcs"):
        # a different protocol below the target is a chain mlstore cannot serve
        fsspec.filesystem(
            "mlstore",
            target_protocol="s3",
            target_options={"target_protocol": "gcs", "target_options": {}},
        )
    fs = _hf_like(endpoint_ur="http://127.0.0.1:1")  # a typo reaches the backend's check
    with pytest.raises(ConfigError, match="endpoint_ur"):
        fs.info("bucket/k")


def _hf_like(**flat: Any) -> MLStoreFileSystem:
    fs, _ = fsspec.core.url_to_fs(
        "mlstore::s3://bucket/k::s3://bucket/k", file=dict(flat), s3=dict(flat)
    )
    assert isinstance(fs, MLStoreFileSystem)
    return fs


# ------------------------------------------------------------------------- Polars


def test_polars_reads_and_scans_an_opened_mlstore_file(
    s3_options: dict[str, Any], table: str
) -> None:
    import polars as pl

    with fsspec.open("mlstore::" + table, s3=s3_options) as f:
        assert pl.read_parquet(f)["id"].to_list() == list(range(10))
    with fsspec.open("mlstore::" + table, s3=s3_options) as f:
        picked = pl.scan_parquet(f).filter(pl.col("id") >= 7).select("label").collect()
    assert picked["label"].to_list() == ["r7", "r8", "r9"]


def test_polars_reads_a_mount_url_with_storage_options(
    s3_options: dict[str, Any], s3_bucket: str, table: str
) -> None:
    import polars as pl

    df = pl.read_parquet(
        "mlstore://tables/d/train.parquet",
        use_pyarrow=True,
        storage_options={"mounts": {"tables": f"s3://{s3_bucket}"}, "options": {"s3": s3_options}},
    )
    assert df["id"].to_list() == list(range(10))
