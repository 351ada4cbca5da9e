"""mlstore.Manifest: built from one listing, saved and loaded (JSON Lines, Parquet), read
pinned to the recorded versions on every backend, and never listing again once loaded."""

from __future__ import annotations

import json
import pathlib
import pickle
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import mlstore
from mlstore import (
    ConfigError,
    Manifest,
    ManifestEntry,
    NotFoundError,
    NotInManifestError,
    PreconditionFailedError,
    Store,
)
from mlstore._util.compact import Tokens
from tests.conftest import run_child
from tests.emulators import ServerProcess
from tests.servers import proxy


@pytest.fixture(params=["memory", "local"])
def root(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[str]:
    """An empty directory-like prefix on each local backend, as a URL."""
    if request.param == "local":
        yield f"file://{tmp_path}/data"
        return
    prefix = f"memory://t-{uuid.uuid4().hex[:12]}"
    yield prefix
    s = Store()
    if s.exists(prefix):
        s.rm(prefix, recursive=True)


DATASET = {
    "train/a.bin": b"alpha",
    "train/b.bin": b"bravo!",
    "train/sub/c.bin": b"charlie",
    "val/d.txt": b"delta",
}


def fill(store: Store, prefix: str) -> None:
    for key, data in DATASET.items():
        store.write_bytes(f"{prefix}/{key}", data)


# ---------------------------------------------------------------- building


def test_build_from_a_prefix_records_every_object_with_its_size_and_version(
    root: str, store: Store
) -> None:
    fill(store, root)
    m = Manifest.build(root, store=store)
    assert m.urls == [f"{root}/{k}" for k in sorted(DATASET)]
    assert len(m) == 4 and m.root == root + "/"
    for entry, key in zip(m, sorted(DATASET), strict=True):
        assert entry.size == len(DATASET[key])
        assert entry.version is not None
        assert entry.version == store.info(entry.url).version
    assert m[-1] == m[3] and m[1:3] == [m[1], m[2]]
    assert m.index(f"{root}/train/sub/c.bin") == 2
    assert f"{root}/val/d.txt" in m and f"{root}/val/e.txt" not in m


def test_find_with_detail_gives_the_infos_of_the_same_files(root: str, store: Store) -> None:
    fill(store, root)
    infos = store.find(root, detail=True)
    assert [str(i.url) for i in infos] == store.find(root)
    assert [i.size for i in infos] == [len(DATASET[k]) for k in sorted(DATASET)]
    assert all(isinstance(i, mlstore.ObjectInfo) and i.version for i in infos)


def test_build_from_a_glob_keeps_only_the_matching_files(root: str, store: Store) -> None:
    fill(store, root)
    assert Manifest.build(f"{root}/train/*.bin", store=store).urls == [
        f"{root}/train/a.bin",
        f"{root}/train/b.bin",
    ]
    deep = Manifest.build(f"{root}/**/*.bin", store=store)
    assert deep.urls == [f"{root}/train/a.bin", f"{root}/train/b.bin", f"{root}/train/sub/c.bin"]
    assert len(Manifest.build(f"{root}/nothing/*.bin", store=store)) == 0


def test_an_empty_prefix_is_not_found(root: str, store: Store) -> None:
    with pytest.raises(NotFoundError, match="no object below"):
        Manifest.build(f"{root}/missing", store=store)


# ---------------------------------------------------------------- saving and loading


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_a_saved_manifest_loads_back_identical(root: str, store: Store, suffix: str) -> None:
    fill(store, root)
    m = Manifest.build(root, store=store)
    target = f"{root}-manifests/m.{suffix}"
    m.save(target)
    loaded = Manifest.load(target, store=store)
    assert list(loaded) == list(m) and loaded.root == m.root
    assert loaded.read_many(range(len(loaded))) == [DATASET[k] for k in sorted(DATASET)]


def test_the_jsonl_file_has_a_header_then_one_entry_a_line(root: str, store: Store) -> None:
    fill(store, root)
    Manifest.build(root, store=store).save(f"{root}-manifests/m.jsonl")
    lines = store.read_bytes(f"{root}-manifests/m.jsonl").decode().splitlines()
    assert json.loads(lines[0]) == {"mlstore_manifest": 1, "root": root + "/", "count": 4}
    first = json.loads(lines[1])
    assert first["key"] == "train/a.bin" and first["size"] == 5 and "version" in first
    assert len(lines) == 5


def test_an_unordered_file_loads_sorted(mem_root: str) -> None:
    url = f"{mem_root}/m.jsonl"
    rows = [{"key": "b", "size": 2}, {"key": "a", "size": 1, "version": '"' + "0" * 32 + '"'}]
    header = {"mlstore_manifest": 1, "root": "s3://bucket/", "count": 2}
    mlstore.write_bytes(url, "\n".join(json.dumps(r) for r in [header, *rows]).encode())
    m = Manifest.load(url)
    assert list(m) == [
        ManifestEntry("s3://bucket/a", 1, '"' + "0" * 32 + '"'),
        ManifestEntry("s3://bucket/b", 2),
    ]


HEADER = '{"mlstore_manifest": 1, "root": "memory://x/", "count": 2}'
ROW = '{"key": "a", "size": 1}'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "line 1: not an mlstore manifest"),
        ('{"key": "a", "size": 1}', "line 1: not an mlstore manifest"),
        ('{"mlstore_manifest": 9, "root": "x", "count": 0}', "line 1: manifest format 9"),
        ('{"mlstore_manifest": 1, "count": 0}', "line 1: the header needs a string root"),
        (f"{HEADER}\n{ROW}\n{{broken", "line 3: not valid JSON"),
        (f'{HEADER}\n{ROW}\n{{"key": "b"}}', "line 3: expected"),
        (f'{HEADER}\n{ROW}\n{{"key": "b", "size": -1}}', "line 3: key must be a string"),
        (f'{HEADER}\n{ROW}\n{{"key": "b", "size": 1, "version": 7}}', "line 3: version must"),
        (f"{HEADER}\n{ROW}\n{ROW}", "line 3: the key 'a' appears twice"),
        (f"{HEADER}\n{ROW}", "the header says 2 entries but the file holds 1"),
        (f"{HEADER}\n{ROW}\n\n\n{ROW}{ROW}", "line 5: not valid JSON"),
    ],
)
def test_a_malformed_file_is_a_config_error_naming_the_url_and_line(
    mem_root: str, text: str, message: str
) -> None:
    url = f"{mem_root}/bad.jsonl"
    mlstore.write_bytes(url, text.encode())
    with pytest.raises(ConfigError) as err:
        Manifest.load(url)
    assert url in str(err.value) and message in str(err.value)


def test_blank_lines_are_skipped(mem_root: str) -> None:
    url = f"{mem_root}/m.jsonl"
    mlstore.write_bytes(url, f'{HEADER}\n\n{ROW}\n  \n{{"key": "b", "size": 2}}\n\n'.encode())
    assert [e.size for e in Manifest.load(url)] == [1, 2]


def test_a_parquet_file_that_is_not_a_manifest_is_a_config_error(mem_root: str) -> None:
    url = f"{mem_root}/bad.parquet"
    mlstore.write_bytes(url, b"PAR1 not really")
    with pytest.raises(ConfigError, match=r"not a Parquet file") as err:
        Manifest.load(url)
    assert url in str(err.value)


def test_an_unknown_suffix_is_a_config_error(mem_root: str) -> None:
    m = Manifest.from_entries([ManifestEntry("memory://x/a", 1)])
    with pytest.raises(ConfigError, match=r"end it in \.jsonl or \.parquet"):
        m.save(f"{mem_root}/m.csv")


# ---------------------------------------------------------------- reading


def test_reads_return_the_recorded_objects_by_position_or_url(root: str, store: Store) -> None:
    fill(store, root)
    m = Manifest.build(root, store=store)
    assert m.read(0) == b"alpha" and m.read(f"{root}/val/d.txt") == b"delta"
    assert m.read_many([3, 0, f"{root}/train/b.bin"], max_workers=3) == [
        b"delta",
        b"alpha",
        b"bravo!",
    ]
    with pytest.raises(NotInManifestError) as err:
        m.read(f"{root}/val/zzz.txt")
    assert isinstance(err.value, KeyError) and f"{root}/val/zzz.txt" in str(err.value)
    with pytest.raises(IndexError):
        m.read(4)


def test_a_changed_local_object_fails_the_pinned_read_or_is_reread(root: str, store: Store) -> None:
    fill(store, root)
    m = Manifest.build(root, store=store)
    url = f"{root}/train/a.bin"
    store.write_bytes(url, b"a new, longer alpha")
    with pytest.raises(PreconditionFailedError) as err:
        m.read(url)
    assert err.value.url == url and "on_change='reread'" in str(err.value)
    assert m.read(url, on_change="reread") == b"a new, longer alpha"
    assert m.changed == [url]
    assert m[m.index(url)].size == 19 and m.read(url) == b"a new, longer alpha"


def test_a_pickled_manifest_reads_the_same(root: str, store: Store) -> None:
    fill(store, root)
    m = Manifest.build(root, store=store)
    copy = pickle.loads(pickle.dumps(m))
    assert list(copy) == list(m) and copy.read(1) == b"bravo!"


def test_secrets_stay_out_of_repr_and_errors() -> None:
    secret = "hunter2-very-secret"
    m = Manifest.from_entries([ManifestEntry(f"https://user:{secret}@example.test/d/a", 1)])
    assert secret not in repr(m)
    with pytest.raises(NotInManifestError) as err:
        m.index(f"https://user:{secret}@example.test/d/b?sig={secret}")
    assert secret not in str(err.value) and secret not in repr(err.value)


def test_packed_tokens_come_back_exactly_as_given() -> None:
    values = [
        None,
        '"0123456789abcdef0123456789abcdef"',  # S3 ETag
        "0123456789abcdef0123456789abcdef",  # a hex digest
        '"0123456789ABCDEF0123456789ABCDEF"',  # capitals: kept as they are
        '"0123456789abcdef0123456789abcdef-3"',  # multipart ETag
        "0123456789abcdef 123456789abcdef0",  # fromhex would accept the space
        "1700000000123456",  # GCS generation
        "0",
        "007",
        "99999999999999999999",  # too large to pack
        '"0x8DC0123456789AB"',  # Azure ETag
        '"0x08DC0123456789AB"',  # a leading zero: not packed, still exact
        '"0xZZ"',
        '"0x8dc0123456789ab"',  # lower case: not packed, still exact
        "1700000000123456789-42",  # local mtime_ns-size
        "1700000000123456789-042",  # not packed, still exact
        "99999999999999999999999-1",  # too large to pack
        "1-2-3",
        "1700000000.123456-42",  # memory mtime-size
        "",
    ]
    tokens = Tokens()
    for v in values:
        tokens.append(v)
    assert [tokens[i] for i in range(len(values))] == values
    tokens.set(0, "12")
    tokens.set(1, None)
    tokens.set(2, "something else")
    assert [tokens[i] for i in range(3)] == ["12", None, "something else"]


# ---------------------------------------------------------------- clouds


@pytest.fixture(
    params=[
        pytest.param("s3", marks=pytest.mark.s3),
        pytest.param("gs", marks=pytest.mark.gcs),
        pytest.param("az", marks=pytest.mark.azure),
    ]
)
def cloud(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """A prefix in a fresh bucket of each cloud emulator, and the Store options for it."""
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return f"s3://{bucket}/data", {"s3": request.getfixturevalue("s3_options")}
    if request.param == "gs":
        bucket = request.getfixturevalue("gcs_bucket")
        return f"gs://{bucket}/data", {"gs": request.getfixturevalue("gcs_options")}
    container = request.getfixturevalue("az_container")
    return f"az://{container}/data", {"az": request.getfixturevalue("az_options")}


def test_a_cloud_object_overwritten_elsewhere_fails_the_pinned_read(
    cloud: tuple[str, dict[str, Any]],
) -> None:
    prefix, options = cloud
    with Store(options=options) as reader, Store(options=options, cache={"enabled": False}) as w:
        fill(w, prefix)
        m = Manifest.build(prefix, store=reader)
        assert all(e.version for e in m), "every cloud listing reports versions"
        assert m.read(0) == b"alpha"
        url = f"{prefix}/train/a.bin"
        assert reader.read_bytes(url) == b"alpha"  # now in the reader's cache, and its info
        w.write_bytes(url, b"ALPHA, rewritten")
        # A copy of the recorded version is the object as recorded: served, no request.
        assert m.read(url) == b"alpha"
        # Where no copy is cached, the pinned GET finds the object changed.
        with pytest.raises(PreconditionFailedError) as err:
            m.read(url, store=w)
        assert err.value.url == url and url in str(err.value)
        assert m.read(url, store=w, on_change="reread") == b"ALPHA, rewritten"
        assert m.changed == [url] and m[0].version == w.info(url).version
        assert m.read(1) == b"bravo!"


def _lists(endpoint: str) -> int:
    return sum(
        1
        for r in proxy.request_log(endpoint)
        if r["method"] == "GET" and "list-type=2" in (r["query"] or "")
    )


@pytest.mark.s3
def test_a_loaded_manifest_reads_pinned_in_a_fresh_process_without_listing(
    s3_bucket: str, s3_proxy: ServerProcess
) -> None:
    endpoint = s3_proxy.endpoint
    prefix = f"s3://{s3_bucket}/data"
    with Store(options={"s3": {"endpoint_url": endpoint}}, cache={"enabled": False}) as s:
        fill(s, prefix)
        proxy.reset(endpoint)
        m = Manifest.build(prefix, store=s)
        # One listing of the first level, one of each common prefix (train/, val/).
        assert _lists(endpoint) == 3
        m.save(f"s3://{s3_bucket}/manifests/train.jsonl")
    proxy.reset(endpoint)
    out = run_child(
        f"""
        import json, mlstore
        store = mlstore.Store(options={{"s3": {{"endpoint_url": {endpoint!r}}}}})
        m = mlstore.Manifest.load("s3://{s3_bucket}/manifests/train.jsonl", store=store)
        print(json.dumps([d.decode() for d in m.read_many(range(len(m)))]))
        """,
        {},
    )
    assert out == [DATASET[k].decode() for k in sorted(DATASET)]
    log = proxy.request_log(endpoint)
    assert _lists(endpoint) == 0 and not any(r["method"] == "HEAD" for r in log)
    pinned = {r["path"].split("/data/", 1)[-1]: r["if_match"] for r in log if "/data/" in r["path"]}
    assert set(pinned) == set(DATASET)
    assert all(etag and etag.startswith('"') for etag in pinned.values())


@pytest.mark.s3
def test_a_flat_prefix_is_one_listing_and_common_prefixes_are_listed_concurrently(
    s3_bucket: str, s3_proxy: ServerProcess
) -> None:
    endpoint = s3_proxy.endpoint
    with Store(options={"s3": {"endpoint_url": endpoint}}, cache={"enabled": False}) as s:
        for i in range(3):
            s.write_bytes(f"s3://{s3_bucket}/flat/{i}.bin", b"x" * i)
        for part in "abcd":
            s.write_bytes(f"s3://{s3_bucket}/tree/{part}/deep/{part}.bin", part.encode())
        proxy.reset(endpoint)
        assert len(Manifest.build(f"s3://{s3_bucket}/flat", store=s)) == 3
        assert _lists(endpoint) == 1
        proxy.set_latency(endpoint, 0.2)  # long enough for listings to overlap
        try:
            proxy.reset(endpoint)
            m = Manifest.build(f"s3://{s3_bucket}/tree", store=s)
            peak = proxy.counts(endpoint)["peak_in_flight"]
        finally:
            proxy.set_latency(endpoint, 0)
    assert [e.url.rsplit("/", 1)[1] for e in m] == ["a.bin", "b.bin", "c.bin", "d.bin"]
    assert _lists(endpoint) == 5 and peak >= 2
