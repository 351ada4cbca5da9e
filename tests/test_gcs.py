"""The ``gs://`` backend against fake-gcs-server, and through a fault proxy in front of it.

The conformance suite (tests/test_conformance.py::TestGCS) covers reads, writes and
listings; this file covers what is particular to GCS: errors mapped from real answers,
generation pinning, metadata, one attempt per request, and clients across processes.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import multiprocessing
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest

import mlstore
from mlstore import Store
from mlstore.hashing import content_hash
from mlstore.url import URL, parse_url
from tests.conftest import GCS_PROJECT
from tests.emulators import REPO, ServerProcess

pytestmark = [pytest.mark.gcs, pytest.mark.usefixtures("backend_only")]


@pytest.fixture
def store(gcs_options: dict[str, object]) -> Iterator[Store]:
    with Store(options={"gs": gcs_options}) as s:
        yield s


@pytest.fixture
def root(gcs_bucket: str) -> str:
    return f"gs://{gcs_bucket}"


# ------------------------------------------------------------------ errors from the emulator


def test_missing_bucket_is_not_found(store: Store) -> None:
    url = "gs://mlstore-no-such-bucket-4b1d/some/key.bin"
    with pytest.raises(mlstore.NotFoundError) as exc:
        store.read_bytes(url)
    assert exc.value.url == url and exc.value.operation == "read"
    assert url in str(exc.value)
    with pytest.raises(mlstore.NotFoundError, match="info gs://mlstore-no-such-bucket-4b1d"):
        store.info(url)
    with pytest.raises(mlstore.NotFoundError, match="no such bucket"):
        store.info("gs://mlstore-no-such-bucket-4b1d")
    with pytest.raises(mlstore.NotFoundError):
        store.ls("gs://mlstore-no-such-bucket-4b1d")
    assert not store.exists(url)


def test_missing_object_is_not_found(store: Store, root: str) -> None:
    url = f"{root}/nothing/here.bin"
    with pytest.raises(mlstore.NotFoundError) as exc:
        store.read_bytes(url, 0, 10)
    assert exc.value.url == url and "no such object" in str(exc.value)
    assert isinstance(exc.value, FileNotFoundError)
    with pytest.raises(mlstore.NotFoundError):
        store.info(url)
    with pytest.raises(mlstore.NotFoundError):
        store.rm(url)


def test_pinned_read_of_a_replaced_generation(store: Store, root: str) -> None:
    url = f"{root}/pinned.bin"
    store.write_bytes(url, b"first generation")
    old = store.info(url).version
    assert old is not None and old.isdigit()
    assert store.read_bytes(url, 0, 5, version=old) == b"first"
    assert store.read_bytes(url, -10, version=old) == b"generation"
    assert store.read_bytes(url, 6, -3, version=old) == b"first generation"[6:-3]

    store.write_bytes(url, b"second generation, longer")
    new = store.info(url).version
    assert new is not None and new != old
    for start, end in ((0, 5), (-10, None), (6, -3), (None, None)):
        with pytest.raises(mlstore.PreconditionFailedError) as exc:
            store.read_bytes(url, start, end, version=old)
        assert old in str(exc.value) and new in str(exc.value) and url in str(exc.value)
    assert store.read_bytes(url, -6, version=new) == b"longer"

    store.rm(url)
    with pytest.raises(mlstore.NotFoundError):  # gone, not changed
        store.read_bytes(url, 0, 5, version=new)


def test_open_reader_reports_a_replacement_instead_of_mixing(store: Store, root: str) -> None:
    url = f"{root}/reader.bin"
    store.write_bytes(url, b"a" * 10_000)
    with store.open(url, "rb", buffer_size=1000) as fh:
        assert fh.read(1000) == b"a" * 1000
        store.write_bytes(url, b"b" * 10_000)
        with pytest.raises(mlstore.PreconditionFailedError):
            fh.read()


def test_reading_a_directory(store: Store, root: str) -> None:
    store.write_bytes(f"{root}/dir/file.bin", b"x")
    with pytest.raises(IsADirectoryError):
        store.read_bytes(f"{root}/dir")
    with pytest.raises(IsADirectoryError):
        store.read_bytes(root)


# ------------------------------------------------------------------ metadata


def test_info_reports_generation_checksums_and_content_hash(store: Store, root: str) -> None:
    data = b"hello gcs " * 1000
    url = f"{root}/meta/obj.bin"
    store.write_bytes(url, data)
    info = store.info(url)
    assert info.type == "file" and info.size == len(data)
    assert info.version is not None and info.version.isdigit()
    assert info.mtime is not None and info.mtime > 1e9
    assert info.content_hash == content_hash(data)
    assert info.checksums["md5"] == base64.b64encode(hashlib.md5(data).digest()).decode()
    assert info.checksums["crc32c"]

    (listed,) = store.ls(f"{root}/meta", detail=True)
    assert listed.content_hash == content_hash(data) and listed.version == info.version

    with store.open(f"{root}/meta/written.txt", "w") as text:
        text.write("via open()")
    assert store.info(f"{root}/meta/written.txt").content_hash == content_hash(b"via open()")

    store.copy(url, f"{root}/meta/copy.bin")
    copied = store.info(f"{root}/meta/copy.bin")
    assert copied.content_hash == content_hash(data) and copied.version != info.version


def test_directory_and_bucket_info(store: Store, root: str, gcs_bucket: str) -> None:
    store.write_bytes(f"{root}/a/b/c.bin", b"x")
    for url in (root, f"{root}/a", f"{root}/a/b", f"{root}/a/"):
        info = store.info(url)
        assert info.type == "directory" and info.size == 0 and info.version is None, url
    assert str(store.info(root).url) == f"gs://{gcs_bucket}"


def test_mkdir_creates_a_bucket_and_ignores_keys(store: Store) -> None:
    bucket = f"gs://t-mkdir-{uuid.uuid4().hex[:12]}"
    assert not store.exists(bucket)
    store.mkdir(bucket)
    assert store.info(bucket).type == "directory"
    store.mkdir(bucket)  # already there: nothing to do
    store.mkdir(f"{bucket}/some/prefix")  # no directories in an object store
    assert store.ls(bucket) == []
    store.rm(bucket, recursive=True)


def test_endpoint_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, fake_gcs: ServerProcess, root: str, store: Store
) -> None:
    store.write_bytes(f"{root}/env.bin", b"found through the environment")
    monkeypatch.setenv("MLSTORE_GCS_ENDPOINT_URL", fake_gcs.endpoint)
    with Store(options={"gs": {"anon": True}}) as other:
        assert other.read_bytes(f"{root}/env.bin") == b"found through the environment"


def test_storage_emulator_host_means_anonymous_access(
    monkeypatch: pytest.MonkeyPatch, fake_gcs: ServerProcess, root: str, store: Store
) -> None:
    store.write_bytes(f"{root}/emulator.bin", b"no credentials needed")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_gcs.endpoint)
    with Store() as other:
        assert other.read_bytes(f"{root}/emulator.bin") == b"no credentials needed"
        fs = other.backend("gs").fs  # type: ignore[attr-defined]
        assert fs.credentials.method == "anon" and fs.credentials.credentials is None


def test_anon_and_a_token_together_are_refused(gcs_options: dict[str, object]) -> None:
    options = {**gcs_options, "anon": True, "token": "google_default"}
    with Store(options={"gs": options}) as s, pytest.raises(mlstore.ConfigError) as exc:
        s.info("gs://bucket/key")
    assert "either" in str(exc.value)
    assert exc.value.url == "gs://bucket/key" and exc.value.operation == "info"


# ------------------------------------------------------------------ a fault proxy


@dataclass
class Fault:
    """What the proxy does to requests whose ``"METHOD /path?query"`` contains ``match``."""

    action: str  # "status", "truncate" or "stall"
    match: str = ""
    status: int = 503
    retry_after: str | None = None


class FaultProxy:
    """A small HTTP proxy in front of the emulator that injects faults and counts requests."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.faults: list[Fault] = []
        self.seen: list[str] = []
        self.release = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()
                except OSError:  # the client went away (timeouts, truncation tests)
                    self.close_connection = True

            def do_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                line = f"{self.command} {self.path}"
                proxy.seen.append(line)
                fault = next((f for f in proxy.faults if f.match in line), None)
                if fault is not None and fault.action == "status":
                    payload = json.dumps(
                        {"error": {"code": fault.status, "message": "injected by the proxy"}}
                    ).encode()
                    self.send_response(fault.status)
                    if fault.retry_after is not None:
                        self.send_header("Retry-After", fault.retry_after)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault is not None and fault.action == "stall":
                    proxy.release.wait(30)
                    self.close_connection = True
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault is not None and fault.action == "truncate":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_any  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def count(self, match: str) -> int:
        return sum(match in line for line in self.seen)

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(fake_gcs: ServerProcess) -> Iterator[FaultProxy]:
    p = FaultProxy(fake_gcs.endpoint).start()
    yield p
    p.stop()


@pytest.fixture
def proxied(proxy: FaultProxy) -> Iterator[Store]:
    options = {"endpoint_url": proxy.endpoint, "token": "anon", "project": GCS_PROJECT}
    with Store(options={"gs": options}, retry={"read_timeout": 0.5}) as s:
        yield s


@pytest.mark.parametrize(
    ("status", "retry_after", "error", "seconds"),
    [
        (503, "7", mlstore.ThrottledError, 7.0),
        (429, "2", mlstore.ThrottledError, 2.0),
        (500, None, mlstore.TransientError, None),
        (502, None, mlstore.TransientError, None),
        (408, None, mlstore.TransientError, None),
        (401, None, mlstore.PermissionDeniedError, None),
        (403, None, mlstore.PermissionDeniedError, None),
        (412, None, mlstore.PreconditionFailedError, None),
        (404, None, mlstore.NotFoundError, None),
    ],
)
def test_status_answers_map_to_errors_after_one_attempt(
    proxy: FaultProxy,
    proxied: Store,
    root: str,
    store: Store,
    status: int,
    retry_after: str | None,
    error: type[mlstore.MlstoreError],
    seconds: float | None,
) -> None:
    url = f"{root}/fault.bin"
    store.write_bytes(url, b"0123456789")
    proxy.faults.append(Fault("status", "/fault.bin", status, retry_after))
    backend = proxied.backend("gs")
    for operation, call in (
        ("read", lambda: backend.read(parse_url(url), 0, 4)),
        ("info", lambda: backend.info(parse_url(url))),
    ):
        before = proxy.count("/fault.bin")
        with pytest.raises(error) as exc:
            call()
        assert proxy.count("/fault.bin") == before + 1, f"{operation}: retried inside gcsfs"
        assert exc.value.url == url and exc.value.operation == operation
        if seconds is not None:
            assert getattr(exc.value, "retry_after", None) == seconds


def test_bad_request_is_permanent(proxy: FaultProxy, proxied: Store, root: str) -> None:
    proxy.faults.append(Fault("status", "/bad.bin", 400))
    with pytest.raises(mlstore.MlstoreError, match="400") as exc:
        proxied.read_bytes(f"{root}/bad.bin")
    assert not isinstance(exc.value, mlstore.TransientError)


@pytest.mark.parametrize("operation", ["write", "ls", "find", "rm", "copy", "mkdir"])
def test_every_operation_makes_one_attempt(
    proxy: FaultProxy, proxied: Store, root: str, store: Store, operation: str
) -> None:
    store.write_bytes(f"{root}/dir/one.bin", b"1")
    proxy.faults.append(Fault("status", "", 503, "1"))
    calls = {
        "write": lambda: proxied.write_bytes(f"{root}/dir/two.bin", b"2"),
        "ls": lambda: proxied.ls(f"{root}/dir"),
        "find": lambda: proxied.find(root),
        "rm": lambda: proxied.rm(f"{root}/dir/one.bin"),
        "copy": lambda: proxied.copy(f"{root}/dir/one.bin", f"{root}/dir/copy.bin"),
        "mkdir": lambda: proxied.mkdir("gs://t-never-created"),
    }
    with pytest.raises(mlstore.ThrottledError) as exc:
        calls[operation]()
    assert len(proxy.seen) == 1, proxy.seen
    assert exc.value.retry_after == 1.0


def test_truncated_body_is_connection_lost(
    proxy: FaultProxy, proxied: Store, root: str, store: Store
) -> None:
    url = f"{root}/short.bin"
    store.write_bytes(url, bytes(range(256)) * 100)
    proxy.faults.append(Fault("truncate", "alt=media"))
    with pytest.raises(mlstore.ConnectionLostError) as exc:
        proxied.read_bytes(url)
    assert exc.value.url == url
    assert proxy.count("alt=media") == 1


def test_stalled_server_times_out(proxy: FaultProxy, proxied: Store, root: str) -> None:
    proxy.faults.append(Fault("stall", "/stall.bin"))
    with pytest.raises(mlstore.StorageTimeoutError) as exc:
        proxied.info(f"{root}/stall.bin")
    assert exc.value.url == f"{root}/stall.bin" and isinstance(exc.value, TimeoutError)
    assert proxy.count("/stall.bin") == 1


def test_error_text_holds_no_credentials(proxy: FaultProxy, root: str) -> None:
    from google.oauth2.credentials import Credentials

    secret = "ya29.not-a-real-access-token-but-treat-it-as-one"
    options = {
        "endpoint_url": proxy.endpoint,
        "token": Credentials(secret),
        "project": GCS_PROJECT,
    }
    proxy.faults.append(Fault("status", "", 403))
    with Store(options={"gs": options}) as s:
        with pytest.raises(mlstore.MlstoreError) as exc:
            s.read_bytes(f"{root}/x.bin")
        assert secret not in str(exc.value) and secret not in repr(exc.value)
        assert secret not in repr(s) and secret not in repr(s.backend("gs"))


# ------------------------------------------------------------------ the one-attempt gcsfs
# mlstore.backends._gcsfs subclasses gcsfs's GCSFileSystem; these pin the gcsfs behaviour
# that subclass relies on, so a gcsfs upgrade that changes it fails here, by name.


def test_gcsfs_still_has_what_the_one_attempt_filesystem_replaces() -> None:
    from fsspec import asyn
    from gcsfs.core import GCSFileSystem
    from gcsfs.retry import HttpError, is_retriable

    from mlstore.backends._gcsfs import OneAttemptGCSFileSystem

    # gcsfs wraps these in retry_request, a decorator that keeps the function it wraps
    # as __wrapped__; the subclass replaces _request and takes the others unwrapped.
    for name in ("_request", "_get_file_request", "_get_file_concurrent"):
        wrapped = getattr(GCSFileSystem, name)
        assert hasattr(wrapped, "__wrapped__"), f"gcsfs no longer wraps {name}"
        assert not hasattr(getattr(OneAttemptGCSFileSystem, name), "__wrapped__"), name
    for name in ("_get_file_request", "_get_file_concurrent"):
        own = getattr(GCSFileSystem, name).__wrapped__
        assert getattr(OneAttemptGCSFileSystem, name) is own
    # What the wrapper would do with a 503: try again (five more times).
    assert is_retriable(HttpError({"code": 503, "message": "busy"}))
    # The batch delete it replaces, and the helper the replacement runs deletes with.
    assert callable(GCSFileSystem._delete_files) and callable(asyn._run_coros_in_chunks)


@pytest.mark.parametrize(("status", "error"), [(503, "HttpError"), (404, "FileNotFoundError")])
def test_one_attempt_filesystem_sends_a_failed_request_once(
    gcs_fault_proxy: ServerProcess, gcs_bucket: str, status: int, error: str
) -> None:
    from fsspec.asyn import sync

    from mlstore.backends import _errors, _gcsfs
    from tests.servers import proxy

    body = json.dumps({"error": {"code": status, "message": "injected by the proxy"}})
    headers = {"Content-Type": "application/json", "Retry-After": "3"}
    proxy.set_faults(
        gcs_fault_proxy.endpoint,
        {"fault": "status", "status": status, "headers": headers, "body": body},
    )
    fs = _gcsfs.OneAttemptGCSFileSystem(
        endpoint_url=gcs_fault_proxy.endpoint,
        token="anon",
        project=GCS_PROJECT,
        skip_instance_cache=True,
    )
    with pytest.raises(Exception) as exc:  # gcsfs raises its own types: checked below
        sync(fs.loop, _gcsfs.metadata, fs, gcs_bucket, "some/key.bin", None)
    assert type(exc.value).__name__ == error
    assert proxy.counts(gcs_fault_proxy.endpoint)["total"] == 1
    answer = _gcsfs.answer(exc.value)
    assert answer is not None
    assert (answer.status, answer.reason) == (status, "injected by the proxy")
    assert _errors.retry_after(answer.headers) == 3.0


def test_one_attempt_filesystem_reads_through_the_proxy(
    gcs_fault_proxy: ServerProcess, gcs_bucket: str, store: Store
) -> None:
    from fsspec.asyn import sync

    from mlstore.backends import _gcsfs
    from tests.servers import proxy

    store.write_bytes(f"gs://{gcs_bucket}/dir/obj.bin", b"0123456789")
    fs = _gcsfs.OneAttemptGCSFileSystem(
        endpoint_url=gcs_fault_proxy.endpoint,
        token="anon",
        project=GCS_PROJECT,
        skip_instance_cache=True,
    )
    status, headers, data = sync(
        fs.loop, _gcsfs.media, fs, gcs_bucket, "dir/obj.bin", "bytes=2-5", None
    )
    assert (status, data) == (206, b"2345") and headers.get("x-goog-generation")
    assert sync(fs.loop, _gcsfs.has_prefix, fs, gcs_bucket, "dir")
    assert not sync(fs.loop, _gcsfs.has_prefix, fs, gcs_bucket, "dir/obj.bin")
    assert proxy.counts(gcs_fault_proxy.endpoint)["total"] == 3


# ------------------------------------------------------------------ processes


def _read_hashes(store: Store, urls: list[str], out: Any) -> None:
    try:
        out.put([content_hash(store.read_bytes(u)) for u in urls])
    except BaseException as exc:
        out.put(f"{type(exc).__name__}: {exc}")
        raise


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_store_from_the_parent_works_in_child_processes(
    fake_gcs: ServerProcess, root: str, store: Store, method: str
) -> None:
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    blobs = {f"{root}/mp/{i}.bin": bytes([i]) * (1000 + i) for i in range(8)}
    for url, data in blobs.items():
        store.write_bytes(url, data)
    # 'token' never crosses a pickle (it may be a secret); 'anon' is not one, so
    # spawned and forkserver children get anonymous access from the Store itself.
    options = {"endpoint_url": fake_gcs.endpoint, "anon": True, "project": GCS_PROJECT}
    parent = Store(options={"gs": options})
    urls = sorted(blobs)
    assert parent.read_bytes(urls[0]) == blobs[urls[0]]  # a live client before the fork
    ctx = multiprocessing.get_context(method)
    out = ctx.Queue()
    procs = [ctx.Process(target=_read_hashes, args=(parent, urls, out)) for _ in range(4)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
    expected = [content_hash(blobs[u]) for u in urls]
    assert results == [expected] * 4
    assert [p.exitcode for p in procs] == [0] * 4
    assert parent.read_bytes(urls[-1]) == blobs[urls[-1]]  # the parent's client still works
    parent.close()


def _child_client(backend: Any, url: URL, parent_id: int, out: Any) -> None:
    from mlstore._util import process

    # The parent's client was set aside at the fork, kept untouched (so its id is not reused).
    kept = any(id(value) == parent_id for value in process._INHERITED)
    fs = backend.fs
    out.put((kept, id(fs) != parent_id, backend.read(url)))


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_client_is_created_lazily_and_anew_in_a_forked_child(
    gcs_options: dict[str, object], root: str
) -> None:
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork start method here")
    url = f"{root}/lazy.bin"
    with Store(options={"gs": gcs_options}) as s:
        backend = s.backend("gs")
        assert backend._fs._value is None  # type: ignore[attr-defined]
        s.write_bytes(url, b"made lazily")
        parent_fs = backend.fs  # type: ignore[attr-defined]
        assert parent_fs is not None and backend.fs is parent_fs  # type: ignore[attr-defined]
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        p = ctx.Process(target=_child_client, args=(backend, parse_url(url), id(parent_fs), out))
        p.start()
        try:
            assert out.get(timeout=60) == (True, True, b"made lazily")
        finally:
            p.join(timeout=60)
        assert p.exitcode == 0
        assert backend.fs is parent_fs  # type: ignore[attr-defined]
        assert s.read_bytes(url) == b"made lazily"


def test_no_gcsfs_import_or_client_before_the_first_call(fake_gcs: ServerProcess) -> None:
    code = (
        "import sys, mlstore\n"
        f"s = mlstore.Store(options={{'gs': {{'endpoint_url': {fake_gcs.endpoint!r}, "
        "'anon': True}})\n"
        "b = s.backend('gs')\n"
        "assert 'gcsfs' not in sys.modules, 'gcsfs imported before the first call'\n"
        "assert b._fs._value is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
