"""``mlstore`` as an fsspec filesystem: fsspec's own abstract suite over memory, local
and mount targets, both URL spellings, options, errors, pickling and a real consumer
(pandas + pyarrow Parquet)."""

from __future__ import annotations

import datetime
import io
import json
import os
import pickle
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pytest
from fsspec.implementations.cached import CachingFileSystem
from fsspec.tests.abstract import AbstractFixtures
from fsspec.tests.abstract.copy import AbstractCopyTests
from fsspec.tests.abstract.get import AbstractGetTests
from fsspec.tests.abstract.open import AbstractOpenTests
from fsspec.tests.abstract.pipe import AbstractPipeTests
from fsspec.tests.abstract.put import AbstractPutTests
from pyarrow.fs import FSSpecHandler, PyFileSystem

import mlstore
from mlstore.fsspec import MLStoreFileSystem


@pytest.fixture(autouse=True)
def _fresh_instances() -> Iterator[None]:
    """fsspec caches filesystem instances by their arguments; each test gets new ones
    (and so a Store built under this test's environment)."""
    MLStoreFileSystem.clear_instance_cache()
    yield
    MLStoreFileSystem.clear_instance_cache()


def _memory_prefix() -> str:
    return f"mlstore-fsspec-{uuid.uuid4().hex[:12]}"


def _drop_memory(prefix: str) -> None:
    store = mlstore.Store()
    if store.exists(f"memory://{prefix}"):
        store.rm(f"memory://{prefix}", recursive=True)


# ------------------------------------------------------------ fsspec's abstract suite


class MemoryTargetFixtures(AbstractFixtures):  # type: ignore[misc]
    """``mlstore::memory://``: paths are the memory filesystem's ``/a/b``."""

    @pytest.fixture
    def fs(self) -> MLStoreFileSystem:
        return fsspec.filesystem("mlstore", target_protocol="memory")

    @pytest.fixture
    def fs_join(self) -> Callable[..., str]:
        return lambda *args: "/".join(args)

    @pytest.fixture
    def fs_path(self) -> Iterator[str]:
        prefix = _memory_prefix()
        yield "/" + prefix
        _drop_memory(prefix)


class LocalTargetFixtures(AbstractFixtures):  # type: ignore[misc]
    """``mlstore::file://``: paths are absolute local paths."""

    @pytest.fixture
    def fs(self) -> MLStoreFileSystem:
        return fsspec.filesystem("mlstore", target_protocol="file")

    @pytest.fixture
    def fs_path(self, tmp_path: Path) -> str:
        remote = tmp_path / "remote"
        remote.mkdir()
        return str(remote)


class MountFixtures(AbstractFixtures):  # type: ignore[misc]
    """``mlstore://<mount>/<key>`` over a memory prefix: paths are ``mount/key``."""

    @pytest.fixture
    def fs(self, mount_prefix: str) -> MLStoreFileSystem:
        return fsspec.filesystem("mlstore", mounts={"ds": [f"memory://{mount_prefix}"]})

    @pytest.fixture
    def mount_prefix(self) -> Iterator[str]:
        prefix = _memory_prefix()
        yield prefix
        _drop_memory(prefix)

    @pytest.fixture
    def fs_join(self) -> Callable[..., str]:
        return lambda *args: "/".join(args)

    @pytest.fixture
    def fs_path(self) -> str:
        return "ds"


class TestMemoryCopy(AbstractCopyTests, MemoryTargetFixtures):  # type: ignore[misc]
    pass


class TestMemoryGet(AbstractGetTests, MemoryTargetFixtures):  # type: ignore[misc]
    pass


class TestMemoryPut(AbstractPutTests, MemoryTargetFixtures):  # type: ignore[misc]
    pass


class TestMemoryOpen(AbstractOpenTests, MemoryTargetFixtures):  # type: ignore[misc]
    pass


class TestMemoryPipe(AbstractPipeTests, MemoryTargetFixtures):  # type: ignore[misc]
    pass


class TestLocalCopy(AbstractCopyTests, LocalTargetFixtures):  # type: ignore[misc]
    pass


class TestLocalGet(AbstractGetTests, LocalTargetFixtures):  # type: ignore[misc]
    pass


class TestLocalPut(AbstractPutTests, LocalTargetFixtures):  # type: ignore[misc]
    pass


class TestLocalOpen(AbstractOpenTests, LocalTargetFixtures):  # type: ignore[misc]
    pass


class TestLocalPipe(AbstractPipeTests, LocalTargetFixtures):  # type: ignore[misc]
    pass


class TestMountCopy(AbstractCopyTests, MountFixtures):  # type: ignore[misc]
    pass


class TestMountGet(AbstractGetTests, MountFixtures):  # type: ignore[misc]
    pass


class TestMountPut(AbstractPutTests, MountFixtures):  # type: ignore[misc]
    pass


class TestMountOpen(AbstractOpenTests, MountFixtures):  # type: ignore[misc]
    pass


class TestMountPipe(AbstractPipeTests, MountFixtures):  # type: ignore[misc]
    pass


def test_every_abstract_suite_is_run() -> None:
    """A new Abstract*Tests class in a future fsspec must be added above."""
    import fsspec.tests.abstract as abstract

    suites = {name for name in dir(abstract) if name.startswith("Abstract") and "Tests" in name}
    covered = {
        base.__name__
        for cls in globals().values()
        if isinstance(cls, type) and cls.__name__.startswith("Test")
        for base in cls.__mro__
        if base.__name__.startswith("Abstract") and "Tests" in base.__name__
    }
    assert suites <= covered, suites - covered


# ------------------------------------------------------------ chained spelling


@pytest.fixture
def mem() -> Iterator[str]:
    """A fresh memory prefix (no scheme)."""
    prefix = _memory_prefix()
    yield prefix
    _drop_memory(prefix)


def test_chained_memory_open_write_and_read(mem: str) -> None:
    with fsspec.open(f"mlstore::memory://{mem}/a/b.bin", "wb") as f:
        f.write(b"payload")
    with fsspec.open(f"mlstore::memory://{mem}/a/b.bin", "rb") as f:
        assert f.read() == b"payload"
    # the same bytes through the Store directly
    assert mlstore.read_bytes(f"memory://{mem}/a/b.bin") == b"payload"


def test_chained_text_mode(mem: str) -> None:
    with fsspec.open(f"mlstore::memory://{mem}/t.txt", "w", encoding="utf-8") as f:
        f.write("héllo\nworld\n")
    with fsspec.open(f"mlstore::memory://{mem}/t.txt", "r", encoding="utf-8") as f:
        assert f.readlines() == ["héllo\n", "world\n"]


def test_chained_file(tmp_path: Path) -> None:
    target = tmp_path / "x" / "y.bin"
    with fsspec.open(f"mlstore::file://{target}", "wb") as f:
        f.write(b"local bytes")
    assert target.read_bytes() == b"local bytes"
    with fsspec.open(f"mlstore::file://{target}", "rb") as f:
        f.seek(6)
        assert f.read() == b"bytes"


def test_chained_url_to_fs_paths_and_names(tmp_path: Path, mem: str) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.bin").write_bytes(b"12345")
    fs, path = fsspec.url_to_fs(f"mlstore::file://{tmp_path}/d/f.bin")
    assert isinstance(fs, MLStoreFileSystem)
    assert fs.target_protocol == "file"
    assert path == f"{tmp_path}/d/f.bin"
    assert fs.cat_file(path, start=1, end=3) == b"23"
    assert fs.cat_file(path, start=-2) == b"45"
    assert fs.ls(str(tmp_path), detail=False) == [f"{tmp_path}/d"]
    assert fs.info(f"{tmp_path}/d")["type"] == "directory"
    assert fs.info(path) == {**fs.info(path), "name": path, "size": 5, "type": "file"}
    assert fs.find(str(tmp_path)) == [path]
    assert fs.glob(f"{tmp_path}/*/*.bin") == [path]

    fs, path = fsspec.url_to_fs(f"mlstore::memory://{mem}/k/v.bin")
    assert fs.target_protocol == "memory"
    assert path == f"/{mem}/k/v.bin"
    fs.pipe_file(path, b"v")
    assert fs.ls(f"/{mem}", detail=False) == [f"/{mem}/k"]
    assert fs.find(f"/{mem}") == [path]
    assert fs.find(f"/{mem}", withdirs=True) == [f"/{mem}", f"/{mem}/k", path]
    assert fs.info(path)["name"] == path
    assert fs.isdir(f"/{mem}/k") and fs.isfile(path)


def test_chained_paths_of_other_protocols_are_generic() -> None:
    """The mapping is generic: bucket/key for object stores (aliases made canonical),
    the full URL for http, without touching the network."""
    cases = [
        ("mlstore::s3://bucket/a/key.bin", "s3", "bucket/a/key.bin", "s3://bucket/a/key.bin"),
        ("mlstore::gcs://bucket/key", "gs", "bucket/key", "gs://bucket/key"),
        ("mlstore::gs://bucket/key", "gs", "bucket/key", "gs://bucket/key"),
        ("mlstore::abfs://container/dir/key", "az", "container/dir/key", "az://container/dir/key"),
        ("mlstore::https://example.com/a/b.csv", "https", "https://example.com/a/b.csv", None),
    ]
    for url, canonical, path, store_url in cases:
        fs, got = fsspec.url_to_fs(url)
        assert fs.target_protocol == canonical, url
        assert got == path, url
        parsed = fs._url(got)
        assert str(parsed) == (store_url or got), url
        assert fs._name(parsed) == path, url


def test_chained_options_reach_the_store(mem: str) -> None:
    of = fsspec.open(
        f"mlstore::memory://{mem}/o.bin",
        mlstore={"max_workers": 3, "retry": {"max_attempts": 7}, "mounts": {"m": "memory://x"}},
        memory={"some_option": 1},
    )
    store = of.fs.store
    assert store.config.max_workers == 3
    assert store.config.retry.max_attempts == 7
    assert store.config.mounts["m"] == ("memory://x",)
    assert store.config.options["memory"] == {"some_option": 1}

    fs, _ = fsspec.url_to_fs(
        "mlstore::s3://bucket/key",
        s3={"endpoint_url": "http://127.0.0.1:1"},
        mlstore={"options": {"s3": {"region_name": "eu-west-1"}, "gs": {"project": "p"}}},
    )
    assert fs.store.config.options["s3"] == {
        "region_name": "eu-west-1",
        "endpoint_url": "http://127.0.0.1:1",
    }
    assert fs.store.config.options["gs"] == {"project": "p"}

    fs, _ = fsspec.url_to_fs("mlstore::gcs://bucket/key", gcs={"project": "proj"})
    assert fs.store.config.options["gs"] == {"project": "proj"}


def test_storage_options_with_top_level_store_kwargs(mem: str) -> None:
    fs, _ = fsspec.url_to_fs(f"mlstore::memory://{mem}/x", max_workers=5)
    assert fs.store.config.max_workers == 5


# ------------------------------------------------------------ mounts spelling


def test_mount_filesystem_open(mem: str) -> None:
    fs = fsspec.filesystem("mlstore", mounts={"ds": [f"memory://{mem}/data/ds"]})
    with fs.open("mlstore://ds/x.bin", "wb") as f:
        f.write(b"mounted")
    assert mlstore.read_bytes(f"memory://{mem}/data/ds/x.bin") == b"mounted"
    with fs.open("mlstore://ds/x.bin") as f:
        assert f.read() == b"mounted"
    # bare paths are mount/key; names come back in that form
    assert fs.cat_file("ds/x.bin") == b"mounted"
    assert fs.ls("ds", detail=False) == ["ds/x.bin"]
    assert fs.info("mlstore://ds/x.bin")["name"] == "ds/x.bin"
    assert fs.find("mlstore://ds") == ["ds/x.bin"]
    assert fs.glob("ds/*.bin") == ["ds/x.bin"]
    assert fs.unstrip_protocol("ds/x.bin") == "mlstore://ds/x.bin"


def test_mount_via_fsspec_open_and_url_to_fs(mem: str) -> None:
    mlstore.write_bytes(f"memory://{mem}/a/f.txt", b"via open")
    mounts = {"m": f"memory://{mem}/a"}
    with fsspec.open("mlstore://m/f.txt", "rb", mounts=mounts) as f:
        assert f.read() == b"via open"
    fs, path = fsspec.url_to_fs("mlstore://m/f.txt", mounts=mounts)
    assert path == "m/f.txt"
    assert fs.cat_file(path) == b"via open"


def test_mount_root_lists_mounts_and_empty_mount_is_a_directory(mem: str) -> None:
    fs = fsspec.filesystem("mlstore", mounts={"a": f"memory://{mem}/a", "b": f"memory://{mem}/b"})
    assert fs.ls("", detail=False) == ["a", "b"]
    assert fs.ls("mlstore://", detail=False) == ["a", "b"]
    assert fs.info("")["type"] == "directory"
    assert fs.isdir("b")
    assert fs.ls("b") == []
    with pytest.raises(mlstore.ConfigError, match="unknown mount"):
        fs.info("nope/x")


def test_full_urls_are_accepted_by_every_instance(tmp_path: Path, mem: str) -> None:
    mounts_fs = fsspec.filesystem("mlstore", mounts={"ds": f"memory://{mem}"})
    chained_fs = fsspec.filesystem("mlstore", target_protocol="file")
    for fs in (mounts_fs, chained_fs):
        fs.pipe_file(f"memory://{mem}/full/u.bin", b"u")
        assert fs.cat_file(f"memory://{mem}/full/u.bin") == b"u"
        assert fs.ls(f"memory://{mem}/full", detail=False) == [f"memory://{mem}/full/u.bin"]
        local = tmp_path / f"{id(fs)}.bin"
        fs.pipe_file(f"file://{local}", b"l")
        assert local.read_bytes() == b"l"
        assert fs.info(f"file://{local}")["size"] == 1
    # and across protocols
    chained_fs.cp_file(f"memory://{mem}/full/u.bin", str(tmp_path / "copied.bin"))
    assert (tmp_path / "copied.bin").read_bytes() == b"u"
    assert mounts_fs.unstrip_protocol(f"memory://{mem}/x") == f"mlstore::memory://{mem}/x"


# ------------------------------------------------------------ errors


def test_missing_key_is_file_not_found_naming_the_url(mem: str) -> None:
    of = fsspec.open(f"mlstore::memory://{mem}/missing.bin")
    with pytest.raises(FileNotFoundError, match=f"memory://{mem}/missing.bin"), of as f:
        f.read()
    fs = fsspec.filesystem("mlstore", mounts={"ds": f"memory://{mem}"})
    with pytest.raises(FileNotFoundError, match=f"memory://{mem}/nope"):
        fs.cat_file("ds/nope")
    with pytest.raises(FileNotFoundError):
        fs.info("ds/nope")
    with pytest.raises(FileNotFoundError):
        fs.ls("ds/nope")
    with pytest.raises(FileNotFoundError):
        fs.rm("ds/nope")
    assert not fs.exists("ds/nope")
    assert fs.find("ds/nope") == []


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(mlstore.ConfigError, match="unknown mlstore filesystem option"):
        fsspec.filesystem("mlstore", bogus=1)
    with pytest.raises(mlstore.ConfigError, match="cannot chain"):
        fsspec.filesystem("mlstore", target_protocol="ftp")
    with pytest.raises(mlstore.ConfigError, match="needs a target_protocol"):
        fsspec.filesystem("mlstore", target_options={"a": 1})


def test_exclusive_and_unsupported_modes(mem: str) -> None:
    fs = fsspec.filesystem("mlstore", target_protocol="memory")
    path = f"/{mem}/x.bin"
    with fs.open(path, "xb") as f:
        f.write(b"1")
    with pytest.raises(FileExistsError):
        fs.open(path, "xb")
    with pytest.raises(FileExistsError):
        fs.pipe_file(path, b"2", mode="create")
    with pytest.raises(mlstore.UnsupportedOperation):
        fs.open(path, "ab")
    with pytest.raises(NotImplementedError, match="transactions"), fs.transaction:
        fs.open(path, "wb")


def test_write_is_discarded_when_the_block_raises(mem: str) -> None:
    fs = fsspec.filesystem("mlstore", target_protocol="memory")
    with pytest.raises(RuntimeError), fs.open(f"/{mem}/x.bin", "wb") as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert not fs.exists(f"/{mem}/x.bin")


def test_directory_semantics(mem: str) -> None:
    fs = fsspec.filesystem("mlstore", target_protocol="memory")
    root = f"/{mem}"
    fs.mkdir(f"{root}/a/b")
    assert fs.isdir(f"{root}/a/b")
    assert fs.ls(f"{root}/a/b") == []
    with pytest.raises(FileExistsError):
        fs.mkdir(f"{root}/a/b")
    with pytest.raises(FileExistsError):
        fs.makedirs(f"{root}/a/b")
    fs.makedirs(f"{root}/a/b", exist_ok=True)
    with pytest.raises(FileNotFoundError):
        fs.mkdir(f"{root}/nope/c", create_parents=False)
    fs.pipe_file(f"{root}/a/f", b"f")
    with pytest.raises(FileExistsError):
        fs.makedirs(f"{root}/a/f", exist_ok=True)
    with pytest.raises(IsADirectoryError):
        fs.rm(f"{root}/a")  # not empty, not recursive
    with pytest.raises(OSError, match="not empty"):
        fs.rmdir(f"{root}/a")
    fs.rm(f"{root}/a/b")  # empty: fine without recursive
    assert not fs.exists(f"{root}/a/b")
    fs.rm(f"{root}/a/*")
    assert fs.ls(f"{root}/a") == []
    fs.rmdir(f"{root}/a")
    assert not fs.exists(f"{root}/a")
    with pytest.raises(IsADirectoryError):
        fs.cat_file(root)


def test_ukey_and_modified_follow_the_version(tmp_path: Path) -> None:
    fs = fsspec.filesystem("mlstore", target_protocol="file")
    path = str(tmp_path / "v.bin")
    fs.pipe_file(path, b"one")
    first = fs.ukey(path)
    assert first == fs.ukey(path)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert fs.ukey(path) != first
    assert fs.modified(path) == datetime.datetime(1970, 1, 1, 0, 0, 1, tzinfo=datetime.timezone.utc)
    assert fs.checksum(path) == fs.checksum(path)


def test_get_and_put_file_report_progress(tmp_path: Path, mem: str) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)
    fs = fsspec.filesystem("mlstore", target_protocol="memory")
    seen: list[tuple[str, int]] = []

    class Callback(fsspec.callbacks.Callback):  # type: ignore[misc]
        def call(self, *args: Any, **kwargs: Any) -> None:
            seen.append(("value", self.value))

    fs.put_file(str(src), f"/{mem}/up.bin", callback=Callback())
    assert fs.cat_file(f"/{mem}/up.bin") == b"x" * 1000
    assert seen[-1] == ("value", 1000)
    fs.get_file(f"/{mem}/up.bin", str(tmp_path / "down.bin"))
    assert (tmp_path / "down.bin").read_bytes() == b"x" * 1000


# ------------------------------------------------------------ pickling


def test_pickle_round_trip_and_the_copy_reads(mem: str) -> None:
    fs = fsspec.filesystem("mlstore", mounts={"ds": f"memory://{mem}"}, max_workers=4)
    fs.pipe_file("ds/p.bin", b"pickled")
    clone = pickle.loads(pickle.dumps(fs))
    assert isinstance(clone, MLStoreFileSystem)
    assert clone.cat_file("ds/p.bin") == b"pickled"
    assert clone.store.config.max_workers == 4

    chained = fsspec.filesystem("mlstore", target_protocol="memory")
    clone = pickle.loads(pickle.dumps(chained))
    assert clone.target_protocol == "memory"
    assert clone.cat_file(f"/{mem}/p.bin") == b"pickled"


def test_pickle_drops_credentials(mem: str) -> None:
    fs = fsspec.filesystem(
        "mlstore",
        target_protocol="memory",
        target_options={"secret": "hunter2", "region": "r1"},
        options={"s3": {"aws_secret_access_key": "swordfish", "endpoint_url": "http://e"}},
    )
    data = pickle.dumps(fs)
    assert b"hunter2" not in data and b"swordfish" not in data
    clone = pickle.loads(data)
    assert clone.store.config.options["memory"] == {"region": "r1"}
    assert clone.store.config.options["s3"] == {"endpoint_url": "http://e"}
    fs.pipe_file(f"/{mem}/s.bin", b"s")
    assert clone.cat_file(f"/{mem}/s.bin") == b"s"

    config = mlstore.StoreConfig(options={"gs": {"token": "tok-canary", "project": "p"}})
    data = pickle.dumps(fsspec.filesystem("mlstore", config=config))
    assert b"tok-canary" not in data
    assert pickle.loads(data).store.config.options["gs"] == {"project": "p"}


# ------------------------------------------------------------ a real consumer


def _frame() -> Any:
    return pd.DataFrame(
        {
            "id": list(range(100)),
            "name": [f"row-{i}" for i in range(100)],
            "x": [i / 3 for i in range(100)],
        }
    )


def test_pandas_reads_parquet_through_mlstore(tmp_path: Path) -> None:
    df = _frame()
    path = tmp_path / "table.parquet"
    df.to_parquet(path, engine="pyarrow")
    back = pd.read_parquet(f"mlstore::file://{path}", engine="pyarrow")
    pd.testing.assert_frame_equal(back, df)
    back = pd.read_parquet(
        f"mlstore::file://{path}",
        engine="pyarrow",
        storage_options={"mlstore": {"max_workers": 2}},
    )
    pd.testing.assert_frame_equal(back, df)


def test_pandas_reads_through_a_mount_with_storage_options(tmp_path: Path) -> None:
    df = _frame()
    (tmp_path / "data").mkdir()
    df.to_parquet(tmp_path / "data" / "t.parquet", engine="pyarrow")
    back = pd.read_parquet(
        "mlstore://tables/t.parquet",
        engine="pyarrow",
        storage_options={"mounts": {"tables": [f"file://{tmp_path}/data"]}},
    )
    pd.testing.assert_frame_equal(back, df)


def test_pandas_writes_parquet_through_mlstore(mem: str) -> None:
    df = _frame()
    url = f"mlstore::memory://{mem}/out/table.parquet"
    df.to_parquet(url, engine="pyarrow")
    assert mlstore.read_bytes(f"memory://{mem}/out/table.parquet")[:4] == b"PAR1"
    pd.testing.assert_frame_equal(pd.read_parquet(url, engine="pyarrow"), df)


def test_pandas_csv_text_mode_through_mlstore(mem: str) -> None:
    df = _frame()
    url = f"mlstore::memory://{mem}/t.csv"
    df.to_csv(url, index=False)
    pd.testing.assert_frame_equal(pd.read_csv(url), df)


def test_pyarrow_dataset_over_a_directory(tmp_path: Path) -> None:
    import pyarrow.dataset as ds

    df = _frame()
    (tmp_path / "parts").mkdir()
    df.iloc[:50].to_parquet(tmp_path / "parts" / "0.parquet", engine="pyarrow")
    df.iloc[50:].to_parquet(tmp_path / "parts" / "1.parquet", engine="pyarrow")
    fs, path = fsspec.url_to_fs(f"mlstore::file://{tmp_path}/parts")
    table = ds.dataset(path, filesystem=fs, format="parquet").to_table()
    got = table.to_pandas().sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, df)


def test_serialised_filesystems_carry_no_nested_credentials() -> None:
    """pickle, ``to_json()`` and ``to_dict()`` drop every credential option, however deep
    it sits (``client_kwargs``, ``target_options``, per-protocol ``options``); the other
    options survive, and the copy is a working filesystem."""
    canaries = ["NESTEDCANARY" + uuid.uuid4().hex for _ in range(5)]
    fs = fsspec.filesystem(
        "mlstore",
        skip_instance_cache=True,
        target_protocol="s3",
        target_options={
            "endpoint_url": "http://127.0.0.1:9",
            "client_kwargs": {"aws_access_key_id": canaries[0], "region_name": "eu-west-1"},
            "secret": canaries[1],
        },
        options={
            "gs": {"token": canaries[2]},
            "s3": {"client_kwargs": {"aws_secret_access_key": canaries[3]}},
            "az": {"credential": {"account_key": canaries[4]}},
        },
    )
    blob = pickle.dumps(fs)
    as_json = fs.to_json()
    as_dict = json.dumps(fs.to_dict())
    for where, text in (
        ("pickle", blob.decode("latin-1")),
        ("to_json", as_json),
        ("to_dict", as_dict),
    ):
        assert "eu-west-1" in text, where
        for canary in canaries:
            assert canary not in text, f"a nested credential survived {where}"
    for copy in (pickle.loads(blob), fsspec.AbstractFileSystem.from_json(as_json)):
        assert isinstance(copy, MLStoreFileSystem)
        assert copy.target_protocol == "s3"
        assert copy.store.config.options["s3"]["client_kwargs"] == {"region_name": "eu-west-1"}


# ------------------------------------------------------------ one instance per Store setup


def _instances() -> list[MLStoreFileSystem]:
    return list(MLStoreFileSystem._cache.values())


def test_chained_urls_share_one_filesystem_and_store(mem: str) -> None:
    """The path of a chained URL (fsspec's ``fo``) is not part of the instance: 200 opens
    of 200 paths go through one filesystem and so one Store, not 200 of each."""
    for i in range(200):
        with fsspec.open(f"mlstore::memory://{mem}/{i}.bin", "wb") as f:
            f.write(str(i).encode())
    stores = set()
    for i in range(200):
        of = fsspec.open(f"mlstore::memory://{mem}/{i}.bin", "rb")
        with of as f:
            assert f.read() == str(i).encode()
        stores.add(id(of.fs.store))
    assert len(_instances()) == 1
    assert len(stores) == 1
    # Other Store arguments, or another target, are another filesystem.
    fsspec.open(f"mlstore::memory://{mem}/0.bin", mlstore={"max_workers": 3}).open().close()
    fsspec.open(f"mlstore::file://{os.getcwd()}").fs.ls(os.getcwd())
    assert len(_instances()) == 3


def test_chained_s3_urls_share_one_store(s3_options: dict[str, object], s3_bucket: str) -> None:
    for i in range(20):
        with fsspec.open(f"mlstore::s3://{s3_bucket}/k{i}", "wb", s3=s3_options) as f:
            f.write(b"v%d" % i)
    opened = [fsspec.open(f"mlstore::s3://{s3_bucket}/k{i}", s3=s3_options) for i in range(20)]
    for i, of in enumerate(opened):
        with of as f:
            assert f.read() == b"v%d" % i
    assert len({id(of.fs.store) for of in opened}) == 1
    assert len(_instances()) == 1


def test_a_shared_instance_serialises_to_itself(mem: str) -> None:
    """What fsspec records for an instance (``storage_options``, pickle, JSON) leaves the
    per-path ``fo`` out too, so a copy in the same process is the same instance."""
    fs = fsspec.open(f"mlstore::memory://{mem}/a.bin", "wb", mlstore={"max_workers": 2}).fs
    assert "fo" not in fs.storage_options
    assert fs.storage_options["max_workers"] == 2
    assert pickle.loads(pickle.dumps(fs)) is fs
    assert fsspec.AbstractFileSystem.from_json(fs.to_json()) is fs
    assert fsspec.open(f"mlstore::memory://{mem}/b.bin", mlstore={"max_workers": 2}).fs is fs


# ------------------------------------------------------------ the read file's fsspec contract


class _Progress(fsspec.callbacks.Callback):  # type: ignore[misc]
    """Records the size fsspec announces and the progress it reports."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int | None] = []

    def set_size(self, size: int | None) -> None:
        self.sizes.append(size)
        super().set_size(size)


@pytest.fixture
def targets(
    tmp_path: Path, mem: str, s3_options: dict[str, object], s3_bucket: str
) -> list[tuple[MLStoreFileSystem, str]]:
    """(chained filesystem, directory path) for each kind of backend: S3 (moto), memory
    and local files."""
    s3 = fsspec.filesystem("mlstore", target_protocol="s3", target_options=s3_options)
    return [
        (s3, s3_bucket),
        (fsspec.filesystem("mlstore", target_protocol="memory"), f"/{mem}"),
        (fsspec.filesystem("mlstore", target_protocol="file"), str(tmp_path)),
    ]


def _block_reader_fs(s3_options: dict[str, object]) -> MLStoreFileSystem:
    """An S3 instance whose Store serves objects over 2 KiB block by block from its
    cache (the block reader), so that kind of read file is covered too."""
    return fsspec.filesystem(
        "mlstore",
        target_protocol="s3",
        target_options=s3_options,
        cache={"block_size": 1024, "block_threshold": 2048},
    )


def test_read_file_size_is_known_on_every_backend(
    targets: list[tuple[MLStoreFileSystem, str]],
    s3_options: dict[str, object],
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    """fsspec's ``read_block(path, offset, None)`` and ``get_file``'s progress read the
    file's ``size``: it is the object's length whatever backend or cache tier serves it."""
    data = bytes(range(256)) * 20
    cases = [*targets, (_block_reader_fs(s3_options), s3_bucket)]
    for n, (fs, root) in enumerate(cases):
        path = f"{root}/sized.bin"
        fs.pipe_file(path, data)
        for _ in range(2):  # the second open may be served by the Store's cache
            with fs.open(path, "rb") as f:
                assert f.size == len(data), fs
                assert (f.path, f.fs, f.loc) == (path, fs, 0), fs
                f.read(10)
                assert f.loc == 10
        assert fs.read_block(path, 100, None) == data[100:], fs
        progress = _Progress()
        local = tmp_path / f"down-{n}.bin"
        fs.get_file(path, str(local), callback=progress)
        assert local.read_bytes() == data
        assert (progress.sizes, progress.value) == ([len(data)], len(data)), fs


# fsspec's MMapCache opens its local copy and keeps only the mmap over it, so the file
# object is collected unclosed (it does so over any filesystem).
@pytest.mark.filterwarnings("ignore:unclosed file <_io.BufferedRandom:ResourceWarning")
def test_fsspec_block_caches_over_mlstore(
    s3_options: dict[str, object], s3_bucket: str, mem: str, tmp_path: Path
) -> None:
    """fsspec's ``blockcache``/``cached`` filesystems read mlstore files through their own
    block cache: a partial read fetches blocks, and a file read to the end is then served
    from the local copy (even once the object is gone)."""
    data = bytes(range(256)) * 40
    url = f"s3://{s3_bucket}/blocks.bin"
    with fsspec.open(f"mlstore::{url}", "wb", s3=s3_options) as f:
        f.write(data)
    chained = f"blockcache::mlstore::{url}"
    options = {
        "s3": s3_options,
        "mlstore": {"cache": {"enabled": False}},  # only fsspec's cache keeps a copy
        "blockcache": {"cache_storage": str(tmp_path / "bc")},
    }
    with fsspec.open(chained, "rb", **options) as f:
        f.seek(5000)
        assert f.read(100) == data[5000:5100]
        f.seek(0)
        assert f.read() == data
    with mlstore.Store(options={"s3": s3_options}) as store:
        store.rm(url)
    with fsspec.open(chained, "rb", **options) as f:
        assert f.read() == data

    # The same machinery built by hand over a chained instance, and over a mounts one.
    target = fsspec.filesystem("mlstore", target_protocol="memory")
    target.pipe_file(f"/{mem}/c.bin", data)
    mounts = fsspec.filesystem("mlstore", mounts={"m": f"memory://{mem}"})
    for fs, path in ((target, f"/{mem}/c.bin"), (mounts, "m/c.bin")):
        cached = CachingFileSystem(fs=fs, cache_storage=str(tmp_path / f"c{id(fs)}"))
        with cached.open(path, "rb") as f:
            f.seek(-50, os.SEEK_END)
            assert f.read() == data[-50:]
        assert cached.cat_file(path) == data
        with fsspec.open(f"simplecache::mlstore::memory://{mem}/c.bin", "rb") as f:
            assert f.read() == data


def test_strip_protocol_of_none_is_the_root(mem: str) -> None:
    """``get_mapper("").dirfs`` asks for ``_strip_protocol(None)``: the root, not a
    directory named ``None``."""
    assert MLStoreFileSystem._strip_protocol(None) == ""
    fs = fsspec.filesystem("mlstore", mounts={"doc": f"memory://{mem}"})
    dirfs = fs.get_mapper("").dirfs
    dirfs.pipe_file("doc/a.txt", b"mapped")
    assert fs.cat_file("mlstore://doc/a.txt") == b"mapped"
    assert dirfs.ls("doc", detail=False) == ["doc/a.txt"]


def test_read_on_a_write_file_is_an_unsupported_operation(mem: str) -> None:
    fs = fsspec.filesystem("mlstore", target_protocol="memory")
    with fs.open(f"/{mem}/w.bin", "wb") as f:
        f.write(b"written")
        for read in (f.read, lambda: f.read(1), lambda: f.readinto(bytearray(2)), f.readline):
            with pytest.raises(io.UnsupportedOperation):
                read()
    assert fs.cat_file(f"/{mem}/w.bin") == b"written"


def test_seek_before_the_start_is_refused_by_every_read_file(
    targets: list[tuple[MLStoreFileSystem, str]],
    s3_options: dict[str, object],
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    """A position before 0 is a ``ValueError`` (as fsspec's own files and local files
    refuse it), not silently the start; the position is left where it was."""
    big = fsspec.filesystem("mlstore", target_protocol="s3", target_options=s3_options)
    big.pipe_file(f"{s3_bucket}/big.bin", b"x" * 5000)
    blocks = (_block_reader_fs(s3_options), f"{s3_bucket}/big.bin", 5000)
    cases = [(fs, f"{root}/three.bin", 3) for fs, root in targets] + [blocks]
    for fs, path, size in cases:
        if size == 3:
            fs.pipe_file(path, b"abc")
        for _ in range(2):  # the second open may be served by the Store's cache
            with fs.open(path, "rb") as f:
                with pytest.raises(ValueError):
                    f.seek(-(size + 2), os.SEEK_END)
                assert f.tell() == 0
                f.seek(2)
                with pytest.raises(ValueError):
                    f.seek(-3, os.SEEK_CUR)
                with pytest.raises(ValueError):
                    f.seek(-1)
                assert f.tell() == 2
                assert f.seek(-1, os.SEEK_END) == size - 1
                assert f.seek(-size, os.SEEK_END) == 0
                assert f.read(1) in (b"a", b"x")


def test_append_is_not_implemented_for_pyarrow(mem: str) -> None:
    """fsspec filesystems refuse append mode with ``NotImplementedError``, which pyarrow
    passes on from ``open_append_stream``; it is also mlstore's ``UnsupportedOperation``.
    Nothing is written."""
    fs = fsspec.filesystem("mlstore", target_protocol="memory")
    path = f"/{mem}/log.txt"
    fs.pipe_file(path, b"kept")
    arrow = PyFileSystem(FSSpecHandler(fs))
    with pytest.raises(NotImplementedError, match="append"):
        arrow.open_append_stream(path)
    with pytest.raises(NotImplementedError) as refused:
        fs.open(path, "ab")
    assert isinstance(refused.value, mlstore.UnsupportedOperation)
    assert fs.cat_file(path) == b"kept"
