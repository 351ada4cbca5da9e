"""Fixtures shared by the whole suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import mlstore
from tests.emulators import EmulatorUnavailable, ServerProcess, moto_server

# Variables of the test suite itself, left alone by the isolation fixture.
_SUITE_VARIABLES = {"MLSTORE_REQUIRE_EMULATORS", "MLSTORE_AZURITE_BIN"}
REQUIRE_EMULATORS = os.environ.get("MLSTORE_REQUIRE_EMULATORS") == "1"


def start_emulator(factory: object) -> ServerProcess:
    """Start an emulator, or skip the test (fail under MLSTORE_REQUIRE_EMULATORS=1)."""
    try:
        return factory().start()  # type: ignore[operator, no-any-return]
    except EmulatorUnavailable as exc:
        if REQUIRE_EMULATORS:
            pytest.fail(f"MLSTORE_REQUIRE_EMULATORS=1 but {exc}", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture(autouse=True)
def _isolated_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Each test sees no MLSTORE_* settings from the machine, a private cache dir, and
    a fresh default Store."""
    for name in list(os.environ):
        if name.startswith("MLSTORE_") and name not in _SUITE_VARIABLES:
            monkeypatch.delenv(name)
    monkeypatch.setenv("MLSTORE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    mlstore.set_default_store(None)
    yield
    mlstore.set_default_store(None)


@pytest.fixture
def backend_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests of a backend itself: no cache and one attempt, so every call reaches
    the server exactly once (the cache and the retry layer have tests of their own)."""
    monkeypatch.setenv("MLSTORE_CACHE", "0")
    monkeypatch.setenv("MLSTORE_MAX_ATTEMPTS", "1")


@pytest.fixture
def store() -> Iterator[mlstore.Store]:
    with mlstore.Store() as s:
        yield s


@pytest.fixture
def mem_root() -> Iterator[str]:
    """A fresh ``memory://`` prefix, emptied afterwards."""
    root = f"memory://t-{uuid.uuid4().hex[:12]}"
    yield root
    s = mlstore.Store()
    if s.exists(root):
        s.rm(root, recursive=True)


# ----------------------------------------------------------------------------- S3


@pytest.fixture(scope="session")
def aws_test_credentials() -> None:
    """moto accepts any credentials; set them where botocore looks, so child processes
    (spawn, forkserver) find them too."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def moto(aws_test_credentials: None) -> Iterator[ServerProcess]:
    """A moto_server process for the whole session."""
    server = start_emulator(moto_server)
    yield server
    server.stop()


@pytest.fixture
def s3_options(moto: ServerProcess) -> dict[str, object]:
    return {"endpoint_url": moto.endpoint}


@pytest.fixture
def s3_bucket(moto: ServerProcess, s3_options: dict[str, object]) -> Iterator[str]:
    """A new, empty bucket; emptied and deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    with mlstore.Store(options={"s3": s3_options}) as s:
        s.mkdir(f"s3://{name}")
        yield name
        for url in s.find(f"s3://{name}"):
            s.rm(url)


# ---------------------------------------------------------------------------- GCS

GCS_PROJECT = "mlstore-test"


@pytest.fixture(scope="session")
def fake_gcs() -> Iterator[ServerProcess]:
    """A fake-gcs-server process (in memory, plain HTTP) for the whole session."""
    from tests.emulators import fake_gcs_server

    server = start_emulator(fake_gcs_server)
    yield server
    server.stop()


@pytest.fixture
def gcs_options(fake_gcs: ServerProcess) -> dict[str, object]:
    return {"endpoint_url": fake_gcs.endpoint, "token": "anon", "project": GCS_PROJECT}


@pytest.fixture
def gcs_bucket(fake_gcs: ServerProcess, gcs_options: dict[str, object]) -> Iterator[str]:
    """A new, empty bucket; emptied afterwards."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    with mlstore.Store(options={"gs": gcs_options}) as s:
        s.mkdir(f"gs://{name}")
        yield name
        for url in s.find(f"gs://{name}"):
            s.rm(url)


# -------------------------------------------------------------------------- Azure


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """An Azurite blob service process (data under a session temp dir) for the session."""
    from tests.emulators import azurite

    location = str(tmp_path_factory.mktemp("azurite"))
    server = start_emulator(lambda: azurite(location))
    yield server
    server.stop()


@pytest.fixture
def az_connection_string(azurite_server: ServerProcess) -> str:
    from tests.emulators import azurite_connection_string

    return azurite_connection_string(azurite_server.endpoint)


@pytest.fixture
def az_options(az_connection_string: str) -> dict[str, object]:
    return {"connection_string": az_connection_string}


@pytest.fixture
def az_container(az_connection_string: str) -> Iterator[str]:
    """A new, empty container; deleted (with everything in it) afterwards."""
    from azure.storage.blob import BlobServiceClient

    name = f"t-{uuid.uuid4().hex[:16]}"
    with BlobServiceClient.from_connection_string(az_connection_string) as service:
        service.create_container(name)
        yield name
        service.delete_container(name)


# ---------------------------------------------------------------------------- HTTP


@pytest.fixture(scope="session")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    """The range-capable test HTTP server (tests/servers/http_server.py) as a process,
    serving a session temp dir; yields the process and that directory."""
    import sys

    root = str(tmp_path_factory.mktemp("http-root"))
    script = str(Path(__file__).parent / "servers" / "http_server.py")
    server = start_emulator(
        lambda: ServerProcess(
            "http test server",
            [sys.executable, script, "--root", root, "--port", "0"],
            r"listening on http://127\.0\.0\.1:(?P<port>\d+)",
        )
    )
    yield server, root
    server.stop()


@pytest.fixture(scope="session")
def s3_proxy(moto: ServerProcess) -> Iterator[ServerProcess]:
    """A counting reverse proxy (tests/servers/proxy.py) in front of the session's moto."""
    import sys

    script = str(Path(__file__).parent / "servers" / "proxy.py")
    server = start_emulator(
        lambda: ServerProcess(
            "proxy",
            [sys.executable, script, "--upstream", moto.endpoint, "--port", "0"],
            r"listening on http://127\.0\.0\.1:(?P<port>\d+)",
        )
    )
    yield server
    server.stop()


# ---------------------------------------------------------------------------- fault proxies
# A fault-injecting proxy (tests/servers/proxy.py) in front of each session emulator. The
# session fixtures own the processes; the function-scoped ``*_fault_proxy`` fixtures hand
# the same process to a test with no fault rules and zeroed counters and log, and clear
# the rules again afterwards, so a test never inherits another's faults. Point a client at
# ``.endpoint`` (see ``*_fault_options``).


def _fault_proxy(upstream: ServerProcess) -> Iterator[ServerProcess]:
    from tests.servers import proxy

    server = start_emulator(lambda: proxy.process(upstream.endpoint))
    yield server
    server.stop()


def _cleared_fault_proxy(server: ServerProcess) -> Iterator[ServerProcess]:
    from tests.servers import proxy

    proxy.clear_faults(server.endpoint)
    proxy.reset(server.endpoint)
    yield server
    proxy.clear_faults(server.endpoint)


@pytest.fixture(scope="session")
def s3_faults(moto: ServerProcess) -> Iterator[ServerProcess]:
    """The session's fault proxy in front of moto."""
    yield from _fault_proxy(moto)


@pytest.fixture(scope="session")
def gcs_faults(fake_gcs: ServerProcess) -> Iterator[ServerProcess]:
    """The session's fault proxy in front of fake-gcs-server."""
    yield from _fault_proxy(fake_gcs)


@pytest.fixture(scope="session")
def az_faults(azurite_server: ServerProcess) -> Iterator[ServerProcess]:
    """The session's fault proxy in front of Azurite."""
    yield from _fault_proxy(azurite_server)


@pytest.fixture
def s3_fault_proxy(s3_faults: ServerProcess) -> Iterator[ServerProcess]:
    yield from _cleared_fault_proxy(s3_faults)


@pytest.fixture
def gcs_fault_proxy(gcs_faults: ServerProcess) -> Iterator[ServerProcess]:
    yield from _cleared_fault_proxy(gcs_faults)


@pytest.fixture
def az_fault_proxy(az_faults: ServerProcess) -> Iterator[ServerProcess]:
    yield from _cleared_fault_proxy(az_faults)


@pytest.fixture
def s3_fault_options(s3_fault_proxy: ServerProcess) -> dict[str, object]:
    """``s3_options`` through the fault proxy."""
    return {"endpoint_url": s3_fault_proxy.endpoint}


@pytest.fixture
def gcs_fault_options(gcs_fault_proxy: ServerProcess) -> dict[str, object]:
    """``gcs_options`` through the fault proxy."""
    return {"endpoint_url": gcs_fault_proxy.endpoint, "token": "anon", "project": GCS_PROJECT}


@pytest.fixture
def az_fault_options(az_fault_proxy: ServerProcess) -> dict[str, object]:
    """``az_options`` through the fault proxy (Azurite's connection string, with the
    proxy as its blob endpoint)."""
    from tests.emulators import azurite_connection_string

    return {"connection_string": azurite_connection_string(az_fault_proxy.endpoint)}


# ---------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB file system (a tmpfs: needs root, else the test is skipped)."""
    small = tmp_path / "small"
    small.mkdir(mode=0o700)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(small)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield small
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def run_child(code: str, env: dict[str, str]) -> object:
    """Run ``code`` in a fresh Python process; it prints one JSON value as its result."""
    child_env = {**os.environ, **env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
