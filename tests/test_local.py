"""The local backend's promises: atomic writes, permissions, pinned reads, and copies
that cannot write outside their destination."""

from __future__ import annotations

import gc
import os
import pathlib
import stat
import threading
import uuid
from collections.abc import Iterator

import pytest

from mlstore import (
    ConfigError,
    PermissionDeniedError,
    PreconditionFailedError,
    Store,
)
from mlstore.backends.local import TEMP_SUFFIX

OLD = b"O" * 300_000
NEW = b"N" * 200_000 + b"n" * 150_000


def leftovers(directory: pathlib.Path) -> list[str]:
    return [p.name for p in directory.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


def tree(directory: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask after a test that changes it."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


# ------------------------------------------------------------------ atomic writes


def test_write_creates_parent_directories(store: Store, tmp_path: pathlib.Path) -> None:
    store.write_bytes(tmp_path / "a" / "b" / "c.bin", b"x")
    assert (tmp_path / "a" / "b" / "c.bin").read_bytes() == b"x"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("mode", ["wb", "w"])
def test_interrupted_write_keeps_the_old_content(
    store: Store, tmp_path: pathlib.Path, mode: str
) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"old content")
    with pytest.raises(RuntimeError), store.open(path, mode) as fh:
        fh.write(b"new" * 1000 if mode == "wb" else "new" * 1000)
        fh.flush()
        assert leftovers(tmp_path)  # the bytes went to a temporary file
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old content"
    assert leftovers(tmp_path) == []
    assert os.listdir(tmp_path) == ["f.bin"]


def test_interrupted_first_write_leaves_nothing(store: Store, tmp_path: pathlib.Path) -> None:
    with pytest.raises(RuntimeError), store.open(tmp_path / "new.bin", "wb") as fh:
        fh.write(b"partial")
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_content_is_invisible_until_close(store: Store, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    fh = store.open(path, "wb")
    fh.write(b"new")
    fh.flush()
    assert path.read_bytes() == b"old"
    fh.close()
    assert path.read_bytes() == b"new"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("mode", ["wb", "w"])
def test_writer_dropped_without_close_publishes_nothing(
    store: Store, tmp_path: pathlib.Path, mode: str
) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    fh = store.open(path, mode)
    fh.write(b"new" if mode == "wb" else "new")
    with pytest.warns(ResourceWarning, match="never closed"):
        del fh
        gc.collect()
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_memory_writer_dropped_without_close_publishes_nothing(store: Store, mem_root: str) -> None:
    fh = store.open(f"{mem_root}/x", "wb")
    fh.write(b"new")
    with pytest.warns(ResourceWarning, match="never closed"):
        del fh
        gc.collect()
    assert not store.exists(f"{mem_root}/x")


@pytest.mark.parametrize("reader", ["read_bytes", "open"])
def test_concurrent_readers_see_one_version_or_the_other(
    store: Store, tmp_path: pathlib.Path, reader: str
) -> None:
    path = tmp_path / "hot.bin"
    store.write_bytes(path, OLD)
    done = threading.Event()
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def read_once() -> bytes:
        if reader == "read_bytes":
            return store.read_bytes(path)
        with store.open(path, "rb", buffer_size=4096) as fh:
            chunks = []
            while chunk := fh.read(16_384):
                chunks.append(chunk)
            return b"".join(chunks)

    def read_loop() -> None:
        try:
            while not done.is_set():
                seen.append(read_once())
            seen.append(read_once())
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=read_loop) for _ in range(4)]
    for t in readers:
        t.start()
    try:
        for i in range(60):
            store.write_bytes(path, NEW if i % 2 == 0 else OLD)
    finally:
        done.set()
        for t in readers:
            t.join()
    assert errors == []
    assert len(seen) >= len(readers)
    bad = [len(data) for data in seen if data not in (OLD, NEW)]
    assert bad == [], f"{len(bad)} reads saw a mix of versions or a partial file"
    assert leftovers(tmp_path) == []


def test_new_file_permissions_follow_the_umask(
    store: Store, tmp_path: pathlib.Path, umask: None
) -> None:
    for mask in (0o022, 0o077, 0o002, 0o027):
        os.umask(mask)
        reference = tmp_path / f"plain-{mask:o}"
        with open(reference, "wb") as fh:
            fh.write(b"x")
        written = tmp_path / f"mlstore-{mask:o}"
        store.write_bytes(written, b"x")
        assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~mask


def test_rewrite_keeps_the_permissions_of_the_file_it_replaces(
    store: Store, tmp_path: pathlib.Path, umask: None
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    path.chmod(0o640)
    os.umask(0o000)
    store.write_bytes(path, b"new")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # as open(path, "wb") would keep it
    assert path.read_bytes() == b"new"


def test_pinned_read_refuses_a_replaced_file(store: Store, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "f"
    store.write_bytes(path, b"first version")
    version = store.info(path).version
    assert store.read_bytes(path, 0, 5, version=version) == b"first"
    store.write_bytes(path, b"second, longer version")
    with pytest.raises(PreconditionFailedError):
        store.read_bytes(path, 0, 5, version=version)
    with pytest.raises(PreconditionFailedError):
        store.open(path, version=version)


def test_open_file_keeps_reading_the_version_it_opened(
    store: Store, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "f"
    store.write_bytes(path, OLD)
    with store.open(path, buffer_size=1024) as fh:
        head = fh.read(1000)
        store.write_bytes(path, NEW)
        assert head + fh.read() == OLD
    assert store.read_bytes(path) == NEW


# ------------------------------------------------------------------ copy safety


def escaping_keys() -> list[str]:
    """Keys that memory:// can hold and that would leave a local destination."""
    return ["a/../../x", "..", "../x", "sub/../../../x", "a\\..\\..\\y", "..\\x"]


@pytest.mark.parametrize("key", escaping_keys())
def test_copy_refuses_keys_that_escape_the_destination(
    store: Store, tmp_path: pathlib.Path, key: str
) -> None:
    src = f"memory://t-{uuid.uuid4().hex[:12]}"
    try:
        store.write_bytes(f"{src}/fine.txt", b"fine")
        store.write_bytes(f"{src}/{key}", b"evil")
        assert any(".." in u for u in store.find(src))  # the key really is in the source
        sandbox = tmp_path / "sandbox"
        dst = sandbox / "inner" / "dst"
        dst.mkdir(parents=True)
        before = tree(tmp_path)
        with pytest.raises(PermissionDeniedError) as info:
            store.copy(src, dst, recursive=True)
        assert repr(key) in str(info.value) or key in str(info.value)
        assert tree(tmp_path) == before  # nothing written, inside or outside
    finally:
        store.rm(src, recursive=True)


def test_copy_refuses_escaping_keys_into_memory_too(store: Store, mem_root: str) -> None:
    store.write_bytes(f"{mem_root}/src/a/../../x", b"evil")
    with pytest.raises(PermissionDeniedError, match=r"a/\.\./\.\./x"):
        store.copy(f"{mem_root}/src", f"{mem_root}/dst", recursive=True)
    assert not store.exists(f"{mem_root}/dst")


def test_absolute_looking_keys_land_inside_the_destination(
    store: Store, mem_root: str, tmp_path: pathlib.Path
) -> None:
    # memory:// folds "//etc/passwd" to "etc/passwd": it cannot name an absolute path.
    store.write_bytes(f"{mem_root}/src//etc/passwd", b"inside")
    store.write_bytes(f"{mem_root}/src/..x/ok", b"dots in a name are fine")
    dst = tmp_path / "dst"
    store.copy(f"{mem_root}/src", dst, recursive=True)
    assert (dst / "etc" / "passwd").read_bytes() == b"inside"
    assert (dst / "..x" / "ok").read_bytes() == b"dots in a name are fine"
    assert tree(tmp_path) == ["dst", "dst/..x", "dst/..x/ok", "dst/etc", "dst/etc/passwd"]


def test_keys_with_nul_cannot_be_created(store: Store, mem_root: str) -> None:
    with pytest.raises(ConfigError, match="NUL"):
        store.write_bytes(f"{mem_root}/src/a\x00b", b"x")
