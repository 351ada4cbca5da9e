"""The reading half of :mod:`mlstore.torch.dcp`: DCP's ``StorageReader`` over a
checkpoint's manifest and chunk store, and the names both halves give a checkpoint's
parts."""

from __future__ import annotations

import functools
import io
import os
import pickle
import uuid
from collections.abc import Callable
from concurrent.futures import Future as PoolFuture
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType
from torch.distributed.checkpoint.storage import StorageReader as DcpStorageReader
from torch.futures import Future

from mlstore.checkpoint import (
    Chunk,
    ChunkReader,
    Layout,
    Manifest,
    Part,
    canonical,
    read_manifest,
    wait_all,
)
from mlstore.errors import CheckpointError, MlstoreError
from mlstore.store import Store, default_store
from mlstore.url import parse_url

__all__ = ["MAX_BYTES", "METADATA", "StorageReader", "dtype_name", "part_name", "valid_url"]

#: The part holding DCP's pickled ``Metadata``.
METADATA = "metadata"
#: Bytes of fetched chunks a rank holds at most before copying them into place.
MAX_BYTES = 256 * 1024 * 1024


def part_name(index: Any) -> str:
    """The manifest's name of a write item: ``item/<fqn>``, and for a shard its offset in
    the whole tensor (``item/layer.weight@128,0``)."""
    offset = "" if index.offset is None else "@" + ",".join(str(int(o)) for o in index.offset)
    return f"item/{index.fqn}{offset}"


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str, url: str) -> Any:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"the checkpoint names an unknown dtype {name!r}", url=url)
    return dtype


class StorageReader(DcpStorageReader):  # type: ignore[misc,unused-ignore]
    """Loads a DCP checkpoint :class:`StorageWriter` saved at ``url``.

    Each rank fetches only the chunks that hold the parts of the tensors it loads (a
    resharded load reads a slice, not the whole tensor), verified against their names,
    in parallel, straight into the destination tensor when it is a whole contiguous CPU
    tensor of the saved dtype.

    Args:
        url: the checkpoint.
        store: the Store to read through (default: each process's default).
        workers: parallel chunk reads per rank.
        max_bytes: bytes of fetched chunks held at most before they are copied into
            place (reads straight into the destination do not count).
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        store: Store | None = None,
        workers: int = 16,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        super().__init__()
        self._store = store
        self.workers = workers
        self.max_bytes = max_bytes
        self.url = canonical(os.fspath(url))
        self._manifest: Manifest | None = None
        self._names: dict[Any, str] = {}
        self.load_id = uuid.uuid4().hex
        #: Why the last read of the manifest failed (DCP reports it wrapped).
        self.failure: MlstoreError | None = None

    @property
    def store(self) -> Store:
        return self._store or default_store()

    @property
    def checkpoint_id(self) -> str:
        return self.url

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return valid_url(checkpoint_id)

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self.url = canonical(os.fspath(checkpoint_id))
        self._manifest = None
        self._names = {}
        self.load_id = uuid.uuid4().hex
        self.failure = None

    def _read_manifest(self) -> Manifest:
        manifest = read_manifest(self.store, self.url)
        if manifest.kind != "dcp":
            raise CheckpointError(
                f"a {manifest.kind!r} checkpoint, not one mlstore.torch.dcp.StorageWriter wrote",
                url=self.url,
                operation="load",
            )
        self._manifest = manifest
        return manifest

    def _chunks(self, manifest: Manifest) -> ChunkReader:
        layout = Layout(manifest.chunks_root)
        return ChunkReader(self.store, layout, self.url, workers=self.workers)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("rank") is not None:
            # DCP's fallback to a rank's own metadata: there is none, only the manifest
            # whose read just failed; that failure is the one to report.
            raise self.failure or CheckpointError(
                "mlstore's DCP checkpoints have one manifest for every rank, none per rank",
                url=self.url,
                operation="load",
            )
        try:
            manifest = self._read_manifest()
            with self._chunks(manifest) as chunks:
                raw = chunks.read(self._part_named(str(manifest.meta.get("metadata", METADATA))))
        except MlstoreError as exc:
            self.failure = exc
            raise
        metadata: Any = pickle.loads(raw)  # trusted, as by DCP's own FileSystemReader
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(
        self, metadata: Any, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self._names = dict(metadata.storage_data or {})
        if self._manifest is None:
            self._read_manifest()

    def prepare_local_plan(self, plan: Any) -> Any:
        return plan

    def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
        return plans

    def _part_named(self, name: str) -> Part:
        assert self._manifest is not None
        try:
            return self._manifest.parts[name]
        except KeyError:
            raise CheckpointError(
                f"the checkpoint has no part {name!r}", url=self.url, operation="load"
            ) from None

    def read_data(self, plan: Any, planner: Any) -> Any:
        manifest = self._manifest or self._read_manifest()
        jobs: list[Callable[[], None]] = []
        futures: list[PoolFuture[None]] = []
        held = 0
        with self._chunks(manifest) as chunks:
            for req in plan.items:
                name = self._names.get(req.storage_index) or part_name(req.storage_index)
                part = self._part_named(name)
                if req.type == LoadItemType.BYTE_IO:
                    buf = bytearray(part.size)
                    futures += chunks.start(part, memoryview(buf))
                    jobs.append(functools.partial(_load_bytes, planner, req, buf))
                    held += part.size
                else:
                    held += self._tensor(req, part, planner, chunks, jobs, futures)
                if held >= self.max_bytes:
                    _settle(futures, jobs)
                    held = 0
            _settle(futures, jobs)
        future: Any = Future()
        future.set_result(None)
        return future

    def _tensor(
        self,
        req: Any,
        part: Part,
        planner: Any,
        chunks: ChunkReader,
        jobs: list[Callable[[], None]],
        futures: list[PoolFuture[None]],
    ) -> int:
        """Start fetching what ``req`` needs of ``part``; queue the copy into place.
        Returns the bytes of the buffer it holds until then."""
        dtype = _dtype(str(part.meta.get("dtype")), self.url)
        shape = [int(s) for s in part.meta.get("shape", [])]
        size = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for s in shape:
            numel *= s
        if numel * size != part.size:
            raise CheckpointError(
                f"the part of {req.storage_index.fqn!r} holds {part.size} bytes, not the "
                f"{numel * size} of a {dtype_name(dtype)} tensor of shape {shape}",
                url=self.url,
                operation="load",
            )
        offsets, lengths = [int(o) for o in req.storage_offsets], [int(n) for n in req.lengths]
        target = planner.resolve_tensor(req).detach()
        if list(target.shape) != lengths:
            raise CheckpointError(
                f"{req.dest_index.fqn!r}: the destination has shape {list(target.shape)}, the "
                f"checkpoint's slice {lengths}",
                url=self.url,
                operation="load",
            )

        def commit() -> None:
            planner.commit_tensor(req, target)

        if 0 in lengths:
            jobs.append(commit)
            return 0
        strides = [1] * len(shape)  # row-major, in elements
        for i in range(len(shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1]
        first = sum(o * s for o, s in zip(offsets, strides, strict=True))
        last = sum((o + n - 1) * s for o, n, s in zip(offsets, lengths, strides, strict=True))
        start, end = first * size, (last + 1) * size
        whole = start == 0 and end == part.size
        cpu = target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
        if whole and cpu:  # straight into the destination's memory
            array: Any = target.reshape(-1).view(torch.uint8).numpy()
            futures += chunks.start(part, memoryview(array))
            jobs.append(commit)
            return 0
        span, base = _span(part, start, end)
        if base % size or span.size % size:
            span, base = part, 0  # chunks not cut at element boundaries: read it whole
        raw = torch.empty(span.size, dtype=torch.uint8)
        array = raw.numpy()
        futures += chunks.start(span, memoryview(array))

        def place() -> None:
            source = torch.as_strided(raw.view(dtype), lengths, strides, (start - base) // size)
            target.copy_(source)
            commit()

        jobs.append(place)
        return span.size


def _span(part: Part, start: int, end: int) -> tuple[Part, int]:
    """The chunks of ``part`` that hold its bytes ``start:end``, as a part, and the
    offset of the first of them in ``part``."""
    picked: list[Chunk] = []
    base = offset = 0
    for chunk in part.chunks:
        if offset < end and offset + chunk.size > start:
            if not picked:
                base = offset
            picked.append(chunk)
        offset += chunk.size
        if offset >= end:
            break
    return Part(sum(c.size for c in picked), picked), base


def _load_bytes(planner: Any, req: Any, buf: bytearray) -> None:
    planner.load_bytes(req, io.BytesIO(buf))


def _settle(futures: list[PoolFuture[None]], jobs: list[Callable[[], None]]) -> None:
    """Wait for the fetches, then copy each into place, in order."""
    try:
        wait_all(futures)
        for job in jobs:
            job()
    finally:
        futures.clear()
        jobs.clear()


def valid_url(checkpoint_id: str | os.PathLike[str]) -> bool:
    try:
        parse_url(os.fspath(checkpoint_id))
    except (MlstoreError, ValueError):
        return False
    return True
