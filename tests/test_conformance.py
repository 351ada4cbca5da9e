"""The shared conformance suite (tests/conformance.py) run against every backend on its
real server: memory, local, s3 (moto_server)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlstore import Store
from tests.conformance import ListingConformance, ReadConformance, WriteConformance


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
