"""The http(s) backend against a real HTTP/1.1 server process on 127.0.0.1.

The server (``tests/servers/http_server.py``) serves the files of a temporary directory;
tests create and replace files there directly. Everything goes through the public API
(:class:`mlstore.Store`). Connections are observed (never faked) by wrapping
``socket.getaddrinfo`` and ``socket.socket.connect``, to prove that a refused URL is
refused before any look-up or connection.
"""

from __future__ import annotations

import email.utils
import gzip
import io
import ipaddress
import json
import os
import pickle
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlstore

# These tests are about the backend itself: every call reaches the server, once.
pytestmark = pytest.mark.usefixtures("backend_only")


SERVER = Path(__file__).resolve().parent / "servers" / "http_server.py"
TOKEN = "canary-" + secrets.token_hex(16)
METADATA = "http://169.254.169.254/latest/meta-data"


@dataclass
class Server:
    root: Path
    port: int
    scheme: str = "http"
    ca: Path | None = None  # the certificate an https server presents

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}/{path.lstrip('/')}"

    def put(self, data: bytes, name: str | None = None) -> tuple[str, Path]:
        """A new file under the root: its name (relative) and path."""
        name = name or f"f-{uuid.uuid4().hex[:12]}.bin"
        path = self.root / name
        path.write_bytes(data)
        return name, path

    def requests(self) -> dict[str, int]:
        """Requests the server has received so far, by path."""
        with urllib.request.urlopen(self.url("/__requests"), timeout=30) as resp:
            counts: dict[str, int] = json.load(resp)
        return counts

    def sent(self, path: str) -> tuple[int, bool]:
        """Body bytes a ``/stream/`` path has written so far, and whether all of it."""
        with urllib.request.urlopen(self.url("/__sent"), timeout=30) as resp:
            record = json.load(resp).get(path, {"sent": 0, "finished": False})
        return int(record["sent"]), bool(record["finished"])


def _start(root: Path, *extra: str) -> tuple[subprocess.Popen[str], Server]:
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "--root", str(root), "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "HTTP_SERVER_TOKEN": TOKEN},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the socket is bound (or the process ends)
    m = re.search(r"listening on (https?)://127\.0\.0\.1:(\d+)", line)
    if m is None:
        _stop(proc)
        pytest.fail(f"the http test server did not start: {line!r}")
    return proc, Server(root, int(m.group(2)), m.group(1))


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    proc, srv = _start(tmp_path_factory.mktemp("http-root"))
    try:
        yield srv
    finally:
        _stop(proc)


def make_store(**kwargs: Any) -> mlstore.Store:
    # No cache: every call reaches the server, so request counts and versions are exact.
    return mlstore.Store(cache={"enabled": False}, **kwargs)


@pytest.fixture
def store() -> Iterator[mlstore.Store]:
    with make_store() as s:
        yield s


def replace(path: Path, data: bytes) -> None:
    """Replace a served file with new content and a later mtime (a new version)."""
    before = path.stat().st_mtime_ns
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    later = before + 10 * 10**9
    os.utime(path, ns=(later, later))


@dataclass
class Network:
    lookups: list[str]
    connects: list[Any]

    def hosts_connected(self) -> set[str]:
        return {str(addr[0]) for addr in self.connects}


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> Network:
    """Record every DNS look-up and socket connect. Connections to this machine really
    happen; any other address is refused before a packet leaves (a test of a refused
    URL must never reach the address it is about, even when the code under test is
    broken)."""
    seen = Network([], [])
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        seen.lookups.append(str(host))
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self: socket.socket, address: Any) -> None:
        seen.connects.append(address)
        host = str(address[0]) if isinstance(address, tuple) else ""
        try:
            local = ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
        except ValueError:
            local = host == "localhost"
        if not local:
            raise ConnectionRefusedError(f"the tests reach only this machine, not {host}")
        real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


DATA = bytes(range(256)) * 4 + b"tail\nline two\nlast"


# ----------------------------------------------------------------------- reading


def test_read_whole(server: Server, store: mlstore.Store) -> None:
    name, _ = server.put(DATA)
    assert store.read_bytes(server.url(name)) == DATA


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, 10),
        (5, None),
        (None, 7),
        (100, 300),
        (-10, None),
        (-10, -2),
        (None, -3),
        (3, -3),
        (-5000, 4),
        (1000, 5000),
        (len(DATA), None),
        (len(DATA) + 10, None),
        (len(DATA) + 10, len(DATA) + 20),
        (5, 5),
        (7, 3),
        (0, 0),
        (-3, -5),
    ],
)
def test_read_range_is_a_slice(
    server: Server, store: mlstore.Store, start: int | None, end: int | None
) -> None:
    name, _ = server.put(DATA)
    assert store.read_bytes(server.url(name), start, end) == DATA[start:end]


@pytest.mark.parametrize(("start", "end"), [(None, None), (0, 5), (-5, None), (3, None)])
def test_empty_object(server: Server, store: mlstore.Store, start: Any, end: Any) -> None:
    name, _ = server.put(b"")
    url = server.url(name)
    assert store.read_bytes(url, start, end) == b""
    assert store.info(url).size == 0
    with store.open(url, "rb") as fh:
        assert fh.read() == b""


def test_info(server: Server, store: mlstore.Store) -> None:
    name, path = server.put(DATA)
    info = store.info(server.url(name))
    st = path.stat()
    assert info.size == len(DATA)
    assert info.type == "file"
    assert info.version == f'"{st.st_mtime_ns:x}-{st.st_size:x}"'  # the server's ETag
    assert info.mtime == int(st.st_mtime)
    assert store.ls(server.url(name)) == [server.url(name)]


def test_exists(server: Server, store: mlstore.Store) -> None:
    name, _ = server.put(b"x")
    assert store.exists(server.url(name))
    assert not store.exists(server.url("no-such-file"))


def readinto(f: Any, n: int) -> tuple[int, bytes]:
    buf = bytearray(n)
    count = f.readinto(buf)
    return count, bytes(buf)


# (name, operation) pairs applied alike to an mlstore file and an io.BytesIO.
OPS: dict[str, Callable[[Any, int], Any]] = {
    "read": lambda f, n: f.read(n),
    "read_all": lambda f, n: f.read(),
    "readline": lambda f, n: f.readline(),
    "readline_n": lambda f, n: f.readline(n),
    "readinto": readinto,
    "seek_set": lambda f, n: f.seek(n),
    "seek_cur": lambda f, n: f.seek(n - 50, io.SEEK_CUR),
    "seek_end": lambda f, n: f.seek(-n, io.SEEK_END),
    "tell": lambda f, n: f.tell(),
}


def test_open_behaves_like_a_local_file(server: Server, store: mlstore.Store) -> None:
    name, _ = server.put(DATA)
    expected = io.BytesIO(DATA)
    script = [("read", 10), ("seek_set", 300), ("read", 100), ("tell", 0), ("seek_end", 20),
              ("readline", 0), ("readline", 0), ("seek_set", 5), ("readinto", 33),
              ("seek_cur", 46), ("read_all", 0), ("read_all", 0), ("seek_set", len(DATA) + 9),
              ("read", 5), ("seek_set", 0), ("readline_n", 3)]  # fmt: skip
    with store.open(server.url(name), "rb", buffer_size=64) as fh:
        assert fh.seekable() and fh.readable() and not fh.writable()
        for op, n in script:
            assert OPS[op](fh, n) == OPS[op](expected, n), (op, n)


@settings(max_examples=40, deadline=None)
@given(
    buffer_size=st.integers(1, 200),
    script=st.lists(st.tuples(st.sampled_from(sorted(OPS)), st.integers(0, len(DATA) + 20))),
)
def test_open_matches_bytesio_property(
    server: Server, buffer_size: int, script: list[tuple[str, int]]
) -> None:
    name = "property.bin"
    if not (server.root / name).exists():
        server.put(DATA, name)
    expected = io.BytesIO(DATA)
    with make_store() as s, s.open(server.url(name), "rb", buffer_size=buffer_size) as fh:
        for op, n in script:
            assert OPS[op](fh, n) == OPS[op](expected, n), (op, n)


def test_open_text_mode(server: Server, store: mlstore.Store) -> None:
    name, _ = server.put(b"one\ntwo\nthree")
    with store.open(server.url(name), "r", encoding="utf-8") as fh:
        assert fh.readlines() == ["one\n", "two\n", "three"]


def test_content_encoding_is_not_decoded(server: Server, store: mlstore.Store) -> None:
    raw = gzip.compress(b"compressed payload " * 100)
    name, _ = server.put(raw)
    url = server.url(f"gzip/{name}")
    assert store.info(url).size == len(raw)
    assert store.read_bytes(url) == raw
    assert store.read_bytes(url, 10, 50) == raw[10:50]
    with store.open(url, "rb", buffer_size=16) as fh:
        assert fh.read() == raw


def test_info_when_head_is_refused(server: Server, store: mlstore.Store) -> None:
    name, path = server.put(DATA)
    info = store.info(server.url(f"nohead/{name}"))
    assert info.size == len(DATA)
    assert info.version == f'"{path.stat().st_mtime_ns:x}-{len(DATA):x}"'
    empty, _ = server.put(b"")
    assert store.info(server.url(f"nohead/{empty}")).size == 0


def test_server_ignoring_range_still_gives_the_slice(server: Server, store: mlstore.Store) -> None:
    name, _ = server.put(DATA)
    url = server.url(f"norange/{name}")
    assert store.read_bytes(url, 3, 9) == DATA[3:9]
    assert store.read_bytes(url, -7, None) == DATA[-7:]
    with store.open(url, "rb", buffer_size=32) as fh:
        fh.seek(500)
        assert fh.read(40) == DATA[500:540]


# ------------------------------------------------- bodies bounded by what was asked
#
# The /stream/ bodies are far larger than any socket buffer on the path (kernel send and
# receive buffers are a few MiB), so a client that stops reading and closes the connection
# leaves the server short of the end: it has sent well under the body and not finished.
# A client that reads the whole body lets the server finish. No clock is involved.

BIG = 128 * 1024 * 1024


def pattern(start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a /stream/ body."""
    return bytes(i % 251 for i in range(start, end))


def stream_path(query: str = "") -> tuple[str, str]:
    """A fresh /stream/ route of ``BIG`` bytes: its path (what the server counts by) and
    the route to request."""
    path = f"/stream/{BIG}/{uuid.uuid4().hex[:12]}"
    return path, path + ("?" + query if query else "")


def assert_stopped_early(server: Server, path: str) -> None:
    sent, finished = server.sent(path)
    assert not finished and sent < BIG // 2, (sent, finished)


@pytest.mark.parametrize("query", ["", "chunked=1"])
def test_ranged_read_stops_when_the_server_ignores_range(
    server: Server, store: mlstore.Store, query: str
) -> None:
    path, route = stream_path(query)
    assert store.read_bytes(server.url(route), 100, 110) == pattern(100, 110)
    assert_stopped_early(server, path)


def test_ends_of_a_chunked_body_that_ignores_range(server: Server, store: mlstore.Store) -> None:
    # No length on the answer: the object's size (from HEAD) says where the end is.
    url = server.url(f"/stream/5000/{uuid.uuid4().hex[:12]}?chunked=1")
    assert store.read_bytes(url, -7, None) == pattern(4993, 5000)
    assert store.read_bytes(url, 4990, None) == pattern(4990, 5000)
    assert store.read_bytes(url, 4990, 6000) == pattern(4990, 5000)
    assert store.read_bytes(url, 6000, 7000) == b""
    assert store.read_bytes(url) == pattern(0, 5000)


def test_open_reads_one_block_not_the_object_when_range_is_ignored(
    server: Server, store: mlstore.Store
) -> None:
    path, route = stream_path()
    with store.open(server.url(route), "rb", buffer_size=64 * 1024) as fh:
        fh.seek(1000)
        assert fh.read(100) == pattern(1000, 1100)
    assert_stopped_early(server, path)


def test_endless_body_is_cut_at_the_size_announced_by_head(
    server: Server, store: mlstore.Store
) -> None:
    # HEAD announces 1 MiB; the GET body runs on (chunked) far beyond it.
    path, route = stream_path(f"chunked=1&head={1024 * 1024}")
    url = server.url(route)
    assert store.info(url).size == 1024 * 1024
    with pytest.raises(mlstore.IntegrityError, match="longer") as err:
        store.read_bytes(url)
    assert url in str(err.value)
    assert not isinstance(err.value, mlstore.TransientError)
    assert_stopped_early(server, path)


@pytest.mark.parametrize("query", ["partial=1", "partial=1&chunked=1"])
def test_partial_answer_longer_than_the_range_is_refused(
    server: Server, store: mlstore.Store, query: str
) -> None:
    # 206 with the Content-Range asked for, but a body of BIG bytes (announced or not).
    path, route = stream_path(query)
    url = server.url(route)
    with pytest.raises(mlstore.IntegrityError) as err:
        store.read_bytes(url, 0, 10)
    assert url in str(err.value)
    assert_stopped_early(server, path)
    assert store.read_bytes(server.url(stream_path()[1]), 0, 5) == pattern(0, 5)  # pool fine


# -------------------------------------------------------------- version pinning


def test_open_is_pinned_to_the_version_seen_first(server: Server, store: mlstore.Store) -> None:
    name, path = server.put(DATA)
    with store.open(server.url(name), "rb", buffer_size=16) as fh:
        assert fh.read(16) == DATA[:16]
        replace(path, b"new content, another version " * 50)
        fh.seek(500)
        with pytest.raises(mlstore.PreconditionFailedError) as err:
            fh.read(10)
    assert server.url(name) in str(err.value)


def test_read_bytes_of_an_old_version(server: Server, store: mlstore.Store) -> None:
    name, path = server.put(DATA)
    url = server.url(name)
    old = store.info(url).version
    assert old is not None
    assert store.read_bytes(url, 0, 4, version=old) == DATA[:4]
    replace(path, DATA[::-1])
    with pytest.raises(mlstore.PreconditionFailedError):
        store.read_bytes(url, version=old)
    with pytest.raises(mlstore.PreconditionFailedError):
        store.read_bytes(url, 0, 4, version=old)
    with pytest.raises(mlstore.PreconditionFailedError):
        store.open(url, "rb", version=old)
    new = store.info(url).version
    assert new != old
    assert store.read_bytes(url, -4, None, version=new) == DATA[::-1][-4:]


# ------------------------------------------- objects without a strong ETag

# Routes whose objects have no strong ETag: only a Last-Modified date (one second of
# resolution), or a weak ETag, which may stay the same when the bytes change.
UNVERSIONED = ["noetag", "weak"]


def replace_within_the_second(path: Path, data: bytes) -> None:
    """Replace a served file with other bytes of the same size and the same mtime: the
    same Last-Modified and weak ETag, as for an object replaced within one second."""
    assert len(data) == path.stat().st_size
    st = path.stat()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def put_swapping(server: Server, old: bytes, new: bytes, *, same_second: bool) -> str:
    """A file that ``/swap/`` routes replace with ``new`` once its first GET is answered:
    with the same mtime (Last-Modified and weak ETag unchanged) if ``same_second``, else
    one nanosecond later (a new strong ETag within the same second)."""
    name, path = server.put(old)
    _, after = server.put(new, name + ".next")
    mtime = path.stat().st_mtime_ns // 10**9 * 10**9  # the start of a second
    os.utime(path, ns=(mtime, mtime))
    os.utime(after, ns=(mtime, mtime if same_second else mtime + 1))
    return name


@pytest.mark.parametrize("route", UNVERSIONED)
def test_an_object_without_a_strong_etag_has_no_version(server: Server, route: str) -> None:
    name, path = server.put(DATA)
    with make_store() as store:
        info = store.info(server.url(f"{route}/{name}"))
    assert info.version is None
    assert info.mtime == int(path.stat().st_mtime)  # Last-Modified is still the mtime
    assert info.size == len(DATA)


@pytest.mark.parametrize("route", UNVERSIONED)
@pytest.mark.parametrize("validate", ["always", "ttl"])
@pytest.mark.parametrize("memory_bytes", [0, 1 << 20], ids=["disk", "memory+disk"])
def test_the_cache_refetches_an_object_replaced_within_the_second(
    server: Server, tmp_path: Path, route: str, validate: str, memory_bytes: int
) -> None:
    name, path = server.put(DATA)
    url = server.url(f"{route}/{name}")
    # Cached copies checked on every read: a HEAD that shows the same Last-Modified (or
    # weak ETag) cannot prove a copy current, so the object is fetched again.
    cache = {"enabled": True, "disk_dir": str(tmp_path), "memory_bytes": memory_bytes}
    policy = {"validate": validate, "ttl": 0}
    with mlstore.Store(cache={**cache, **policy}) as store:
        assert store.read_bytes(url) == DATA
        replace_within_the_second(path, DATA[::-1])
        assert store.read_bytes(url) == DATA[::-1]
        with store.open(url, "rb") as fh:
            assert fh.read() == DATA[::-1]
    with mlstore.Store(cache={**cache, **policy}) as other:  # the node's copy, a new process
        replace_within_the_second(path, DATA)
        assert other.read_bytes(url) == DATA


# A small object is cached whole; a large one in blocks (here of 256 bytes).
OPEN_PATHS = {
    "uncached": {"enabled": False},
    "cached whole": {"enabled": True, "memory_bytes": 0},
    "cached blocks": {"enabled": True, "block_size": 256, "block_threshold": 512},
}


@pytest.mark.parametrize("route", UNVERSIONED)
@pytest.mark.parametrize("path", OPEN_PATHS)
def test_open_never_mixes_two_versions_of_an_unversioned_object(
    server: Server, tmp_path: Path, route: str, path: str
) -> None:
    new = bytes(255 - b for b in DATA)
    name = put_swapping(server, DATA, new, same_second=True)
    url = server.url(f"swap/{route}/{name}")
    cache = {**OPEN_PATHS[path], "disk_dir": str(tmp_path)}
    with mlstore.Store(cache=cache) as store, store.open(url, "rb", buffer_size=16) as fh:
        got = fh.read(16)
        got += fh.read()  # the server has replaced the object by now
    assert got in (DATA, new)


@pytest.mark.parametrize("path", ["uncached", "cached blocks"])  # ranges, not one GET
def test_open_of_an_object_with_a_strong_etag_stays_pinned(
    server: Server, tmp_path: Path, path: str
) -> None:
    # Replaced within the same second, but the strong ETag changes: the ranges read
    # after the replacement are refused, not mixed in.
    name = put_swapping(server, DATA, bytes(255 - b for b in DATA), same_second=False)
    url = server.url(f"swap/{name}")
    cache = {**OPEN_PATHS[path], "disk_dir": str(tmp_path)}
    with mlstore.Store(cache=cache) as store:
        assert store.info(url).version is not None
        with store.open(url, "rb", buffer_size=16) as fh:
            assert fh.read(16) == DATA[:16]
            with pytest.raises(mlstore.PreconditionFailedError):
                fh.read()


@pytest.mark.parametrize("route", UNVERSIONED)
def test_a_version_pin_on_an_unversioned_object_is_refused(server: Server, route: str) -> None:
    name, path = server.put(DATA)
    url = server.url(f"{route}/{name}")
    modified = email.utils.formatdate(path.stat().st_mtime, usegmt=True)
    with make_store() as store:
        # What older releases reported as the version, and a weak ETag: neither pins.
        for token in (f"lm:{modified}", f'W/"{path.stat().st_mtime_ns:x}"'):
            before = server.requests().get(f"/{route}/{name}", 0)
            with pytest.raises(mlstore.UnsupportedOperation) as err:
                store.read_bytes(url, 0, 4, version=token)
            assert url in str(err.value) and "strong ETag" in str(err.value)
            assert server.requests().get(f"/{route}/{name}", 0) == before  # nothing sent
        # A strong ETag it no longer has: the object is not that version.
        with pytest.raises(mlstore.PreconditionFailedError):
            store.read_bytes(url, 0, 4, version='"gone"')
        with pytest.raises(mlstore.UnsupportedOperation) as err:
            store.open(url, "rb", version='"gone"')
        assert url in str(err.value) and "no version" in str(err.value)
    # A server that ignores If-Match and sends no ETag: nothing shows the answer is of
    # the version asked for.
    with make_store() as store, pytest.raises(mlstore.PreconditionFailedError):
        store.read_bytes(server.url(f"norange/noetag/{name}"), 0, 4, version='"gone"')


def test_pinning_holds_when_the_server_ignores_if_match(
    server: Server, store: mlstore.Store
) -> None:
    name, path = server.put(DATA)
    url = server.url(f"norange/{name}")
    with store.open(url, "rb", buffer_size=16) as fh:
        fh.read(16)
        replace(path, DATA * 3)
        fh.seek(200)
        with pytest.raises(mlstore.PreconditionFailedError):
            fh.read(1)


# ----------------------------------------------------------------------- errors


def test_not_found_names_the_url_after_one_request(server: Server, store: mlstore.Store) -> None:
    path = f"missing-{uuid.uuid4().hex}"
    url = server.url(path)
    with pytest.raises(mlstore.NotFoundError) as err:
        store.read_bytes(url)
    assert isinstance(err.value, FileNotFoundError)
    assert url in str(err.value)
    assert server.requests()[f"/{path}"] == 1
    with pytest.raises(mlstore.NotFoundError):
        store.info(url)


@pytest.mark.parametrize("route", ["status/401", "status/403", "auth/secret.txt"])
def test_denied(server: Server, store: mlstore.Store, route: str) -> None:
    server.put(b"secret", "secret.txt")
    with pytest.raises(mlstore.PermissionDeniedError) as err:
        store.read_bytes(server.url(route))
    assert isinstance(err.value, PermissionError)
    assert server.url(route) in str(err.value)
    assert server.requests()[f"/{route}"] == 1


@pytest.mark.parametrize("code", [503, 429])
def test_throttled_with_retry_after(server: Server, store: mlstore.Store, code: int) -> None:
    with pytest.raises(mlstore.ThrottledError) as err:
        store.read_bytes(server.url(f"status/{code}?retry_after=7"))
    assert err.value.retry_after == 7.0
    assert isinstance(err.value, mlstore.TransientError)


def test_retry_after_as_a_date(server: Server, store: mlstore.Store) -> None:
    when = email.utils.formatdate(time.time() + 3600, usegmt=True)
    with pytest.raises(mlstore.ThrottledError) as err:
        store.info(server.url(f"status/503?retry_after={when}"))
    assert err.value.retry_after is not None and 3000 < err.value.retry_after <= 3600


def test_server_errors_are_transient_client_errors_are_not(
    server: Server, store: mlstore.Store
) -> None:
    with pytest.raises(mlstore.TransientError) as err:
        store.read_bytes(server.url("status/500"))
    assert not isinstance(err.value, mlstore.ThrottledError)
    assert err.value.retry_after is None
    with pytest.raises(mlstore.MlstoreError) as bad:
        store.read_bytes(server.url("status/400"))
    assert not isinstance(bad.value, mlstore.TransientError)
    assert "400" in str(bad.value)


def test_whole_body_shorter_than_the_object_is_an_error(
    server: Server, store: mlstore.Store
) -> None:
    # HEAD announces 5000 bytes; the GET sends a complete chunked body of 3000.
    url = server.url(f"/stream/3000/{uuid.uuid4().hex[:12]}?chunked=1&head=5000")
    with pytest.raises(mlstore.IntegrityError, match="3000 bytes of a 5000-byte") as err:
        store.read_bytes(url)
    assert url in str(err.value)


def test_whole_body_is_checked_against_its_content_md5(
    server: Server, store: mlstore.Store
) -> None:
    name, _ = server.put(DATA)
    assert store.read_bytes(server.url(f"md5/{name}")) == DATA
    with pytest.raises(mlstore.IntegrityError, match="Content-MD5") as err:
        store.read_bytes(server.url(f"badmd5/{name}"))
    assert server.url(f"badmd5/{name}") in str(err.value)
    assert store.read_bytes(server.url(f"badmd5/{name}"), 0, 4) == DATA[:4]  # a range: no sum


def test_truncated_body_is_an_error_not_short_data(server: Server, store: mlstore.Store) -> None:
    name, _ = server.put(DATA)
    with pytest.raises(mlstore.ConnectionLostError):
        store.read_bytes(server.url(f"truncate/{name}"))
    with pytest.raises(mlstore.ConnectionLostError):
        store.read_bytes(server.url(f"truncate/{name}"), 10, 500)
    assert store.read_bytes(server.url(name), 10, 20) == DATA[10:20]  # the pool recovered


def test_connection_refused_is_a_lost_connection(store: mlstore.Store) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once the socket is closed
    with pytest.raises(mlstore.ConnectionLostError) as err:
        store.read_bytes(f"http://127.0.0.1:{port}/x")
    assert not isinstance(err.value, mlstore.StorageTimeoutError)


def test_writing_is_unsupported(server: Server, store: mlstore.Store, tmp_path: Path) -> None:
    name, _ = server.put(DATA)
    url = server.url(name)
    with pytest.raises(mlstore.UnsupportedOperation):
        store.write_bytes(url, b"x")
    with pytest.raises(mlstore.UnsupportedOperation):
        store.open(url, "wb")
    with pytest.raises(mlstore.UnsupportedOperation):
        store.rm(url)
    store.write_bytes("memory://http-test/src.bin", b"abc")
    with pytest.raises(mlstore.UnsupportedOperation):
        store.copy("memory://http-test/src.bin", url)
    with pytest.raises(mlstore.UnsupportedOperation):
        store.copy(url, server.url("other.bin"))
    store.rm("memory://http-test/src.bin")
    # Reading from http into a writable store works.
    store.copy(url, str(tmp_path / "copy.bin"))
    assert (tmp_path / "copy.bin").read_bytes() == DATA
    assert store.read_bytes(url) == DATA  # unchanged


# ---------------------------------------------------------------------- options


@pytest.mark.parametrize("protocol", ["http", "https"])
def test_headers_option(server: Server, protocol: str) -> None:
    name, _ = server.put(b"protected")
    options = {protocol: {"headers": {"Authorization": f"Bearer {TOKEN}"}}}
    with make_store(options=options) as s:
        assert s.read_bytes(server.url(f"auth/{name}")) == b"protected"
        assert s.info(server.url(f"auth/{name}")).size == len(b"protected")


def test_basic_auth_from_the_url(server: Server) -> None:
    name, _ = server.put(b"protected")
    with make_store() as s:
        url = f"http://user:{TOKEN}@127.0.0.1:{server.port}/auth/{name}"
        assert s.read_bytes(url) == b"protected"
        wrong = f"http://user:{TOKEN}x@127.0.0.1:{server.port}/auth/{name}"
        with pytest.raises(mlstore.PermissionDeniedError) as err:
            s.read_bytes(wrong)
        assert TOKEN not in str(err.value) and TOKEN not in repr(err.value)


@pytest.mark.parametrize(
    "options",
    [
        {"timeout": 3},
        {"headers": ["Authorization: x"]},
        {"headers": {"Bad Name": "x"}},
        {"headers": {"X-Token": f"{TOKEN}\r\nInjected: yes"}},
    ],
)
def test_bad_options(server: Server, options: dict[str, Any]) -> None:
    with make_store(options={"https": options}) as s, pytest.raises(mlstore.ConfigError) as err:
        s.read_bytes(server.url("x"))
    assert TOKEN not in str(err.value)


def test_no_secret_in_reprs_messages_or_pickles(server: Server) -> None:
    name, _ = server.put(b"x")
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Api-Key": TOKEN}
    with make_store(options={"https": {"headers": headers}}) as s:
        texts = [repr(s), str(s), repr(s.backend("http")), repr(s.backend("https"))]
        for route in ["status/401", "status/403", "status/503", "no-such", "truncate/" + name]:
            with pytest.raises(mlstore.MlstoreError) as err:
                s.read_bytes(server.url(route + "?sig=" + TOKEN))
            texts += [str(err.value), repr(err.value)]
        with pytest.raises(mlstore.MlstoreError) as err:
            s.read_bytes(server.url("redirect?to=" + METADATA))
        texts += [str(err.value), repr(err.value)]
        pickled = pickle.dumps(s)
    assert not [t for t in texts if TOKEN in t]
    assert TOKEN.encode() not in pickled


def test_debug_logs_mask_signed_queries(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    name, _ = server.put(b"x")
    caplog.set_level("DEBUG")
    with make_store() as s:
        s.read_bytes(server.url(f"{name}?X-Amz-Signature={TOKEN}&part=1"))
        s.info(server.url(f"{name}?sig={TOKEN}&sv=2024"))
    assert "urllib3" in caplog.text and "part=1" in caplog.text  # the requests were logged
    assert TOKEN not in caplog.text


# ------------------------------------------------------------------- URL policy


def test_metadata_address_refused_without_a_connection(network: Network) -> None:
    # A connect timeout far longer than any test: a connection attempt would hang here.
    with make_store(retry={"connect_timeout": 3600}) as s:
        for call in (s.read_bytes, s.info, s.exists):
            with pytest.raises(mlstore.PermissionDeniedError) as err:
                call(METADATA)
            assert "169.254.169.254" in str(err.value)
    assert network.lookups == [] and network.connects == []


@pytest.mark.parametrize(
    "url",
    [
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://METADATA.google.internal./computeMetadata/v1/",
        "https://metadata.azure.com/metadata/instance",
        "http://169.254.169.254./latest",
        "http://[::ffff:169.254.169.254]/latest",
        "http://[::ffff:a9fe:a9fe]/latest",
        "http://[64:ff9b::a9fe:a9fe]/latest",
        "http://[2002:a9fe:a9fe::1]/latest",
        "http://[fe80::1]/latest",
        "http://100.100.100.200/latest",
    ],
)
def test_metadata_hosts_refused_by_name(network: Network, url: str) -> None:
    with make_store() as s, pytest.raises(mlstore.PermissionDeniedError):
        s.read_bytes(url)
    assert network.lookups == [] and network.connects == []


@pytest.mark.parametrize(
    "url",
    [
        "http://168.63.129.16/machine?comp=goalstate",  # Azure's WireServer
        "http://168.63.129.16:32526/vmSettings",
        "http://[::ffff:168.63.129.16]/machine",
        "http://[64:ff9b:1::a9fe:a9fe]/latest",  # RFC 8215 local-use NAT64 to 169.254.169.254
        "http://[64:ff9b:1:2::a83f:8110]/machine",  # ... and to 168.63.129.16
    ],
)
def test_wireserver_and_local_use_nat64_refused_by_default(network: Network, url: str) -> None:
    # One short attempt: were the URL let through, the test would fail fast, not hang.
    retry = {"max_attempts": 1, "connect_timeout": 2}
    with make_store(retry=retry) as s, pytest.raises(mlstore.PermissionDeniedError) as err:
        s.read_bytes(url)
    assert "URL policy" in str(err.value)
    assert network.lookups == [] and network.connects == []


@pytest.mark.parametrize(
    ("address", "reached"),
    [("64:ff9b:1::a9fe:a9fe", "169.254.169.254"), ("64:ff9b:1:ffff::a9fe:1", "169.254.0.1")],
)
def test_local_use_nat64_is_checked_as_the_ipv4_it_carries(
    network: Network, address: str, reached: str
) -> None:
    # Only an IPv4 rule: the IPv6 address is refused because of the address it reaches.
    policy = {"deny_networks": ("169.254.0.0/16",), "deny_hosts": ()}
    retry = {"max_attempts": 1, "connect_timeout": 2}
    with (
        make_store(http=policy, retry=retry) as s,
        pytest.raises(mlstore.PermissionDeniedError) as err,
    ):
        s.read_bytes(f"http://[{address}]/latest")
    assert reached in str(err.value)
    assert network.lookups == [] and network.connects == []


@pytest.mark.parametrize(
    "location",
    [
        METADATA,
        "http://2852039166/latest/meta-data",  # 169.254.169.254, spelled as one number
        "http://0xa9fea9fe/latest/meta-data",
        "http://metadata.google.internal/computeMetadata/v1/",
        "file:///etc/passwd",
        "ftp://127.0.0.1/x",
    ],
)
def test_redirects_to_refused_urls(server: Server, network: Network, location: str) -> None:
    with make_store(retry={"connect_timeout": 3600}) as s:
        with pytest.raises(mlstore.PermissionDeniedError):
            s.read_bytes(server.url("redirect?to=" + location))
        with pytest.raises(mlstore.PermissionDeniedError):
            s.info(server.url("redirect?code=307&to=" + location))
    assert network.hosts_connected() == {"127.0.0.1"}


def test_deny_networks_checks_the_resolved_address(server: Server, network: Network) -> None:
    name, _ = server.put(b"x")
    with make_store(http={"deny_networks": ("127.0.0.0/8",)}) as s:
        with pytest.raises(mlstore.PermissionDeniedError) as err:
            s.read_bytes(f"http://localhost:{server.port}/{name}")
        assert "127.0.0.1" in str(err.value)
        with pytest.raises(mlstore.PermissionDeniedError):
            s.read_bytes(f"http://[::ffff:127.0.0.1]:{server.port}/{name}")
    assert "localhost" in network.lookups  # refused after resolving, not by its name
    assert network.connects == []


def test_allow_hosts_overrides_a_deny(server: Server) -> None:
    name, _ = server.put(b"allowed")
    for allowed in ("localhost", "127.0.0.1"):
        policy = {"deny_networks": ("127.0.0.0/8",), "allow_hosts": (allowed,)}
        with make_store(http=policy) as s:
            assert s.read_bytes(server.url(name, host=allowed)) == b"allowed"
    policy = {"deny_private": True, "allow_hosts": ("127.0.0.1",)}
    with make_store(http=policy) as s:
        assert s.read_bytes(server.url(name)) == b"allowed"


def test_deny_private(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    name, _ = server.put(b"x")
    with make_store(http={"deny_private": True}) as s:
        for host in ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]"):
            with pytest.raises(mlstore.PermissionDeniedError):
                s.read_bytes(server.url(name, host=host))
        with pytest.raises(mlstore.PermissionDeniedError):
            s.read_bytes("http://10.1.2.3/x")
    monkeypatch.setenv("MLSTORE_HTTP_DENY_PRIVATE", "1")
    with make_store() as s, pytest.raises(mlstore.PermissionDeniedError):
        s.read_bytes(server.url(name))


@pytest.mark.parametrize("host", ["127.0.0.2", "10.1.2.3", "192.168.0.1", "[fd00::1]"])
def test_redirect_to_a_private_address_when_private_is_denied(
    server: Server, network: Network, host: str
) -> None:
    # The first hop is allowed explicitly; the redirect's target is not.
    policy = {"deny_private": True, "allow_hosts": ("127.0.0.1",)}
    with make_store(http=policy) as s, pytest.raises(mlstore.PermissionDeniedError):
        s.read_bytes(server.url(f"redirect?to=http://{host}:{server.port}/x"))
    assert network.hosts_connected() == {"127.0.0.1"}


@pytest.mark.parametrize(
    "path", ["%2e%2e/%2e%2e/private/x", "%2E%2E/.%2e/private/x", "..%2f..%2fprivate%2fx"]
)
def test_encoded_dot_segments_cannot_leave_an_http_mount(server: Server, path: str) -> None:
    # The server decodes %2e and %2f before it resolves the path, as many do.
    (server.root / "private").mkdir(exist_ok=True)
    server.put(b"private data", "private/x")
    with make_store(mounts={"ds": server.url("public/ds")}) as s:
        with pytest.raises(mlstore.PermissionDeniedError) as err:
            s.read_bytes(f"mlstore://ds/{path}")
        assert f"mlstore://ds/{path}" in str(err.value)
        with pytest.raises(mlstore.PermissionDeniedError):
            s.info(f"mlstore://ds/{path}")
    assert not [p for p in server.requests() if p.endswith("private/x")]


# -------------------------------------------------------------------- redirects


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirects_are_followed(server: Server, store: mlstore.Store, code: int) -> None:
    name, _ = server.put(DATA)
    url = server.url(f"redirect?code={code}&to=/{name}")
    assert store.read_bytes(url) == DATA
    assert store.read_bytes(url, 5, 9) == DATA[5:9]
    assert store.info(url).size == len(DATA)


def test_redirect_limit(server: Server) -> None:
    name, _ = server.put(DATA)
    with make_store(http={"max_redirects": 3}) as s:
        assert s.read_bytes(server.url(f"chain/3/{name}")) == DATA
        with pytest.raises(mlstore.MlstoreError, match="more than 3 redirects") as err:
            s.read_bytes(server.url(f"chain/4/{name}"))
        assert not isinstance(err.value, mlstore.TransientError)
    with make_store(http={"max_redirects": 0}) as s:
        assert s.read_bytes(server.url(name)) == DATA
        with pytest.raises(mlstore.MlstoreError, match="more than 0 redirects"):
            s.info(server.url(f"chain/1/{name}"))
    counts = server.requests()
    assert counts[f"/chain/0/{name}"] == 1  # the 4-hop chain stopped after 3 redirects


def test_credentials_stay_with_their_origin(server: Server) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Api-Key": TOKEN, "X-Trace": "1"}
    with make_store(options={"http": {"headers": headers}}) as s:
        assert s.read_bytes(server.url("echo-auth")) == b"present"
        assert s.read_bytes(server.url("redirect?to=/echo-auth")) == b"present"
        other_host = f"http://localhost:{server.port}/echo-auth"
        assert s.read_bytes(server.url("redirect?to=" + other_host)) == b"absent"
    with make_store() as s:
        url = f"http://u:{TOKEN}@127.0.0.1:{server.port}/redirect?to={other_host}"
        assert s.read_bytes(url) == b"absent"


def test_only_harmless_headers_follow_a_redirect_to_another_origin(server: Server) -> None:
    # Artifactory's API-key header is named like no credential; it must stay home too.
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "X-JFrog-Art-Api": TOKEN,
        "X-Trace": "1",
        "User-Agent": "trainer/1.0",
        "Accept": "application/octet-stream",
    }
    with make_store(options={"http": {"headers": headers}}) as s:
        home = json.loads(s.read_bytes(server.url("redirect?to=/echo-headers"), 0, 10**6))
        other = f"http://localhost:{server.port}/echo-headers"
        away = json.loads(s.read_bytes(server.url("redirect?to=" + other), 0, 10**6))
    assert {"authorization", "x-jfrog-art-api", "x-trace"} <= set(home)  # same origin: all
    assert home["x-jfrog-art-api"] == TOKEN
    for name in ("authorization", "x-jfrog-art-api", "x-trace"):
        assert name not in away, name
    assert TOKEN not in json.dumps(away)
    assert away["user-agent"] == "trainer/1.0"
    assert away["accept"] == "application/octet-stream"
    assert away["range"] == f"bytes=0-{10**6 - 1}"
    assert away["accept-encoding"] == "identity"


# ------------------------------------------------------------------------ https


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    certs = tmp_path_factory.mktemp("tls")
    cert, key = certs / "cert.pem", certs / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost",
         "-addext", "basicConstraints=critical,CA:TRUE"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    proc, srv = _start(tmp_path_factory.mktemp("https-root"), "--certfile", str(cert),
                       "--keyfile", str(key))  # fmt: skip
    srv.ca = cert
    try:
        yield srv
    finally:
        _stop(proc)


def test_https_checks_the_certificate_against_the_host_name(
    tls_server: Server, monkeypatch: pytest.MonkeyPatch, network: Network
) -> None:
    assert tls_server.ca is not None
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_server.ca))  # trust the test certificate
    name, _ = tls_server.put(DATA)
    with make_store() as s:
        # Connected to the checked address 127.0.0.1, verified as "localhost".
        assert s.read_bytes(tls_server.url(name, host="localhost"), 2, 8) == DATA[2:8]
        assert s.info(tls_server.url(name, host="localhost")).size == len(DATA)
        # The certificate does not name 127.0.0.1: refused, and not worth retrying.
        with pytest.raises(mlstore.MlstoreError, match="certificate") as err:
            s.read_bytes(tls_server.url(name))
        assert not isinstance(err.value, mlstore.TransientError)
    assert network.hosts_connected() == {"127.0.0.1"}


def test_https_untrusted_certificate(tls_server: Server) -> None:
    name, _ = tls_server.put(DATA)
    with make_store() as s, pytest.raises(mlstore.MlstoreError, match="certificate"):
        s.read_bytes(tls_server.url(name, host="localhost"))
