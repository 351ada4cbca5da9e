"""The behaviour every backend must show, written once and run against each backend.

A test class for one backend subclasses the mixins it supports and provides two
fixtures: ``store`` (a :class:`mlstore.Store` that can reach the backend) and ``root``
(a URL prefix that is empty at the start of the test). Read-only backends (http) also
override :meth:`ReadConformance.put` to place objects some other way.
"""

from __future__ import annotations

import io
import os

import pytest

import mlstore
from mlstore import Store

LARGE = 65 * 1024 * 1024 + 123  # just over 64 MiB, not a multiple of any block size


def payload(n: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible-looking bytes."""
    import random

    return random.Random(seed).randbytes(n)


class ReadConformance:
    """Reads, metadata and version pinning."""

    def put(self, store: Store, url: str, data: bytes) -> None:
        store.write_bytes(url, data)

    def test_read_whole_and_ranges(self, store: Store, root: str) -> None:
        data = payload(10_000)
        url = f"{root}/obj.bin"
        self.put(store, url, data)
        assert store.read_bytes(url) == data
        assert store.read_bytes(url, 100, 200) == data[100:200]
        assert store.read_bytes(url, 9_990) == data[9_990:]
        assert store.read_bytes(url, None, 10) == data[:10]
        assert store.read_bytes(url, -10) == data[-10:]
        assert store.read_bytes(url, 5, -5) == data[5:-5]
        assert store.read_bytes(url, 20_000) == b""
        assert store.read_bytes(url, 50, 40) == b""

    def test_info(self, store: Store, root: str) -> None:
        url = f"{root}/info.bin"
        self.put(store, url, payload(1234))
        info = store.info(url)
        assert info.size == 1234
        assert info.type == "file"
        assert info.version

    def test_version_changes_on_overwrite(self, store: Store, root: str) -> None:
        url = f"{root}/v.bin"
        self.put(store, url, b"first version")
        v1 = store.info(url).version
        self.put(store, url, b"second version!")
        v2 = store.info(url).version
        assert v1 != v2
        assert store.read_bytes(url) == b"second version!"

    def test_empty_object(self, store: Store, root: str) -> None:
        url = f"{root}/empty"
        self.put(store, url, b"")
        assert store.read_bytes(url) == b""
        assert store.info(url).size == 0
        with store.open(url) as fh:
            assert fh.read() == b""

    @pytest.mark.parametrize("key", ["ünï cödé/ñ.bin", "with space/a b+c.txt", "x=1&y=2"])
    def test_unusual_keys(self, store: Store, root: str, key: str) -> None:
        url = f"{root}/{key}"
        self.put(store, url, key.encode())
        assert store.read_bytes(url) == key.encode()
        assert store.info(url).size == len(key.encode())

    def test_open_seek_readline(self, store: Store, root: str) -> None:
        lines = b"".join(b"line %d\n" % i for i in range(2000))
        url = f"{root}/lines.txt"
        self.put(store, url, lines)
        with store.open(url, "rb", buffer_size=4096) as fh:
            assert fh.readline() == b"line 0\n"
            fh.seek(len(lines) - 10)
            assert fh.read() == lines[-10:]
            fh.seek(7)
            buf = bytearray(7)
            assert fh.readinto(buf) == 7 and bytes(buf) == b"line 1\n"
            assert fh.tell() == 14
        with store.open(url, "r") as text:
            assert text.readlines()[1999] == "line 1999\n"

    def test_missing_object_is_not_found_naming_the_url(self, store: Store, root: str) -> None:
        url = f"{root}/does-not-exist.bin"
        with pytest.raises(mlstore.NotFoundError) as exc:
            store.read_bytes(url)
        assert "does-not-exist.bin" in str(exc.value)
        assert isinstance(exc.value, FileNotFoundError)
        with pytest.raises(FileNotFoundError):
            store.info(url)
        assert store.exists(url) is False

    def test_exists(self, store: Store, root: str) -> None:
        url = f"{root}/here.bin"
        self.put(store, url, b"x")
        assert store.exists(url)

    def test_read_pinned_to_version(self, store: Store, root: str) -> None:
        url = f"{root}/pinned.bin"
        self.put(store, url, payload(4096, seed=1))
        old = store.info(url).version
        assert old is not None
        assert store.read_bytes(url, 0, 10, version=old) == payload(4096, seed=1)[:10]
        self.put(store, url, payload(4096, seed=2))
        with pytest.raises(mlstore.PreconditionFailedError):
            store.read_bytes(url, 0, 10, version=old)

    def test_overwrite_between_range_reads_never_mixes_versions(
        self, store: Store, root: str
    ) -> None:
        url = f"{root}/mixed.bin"
        first, second = payload(64 * 1024, seed=3), payload(64 * 1024, seed=4)
        self.put(store, url, first)
        with store.open(url, "rb", buffer_size=1024) as fh:
            head = fh.read(1024)
            assert head == first[:1024]
            self.put(store, url, second)
            # Either the change is reported, or the reader keeps the version it
            # opened (a local file replaced by rename): never a mix of the two.
            try:
                rest = fh.read()
            except mlstore.PreconditionFailedError:
                return
            assert head + rest == first

    def test_large_object(self, store: Store, root: str) -> None:
        data = payload(LARGE, seed=5)
        url = f"{root}/large.bin"
        self.put(store, url, data)
        assert store.info(url).size == LARGE
        got = store.read_bytes(url)
        assert len(got) == LARGE and got == data
        mid = LARGE // 2
        assert store.read_bytes(url, mid, mid + 1_000_000) == data[mid : mid + 1_000_000]


class WriteConformance:
    """Writes, overwrite, deletion and copies."""

    def test_write_read_overwrite(self, store: Store, root: str) -> None:
        url = f"{root}/w.bin"
        store.write_bytes(url, b"one")
        store.write_bytes(url, b"two two")
        assert store.read_bytes(url) == b"two two"

    def test_open_write_binary_and_text(self, store: Store, root: str) -> None:
        with store.open(f"{root}/f.bin", "wb") as fh:
            fh.write(b"abc")
            fh.write(memoryview(b"def"))
        assert store.read_bytes(f"{root}/f.bin") == b"abcdef"
        with store.open(f"{root}/f.txt", "w", encoding="utf-8") as text:
            text.write("héllo\n")
        assert store.read_bytes(f"{root}/f.txt") == "héllo\n".encode()

    def test_failed_write_leaves_old_content(self, store: Store, root: str) -> None:
        url = f"{root}/keep.bin"
        store.write_bytes(url, b"old")
        with pytest.raises(RuntimeError), store.open(url, "wb") as fh:
            fh.write(b"partial new content")
            raise RuntimeError("the writer failed")
        assert store.read_bytes(url) == b"old"

    def test_rm(self, store: Store, root: str) -> None:
        url = f"{root}/gone.bin"
        store.write_bytes(url, b"x")
        store.rm(url)
        assert not store.exists(url)
        with pytest.raises(mlstore.NotFoundError):
            store.rm(url)

    def test_rm_recursive(self, store: Store, root: str) -> None:
        for i in range(3):
            store.write_bytes(f"{root}/tree/sub{i}/f.bin", b"x")
        store.rm(f"{root}/tree", recursive=True)
        assert store.find(f"{root}/tree") == [] if store.exists(f"{root}/tree") else True
        assert not store.exists(f"{root}/tree/sub0/f.bin")

    def test_copy_within_backend(self, store: Store, root: str) -> None:
        data = payload(3000, seed=6)
        store.write_bytes(f"{root}/src.bin", data)
        store.copy(f"{root}/src.bin", f"{root}/dst.bin")
        assert store.read_bytes(f"{root}/dst.bin") == data

    def test_copy_to_and_from_memory(self, store: Store, root: str) -> None:
        data = payload(5000, seed=7)
        mem = f"memory://conformance-{os.getpid()}-{id(self)}"
        store.write_bytes(f"{root}/a/x.bin", data)
        store.write_bytes(f"{root}/a/y/z.bin", data[::-1])
        store.copy(f"{root}/a", mem, recursive=True)
        assert store.read_bytes(f"{mem}/y/z.bin") == data[::-1]
        store.copy(mem, f"{root}/b", recursive=True)
        assert store.read_bytes(f"{root}/b/x.bin") == data
        store.rm(mem, recursive=True)


class ListingConformance:
    """ls, find, glob and "directories"."""

    @pytest.fixture
    def tree(self, store: Store, root: str) -> str:
        for key in ("a.txt", "b.bin", "sub/c.txt", "sub/deeper/d.txt", "subway.txt"):
            store.write_bytes(f"{root}/{key}", key.encode())
        return root

    def test_ls_shows_files_and_directories(self, store: Store, tree: str) -> None:
        entries = store.ls(tree, detail=True)
        names = {str(e.url).rstrip("/").rsplit("/", 1)[-1]: e.type for e in entries}
        assert names == {
            "a.txt": "file",
            "b.bin": "file",
            "sub": "directory",
            "subway.txt": "file",
        }
        sizes = {str(e.url).rsplit("/", 1)[-1]: e.size for e in entries if e.type == "file"}
        assert sizes["a.txt"] == len(b"a.txt")

    def test_ls_of_a_prefix_is_not_a_substring_match(self, store: Store, tree: str) -> None:
        names = [u.rsplit("/", 1)[-1] for u in store.ls(f"{tree}/sub")]
        assert sorted(names) == ["c.txt", "deeper"]

    def test_find_is_recursive_and_sorted(self, store: Store, tree: str) -> None:
        found = store.find(tree)
        rel = [u[len(tree) + 1 :] for u in found]
        assert rel == ["a.txt", "b.bin", "sub/c.txt", "sub/deeper/d.txt", "subway.txt"]

    def test_glob(self, store: Store, tree: str) -> None:
        def rel(pattern: str) -> list[str]:
            return [u[len(tree) + 1 :] for u in store.glob(f"{tree}/{pattern}")]

        assert rel("*.txt") == ["a.txt", "subway.txt"]
        assert rel("**/*.txt") == ["a.txt", "sub/c.txt", "sub/deeper/d.txt", "subway.txt"]
        assert rel("sub/*") == ["sub/c.txt", "sub/deeper"]
        assert rel("[ab].*") == ["a.txt", "b.bin"]
        assert rel("?.bin") == ["b.bin"]
        assert rel("nothing*") == []

    def test_directory_info_and_exists(self, store: Store, tree: str) -> None:
        assert store.info(f"{tree}/sub").type == "directory"
        assert store.exists(f"{tree}/sub")
        assert not store.exists(f"{tree}/su")

    def test_ls_missing_is_not_found(self, store: Store, root: str) -> None:
        with pytest.raises(mlstore.NotFoundError):
            store.ls(f"{root}/no-such-dir")


def read_exactly(fh: io.BufferedIOBase, n: int) -> bytes:
    out = fh.read(n)
    assert len(out) == n
    return out
