"""Mounts with replicas on three real clouds: reads fail over when one cloud dies."""

from __future__ import annotations

import uuid

import pytest

import mlstore
from mlstore import Store
from tests.conftest import start_emulator
from tests.emulators import moto_server

pytestmark = [pytest.mark.s3, pytest.mark.gcs, pytest.mark.azure]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_reads_fail_over_to_the_next_cloud_when_s3_dies(
    aws_test_credentials: None,
    gcs_options: dict[str, object],
    gcs_bucket: str,
    az_options: dict[str, object],
    az_container: str,
) -> None:
    dying = start_emulator(moto_server)  # this test's own S3, killed below
    clock = Clock()
    try:
        store = Store(
            mounts={
                "ds": [
                    "s3://primary/ds",
                    f"gs://{gcs_bucket}/ds",
                    f"az://{az_container}/ds",
                ]
            },
            options={
                "s3": {"endpoint_url": dying.endpoint},
                "gs": gcs_options,
                "az": az_options,
            },
            replica_failures=2,
            replica_cooldown=60,
            clock=clock,
        )
        store.mkdir("s3://primary")
        blobs = {f"shard-{i}.bin": uuid.uuid4().bytes * (100 + i) for i in range(6)}
        for name, data in blobs.items():
            store.write_bytes(f"mlstore://ds/{name}", data, replicate=True)
        store.write_bytes("mlstore://ds/late.bin", b"read after the cool-down", replicate=True)
        assert store.read_bytes("s3://primary/ds/shard-0.bin") == blobs["shard-0.bin"]
        assert store.read_bytes(f"gs://{gcs_bucket}/ds/shard-5.bin") == blobs["shard-5.bin"]
        assert store.read_bytes(f"az://{az_container}/ds/shard-3.bin") == blobs["shard-3.bin"]

        before = store.stats()
        assert store.read_bytes("mlstore://ds/shard-0.bin") == blobs["shard-0.bin"]
        assert (store.stats() - before).get("requests", "gs") == 0, "the primary answers"

        dying.kill()  # SIGKILL: S3 is gone mid-test
        before = store.stats()
        cold = [name for name in blobs if name != "shard-0.bin"]  # shard-0 is cached
        for name in cold:
            assert store.read_bytes(f"mlstore://ds/{name}") == blobs[name]
        assert store.read_bytes("mlstore://ds/shard-0.bin") == blobs["shard-0.bin"]
        delta = store.stats() - before
        assert delta.get("failovers", "s3") == 2, "two failures, then S3 cools down"
        assert delta.get("requests", "s3") == 2
        assert delta.get("requests", "gs") == len(cold)
        assert delta.get("hits", "memory") == 1
        # info, ls and open fail over too, and name things in the mount's terms
        assert store.info("mlstore://ds/shard-1.bin").size == len(blobs["shard-1.bin"])
        assert sorted(store.ls("mlstore://ds")) == sorted(
            f"mlstore://ds/{n}" for n in [*blobs, "late.bin"]
        )
        with store.open("mlstore://ds/shard-2.bin") as fh:
            assert fh.read() == blobs["shard-2.bin"]

        clock.now += 61  # the cool-down is over: S3 is tried again (and is still dead)
        before = store.stats()
        assert store.read_bytes("mlstore://ds/late.bin") == b"read after the cool-down"
        assert (store.stats() - before).get("failovers", "s3") == 1
    finally:
        dying.stop()


def test_missing_on_primary_is_read_from_a_replica(
    s3_options: dict[str, object],
    s3_bucket: str,
    gcs_options: dict[str, object],
    gcs_bucket: str,
) -> None:
    store = Store(
        mounts={"ds": [f"s3://{s3_bucket}/ds", f"gs://{gcs_bucket}/ds"]},
        options={"s3": s3_options, "gs": gcs_options},
    )
    store.write_bytes(f"gs://{gcs_bucket}/ds/only-on-gcs.bin", b"gcs copy")
    assert store.read_bytes("mlstore://ds/only-on-gcs.bin") == b"gcs copy"
    assert store.exists("mlstore://ds/only-on-gcs.bin")
    with pytest.raises(mlstore.NotFoundError):
        store.read_bytes("mlstore://ds/nowhere.bin")


def test_writes_go_to_the_primary_unless_replicated(
    s3_options: dict[str, object],
    s3_bucket: str,
    gcs_options: dict[str, object],
    gcs_bucket: str,
) -> None:
    store = Store(
        mounts={"ds": [f"s3://{s3_bucket}/ds", f"gs://{gcs_bucket}/ds"]},
        options={"s3": s3_options, "gs": gcs_options},
    )
    store.write_bytes("mlstore://ds/a.bin", b"primary only")
    assert store.exists(f"s3://{s3_bucket}/ds/a.bin")
    assert not store.exists(f"gs://{gcs_bucket}/ds/a.bin")
    store.write_bytes("mlstore://ds/b.bin", b"everywhere", replicate=True)
    assert store.read_bytes(f"gs://{gcs_bucket}/ds/b.bin") == b"everywhere"
    store.rm("mlstore://ds/b.bin", replicate=True)
    assert not store.exists("mlstore://ds/b.bin")


def test_permission_errors_do_not_fail_over(
    s3_options: dict[str, object], s3_bucket: str, mem_root: str
) -> None:
    """A refused request is a configuration problem, not an outage: no fall-through."""
    store = Store(
        mounts={"ds": ["http://169.254.169.254/ds", f"{mem_root}/ds"]},
    )
    store.write_bytes(f"{mem_root}/ds/x.bin", b"x")
    with pytest.raises(mlstore.PermissionDeniedError):
        store.read_bytes("mlstore://ds/x.bin")
