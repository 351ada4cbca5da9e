"""The shared conformance suite (tests/conformance.py) run against every backend on its
real server: memory, local, http (a range-capable test server), s3 (moto_server), gs
(fake-gcs-server) and az (Azurite)."""

from __future__ import annotations

import os
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlstore import Store
from tests.conformance import ListingConformance, ReadConformance, WriteConformance
from tests.emulators import ServerProcess


class TestMemory(ReadConformance, WriteConformance, ListingConformance):
    @pytest.fixture
    def store(self) -> Iterator[Store]:
        with Store() as s:
            yield s

    @pytest.fixture
    def root(self, mem_root: str) -> str:
        return mem_root


class TestLocal(ReadConformance, WriteConformance, ListingConformance):
    @pytest.fixture
    def store(self) -> Iterator[Store]:
        with Store() as s:
            yield s

    @pytest.fixture
    def root(self, tmp_path: Path) -> str:
        return f"file://{tmp_path}/root"


@pytest.mark.s3
class TestS3(ReadConformance, WriteConformance, ListingConformance):
    @pytest.fixture
    def store(self, s3_options: dict[str, object]) -> Iterator[Store]:
        with Store(options={"s3": s3_options}) as s:
            yield s

    @pytest.fixture
    def root(self, s3_bucket: str) -> str:
        return f"s3://{s3_bucket}/{uuid.uuid4().hex[:8]}"


@pytest.mark.gcs
class TestGCS(ReadConformance, WriteConformance, ListingConformance):
    @pytest.fixture
    def store(self, gcs_options: dict[str, object]) -> Iterator[Store]:
        with Store(options={"gs": gcs_options}) as s:
            yield s

    @pytest.fixture
    def root(self, gcs_bucket: str) -> str:
        return f"gs://{gcs_bucket}/{uuid.uuid4().hex[:8]}"


@pytest.mark.azure
class TestAzure(ReadConformance, WriteConformance, ListingConformance):
    @pytest.fixture
    def store(self, az_options: dict[str, object]) -> Iterator[Store]:
        with Store(options={"az": az_options}) as s:
            yield s

    @pytest.fixture
    def root(self, az_container: str) -> str:
        return f"az://{az_container}/{uuid.uuid4().hex[:8]}"


class TestHttp(ReadConformance):
    """Read-only: objects are placed as files in the directory the server serves."""

    @pytest.fixture
    def store(self) -> Iterator[Store]:
        # Objects change behind the Store's back (files replaced on the server's disk):
        # check the version on every read, as a user of such a server would configure.
        with Store(cache={"validate": "always"}) as s:
            yield s

    @pytest.fixture
    def root(self, http_server: tuple[ServerProcess, str]) -> str:
        server, _ = http_server
        return f"{server.endpoint}/{uuid.uuid4().hex[:8]}"

    @pytest.fixture(autouse=True)
    def _served_dir(self, http_server: tuple[ServerProcess, str]) -> None:
        self.endpoint, self.served = http_server[0].endpoint, http_server[1]

    def put(self, store: Store, url: str, data: bytes) -> None:
        rel = urllib.parse.unquote(url[len(self.endpoint) + 1 :])
        path = Path(self.served) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        old = path.stat().st_mtime_ns if path.exists() else 0
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        # a new version even within the file system's timestamp granularity
        bumped = max(old + 10**9, path.stat().st_mtime_ns)
        os.utime(path, ns=(bumped, bumped))
