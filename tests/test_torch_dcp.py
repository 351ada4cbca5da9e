"""DCP-native checkpoints (issue 14 item 3): ``torch.distributed.checkpoint`` through
:mod:`mlstore.torch.dcp` on real storage, with two real gloo ranks, deduplicated and
atomic as ``mlstore.torch.save`` is."""

from __future__ import annotations

import collections
import gc
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.metadata import MetadataIndex  # noqa: E402
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem  # noqa: E402

import mlstore  # noqa: E402
import mlstore.torch  # noqa: E402
from mlstore.checkpoint import read_manifest, retain  # noqa: E402
from mlstore.errors import CheckpointError, PermissionDeniedError  # noqa: E402
from mlstore.torch import dcp as mdcp  # noqa: E402
from tests.emulators import ServerProcess  # noqa: E402
from tests.servers import proxy  # noqa: E402
from tests.torch_children import run_program  # noqa: E402
from tests.torch_dcp_children import CHANGED, state  # noqa: E402

pytestmark = [
    pytest.mark.torch,
    # DCP warns that it runs in one process when no process group is up: that is the point.
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]


def sample(version: int = 1) -> dict[str, Any]:
    """A state dict: tensors of several dtypes and shapes (a strided view, a scalar, an
    empty one), nested, with non-tensor values."""
    g = torch.Generator().manual_seed(version)
    return {
        "model": {
            "w": torch.randn(64, 32, generator=g),
            "wt": torch.randn(16, 8, generator=g).t(),  # not contiguous
            "b": torch.arange(7, dtype=torch.int64) * version,
            "half": torch.ones(5, dtype=torch.bfloat16) * version,
            "scalar": torch.tensor(3.5 * version),
            "empty": torch.zeros(0, 4),
            "mask": torch.tensor([True, False, True]),
        },
        "step": 100 * version,
        "name": f"run-{version}",
    }


def zeros_like(sd: Any) -> Any:
    if isinstance(sd, dict):
        return {k: zeros_like(v) for k, v in sd.items()}
    return torch.zeros_like(sd) if isinstance(sd, torch.Tensor) else None


def assert_same(got: Any, want: Any) -> None:
    if isinstance(want, dict):
        assert sorted(got) == sorted(want)
        for k in want:
            assert_same(got[k], want[k])
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want)
    else:
        assert got == want


def roundtrip(root: str, store: mlstore.Store) -> None:
    """Save with DCP's own ``save``, load with its ``load``, in one process; then save
    an unchanged copy beside it: nothing but the new metadata is uploaded."""
    sd = sample()
    url = f"{root}/ckpt/step-1"
    writer = mdcp.StorageWriter(url, store=store)
    dcp.save(sd, storage_writer=writer, no_dist=True)
    assert writer.info is not None and writer.info.new_chunks == writer.info.chunks
    out = zeros_like(sd)
    dcp.load(out, storage_reader=mdcp.StorageReader(url, store=store), no_dist=True)
    assert_same(out, sd)

    again = mdcp.save(sample(), f"{root}/ckpt/step-2", store=store)
    assert again is not None
    manifest = read_manifest(store, again.url)
    assert manifest.kind == "dcp"
    assert again.new_chunks == len(manifest.parts["metadata"].chunks)
    assert not store.find(f"{root}/ckpt/.chunks/locks/"), "the save lock was released"


def test_roundtrip_on_file(tmp_path: Path) -> None:
    with mlstore.Store() as store:
        roundtrip(tmp_path.as_uri(), store)


@pytest.mark.gcs
def test_roundtrip_on_gcs(gcs_bucket: str, gcs_options: dict[str, object]) -> None:
    with mlstore.Store(options={"gs": gcs_options}) as store:
        roundtrip(f"gs://{gcs_bucket}", store)


@pytest.mark.azure
def test_roundtrip_on_azure(az_container: str, az_options: dict[str, object]) -> None:
    with mlstore.Store(options={"az": az_options}) as store:
        roundtrip(f"az://{az_container}", store)


@pytest.mark.s3
@pytest.mark.faults
@pytest.mark.parametrize("failing", ["chunks", "manifest"])
def test_a_failed_save_leaves_the_previous_checkpoint(
    failing: str, s3_bucket: str, s3_fault_proxy: ServerProcess
) -> None:
    """Uploads of chunks, or the manifest's PUT, fail for good (403): the save raises,
    the URL still holds the checkpoint saved there before, whole, and no lock is left."""
    url = f"s3://{s3_bucket}/run/latest"
    with mlstore.Store(options={"s3": {"endpoint_url": s3_fault_proxy.endpoint}}) as store:
        mdcp.save(sample(1), url, store=store)
        path = (
            f"/{s3_bucket}/run/.chunks/data/"
            if failing == "chunks"
            else f"/{s3_bucket}/run/latest$"
        )
        proxy.set_faults(
            s3_fault_proxy.endpoint,
            {"fault": "status", "status": 403, "method": "PUT", "path": path},
        )
        with pytest.raises(PermissionDeniedError):
            mdcp.save(sample(2), url, store=store)
        assert proxy.counts(s3_fault_proxy.endpoint)["faults"]["status"] >= 1
        proxy.clear_faults(s3_fault_proxy.endpoint)

        out = zeros_like(sample(1))
        mdcp.load(out, url, store=store)
        assert_same(out, sample(1))
        assert not store.find(f"s3://{s3_bucket}/run/.chunks/locks/")


def test_a_missing_chunk_fails_the_load_naming_the_checkpoint(tmp_path: Path) -> None:
    url = (tmp_path / "step-1").as_uri()
    sd = sample()
    with mlstore.Store() as store:
        mdcp.save(sd, url, store=store)
        digest = read_manifest(store, url).parts["item/model.w@0,0"].chunks[0].digest
        store.rm(f"{tmp_path.as_uri()}/.chunks/data/{digest[:2]}/{digest}")

        with pytest.raises(CheckpointError, match=str(tmp_path)) as raised:
            mdcp.load(zeros_like(sd), url, store=store)
        assert "not stored" in str(raised.value)
        # Through DCP's own load the same error is the one its exception reports.
        with pytest.raises(dcp.CheckpointException) as wrapped:
            dcp.load(zeros_like(sd), storage_reader=mdcp.StorageReader(url, store=store))
        (error, _trace), *_ = wrapped.value.failures.values()
        assert isinstance(error, CheckpointError) and str(tmp_path) in str(error)


def test_loading_what_is_no_dcp_checkpoint_says_so(tmp_path: Path) -> None:
    with mlstore.Store() as store:
        nothing = (tmp_path / "nothing").as_uri()
        with pytest.raises(mlstore.NotFoundError, match=str(tmp_path)):
            mdcp.load({"w": torch.zeros(2)}, nothing, store=store)
        other = (tmp_path / "torch-save").as_uri()
        mlstore.torch.save({"w": torch.ones(2)}, other, store=store)
        with pytest.raises(CheckpointError, match="'torch' checkpoint"):
            mdcp.load({"w": torch.zeros(2)}, other, store=store)


def test_a_slice_reads_only_the_chunks_that_hold_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ReadItem naming a hypercube of a saved tensor (as a resharding load does) is
    read from the chunks that hold its bytes: with every other chunk deleted, it still
    loads, exactly; the whole tensor no longer does."""
    monkeypatch.setattr(mdcp, "PIECE_BYTES", 1024)  # a 64x64 float32 tensor in 16 chunks
    full = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    url = (tmp_path / "sliced").as_uri()
    with mlstore.Store() as store:
        mdcp.save({"w": full}, url, store=store)
        part = read_manifest(store, url).parts["item/w@0,0"]
        assert len(part.chunks) == 16
        # Rows 10-19, columns 5-8: bytes 2580 to 5124, in chunks 2, 3 and 4.
        for i, chunk in enumerate(part.chunks):
            if i not in (2, 3, 4):
                store.rm(f"{tmp_path.as_uri()}/.chunks/data/{chunk.digest[:2]}/{chunk.digest}")

        reader = mdcp.StorageReader(url, store=store)
        reader.set_up_storage_reader(reader.read_metadata(), True)
        item = ReadItem(
            type=LoadItemType.TENSOR,
            dest_index=MetadataIndex("w"),
            dest_offsets=torch.Size([0, 0]),
            storage_index=MetadataIndex("w", [0, 0]),
            storage_offsets=torch.Size([10, 5]),
            lengths=torch.Size([10, 4]),
        )
        planner = Planner(torch.zeros(10, 4))
        reader.read_data(LoadPlan([item]), planner).wait()
        assert planner.committed == 1 and torch.equal(planner.target, full[10:20, 5:9])

        with pytest.raises(CheckpointError):
            mdcp.load({"w": torch.zeros(64, 64)}, url, store=store)


class Planner:
    """The two calls of a LoadPlanner a tensor read makes."""

    def __init__(self, target: torch.Tensor) -> None:
        self.target = target
        self.committed = 0

    def resolve_tensor(self, item: ReadItem) -> torch.Tensor:
        return self.target

    def commit_tensor(self, item: ReadItem, tensor: torch.Tensor) -> None:
        self.committed += 1


def test_retention_waits_for_a_save_in_progress_and_keeps_what_it_names(tmp_path: Path) -> None:
    """From the coordinator's global planning to its manifest a DCP save holds the
    store's save lock: a collection then defers. Afterwards retention keeps the newest
    checkpoint loadable and deletes what only the older one named."""
    root = tmp_path.as_uri()
    with mlstore.Store() as store:
        mdcp.save(sample(1), f"{root}/step-1", store=store)

        writer = mdcp.StorageWriter(f"{root}/step-2", store=store)
        writer.set_up_storage_writer(True, rank=0)
        writer.prepare_global_plan([])
        assert retain(root, keep_last=1, store=store).deferred
        # A save that fails on another rank never reaches finish(): the lock goes with
        # the writer (or its next save, or close()).
        del writer
        gc.collect()
        assert not store.find(f"{root}/.chunks/locks/")

        mdcp.save(sample(2), f"{root}/step-2", store=store)
        done = retain(root, keep_last=1, store=store)
        assert not done.deferred and done.chunks_deleted > 0
        out = zeros_like(sample(2))
        mdcp.load(out, f"{root}/step-2", store=store)
        assert_same(out, sample(2))


# ------------------------------------------------------------------ two gloo ranks


@pytest.mark.s3
@pytest.mark.slow
def test_two_ranks_save_and_load_and_a_second_save_uploads_only_the_change(
    s3_bucket: str, s3_proxy: ServerProcess, moto: ServerProcess, tmp_path: Path
) -> None:
    """Two forked gloo ranks save a sharded state dict (ten tensors of each rank's own,
    a replicated tensor, a DTensor sharded by rows, non-tensor values) to S3; two fresh
    ranks load it back, the DTensor sharded by columns, and find it exact. Then one
    tensor of rank 0 changes and those ranks save to a new URL beside the first: the
    only chunks PUT are that tensor's and the new metadata's. The new checkpoint loads
    exactly too."""
    first, second = f"s3://{s3_bucket}/dcp/step-1", f"s3://{s3_bucket}/dcp/step-2"

    def ranks(name: str, *steps: dict[str, Any]) -> list[dict[str, Any]]:
        cfg = {
            "steps": list(steps),
            "endpoint": s3_proxy.endpoint,
            "cache_root": str(tmp_path / name),
            "out": str(tmp_path / f"{name}.json"),
        }
        out = run_program(
            "ranks",
            cfg,
            cache_dir=str(tmp_path / f"{name}-launcher"),
            module="tests.torch_dcp_children",
        )
        result: list[dict[str, Any]] = out["ranks"]
        return result

    saved = [r["saved"][0] for r in ranks("first", {"mode": "save", "version": 1, "url": first})]
    assert saved[0]["new_chunks"] == saved[0]["chunks"] > 20
    assert saved[1] is None  # the coordinator commits; the other rank only uploads

    second_run = ranks(
        "second",
        {"mode": "load", "version": 1, "url": first},
        {"mode": "save", "version": 2, "url": second, "reset_proxy": True},
        {"mode": "load", "version": 2, "url": second},
    )
    for r in second_run:
        for loaded in r["loaded"]:
            assert loaded["mismatched"] == [] and loaded["dt_equal"], (r["rank"], loaded)
            assert loaded["loaded"] == sorted(state(r["rank"], loaded["version"]))

    puts = collections.Counter(
        e["path"].rsplit("/", 1)[-1]
        for e in proxy.request_log(s3_proxy.endpoint)
        if e["method"] == "PUT" and "/.chunks/data/" in e["path"]
    )
    with mlstore.Store(options={"s3": {"endpoint_url": moto.endpoint}}) as store:
        old, new = read_manifest(store, first), read_manifest(store, second)
    changed = {c.digest for c in new.parts[f"item/rank0.w{CHANGED}@0,0"].chunks}
    metadata = {c.digest for c in new.parts["metadata"].chunks}
    assert set(puts) == new.digests() - old.digests() == changed | metadata
    assert set(puts.values()) == {1}
    assert second_run[0]["saved"][0]["new_chunks"] == len(puts)
