"""The obstore transport (``StoreConfig.transport = "obstore"``, ``mlstore[fast]``):
the conformance suite on every emulator, and the invariants it must keep."""

from __future__ import annotations

import multiprocessing
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mlstore
from mlstore import Store
from mlstore.hashing import content_hash
from mlstore.url import parse_url
from tests.conformance import ListingConformance, ReadConformance, WriteConformance, payload
from tests.conftest import GCS_PROJECT, run_child, start_emulator
from tests.emulators import ServerProcess
from tests.servers import proxy

MiB = 1 << 20

pytest.importorskip("obstore")


@pytest.mark.s3
class TestS3(ReadConformance, WriteConformance, ListingConformance):
    @pytest.fixture
    def store(self, s3_options: dict[str, object]) -> Iterator[Store]:
        with Store(options={"s3": s3_options}, transport="obstore") as s:
            yield s

    @pytest.fixture
    def root(self, s3_bucket: str) -> str:
        return f"s3://{s3_bucket}/{uuid.uuid4().hex[:8]}"


@pytest.mark.gcs
class TestGCS(ReadConformance, WriteConformance, ListingConformance):
    @pytest.fixture
    def store(self, gcs_options: dict[str, object]) -> Iterator[Store]:
        with Store(options={"gs": gcs_options}, transport="obstore") as s:
            yield s

    @pytest.fixture
    def root(self, gcs_bucket: str) -> str:
        return f"gs://{gcs_bucket}/{uuid.uuid4().hex[:8]}"


@pytest.mark.azure
class TestAzure(ReadConformance, WriteConformance, ListingConformance):
    @pytest.fixture
    def store(self, az_options: dict[str, object]) -> Iterator[Store]:
        with Store(options={"az": az_options}, transport="obstore") as s:
            yield s

    @pytest.fixture
    def root(self, az_container: str) -> str:
        return f"az://{az_container}/{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------ the invariants

CLOUDS = ["s3", "gs", "az"]
_FIXTURES = {
    "s3": ("s3_options", "s3_bucket", "s3_fault_proxy", "s3_fault_options"),
    # fake-gcs-server serves obstore's XML API reads only to the Host it was told: the
    # gs tests here run on one whose Host is its fault proxy's
    "gs": ("gcs_proxied_options", "gcs_proxied_bucket", "gcs_proxied", "gcs_proxied_options"),
    "az": ("az_options", "az_container", "az_fault_proxy", "az_fault_options"),
}
_MARKS = {"s3": pytest.mark.s3, "gs": pytest.mark.gcs, "az": pytest.mark.azure}
EVERY_CLOUD = pytest.mark.parametrize(
    "cloud", [pytest.param(c, marks=_MARKS[c]) for c in CLOUDS], indirect=True
)


class Cloud:
    """One cloud's emulator, bucket and fault proxy, for tests run on each."""

    def __init__(self, request: pytest.FixtureRequest, protocol: str) -> None:
        options, bucket, fault_proxy, fault_options = _FIXTURES[protocol]
        self.protocol = protocol
        self.options = request.getfixturevalue(options)
        self.bucket = request.getfixturevalue(bucket)
        if protocol != "gs":  # (the gs proxy's counters are zeroed once its bucket exists)
            request.getfixturevalue(fault_proxy)
        self._request = request
        self._proxy_names = (fault_proxy, fault_options)

    def url(self, key: str) -> str:
        return f"{self.protocol}://{self.bucket}/{key}"

    def store(self, transport: str = "obstore", *, proxied: bool = False, **kw: Any) -> Store:
        options = self.fault_options if proxied else self.options
        return Store(options={self.protocol: options}, transport=transport, **kw)

    @property
    def proxy(self) -> str:
        return str(self._request.getfixturevalue(self._proxy_names[0]).endpoint)

    @property
    def fault_options(self) -> dict[str, object]:
        return dict(self._request.getfixturevalue(self._proxy_names[1]))


@pytest.fixture(scope="module")
def _gcs_behind_proxy() -> Iterator[ServerProcess]:
    """A fake-gcs-server that takes its fault proxy's address for its own, and that
    proxy."""
    from tests.emulators import fake_gcs_server, free_port

    port = free_port()
    server = start_emulator(lambda: fake_gcs_server(public_host=f"127.0.0.1:{port}"))
    try:
        front = start_emulator(lambda: proxy.process(server.endpoint, port))
        yield front
        front.stop()
    finally:
        server.stop()


@pytest.fixture
def gcs_proxied(_gcs_behind_proxy: ServerProcess) -> Iterator[ServerProcess]:
    proxy.clear_faults(_gcs_behind_proxy.endpoint)
    yield _gcs_behind_proxy
    proxy.clear_faults(_gcs_behind_proxy.endpoint)


@pytest.fixture
def gcs_proxied_options(gcs_proxied: ServerProcess) -> dict[str, object]:
    return {"endpoint_url": gcs_proxied.endpoint, "token": "anon", "project": GCS_PROJECT}


@pytest.fixture
def gcs_proxied_bucket(gcs_proxied_options: dict[str, object], gcs_proxied: ServerProcess) -> str:
    name = f"t-{uuid.uuid4().hex[:16]}"
    with Store(options={"gs": gcs_proxied_options}) as s:
        s.mkdir(f"gs://{name}")
    proxy.reset(gcs_proxied.endpoint)
    return name


@pytest.fixture
def cloud(request: pytest.FixtureRequest, backend_only: None) -> Cloud:
    return Cloud(request, request.param)


@EVERY_CLOUD
def test_the_obstore_transport_makes_the_object_requests(cloud: Cloud) -> None:
    with cloud.store() as fast, cloud.store("fsspec") as default:
        fast.exists(cloud.url("x"))
        default.exists(cloud.url("x"))
        assert type(fast.backend(cloud.protocol)).__module__ == "mlstore.backends.fast"
        assert type(default.backend(cloud.protocol)).__module__ != "mlstore.backends.fast"


@EVERY_CLOUD
def test_each_transport_reads_and_verifies_what_the_other_wrote(cloud: Cloud) -> None:
    one, two = payload(70_000, seed=11), payload(70_000, seed=12)
    with cloud.store() as fast, cloud.store("fsspec") as default:
        fast.write_bytes(cloud.url("by-obstore.bin"), one)
        default.write_bytes(cloud.url("by-fsspec.bin"), two)
        for store in (fast, default):
            assert store.info(cloud.url("by-obstore.bin")).content_hash == content_hash(one)
            assert store.info(cloud.url("by-fsspec.bin")).content_hash == content_hash(two)
            assert store.read_bytes(cloud.url("by-obstore.bin")) == one
            assert store.read_bytes(cloud.url("by-fsspec.bin")) == two
        # the same object, the same version, whichever transport asks
        for key in ("by-obstore.bin", "by-fsspec.bin"):
            assert fast.info(cloud.url(key)).version == default.info(cloud.url(key)).version


@EVERY_CLOUD
def test_a_write_returns_the_version_it_made(cloud: Cloud) -> None:
    with cloud.store() as fast:
        url = parse_url(cloud.url("made.bin"))
        made = fast.backend(cloud.protocol).write(url, b"made by obstore")
        if cloud.protocol != "gs":  # gs writes stay on gcsfs, which names no version
            assert made == fast.info(str(url)).version


@EVERY_CLOUD
def test_a_damaged_whole_download_is_checked_against_the_recorded_hash(cloud: Cloud) -> None:
    data = payload(50_000, seed=13)
    with cloud.store("fsspec") as writer:
        writer.write_bytes(cloud.url("flip.bin"), data)
    proxy.set_faults(cloud.proxy, {"fault": "flip", "method": "GET", "times": 1})
    with cloud.store(proxied=True, retry={"max_attempts": 2}, sleep=lambda _s: None) as fast:
        assert fast.read_bytes(cloud.url("flip.bin")) == data
    # the flipped body was refused, and fetched again by the retry layer
    assert proxy.counts(cloud.proxy)["faults"] == {"flip": 1}
    assert proxy.requests(cloud.proxy, "GET") == 2


@EVERY_CLOUD
def test_a_pinned_read_sends_the_version_and_refuses_another(cloud: Cloud) -> None:
    with cloud.store() as writer:
        writer.write_bytes(cloud.url("pin.bin"), b"first version")
        old = writer.info(cloud.url("pin.bin")).version
        assert old
    with cloud.store(proxied=True) as fast:
        assert fast.read_bytes(cloud.url("pin.bin"), 0, 5, version=old) == b"first"
        sent = [e for e in proxy.request_log(cloud.proxy) if e["method"] == "GET"][-1]
        assert old in (sent["if_match"], sent["generation"])
        writer.write_bytes(cloud.url("pin.bin"), b"second version")
        with pytest.raises(mlstore.PreconditionFailedError):
            fast.read_bytes(cloud.url("pin.bin"), 0, 5, version=old)


@EVERY_CLOUD
@pytest.mark.parametrize(
    ("status", "error"),
    [
        (503, mlstore.ThrottledError),
        (429, mlstore.ThrottledError),
        (500, mlstore.TransientError),
        (403, mlstore.PermissionDeniedError),
        (400, mlstore.MlstoreError),
    ],
)
def test_errors_are_translated_and_sent_once(
    cloud: Cloud, status: int, error: type[Exception]
) -> None:
    with cloud.store("fsspec") as writer:
        writer.write_bytes(cloud.url("err.bin"), b"x" * 100)
    proxy.set_faults(
        cloud.proxy, {"fault": "status", "status": status, "method": "GET", "body": ""}
    )
    with cloud.store(proxied=True) as fast, pytest.raises(error) as exc:
        fast.read_bytes(cloud.url("err.bin"))
    assert exc.value.url == cloud.url("err.bin")  # type: ignore[attr-defined]
    if error is mlstore.MlstoreError:
        assert not isinstance(exc.value, mlstore.TransientError)
    assert proxy.requests(cloud.proxy, "GET") == 1, "obstore retried on its own"


@EVERY_CLOUD
def test_the_one_retry_layer_is_mlstores(cloud: Cloud) -> None:
    with cloud.store("fsspec") as writer:
        writer.write_bytes(cloud.url("retry.bin"), b"y" * 100)
    proxy.set_faults(cloud.proxy, {"fault": "status", "status": 503, "method": "GET", "times": 2})
    with cloud.store(proxied=True, retry={"max_attempts": 4}, sleep=lambda _s: None) as fast:
        assert fast.read_bytes(cloud.url("retry.bin")) == b"y" * 100
        assert fast.stats().get("retries", cloud.protocol) == 2
    assert proxy.requests(cloud.proxy, "GET") == 3


@EVERY_CLOUD
def test_a_missing_object_is_not_found(cloud: Cloud) -> None:
    with cloud.store() as fast, pytest.raises(mlstore.NotFoundError):
        fast.read_bytes(cloud.url("nothing-here.bin"))


@EVERY_CLOUD
def test_a_body_that_breaks_off_is_resumed_pinned(cloud: Cloud) -> None:
    data = payload(3 * MiB, seed=14)
    with cloud.store("fsspec") as writer:
        writer.write_bytes(cloud.url("resume.bin"), data)
        version = writer.info(cloud.url("resume.bin")).version
    proxy.reset(cloud.proxy)
    proxy.set_faults(
        cloud.proxy, {"fault": "reset", "method": "GET", "offset": 2 * MiB, "times": 1}
    )
    with cloud.store(proxied=True, retry={"max_attempts": 3}, sleep=lambda _s: None) as fast:
        assert fast.read_bytes(cloud.url("resume.bin")) == data
        assert fast.stats().get("resumes", cloud.protocol) == 1
    gets = [e for e in proxy.request_log(cloud.proxy) if e["method"] == "GET"]
    assert len(gets) == 2
    assert gets[1]["range"].startswith("bytes=") and not gets[1]["range"].startswith("bytes=0-")
    assert version in (gets[1]["if_match"], gets[1]["generation"])


# ------------------------------------------------------------------ cache identity, processes


@pytest.mark.s3
def test_the_transport_does_not_change_what_the_node_cache_holds(
    s3_options: dict[str, object],
    s3_bucket: str,
    s3_fault_proxy: ServerProcess,
    s3_fault_options: dict[str, object],
    tmp_path: Path,
) -> None:
    url = f"s3://{s3_bucket}/cached.bin"
    cache = {"disk_dir": str(tmp_path / "cache")}
    with Store(options={"s3": s3_fault_options}, cache=cache) as default:
        default.write_bytes(url, b"cached once")
        assert default.read_bytes(url) == b"cached once"
    proxy.reset(s3_fault_proxy.endpoint)
    with Store(options={"s3": s3_fault_options}, cache=cache, transport="obstore") as fast:
        assert fast.read_bytes(url) == b"cached once"
    assert proxy.counts(s3_fault_proxy.endpoint)["total"] == 0, "served from the node cache"


def _read_in_child(args: tuple[Store, list[str]]) -> tuple[str, bool, list[str]]:
    from mlstore.backends._obstore import runtime_usable

    store, urls = args
    backend = type(store.backend(parse_url(urls[0]).protocol)).__name__
    hashes = [content_hash(store.read_bytes(u)) for u in urls]
    return backend, runtime_usable(), hashes


@EVERY_CLOUD
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_store_used_before_fork_or_spawn_reads_in_the_children(
    cloud: Cloud, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Credentials never cross a pickle: the workers find them where a user's would
    options = dict(cloud.options)
    if cloud.protocol == "gs":
        options = {**options, "token": None, "anon": True}
    elif cloud.protocol == "az":
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", str(options.pop("connection_string")))
    urls = [cloud.url(f"proc-{i}.bin") for i in range(8)]
    with Store(options={cloud.protocol: options}, transport="obstore") as store:
        expected = set()
        for i, url in enumerate(urls):
            data = payload(10_000 + i, seed=i)
            store.write_bytes(url, data)
            expected.add(content_hash(data))
        store.read_bytes(urls[0])  # the parent's obstore client exists and is connected
        ctx = multiprocessing.get_context(method)
        with ctx.Pool(2) as pool:
            results = pool.map(_read_in_child, [(store, urls[i::2]) for i in range(2)])
        assert {name for name, _, _ in results} == {f"Fast{_CLASS[cloud.protocol]}Backend"}
        # obstore's runtime started in the parent: a forked child makes its requests
        # through the fsspec half (obstore would hang there); a spawned one uses obstore
        assert {used for _, used, _ in results} == {method == "spawn"}
        assert {h for _, _, part in results for h in part} == expected
        assert store.read_bytes(urls[1]) == payload(10_001, seed=1)  # the parent reads on


_CLASS = {"s3": "S3", "gs": "GCS", "az": "Azure"}


# ------------------------------------------------------------------ selection and secrets


def test_the_transport_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Store().config.transport == "fsspec"
    monkeypatch.setenv("MLSTORE_TRANSPORT", "obstore")
    assert Store().config.transport == "obstore"
    assert Store(transport="fsspec").config.transport == "fsspec"
    with pytest.raises(mlstore.ConfigError, match="transport"):
        Store(transport="grpc")
    assert pickle.loads(pickle.dumps(Store(transport="obstore"))).config.transport == "obstore"


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_asking_for_obstore_without_it_says_what_to_install(how: str) -> None:
    given = "transport='obstore'" if how == "argument" else ""
    code = f"""
        import json, sys
        sys.modules["obstore"] = None  # as if mlstore[fast] were not installed
        import mlstore
        try:
            mlstore.Store({given})
        except mlstore.ConfigError as exc:
            print(json.dumps(str(exc)))
        else:
            print(json.dumps("no error"))
    """
    env = {"MLSTORE_TRANSPORT": "obstore"} if how == "environment" else {}
    message = str(run_child(code, env))
    assert "pip install 'mlstore[fast]'" in message
    assert ("MLSTORE_TRANSPORT" if how == "environment" else "transport") in message


@pytest.mark.s3
def test_s3_secrets_stay_hidden(
    caplog: pytest.LogCaptureFixture, s3_options: dict[str, object], s3_bucket: str
) -> None:
    from tests.test_secrets import run_canary

    key, secret, token = (
        "AKIACANARY" + uuid.uuid4().hex[:10].upper(),
        uuid.uuid4().hex * 2,
        "CANARYTOKEN" + uuid.uuid4().hex,
    )
    opts = {**s3_options, "key": key, "secret": secret, "token": token}
    run_canary(
        caplog,
        lambda: Store(options={"s3": opts}, transport="obstore"),
        f"s3://{s3_bucket}/canary",
        [key, secret, token],
        {"options": {"s3": opts}, "transport": "obstore"},
    )


@pytest.mark.azure
def test_azure_secrets_stay_hidden(
    caplog: pytest.LogCaptureFixture, az_connection_string: str, az_container: str
) -> None:
    from tests.emulators import AZURITE_KEY
    from tests.test_secrets import run_canary

    opts = {"connection_string": az_connection_string}
    run_canary(
        caplog,
        lambda: Store(options={"az": opts}, transport="obstore"),
        f"az://{az_container}/canary",
        [AZURITE_KEY, az_connection_string],
        {"options": {"az": opts}, "transport": "obstore"},
    )


def test_a_backend_registered_by_the_user_serves_under_every_transport() -> None:
    from mlstore.backends import base
    from mlstore.backends.fast import FastS3Backend
    from mlstore.backends.memory import MemoryBackend

    assert base.get_backend_class("s3", "obstore") is FastS3Backend
    assert base.get_backend_class("memory", "obstore") is MemoryBackend  # no other kind
    saved = dict(base._REGISTRY)
    try:
        base.register_backend("s3", MemoryBackend)
        assert base.get_backend_class("s3", "obstore") is MemoryBackend
    finally:
        base._REGISTRY.clear()
        base._REGISTRY.update(saved)
        base._REPLACED.discard("s3")
