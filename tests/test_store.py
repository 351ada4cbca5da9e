"""The Store facade over memory:// and file://: reading, writing, listing, copying,
mounts, stats, bad input, the module-level functions, pickling and fork."""

from __future__ import annotations

import array
import io
import multiprocessing
import os
import pathlib
import pickle
import uuid
from collections.abc import Iterator

import pytest

import mlstore
from mlstore import ConfigError, NotFoundError, Store, UnsupportedOperation
from mlstore.fsspec import MLStoreFileSystem
from tests.emulators import ServerProcess
from tests.servers import proxy


@pytest.fixture(params=["memory", "local"])
def root(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[str]:
    """An empty directory-like prefix on each backend, as a URL."""
    if request.param == "local":
        yield f"file://{tmp_path}/root"
        return
    prefix = f"memory://t-{uuid.uuid4().hex[:12]}"
    yield prefix
    cleanup = Store()
    if cleanup.exists(prefix):
        cleanup.rm(prefix, recursive=True)


def rel(root: str, urls: list[str]) -> list[str]:
    return [u[len(root) + 1 :] for u in urls]


def populate(store: Store, root: str) -> None:
    for key in ["a.txt", "b.txt", "ab.bin", "c/d.txt", "c/e/f.txt"]:
        store.write_bytes(f"{root}/{key}", key.encode())


# ------------------------------------------------------------------ read and write

DATA = bytes(range(256)) * 4


def test_write_then_read_round_trips(store: Store, root: str) -> None:
    store.write_bytes(f"{root}/x.bin", DATA)
    assert store.read_bytes(f"{root}/x.bin") == DATA
    store.write_bytes(f"{root}/x.bin", b"shorter")
    assert store.read_bytes(f"{root}/x.bin") == b"shorter"


def test_write_accepts_bytearray_and_memoryview(store: Store, root: str) -> None:
    store.write_bytes(f"{root}/a", bytearray(b"abc"))
    store.write_bytes(f"{root}/b", memoryview(b"xyz"))
    assert store.read_many([f"{root}/a", f"{root}/b"]) == [b"abc", b"xyz"]


def test_write_accepts_any_buffer(store: Store, root: str) -> None:
    store.write_bytes(f"{root}/arr", array.array("B", b"buffer protocol"))
    assert store.read_bytes(f"{root}/arr") == b"buffer protocol"


@pytest.mark.parametrize("data", [10**9, 5, "text", [1, 2, 3], None, 1.5])
def test_write_refuses_what_is_not_bytes_like(store: Store, root: str, data: object) -> None:
    # bytes(10**9) would be a gigabyte of zeros and bytes("x") a TypeError without the
    # URL: neither says what went wrong, and the first writes it.
    url = f"{root}/not-bytes"
    with pytest.raises(TypeError, match="bytes-like") as caught:
        store.write_bytes(url, data)  # type: ignore[arg-type]
    assert url in str(caught.value) and type(data).__name__ in str(caught.value)
    assert not store.exists(url)


def test_a_refused_write_sends_no_request(s3_proxy: ServerProcess, s3_bucket: str) -> None:
    proxy.reset(s3_proxy.endpoint)
    store = Store(options={"s3": {"endpoint_url": s3_proxy.endpoint}}, cache={"enabled": False})
    url = f"s3://{s3_bucket}/not-bytes"
    with pytest.raises(TypeError, match="bytes-like"):
        store.write_bytes(url, 10**9)  # type: ignore[arg-type]
    assert proxy.counts(s3_proxy.endpoint)["total"] == 0


def test_fsspec_pipe_file_refuses_what_is_not_bytes_like(mem_root: str) -> None:
    fs = MLStoreFileSystem(skip_instance_cache=True)
    path = f"{mem_root}/piped"
    with pytest.raises(TypeError, match="bytes-like") as caught:
        fs.pipe_file(path, 10**6)
    assert path in str(caught.value)
    with pytest.raises(TypeError, match="bytes-like"):
        fs.pipe(path, "text")
    with pytest.raises(TypeError, match="bytes-like"):
        fs.pipe_file(path, None, mode="create")
    assert not fs.exists(path)
    fs.pipe_file(path, memoryview(b"ok"))
    assert fs.cat_file(path) == b"ok"


def test_empty_object(store: Store, root: str) -> None:
    store.write_bytes(f"{root}/empty", b"")
    assert store.read_bytes(f"{root}/empty") == b""
    assert store.info(f"{root}/empty").size == 0
    with store.open(f"{root}/empty") as fh:
        assert fh.read() == b""


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (None, None),
        (0, 10),
        (10, None),
        (None, 10),
        (-10, None),
        (-10, -2),
        (None, -1),
        (5, -5),
        (100, 50),
        (2000, 3000),
        (-5000, 3),
        (1023, 1024),
        (0, 0),
    ],
)
def test_read_bytes_slices_like_python(
    store: Store, root: str, start: int | None, end: int | None
) -> None:
    store.write_bytes(f"{root}/x.bin", DATA)
    assert store.read_bytes(f"{root}/x.bin", start, end) == DATA[start:end]


def test_open_binary(store: Store, root: str) -> None:
    with store.open(f"{root}/d/x.bin", "wb") as fh:
        fh.write(DATA[:100])
        fh.write(DATA[100:])
    with store.open(f"{root}/d/x.bin", "rb") as fh:
        assert fh.read(10) == DATA[:10]
        fh.seek(-4, io.SEEK_END)
        assert fh.read() == DATA[-4:]
        fh.seek(500)
        assert fh.tell() == 500
        buf = bytearray(8)
        assert fh.readinto(buf) == 8
        assert bytes(buf) == DATA[500:508]


def test_open_text(store: Store, root: str) -> None:
    with store.open(f"{root}/t.txt", "w", encoding="utf-8") as fh:
        fh.write("héllo\nwörld\n")
    assert store.read_bytes(f"{root}/t.txt") == "héllo\nwörld\n".encode()
    with store.open(f"{root}/t.txt", "r", encoding="utf-8") as fh:
        assert fh.readline() == "héllo\n"
        assert fh.read() == "wörld\n"
    with store.open(f"{root}/t.txt", "rt", encoding="latin-1") as fh:
        assert fh.read() == "héllo\nwörld\n".encode().decode("latin-1")


def test_text_write_interrupted_by_an_exception_publishes_nothing(store: Store, root: str) -> None:
    store.write_bytes(f"{root}/t.txt", b"old")
    with pytest.raises(RuntimeError), store.open(f"{root}/t.txt", "w") as fh:
        fh.write("new content")
        raise RuntimeError("boom")
    assert store.read_bytes(f"{root}/t.txt") == b"old"


def test_binary_write_interrupted_by_an_exception_publishes_nothing(
    store: Store, root: str
) -> None:
    with pytest.raises(RuntimeError), store.open(f"{root}/new.bin", "wb") as fh:
        fh.write(b"partial")
        raise RuntimeError("boom")
    assert not store.exists(f"{root}/new.bin")


def test_unknown_text_encoding_writes_nothing(store: Store, root: str) -> None:
    with pytest.raises(LookupError):
        store.open(f"{root}/t.txt", "w", encoding="no-such-codec")
    assert not store.exists(f"{root}/t.txt")


# ------------------------------------------------------------------ listing


def test_ls(store: Store, root: str) -> None:
    populate(store, root)
    assert rel(root, store.ls(root)) == ["a.txt", "ab.bin", "b.txt", "c"]
    assert rel(root, store.ls(f"{root}/c")) == ["c/d.txt", "c/e"]
    entries = store.ls(root, detail=True)
    kinds = {str(e.url)[len(root) + 1 :]: (e.type, e.size) for e in entries}
    assert kinds == {
        "a.txt": ("file", 5),
        "ab.bin": ("file", 6),
        "b.txt": ("file", 5),
        "c": ("directory", 0),
    }


def test_ls_of_a_file_lists_the_file(store: Store, root: str) -> None:
    populate(store, root)
    assert store.ls(f"{root}/a.txt") == [f"{root}/a.txt"]


def test_info_and_exists(store: Store, root: str) -> None:
    populate(store, root)
    info = store.info(f"{root}/c/d.txt")
    assert str(info.url) == f"{root}/c/d.txt"
    assert info.size == len(b"c/d.txt")
    assert info.type == "file" and not info.is_dir
    assert info.version is not None
    assert info.as_dict()["name"] == f"{root}/c/d.txt"
    assert store.info(f"{root}/c").is_dir
    assert store.exists(f"{root}/a.txt")
    assert store.exists(f"{root}/c")
    assert not store.exists(f"{root}/nope")
    assert not store.exists(f"{root}/c/nope/deeper")


def test_version_changes_when_content_changes(store: Store, root: str) -> None:
    store.write_bytes(f"{root}/v", b"one")
    first = store.info(f"{root}/v").version
    store.write_bytes(f"{root}/v", b"three")
    assert store.info(f"{root}/v").version != first


def test_find(store: Store, root: str) -> None:
    populate(store, root)
    assert rel(root, store.find(root)) == ["a.txt", "ab.bin", "b.txt", "c/d.txt", "c/e/f.txt"]
    assert rel(root, store.find(f"{root}/c")) == ["c/d.txt", "c/e/f.txt"]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("*.txt", ["a.txt", "b.txt"]),
        ("?.txt", ["a.txt", "b.txt"]),
        ("??.bin", ["ab.bin"]),
        ("[ab].txt", ["a.txt", "b.txt"]),
        ("[b]*", ["b.txt"]),
        ("[!a]*", ["b.txt", "c"]),
        ("*", ["a.txt", "ab.bin", "b.txt", "c"]),
        ("c/*", ["c/d.txt", "c/e"]),
        ("*/*.txt", ["c/d.txt"]),
        ("**/*.txt", ["a.txt", "b.txt", "c/d.txt", "c/e/f.txt"]),
        ("c/**/f.txt", ["c/e/f.txt"]),
        ("c/**", ["c/d.txt", "c/e", "c/e/f.txt"]),
        ("a.txt", ["a.txt"]),
        ("nope.txt", []),
        ("*.csv", []),
        ("nope/*", []),
    ],
)
def test_glob(store: Store, root: str, pattern: str, expected: list[str]) -> None:
    populate(store, root)
    assert rel(root, store.glob(f"{root}/{pattern}")) == expected


def test_glob_from_the_top_of_memory(store: Store, mem_root: str) -> None:
    store.write_bytes(f"{mem_root}/x.txt", b"x")
    assert store.glob(f"{mem_root}*") == [mem_root]
    assert store.glob(f"{mem_root}*/*.txt") == [f"{mem_root}/x.txt"]


def test_mkdir(store: Store, root: str) -> None:
    store.mkdir(f"{root}/m/n")
    store.mkdir(f"{root}/m/n")  # twice is fine
    store.write_bytes(f"{root}/m/n/x", b"x")
    assert store.read_bytes(f"{root}/m/n/x") == b"x"


def test_mkdir_creates_local_directories(store: Store, tmp_path: pathlib.Path) -> None:
    store.mkdir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    assert store.info(tmp_path / "a" / "b").is_dir


# ------------------------------------------------------------------ rm


def test_rm_file(store: Store, root: str) -> None:
    populate(store, root)
    store.rm(f"{root}/a.txt")
    assert not store.exists(f"{root}/a.txt")
    assert store.exists(f"{root}/b.txt")


def test_rm_recursive(store: Store, root: str) -> None:
    populate(store, root)
    store.rm(f"{root}/c", recursive=True)
    assert not store.exists(f"{root}/c")
    assert store.find(root) == [f"{root}/{k}" for k in ("a.txt", "ab.bin", "b.txt")]


def test_rm_directory_needs_recursive(store: Store, root: str) -> None:
    populate(store, root)
    with pytest.raises(IsADirectoryError, match="recursive=True"):
        store.rm(f"{root}/c")
    assert store.exists(f"{root}/c/d.txt")


def test_rm_missing(store: Store, root: str) -> None:
    with pytest.raises(NotFoundError) as info:
        store.rm(f"{root}/nope")
    assert f"{root}/nope" in str(info.value)


# ------------------------------------------------------------------ copy


def test_copy_file_between_backends(store: Store, mem_root: str, tmp_path: pathlib.Path) -> None:
    store.write_bytes(f"{mem_root}/src.bin", DATA)
    assert store.copy(f"{mem_root}/src.bin", tmp_path / "dst.bin") == [f"file://{tmp_path}/dst.bin"]
    assert (tmp_path / "dst.bin").read_bytes() == DATA
    store.copy(tmp_path / "dst.bin", f"{mem_root}/back.bin")
    assert store.read_bytes(f"{mem_root}/back.bin") == DATA


def test_copy_file_within_a_backend(store: Store, root: str) -> None:
    store.write_bytes(f"{root}/a", DATA)
    store.copy(f"{root}/a", f"{root}/sub/b")
    assert store.read_bytes(f"{root}/sub/b") == DATA
    assert store.read_bytes(f"{root}/a") == DATA


@pytest.mark.parametrize("direction", ["memory->local", "local->memory", "same backend"])
def test_copy_directory_recursively(
    store: Store, mem_root: str, tmp_path: pathlib.Path, direction: str
) -> None:
    local = f"file://{tmp_path}/tree"
    src, dst = {
        "memory->local": (f"{mem_root}/tree", local),
        "local->memory": (local, f"{mem_root}/tree"),
        "same backend": (f"{mem_root}/tree", f"{mem_root}/copy"),
    }[direction]
    files = {"a.bin": DATA, "sub/b.bin": DATA[:300], "sub/deep/c.txt": b"c", "empty": b""}
    for key, data in files.items():
        store.write_bytes(f"{src}/{key}", data)
    progress: list[tuple[int, int]] = []
    written = store.copy(src, dst, recursive=True, progress=lambda d, t: progress.append((d, t)))
    assert sorted(written) == sorted(f"{dst}/{k}" for k in files)
    for key, data in files.items():
        assert store.read_bytes(f"{dst}/{key}") == data
    total = sum(len(d) for d in files.values())
    done = [d for d, _ in progress]
    assert done == sorted(done)
    assert {t for _, t in progress} == {total}
    assert progress[-1] == (total, total)


def test_copy_progress_for_empty_files_still_finishes(
    store: Store, mem_root: str, tmp_path: pathlib.Path
) -> None:
    store.write_bytes(f"{mem_root}/e/1", b"")
    store.write_bytes(f"{mem_root}/e/2", b"")
    progress: list[tuple[int, int]] = []
    store.copy(
        f"{mem_root}/e", tmp_path / "e", recursive=True, progress=lambda *a: progress.append(a)
    )
    assert progress[-1] == (0, 0)
    assert sorted(os.listdir(tmp_path / "e")) == ["1", "2"]


def test_copy_directory_needs_recursive(
    store: Store, mem_root: str, tmp_path: pathlib.Path
) -> None:
    store.write_bytes(f"{mem_root}/d/x", b"x")
    with pytest.raises(IsADirectoryError, match="recursive=True"):
        store.copy(f"{mem_root}/d", tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_copy_missing_source(store: Store, root: str, tmp_path: pathlib.Path) -> None:
    with pytest.raises(NotFoundError, match="nope"):
        store.copy(f"{root}/nope", tmp_path / "x")


# ------------------------------------------------------------------ read_many


def test_read_many_keeps_input_order(store: Store, root: str) -> None:
    urls = [f"{root}/{i:03d}" for i in range(60)]
    for i, url in enumerate(urls):
        store.write_bytes(url, str(i).encode() * (i % 7 + 1))
    shuffled = urls[::-1] + urls[::3]
    expected = [store.read_bytes(u) for u in shuffled]
    assert store.read_many(shuffled) == expected
    assert store.read_many(shuffled, max_workers=1) == expected
    assert store.read_many([]) == []


def test_read_many_raises_the_failure(store: Store, root: str) -> None:
    for i in range(10):
        store.write_bytes(f"{root}/{i}", b"x")
    urls = [f"{root}/{i}" for i in range(10)]
    urls.insert(5, f"{root}/missing")
    with pytest.raises(NotFoundError) as info:
        store.read_many(urls)
    assert f"{root}/missing" in str(info.value)


# ------------------------------------------------------------------ stats


def test_stats_count_requests_and_bytes_per_protocol(
    store: Store, mem_root: str, tmp_path: pathlib.Path
) -> None:
    before = store.stats()
    store.write_bytes(f"{mem_root}/a", b"12345")
    store.read_bytes(f"{mem_root}/a")
    store.read_bytes(f"{mem_root}/a", 1, 3)
    store.write_bytes(tmp_path / "f", b"abc")
    store.read_bytes(tmp_path / "f")
    delta = store.stats() - before
    assert delta.get("requests", "memory") == 3
    assert delta.get("bytes_written", "memory") == 5
    assert delta.get("bytes_read", "memory") == 7
    assert delta.get("requests", "file") == 2
    assert delta.get("bytes_written", "file") == 3
    assert delta.get("bytes_read", "file") == 3
    assert delta["requests"] == 5
    assert delta.by_protocol["memory"]["bytes_read"] == 7
    assert "memory" in delta.table() and "file" in delta.table()


def test_stats_count_errors(store: Store, mem_root: str) -> None:
    before = store.stats()
    with pytest.raises(NotFoundError):
        store.read_bytes(f"{mem_root}/nope")
    delta = store.stats() - before
    assert delta.get("errors", "memory") == 1


def test_stats_count_file_writes_on_close(store: Store, mem_root: str) -> None:
    before = store.stats()
    with store.open(f"{mem_root}/w", "wb") as fh:
        fh.write(b"abc")
        fh.write(b"de")
    assert (store.stats() - before).get("bytes_written", "memory") == 5


def test_stats_subtraction_and_snapshot_immutability(store: Store, mem_root: str) -> None:
    store.write_bytes(f"{mem_root}/a", b"x")
    snapshot = store.stats()
    requests = snapshot["requests"]
    store.read_bytes(f"{mem_root}/a")
    assert snapshot["requests"] == requests  # a snapshot does not move
    assert (store.stats() - snapshot)["requests"] == 1
    assert (snapshot - snapshot)["requests"] == 0
    assert snapshot["no-such-metric"] == 0


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_stats_count_bytes_read_through_open(
    store: Store, mem_root: str, tmp_path: pathlib.Path, kind: str
) -> None:
    url = f"{mem_root}/o" if kind == "memory" else f"file://{tmp_path}/o"
    protocol = "memory" if kind == "memory" else "file"
    store.write_bytes(url, DATA)
    before = store.stats()
    with store.open(url, buffer_size=100) as fh:
        fh.seek(1000)
        assert fh.read(10) == DATA[1000:1010]
    delta = store.stats() - before
    assert 10 <= delta.get("bytes_read", protocol) <= 100
    assert delta.get("requests", protocol) >= 1


def test_stats_difference_shows_only_what_changed(
    store: Store, mem_root: str, tmp_path: pathlib.Path
) -> None:
    store.write_bytes(tmp_path / "f", b"x")
    before = store.stats()
    store.write_bytes(f"{mem_root}/a", b"xy")
    delta = store.stats() - before
    assert delta.by_protocol == {"memory": {"requests": 1, "put_requests": 1, "bytes_written": 2}}
    assert "file" not in delta.table()
    with pytest.raises(TypeError):
        store.stats() - 1  # type: ignore[operator]


def test_stats_are_per_store(mem_root: str) -> None:
    a, b = Store(), Store()
    a.write_bytes(f"{mem_root}/x", b"x")
    assert a.stats()["requests"] == 1
    assert b.stats()["requests"] == 0


# ------------------------------------------------------------------ mounts


def test_read_write_and_list_through_a_mount(store: Store, root: str) -> None:
    populate(store, root)
    mounted = Store(mounts={"ds": [root]})
    assert mounted.read_bytes("mlstore://ds/c/d.txt") == b"c/d.txt"
    assert mounted.read_bytes("mlstore://ds/c/d.txt", -3) == b"txt"
    with mounted.open("mlstore://ds/a.txt") as fh:
        assert fh.read() == b"a.txt"
    assert mounted.ls("mlstore://ds") == [
        "mlstore://ds/a.txt",
        "mlstore://ds/ab.bin",
        "mlstore://ds/b.txt",
        "mlstore://ds/c",
    ]
    assert mounted.ls("mlstore://ds/c") == ["mlstore://ds/c/d.txt", "mlstore://ds/c/e"]
    assert [str(e.url) for e in mounted.ls("mlstore://ds/c/e", detail=True)] == [
        "mlstore://ds/c/e/f.txt"
    ]
    assert mounted.find("mlstore://ds/c") == ["mlstore://ds/c/d.txt", "mlstore://ds/c/e/f.txt"]
    assert mounted.glob("mlstore://ds/**/*.txt") == [
        "mlstore://ds/a.txt",
        "mlstore://ds/b.txt",
        "mlstore://ds/c/d.txt",
        "mlstore://ds/c/e/f.txt",
    ]
    assert str(mounted.info("mlstore://ds/c/d.txt").url) == "mlstore://ds/c/d.txt"
    assert mounted.exists("mlstore://ds/a.txt")
    mounted.write_bytes("mlstore://ds/new", b"new")
    assert store.read_bytes(f"{root}/new") == b"new"


def test_mount_writes_go_to_the_first_replica(store: Store, mem_root: str) -> None:
    mounted = Store(mounts={"ds": [f"{mem_root}/primary", f"{mem_root}/replica"]})
    mounted.write_bytes("mlstore://ds/x", b"x")
    assert store.exists(f"{mem_root}/primary/x")
    assert not store.exists(f"{mem_root}/replica/x")


# ------------------------------------------------------------------ bad input


def test_unknown_scheme(store: Store) -> None:
    with pytest.raises(ConfigError, match="unknown URL scheme"):
        store.read_bytes("ftp://host/file")


def test_malformed_url(store: Store) -> None:
    with pytest.raises(ConfigError, match="no bucket"):
        store.read_bytes("s3:///key")


@pytest.mark.parametrize("call", ["read_bytes", "info", "open", "ls"])
def test_missing_object_names_the_url(store: Store, root: str, call: str) -> None:
    url = f"{root}/no/such/object.bin"
    with pytest.raises(NotFoundError) as info:
        getattr(store, call)(url)
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.url == url
    assert url in str(info.value)


def test_reading_a_directory(store: Store, root: str) -> None:
    populate(store, root)
    with pytest.raises(IsADirectoryError, match="directory"):
        store.read_bytes(f"{root}/c")
    with pytest.raises(IsADirectoryError):
        store.open(f"{root}/c")


@pytest.mark.parametrize("mode", ["a", "ab", "r+", "w+b", "x", "rbt", "rw", "", "br"])
def test_unsupported_open_mode(store: Store, root: str, mode: str) -> None:
    store.write_bytes(f"{root}/a", b"a")
    with pytest.raises(UnsupportedOperation, match="not supported") as info:
        store.open(f"{root}/a", mode)
    assert isinstance(info.value, io.UnsupportedOperation)
    assert store.read_bytes(f"{root}/a") == b"a"


@pytest.mark.parametrize("how", ["write_bytes", "open"])
def test_writing_over_a_directory(store: Store, root: str, how: str) -> None:
    populate(store, root)
    with pytest.raises(IsADirectoryError):
        if how == "write_bytes":
            store.write_bytes(f"{root}/c", b"x")
        else:
            with store.open(f"{root}/c", "wb") as fh:
                fh.write(b"x")
    assert store.info(f"{root}/c").is_dir
    assert store.read_bytes(f"{root}/c/d.txt") == b"c/d.txt"


def test_http_urls_are_read_only(store: Store) -> None:
    with pytest.raises(UnsupportedOperation, match="read-only"):
        store.write_bytes("https://example.invalid/x", b"x")
    with pytest.raises(UnsupportedOperation, match="read-only"):
        store.open("https://example.invalid/x", "wb")
    with pytest.raises(UnsupportedOperation, match="read-only"):
        store.rm("https://example.invalid/x")


# ------------------------------------------------------------------ module level


def test_module_functions_use_the_default_store(mem_root: str, tmp_path: pathlib.Path) -> None:
    url = f"{mem_root}/m.txt"
    mlstore.write_bytes(url, b"module")
    assert mlstore.read_bytes(url) == b"module"
    assert mlstore.read_bytes(url, 1, -1) == b"odul"
    assert mlstore.exists(url)
    assert mlstore.info(url).size == 6
    assert mlstore.ls(mem_root) == [url]
    assert mlstore.find(mem_root) == [url]
    assert mlstore.glob(f"{mem_root}/*.txt") == [url]
    assert mlstore.read_many([url, url]) == [b"module", b"module"]
    with mlstore.open(url) as fh:
        assert fh.read() == b"module"
    assert mlstore.copy(url, tmp_path / "m.txt") == [f"file://{tmp_path}/m.txt"]
    mlstore.rm(url)
    assert not mlstore.exists(url)
    assert mlstore.stats() == mlstore.default_store().stats()
    assert mlstore.stats().get("bytes_written", "memory") == 6


def test_set_default_store(mem_root: str) -> None:
    custom = Store(mounts={"ds": mem_root})
    mlstore.set_default_store(custom)
    assert mlstore.default_store() is custom
    mlstore.write_bytes("mlstore://ds/x", b"via mount")
    assert custom.read_bytes(f"{mem_root}/x") == b"via mount"
    mlstore.set_default_store(None)
    assert mlstore.default_store() is not custom


def test_default_store_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, mem_root: str
) -> None:
    monkeypatch.setenv("MLSTORE_MAX_WORKERS", "3")
    mlstore.set_default_store(None)
    assert mlstore.default_store().config.max_workers == 3


# ------------------------------------------------------------------ pickling and fork

CANARIES = {
    "s3": {
        "secret": "CANARY123",
        "key": "CANARY456",
        "endpoint_url": "http://x",
        "client_kwargs": {"aws_secret_access_key": "CANARY789", "region_name": "eu"},
    },
    "az": {"account_name": "acct", "account_key": "CANARYAZ", "sas_token": "CANARYSAS"},
    "gs": {"token": "CANARYGS", "project": "p"},
}


def test_pickled_store_round_trips_and_works(mem_root: str) -> None:
    store = Store(mounts={"ds": [mem_root]}, retry={"max_attempts": 3}, max_workers=4)
    store.write_bytes("mlstore://ds/a", b"before")  # a live backend must not break pickling
    copy = pickle.loads(pickle.dumps(store))
    assert copy.config.retry.max_attempts == 3
    assert copy.config.max_workers == 4
    assert dict(copy.config.mounts) == dict(store.config.mounts)
    assert copy.read_bytes("mlstore://ds/a") == b"before"
    copy.write_bytes("mlstore://ds/b", b"after")
    assert store.read_bytes("mlstore://ds/b") == b"after"


def test_every_setting_but_credentials_crosses_a_pickle() -> None:
    """A DataLoader worker gets the Store its parent configured, field by field (options
    aside: credentials are re-resolved in the child, never pickled)."""
    import dataclasses

    store = Store(
        max_workers=5,
        replica_failures=7,
        replica_cooldown=9.0,
        multipart_threshold=96 * 1024 * 1024,
        multipart_part_size=8 * 1024 * 1024,
        multipart_concurrency=3,
        dedupe_writes="off",
        cost={"egress": "internet", "classes": {"s3": "s3-express"}},
        cache={"ttl": 12.0, "write_through": True},
    )
    copy = pickle.loads(pickle.dumps(store)).config
    for f in dataclasses.fields(store.config):
        if f.name != "options":
            assert getattr(copy, f.name) == getattr(store.config, f.name), f.name


def test_pickle_and_repr_carry_no_secrets() -> None:
    store = Store(options=CANARIES)
    data = pickle.dumps(store)
    assert b"CANARY" not in data
    for text in (repr(store), repr(store.config), str(store.config)):
        assert "CANARY" not in text
    copy = pickle.loads(data)
    assert copy.config.options["s3"]["endpoint_url"] == "http://x"
    assert copy.config.options["s3"]["client_kwargs"] == {"region_name": "eu"}
    assert copy.config.options["az"] == {"account_name": "acct"}
    assert copy.config.options["gs"] == {"project": "p"}
    # the original keeps its credentials for this process
    assert store.config.options["s3"]["secret"] == "CANARY123"


def test_unpickled_store_picks_up_secrets_from_the_config_file(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker re-resolves credentials from its own config, never from the pickle.
    data = pickle.dumps(Store(options={"s3": {"secret": "FROM-CODE"}}))
    (tmp_path / "c.toml").write_text('[options.s3]\nsecret = "FROM-FILE"\n')
    monkeypatch.setenv("MLSTORE_CONFIG", str(tmp_path / "c.toml"))
    assert pickle.loads(data).config.options["s3"]["secret"] == "FROM-FILE"


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_store_created_before_fork_works_in_the_child(store: Store, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "data.bin"
    store.write_bytes(path, DATA)
    assert store.read_bytes(path) == DATA  # the parent has live clients before the fork
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()

    def child() -> None:
        try:
            with store.open(path) as fh:
                fh.seek(10)
                head = fh.read(5)
            store.write_bytes(tmp_path / "from-child.bin", b"child %d" % os.getpid())
            results.put(("ok", store.read_bytes(path), head, os.getpid()))
        except BaseException as exc:
            results.put(("error", repr(exc), b"", 0))

    proc = ctx.Process(target=child)
    proc.start()
    status, data, head, pid = results.get(timeout=60)
    proc.join(60)
    assert status == "ok", data
    assert proc.exitcode == 0
    assert pid != os.getpid()
    assert data == DATA
    assert head == DATA[10:15]
    assert (tmp_path / "from-child.bin").read_bytes() == b"child %d" % pid
    assert store.read_bytes(path) == DATA  # and the parent still works
