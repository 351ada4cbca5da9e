"""The az:// backend against Azurite (started by the suite), plus a small real HTTP server
on 127.0.0.1 that answers like a failing Azure endpoint (503 ServerBusy, 429, 500, a body
cut short, a stall), to show how failures are mapped and that the Azure SDK makes exactly
one attempt per call (mlstore is the one retry layer).

The shared behaviour (reads, ranges, version pinning, listings, the >64 MiB object) is in
``tests/test_conformance.py::TestAzure``.
"""

from __future__ import annotations

import base64
import gc
import multiprocessing
import multiprocessing.forkserver
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import traceback
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

import mlstore
from mlstore import Store
from mlstore.backends.azure import AZURE_BLOCKS_KEY, AZURE_METADATA_KEY
from mlstore.hashing import block_digests, content_hash
from mlstore.url import parse_url
from tests.emulators import AZURITE_ACCOUNT, AZURITE_KEY, ServerProcess

pytestmark = [pytest.mark.azure, pytest.mark.usefixtures("backend_only")]


# A well-formed account key (base64 of 64 bytes) that is not the account's.
WRONG_KEY = base64.b64encode(
    b"not the key of devstoreaccount1, but shaped like one: 64 bytes.."
).decode()
MALFORMED_KEY = "not-base64-" + "k" * 30


def _chain_text(exc: BaseException) -> str:
    """Everything a traceback of ``exc`` would print, causes included."""
    return "".join(traceback.format_exception(exc)) + repr(exc)


# ------------------------------------------------------------------ error mapping


def test_missing_container_is_not_found(az_options: dict[str, Any]) -> None:
    name = f"t-missing-{uuid.uuid4().hex[:8]}"
    with Store(options={"az": az_options}) as s:
        for call in (
            lambda: s.read_bytes(f"az://{name}/x.bin"),
            lambda: s.info(f"az://{name}/x.bin"),
            lambda: s.info(f"az://{name}"),
            lambda: s.ls(f"az://{name}"),
            lambda: s.find(f"az://{name}/sub"),
            lambda: s.write_bytes(f"az://{name}/x.bin", b"x"),
        ):
            with pytest.raises(mlstore.NotFoundError) as exc:
                call()
            assert name in str(exc.value)
        assert not s.exists(f"az://{name}")
        assert not s.exists(f"az://{name}/x.bin")
        with pytest.raises(mlstore.NotFoundError, match="no such container"):
            s.read_bytes(f"az://{name}/x.bin")


def test_missing_blob_is_not_found(az_options: dict[str, Any], az_container: str) -> None:
    url = f"az://{az_container}/no/such/blob.bin"
    with Store(options={"az": az_options}) as s:
        with pytest.raises(mlstore.NotFoundError) as exc:
            s.read_bytes(url)
        assert exc.value.url == url and exc.value.operation == "read"
        assert "no such blob" in str(exc.value) and url in str(exc.value)
        with pytest.raises(FileNotFoundError):
            s.info(url)
        with pytest.raises(mlstore.NotFoundError):
            s.rm(url)
        with pytest.raises(mlstore.NotFoundError):
            s.copy(url, f"az://{az_container}/copy.bin")


def test_pinned_read_of_a_replaced_blob(az_options: dict[str, Any], az_container: str) -> None:
    """The backend's reads carry If-Match: Azurite answers 412 once the blob is replaced.
    (Called on the backend: the Store may serve an old version it has cached.)"""
    url = f"az://{az_container}/pinned.bin"
    target = parse_url(url)
    with Store(options={"az": az_options}) as s:
        backend = s.backend("az")
        s.write_bytes(url, b"A" * 5000)
        old = s.info(url).version
        assert old is not None and old.startswith('"')
        assert backend.read(target, 10, 20, old) == b"A" * 10
        assert backend.read(target, -10, None, old) == b"A" * 10
        assert backend.read(target, None, None, old) == b"A" * 5000
        s.write_bytes(url, b"B" * 5000)
        for start, end in ((None, None), (0, 10), (-10, None), (4990, 6000)):
            with pytest.raises(mlstore.PreconditionFailedError) as exc:
                backend.read(target, start, end, old)
            assert exc.value.url == url and exc.value.operation == "read"
        new = s.info(url).version
        assert new != old
        assert backend.read(target, 0, 3, new) == b"BBB"


def test_wrong_account_key_is_permission_denied_without_the_key(
    azurite_server: Any, az_container: str
) -> None:
    endpoint = f"{azurite_server.endpoint}/{AZURITE_ACCOUNT}"
    bad = (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
        f"AccountKey={WRONG_KEY};BlobEndpoint={endpoint};"
    )
    url = f"az://{az_container}/x.bin"
    for options in (
        {"connection_string": bad},
        {"account_name": AZURITE_ACCOUNT, "account_key": WRONG_KEY, "endpoint_url": endpoint},
    ):
        with Store(options={"az": options}) as s:
            for call in (lambda: s.read_bytes(url), lambda: s.write_bytes(url, b"x")):
                with pytest.raises(mlstore.PermissionDeniedError) as exc:
                    call()
                err = exc.value
                assert isinstance(err, PermissionError)
                assert url in str(err) and "access denied" in str(err)
                text = _chain_text(err)
                for secret in (WRONG_KEY, AZURITE_KEY, "AccountKey"):
                    assert secret not in text
            for shown in (repr(s), repr(s.backend("az")), str(s.stats())):
                assert WRONG_KEY not in shown
            assert WRONG_KEY.encode() not in pickle.dumps(s)
    # A key that is not even base64 cannot sign a request: the same error, no key shown.
    options = {
        "account_name": AZURITE_ACCOUNT,
        "account_key": MALFORMED_KEY,
        "endpoint_url": endpoint,
    }
    with Store(options={"az": options}) as s:
        with pytest.raises(mlstore.PermissionDeniedError, match="account key") as exc:
            s.read_bytes(url)
        assert MALFORMED_KEY not in _chain_text(exc.value)


def test_explicit_credentials_win_over_the_environment(
    azurite_server: Any,
    az_container: str,
    az_connection_string: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """adlfs alone would use AZURE_STORAGE_CONNECTION_STRING over an account_key given in
    code; mlstore's precedence is explicit option > environment."""
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", az_connection_string)
    url = f"az://{az_container}/x.bin"
    endpoint = f"{azurite_server.endpoint}/{AZURITE_ACCOUNT}"
    with Store() as s:
        s.write_bytes(url, b"from the environment")
    options = {"account_name": AZURITE_ACCOUNT, "account_key": WRONG_KEY, "endpoint_url": endpoint}
    with Store(options={"az": options}) as s, pytest.raises(mlstore.PermissionDeniedError):
        s.read_bytes(url)
    options["account_key"] = AZURITE_KEY
    with Store(options={"az": options}) as s:
        assert s.read_bytes(url) == b"from the environment"


def test_sas_token_never_appears_in_errors(azurite_server: Any, az_container: str) -> None:
    sig = "c2VjcmV0U2lnbmF0dXJl" + uuid.uuid4().hex
    sas = f"sv=2021-08-06&ss=b&srt=sco&sp=rl&se=2099-01-01T00:00:00Z&sig={sig}"
    options = {
        "account_name": AZURITE_ACCOUNT,
        "sas_token": sas,
        "endpoint_url": f"{azurite_server.endpoint}/{AZURITE_ACCOUNT}",
    }
    with Store(options={"az": options}) as s:
        with pytest.raises(mlstore.PermissionDeniedError) as exc:
            s.read_bytes(f"az://{az_container}/x.bin")
        assert sig not in _chain_text(exc.value)
        assert sig.encode() not in pickle.dumps(s)


def test_unusable_options_are_a_config_error_without_secrets() -> None:
    secret = "AccountKey=" + "k" * 40
    with Store(options={"az": {"connection_string": f"garbage;{secret}"}}) as s:
        with pytest.raises(mlstore.ConfigError) as exc:
            s.info("az://ctr/x")
        assert "could not configure the Azure client" in str(exc.value)
        assert "az://ctr/x" in str(exc.value) and exc.value.operation == "info"
        assert "k" * 40 not in _chain_text(exc.value)


# ------------------------------------------------------------ content hash, metadata


@pytest.mark.parametrize("size", [0, 3000, 65 * 1024 * 1024 + 7])
def test_content_hash_round_trip(
    az_options: dict[str, Any], az_container: str, az_connection_string: str, size: int
) -> None:
    data = os.urandom(size)
    url = f"az://{az_container}/h-{size}.bin"
    with Store(options={"az": az_options}) as s:
        s.write_bytes(url, data)
        info = s.info(url)
        assert info.content_hash == content_hash(data)
        assert info.size == size and info.type == "file" and info.mtime
        if size <= 64 * 1024 * 1024:  # a single Put Blob: Azure records the MD5
            import base64
            import hashlib

            assert info.checksums["md5"] == base64.b64encode(hashlib.md5(data).digest()).decode()
        # ls and find report the same version and hash as info
        (listed,) = [e for e in s.ls(f"az://{az_container}", detail=True) if e.url == info.url]
        assert listed.version == info.version and listed.content_hash == info.content_hash
        # a server-side copy keeps the metadata, so the hash travels with the bytes
        s.copy(url, f"{url}.copy")
        assert s.info(f"{url}.copy").content_hash == content_hash(data)
        assert s.read_bytes(f"{url}.copy") == data
    # The raw metadata name is a valid C# identifier (Azure refuses hyphens).
    from azure.storage.blob import BlobServiceClient

    with BlobServiceClient.from_connection_string(az_connection_string) as service:
        props = service.get_blob_client(az_container, f"h-{size}.bin").get_blob_properties()
    expected = {AZURE_METADATA_KEY: content_hash(data)}
    blocks = block_digests(data)
    if blocks is not None:  # larger than one digest block
        expected[AZURE_BLOCKS_KEY] = blocks
    assert props.metadata == expected
    assert (AZURE_METADATA_KEY, AZURE_BLOCKS_KEY) == ("mlstore_xxh3", "mlstore_xxh3_blocks")


def test_fetch_is_one_get_with_the_version(az_options: dict[str, Any], az_container: str) -> None:
    url = f"az://{az_container}/fetched.bin"
    with Store(options={"az": az_options}) as s:
        s.write_bytes(url, b"fetched bytes")
        backend = s.backend("az")
        data, version = backend.fetch(parse_url(url))
        assert data == b"fetched bytes" and version == s.info(url).version
        with pytest.raises(mlstore.NotFoundError):
            backend.fetch(parse_url(f"{url}.missing"))
        with pytest.raises(IsADirectoryError):
            backend.fetch(parse_url(f"az://{az_container}"))


def test_directories_containers_and_mkdir(az_options: dict[str, Any], az_container: str) -> None:
    with Store(options={"az": az_options}) as s:
        s.write_bytes(f"az://{az_container}/d/e/f.bin", b"f")
        assert s.info(f"az://{az_container}").type == "directory"
        assert s.info(f"az://{az_container}/d").type == "directory"
        assert s.info(f"az://{az_container}/d/").type == "directory"
        with pytest.raises(IsADirectoryError):
            s.read_bytes(f"az://{az_container}/d")
        # find of a file is that file
        assert s.find(f"az://{az_container}/d/e/f.bin") == [f"az://{az_container}/d/e/f.bin"]
        # a recursive rm of the container empties it and keeps it
        s.rm(f"az://{az_container}", recursive=True)
        assert s.find(f"az://{az_container}") == []
        assert s.info(f"az://{az_container}").type == "directory"
        # mkdir of a container URL creates it (and again is fine); of a key, nothing
        fresh = f"t-{uuid.uuid4().hex[:16]}"
        s.mkdir(f"az://{fresh}")
        s.mkdir(f"az://{fresh}")
        s.mkdir(f"az://{fresh}/some/dir")
        assert s.ls(f"az://{fresh}") == []
        s.write_bytes(f"az://{fresh}/x", b"x")
        assert s.read_bytes(f"az://{fresh}/x") == b"x"
    from azure.storage.blob import BlobServiceClient

    with BlobServiceClient.from_connection_string(az_options["connection_string"]) as service:
        service.delete_container(fresh)


# ---------------------------------------------------- failures from a real endpoint


class _Plan:
    """What the failing endpoint answers: a status, with an Azure error code and
    headers. (Bodies cut short and stalls come from the fault proxy.)"""

    def __init__(self) -> None:
        self.status = 200
        self.code = ""
        self.headers: dict[str, str] = {}
        self.requests = 0
        self.seen: list[tuple[str, str]] = []  # (method, path) of every request
        self.lock = threading.Lock()


class _FailingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_PUT(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self._answer(head=False)

    def _answer(self, *, head: bool) -> None:
        plan: _Plan = self.server.plan
        with plan.lock:
            plan.requests += 1
            plan.seen.append((self.command, self.path.split("?")[0]))
        body = (
            f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{plan.code}</Code>'
            f"<Message>injected</Message></Error>"
        ).encode()
        self.send_response(plan.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if head else str(len(body)))
        if plan.code:
            self.send_header("x-ms-error-code", plan.code)
        for name, value in plan.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


@pytest.fixture
def failing() -> Iterator[tuple[_Plan, str]]:
    """A real HTTP server on 127.0.0.1 answering as the plan says; yields the plan and
    ``az`` options that point at it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FailingHandler)
    server.daemon_threads = True
    server.plan = _Plan()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    port = server.server_address[1]
    options = {
        "account_name": AZURITE_ACCOUNT,
        "account_key": AZURITE_KEY,
        "endpoint_url": f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}",
    }
    yield server.plan, options  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("status", "code", "headers", "expected", "retry_after"),
    [
        (503, "ServerBusy", {"Retry-After": "7"}, mlstore.ThrottledError, 7.0),
        (429, "", {"Retry-After": "2"}, mlstore.ThrottledError, 2.0),
        (500, "InternalError", {}, mlstore.TransientError, None),
        (500, "OperationTimedOut", {}, mlstore.TransientError, None),
        (403, "AuthorizationPermissionMismatch", {}, mlstore.PermissionDeniedError, None),
        (404, "BlobNotFound", {}, mlstore.NotFoundError, None),
        (412, "ConditionNotMet", {}, mlstore.PreconditionFailedError, None),
    ],
)
def test_status_mapping_with_one_attempt(
    failing: tuple[_Plan, dict[str, Any]],
    status: int,
    code: str,
    headers: dict[str, str],
    expected: type[Exception],
    retry_after: float | None,
) -> None:
    plan, options = failing
    plan.status, plan.code, plan.headers = status, code, headers
    url = "az://ctr/k.bin"
    with Store(options={"az": options}) as s:
        backend = s.backend("az")
        target = parse_url(url)
        for operation, call in (
            ("read", lambda: backend.read(target, 0, 10, '"0x1"')),
            ("write", lambda: backend.write(target, b"data")),
        ):
            del plan.seen[:]
            with pytest.raises(expected) as exc:
                call()
            # One request per (method, path): a 404 read also lists the prefix (is it a
            # directory?), but nothing is sent twice.
            assert plan.seen, "no request reached the server"
            assert len(set(plan.seen)) == len(plan.seen), f"the SDK retried: {plan.seen}"
            err = exc.value
            assert isinstance(err, mlstore.MlstoreError)
            assert err.url == url and err.operation == operation
            if isinstance(err, mlstore.TransientError):
                assert err.retry_after == retry_after
                assert type(err) is expected


def test_retry_after_in_milliseconds_is_the_more_precise(
    failing: tuple[_Plan, dict[str, Any]],
) -> None:
    plan, options = failing
    plan.status, plan.code = 503, "ServerBusy"
    plan.headers = {"x-ms-retry-after-ms": "1500", "Retry-After": "7"}
    with (
        Store(options={"az": options}) as s,
        pytest.raises(mlstore.ThrottledError, match="ServerBusy") as exc,
    ):
        s.backend("az").read(parse_url("az://ctr/k.bin"), 0, 10)
    assert exc.value.retry_after == 1.5
    assert plan.requests == 1


def test_directory_urls_are_neither_read_nor_written(
    az_options: dict[str, Any], az_container: str
) -> None:
    with Store(options={"az": az_options}) as s:
        s.write_bytes(f"az://{az_container}/dir/x.bin", b"x")
        for url in (f"az://{az_container}", f"az://{az_container}/dir/"):
            with pytest.raises(IsADirectoryError, match="use ls"):
                s.read_bytes(url)
            with pytest.raises(IsADirectoryError, match="cannot write a file over it"):
                s.write_bytes(url, b"y")
        assert s.find(f"az://{az_container}") == [f"az://{az_container}/dir/x.bin"]


def _faulty_blob(
    az_fault_proxy: ServerProcess,
    az_options: dict[str, Any],
    az_container: str,
    rule: dict[str, Any],
) -> str:
    """A blob on Azurite whose GETs through the fault proxy meet ``rule``."""
    from tests.servers import proxy

    url = f"az://{az_container}/faulty.bin"
    with Store(options={"az": az_options}) as s:
        s.write_bytes(url, b"x" * 10_000)
    proxy.set_faults(az_fault_proxy.endpoint, {"method": "GET", **rule})
    return url


def test_body_cut_short_is_connection_lost_after_one_request(
    az_fault_proxy: ServerProcess,
    az_fault_options: dict[str, Any],
    az_options: dict[str, Any],
    az_container: str,
) -> None:
    from tests.servers import proxy

    rule = {"fault": "truncate", "offset": 4000}
    url = _faulty_blob(az_fault_proxy, az_options, az_container, rule)
    with (
        Store(options={"az": az_fault_options}) as s,
        pytest.raises(mlstore.ConnectionLostError) as exc,
    ):
        s.backend("az").read(parse_url(url))
    assert url in str(exc.value) and exc.value.operation == "read"
    gets = proxy.counts(az_fault_proxy.endpoint)["methods"].get("GET", 0)
    assert gets == 1, "the body was re-requested by the Azure SDK"


def test_stall_is_a_timeout(
    az_fault_proxy: ServerProcess,
    az_fault_options: dict[str, Any],
    az_options: dict[str, Any],
    az_container: str,
) -> None:
    from tests.servers import proxy

    # The body never comes: only the client's read timeout can end the read (a stall
    # that ended by itself would deliver the body, not a timeout).
    url = _faulty_blob(az_fault_proxy, az_options, az_container, {"fault": "stall"})
    retry = mlstore.RetryPolicy(read_timeout=0.5, connect_timeout=0.5)
    with (
        Store(options={"az": az_fault_options}, retry=retry) as s,
        pytest.raises(mlstore.StorageTimeoutError) as exc,
    ):
        s.backend("az").read(parse_url(url), 0, 5)
    assert isinstance(exc.value, TimeoutError)
    assert proxy.counts(az_fault_proxy.endpoint)["methods"].get("GET", 0) == 1


def test_refused_connection_is_connection_lost() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        options = {
            "account_name": AZURITE_ACCOUNT,
            "account_key": AZURITE_KEY,
            "endpoint_url": f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}",
        }
        with (
            Store(options={"az": options}) as s,
            pytest.raises(mlstore.ConnectionLostError) as exc,
        ):
            s.read_bytes("az://ctr/k.bin")
    assert "az://ctr/k.bin" in str(exc.value)


# ------------------------------------------------------------------ processes


def _child_read(store: Store, url: str, results: Any) -> None:
    try:
        results.put((url, content_hash(store.read_bytes(url))))
        # Collect the parent's inherited client, if anything would free it: that must
        # not disturb the parent's pooled connections (they share sockets and epoll).
        gc.collect()
    except BaseException as exc:
        results.put((url, f"error: {exc!r}"))


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_store_made_in_parent_works_in_children(
    method: str,
    az_options: dict[str, Any],
    az_container: str,
    az_connection_string: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The connection string is a secret: a pickled Store drops it, and children started
    # with spawn/forkserver find it in the environment they inherit.
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", az_connection_string)
    if method == "forkserver":
        # A fork server started earlier in the session has the old environment.
        multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]
    ctx = multiprocessing.get_context(method)
    # A bounded read timeout: a parent whose connections the children broke would
    # otherwise wait a minute per read.
    store = Store(options={"az": az_options}, retry=mlstore.RetryPolicy(read_timeout=10))
    urls, expected = [], {}
    for i in range(4):
        data = os.urandom(10_000 + i)
        url = f"az://{az_container}/mp/{i}.bin"
        store.write_bytes(url, data)
        urls.append(url)
        expected[url] = content_hash(data)
    assert store.read_bytes(urls[0]) is not None  # the parent's client exists before fork
    results = ctx.Queue()
    procs = [ctx.Process(target=_child_read, args=(store, url, results)) for url in urls]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got == expected
    # and the parent's own client (and its pooled connection) still works after its
    # children used theirs
    for url in urls:
        assert content_hash(store.read_bytes(url)) == expected[url]
    store.close()
    if method == "forkserver":
        multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]


def test_forked_children_leave_the_parent_working(
    az_connection_string: str, az_container: str
) -> None:
    """The parent's client, inherited by a forked child, shares its sockets and its event
    loop's epoll instance with the parent. A child that frees it (gc) or exits normally
    (a raw ``os.fork()``, whose exit handlers run; multiprocessing ends with
    ``os._exit``) must neither hang on the parent's loop thread nor unregister the
    parent's pooled connection. Run in a fresh interpreter: the failure modes depend on
    the order objects are freed in, which pytest's own references change."""
    url = f"az://{az_container}/forked.bin"
    script = textwrap.dedent(
        f"""
        import gc, multiprocessing, os, sys, mlstore
        options = {{"az": {{"connection_string": {az_connection_string!r}}}}}
        s = mlstore.Store(options=options, retry=mlstore.RetryPolicy(read_timeout=5))
        s.write_bytes({url!r}, b"made in the parent")
        assert s.read_bytes({url!r}) == b"made in the parent"  # a pooled connection

        def child(store):
            assert store.read_bytes({url!r}) == b"made in the parent"
            gc.collect()  # frees whatever of the parent's the child dropped

        p = multiprocessing.get_context("fork").Process(target=child, args=(s,))
        p.start()
        p.join()
        assert p.exitcode == 0, p.exitcode
        assert s.read_bytes({url!r}) == b"made in the parent"

        pid = os.fork()
        if pid == 0:
            assert s.read_bytes({url!r}) == b"made in the parent"
            sys.exit(0)  # a normal exit: atexit handlers and finalizers run
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        assert s.read_bytes({url!r}) == b"made in the parent"
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert "Traceback" not in out.stderr
    assert "Unclosed" not in out.stderr


def test_pickled_store_carries_no_connection_string(az_options: dict[str, Any]) -> None:
    store = Store(options={"az": az_options})
    blob = pickle.dumps(store)
    assert AZURITE_KEY.encode() not in blob
    assert b"AccountKey" not in blob
    clone = pickle.loads(blob)
    assert "connection_string" not in clone.config.options.get("az", {})


def test_client_is_created_lazily(az_connection_string: str, az_container: str) -> None:
    """Neither the Azure SDK nor adlfs is imported, and no client is made, until the
    first operation."""
    script = textwrap.dedent(
        f"""
        import sys, mlstore
        s = mlstore.Store(options={{"az": {{"connection_string": {az_connection_string!r}}}}})
        backend = s.backend("az")
        assert "adlfs" not in sys.modules, "adlfs imported early"
        assert not any(m.startswith("azure") for m in sys.modules), "azure imported early"
        assert backend._closer is None
        assert s.exists("az://{az_container}") is True
        assert "adlfs" in sys.modules and backend._closer is not None
        s.close()
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_STORAGE_")}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
