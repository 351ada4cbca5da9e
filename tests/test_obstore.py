"""The obstore transport (``StoreConfig.transport = "obstore"``, ``mlstore[fast]``):
the conformance suite on every emulator, and the invariants it must keep."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from mlstore import Store
from tests.conformance import ListingConformance, ReadConformance, WriteConformance

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
