"""A file from ``store.open(url, "rb")`` behaves exactly like ``io.BytesIO`` over the
same bytes, on memory:// (ranged reads behind a buffer) and file:// (a native file),
under random sequences of seek/read/readinto/readline/tell, with small buffers so that
every operation crosses buffer boundaries."""

from __future__ import annotations

import io
import pathlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlstore import Store

Op = tuple[Any, ...]

offsets = st.integers(min_value=-400, max_value=400)
sizes = st.one_of(st.integers(min_value=-1, max_value=300), st.none())

operations: st.SearchStrategy[Op] = st.one_of(
    st.tuples(st.just("seek"), offsets, st.sampled_from([0, 1, 2, 3])),
    st.tuples(st.just("seek"), offsets),
    st.tuples(st.just("read"), sizes),
    st.tuples(st.just("read")),
    st.tuples(st.just("readinto"), st.integers(min_value=0, max_value=300)),
    st.tuples(st.just("readline"), st.integers(min_value=-1, max_value=120)),
    st.tuples(st.just("readline")),
    st.tuples(st.just("readlines")),
    st.tuples(st.just("tell")),
    st.tuples(st.just("iterate"), st.integers(min_value=0, max_value=5)),
)
# Bytes with newlines now and then, so readline has lines to find.
contents = st.lists(st.sampled_from([b"a", b"b", b"\n", b"\x00", b"xyz"]), max_size=120).map(
    b"".join
)


def apply(fh: Any, op: Op) -> object:
    """Run ``op`` on ``fh``; return what it returned, or the type of what it raised."""
    name, *args = op
    try:
        if name == "readinto":
            buf = bytearray(args[0])
            n = fh.readinto(buf)
            return n, bytes(buf)
        if name == "iterate":
            lines = []
            for line in fh:
                lines.append(line)
                if len(lines) == args[0]:
                    break
            return lines
        result = getattr(fh, name)(*args)
    except Exception as exc:
        return type(exc)
    return result


def check(make: Callable[[bytes, int], Any], data: bytes, buffer_size: int, ops: list[Op]) -> None:
    expected = io.BytesIO(data)
    actual = make(data, buffer_size)
    with actual:
        for op in ops:
            want = apply(expected, op)
            got = apply(actual, op)
            assert got == want, f"{op}: got {got!r}, BytesIO gave {want!r}"
            assert actual.tell() == expected.tell(), f"position differs after {op}"
        assert actual.read() == expected.read()


@pytest.fixture(scope="module")
def shared_store() -> Iterator[Store]:
    with Store() as store:
        yield store


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("props")


@settings(max_examples=200, deadline=None)
@given(
    data=contents,
    buffer_size=st.integers(min_value=1, max_value=40),
    ops=st.lists(operations, max_size=25),
)
def test_memory_file_behaves_like_bytesio(
    shared_store: Store, data: bytes, buffer_size: int, ops: list[Op]
) -> None:
    url = f"memory://props-{uuid.uuid4().hex}/obj"

    def make(content: bytes, size: int) -> Any:
        shared_store.write_bytes(url, content)
        return shared_store.open(url, "rb", buffer_size=size)

    try:
        check(make, data, buffer_size, ops)
    finally:
        shared_store.rm(url)


@settings(max_examples=200, deadline=None)
@given(
    data=contents,
    buffer_size=st.integers(min_value=1, max_value=40),
    ops=st.lists(operations, max_size=25),
)
def test_local_file_behaves_like_bytesio(
    shared_store: Store, local_dir: pathlib.Path, data: bytes, buffer_size: int, ops: list[Op]
) -> None:
    path = local_dir / "obj.bin"

    def make(content: bytes, size: int) -> Any:
        shared_store.write_bytes(path, content)
        return shared_store.open(path, "rb", buffer_size=size)

    check(make, data, buffer_size, ops)


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_closed_file_refuses_operations_like_bytesio(
    shared_store: Store, tmp_path: pathlib.Path, kind: str
) -> None:
    url = f"memory://props-{uuid.uuid4().hex}/obj" if kind == "memory" else str(tmp_path / "o")
    shared_store.write_bytes(url, b"abc\ndef")
    fh = shared_store.open(url, "rb", buffer_size=2)
    fh.close()
    closed = io.BytesIO(b"abc\ndef")
    closed.close()
    for op in [("read",), ("read", 1), ("readinto", 2), ("readline",), ("seek", 0), ("tell",)]:
        assert apply(fh, op) is ValueError, op
        assert apply(closed, op) is ValueError, op
    assert fh.closed


class _LikeFsspecFile(io.BytesIO):
    """The reference for fsspec read files: ``io.BytesIO``, except that a seek to a
    position before the start is a ``ValueError`` (as fsspec's own files refuse it)
    instead of the start."""

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence in (io.SEEK_CUR, io.SEEK_END) and not self.closed:
            base = self.tell() if whence == io.SEEK_CUR else len(self.getbuffer())
            if base + offset < 0:
                raise ValueError("before the start")
        return super().seek(offset, whence)


@pytest.fixture(scope="module")
def mlstore_fs() -> Iterator[Any]:
    import fsspec

    from mlstore.fsspec import MLStoreFileSystem

    yield fsspec.filesystem("mlstore", target_protocol="memory", skip_instance_cache=True)
    MLStoreFileSystem.clear_instance_cache()


@settings(max_examples=150, deadline=None)
@given(
    data=contents,
    buffer_size=st.integers(min_value=1, max_value=40),
    ops=st.lists(operations, max_size=25),
)
def test_fsspec_read_file_behaves_like_a_file(
    mlstore_fs: Any, data: bytes, buffer_size: int, ops: list[Op]
) -> None:
    """A file from the fsspec protocol (``fs.open(path, "rb")``) gives the same results
    as the reference under random operations, and says it refuses seeks before 0."""
    path = f"/props-{uuid.uuid4().hex}/obj"
    expected = _LikeFsspecFile(data)
    mlstore_fs.pipe_file(path, data)
    try:
        with mlstore_fs.open(path, "rb", block_size=buffer_size) as actual:
            assert actual.size == len(data)
            for op in ops:
                want = apply(expected, op)
                got = apply(actual, op)
                assert got == want, f"{op}: got {got!r}, the reference gave {want!r}"
                assert actual.tell() == expected.tell(), f"position differs after {op}"
            assert actual.read() == expected.read()
    finally:
        mlstore_fs.rm(path)
