"""PyTorch Distributed Checkpoint (DCP) on any mlstore URL, deduplicated and atomic.

:class:`StorageWriter` and :class:`StorageReader` plug into
``torch.distributed.checkpoint`` the way its ``FileSystemWriter`` and
``FileSystemReader`` do, so a sharded state dict saved by every rank of a job goes to
``s3://``, ``gs://``, ``az://``, ``file://`` or an ``mlstore://`` mount::

    import torch.distributed.checkpoint as dcp
    from mlstore.torch.dcp import StorageReader, StorageWriter

    dcp.save(state_dict, storage_writer=StorageWriter("s3://bucket/run-7/step-1000"))
    dcp.load(state_dict, storage_reader=StorageReader("s3://bucket/run-7/step-1000"))

(:func:`save` and :func:`load` do the same and raise mlstore's own errors rather than
DCP's ``CheckpointException``.)

**Layout.** The checkpoint is one manifest (kind ``"dcp"``) at the URL, pointing into
the chunk store beside it, the one :func:`mlstore.torch.save` uses (``<dir>/.chunks``).
Every rank uploads the bytes of its own write items as chunks: a tensor's bytes in fixed
pieces straight from its memory, a serialized object (DCP's ``BytesIO`` items) cut by
content; a chunk the store already holds is not uploaded, so a save after a partial
change uploads about the change. ``write_data`` returns, per item, its chunk list with
the tensor's dtype and shape; the coordinator's ``finish`` writes them all into the
manifest, with DCP's ``Metadata`` pickled as one more part. The manifest is written
last, once, after every rank's ``write_data`` has returned: a reader sees the previous
checkpoint at the URL or the whole new one, never a mix.

**Locking.** A rank skips uploading a chunk because it saw it listed; retention
(:func:`mlstore.checkpoint.retain`) deletes chunks no manifest names. Between that
listing and the manifest, the rank relies on a chunk nothing names yet, so a save must
hold a save lock from before any listing until after its manifest, as
:func:`mlstore.torch.save` does. Here the listings happen on every rank and the manifest
on one, so the coordinator holds one lock for all of them: it takes it in
``prepare_global_plan``, which DCP runs on the coordinator after gathering the local
plans and before scattering the global plan; no rank reaches ``write_data`` (where the
others list the store) before it has received its plan, so every listing follows the
lock, and :func:`~mlstore.checkpoint.lock_for_save` has also waited out any collector
already at work. The lock is released after ``finish`` has written the manifest.

DCP calls ``finish`` only when every rank's ``write_data`` succeeded; otherwise it raises
on every rank without telling the storage writer. So the coordinator also releases the
lock when its own ``write_data`` or ``finish`` fails, at its next save, on
:meth:`StorageWriter.close` (or leaving a ``with`` block), when the writer is garbage
collected, and at exit; a killed process leaves a lock that lapses (see
:mod:`mlstore.checkpoint`). A lock held too long only defers collection; it never costs
data. :func:`save` closes its writer in every case. Chunks uploaded by a failed save are
named by no manifest: the next save dedupes against them, or retention collects them.

The pickled ``Metadata`` is unpickled with Python's full unpickler on load, as DCP's own
``FileSystemReader`` does: load only checkpoints you trust.
"""

from __future__ import annotations

import io
import os
import pickle
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.checkpoint.storage import StorageWriter as DcpStorageWriter
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from mlstore.checkpoint import (
    PIECE_BYTES,
    CheckpointInfo,
    Chunk,
    ChunkWriter,
    Layout,
    Lock,
    Manifest,
    Part,
    canonical,
    cdc_pieces,
    commit_manifest,
    listed_chunks,
    lock_for_save,
)
from mlstore.errors import CheckpointError, ConfigError, MlstoreError
from mlstore.store import Store, default_store
from mlstore.torch._dcp_reader import (
    MAX_BYTES,
    METADATA,
    StorageReader,
    dtype_name,
    part_name,
    valid_url,
)

__all__ = ["StorageReader", "StorageWriter", "load", "save"]


def _tensor_pieces(tensor: Any) -> Iterator[memoryview]:
    """The bytes of ``tensor`` (any device, maybe a strided view) in fixed pieces, each
    read from the tensor's memory, copied off an accelerator one piece at a time."""
    t = tensor.detach()
    if not t.is_contiguous():
        t = t.contiguous()  # DCP may hand a view: only its projection is saved
    flat = t.reshape(-1).view(torch.uint8)
    for start in range(0, flat.numel(), PIECE_BYTES):
        piece = flat[start : start + PIECE_BYTES]
        if piece.device.type != "cpu":
            piece = piece.cpu()
        array: Any = piece.numpy()
        yield memoryview(array)


def _release(lock: Lock) -> None:
    try:
        lock.release()
    except Exception:  # noqa: BLE001 - a lock left behind lapses; it only defers retention
        pass


class StorageWriter(DcpStorageWriter):  # type: ignore[misc,unused-ignore]
    """Saves a DCP checkpoint at ``url`` (see the module docstring).

    Args:
        url: where the manifest goes; the checkpoint's name.
        store: the Store every rank writes through (default: each process's default).
        chunks: the chunk store's root (default: ``.chunks`` beside ``url``).
        tags: names :func:`~mlstore.checkpoint.retain` keeps the checkpoint under.
        workers: parallel uploads per rank.
        max_bytes: bytes of pieces in flight per rank at most.
        timeout: seconds to wait for a running chunk collection before
            :class:`~mlstore.errors.CheckpointBusyError`.

    Attributes:
        info: after a save, on the coordinator: what it stored and uploaded, every rank
            together (:class:`~mlstore.checkpoint.CheckpointInfo`).
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        store: Store | None = None,
        chunks: str | None = None,
        tags: Sequence[str] = (),
        workers: int = 16,
        max_bytes: int = MAX_BYTES,
        timeout: float = 600.0,
    ) -> None:
        super().__init__()
        self._store = store
        self._chunks_root = chunks
        self.tags = list(tags)
        self.workers = workers
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.is_coordinator = True
        self.rank = 0
        self.info: CheckpointInfo | None = None
        self._lock: weakref.finalize[Any, Any] | None = None
        self._known: dict[str, int] | None = None
        self._created = time.time()
        self._started = time.perf_counter()
        self._at(url)
        self.save_id = uuid.uuid4().hex

    def _at(self, url: str | os.PathLike[str]) -> None:
        self.url = canonical(os.fspath(url))
        self.layout = Layout.beside(self.url, self._chunks_root)

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
            self._at(checkpoint_id)
        self.release()
        self.save_id = uuid.uuid4().hex

    def storage_meta(self) -> Any:
        return StorageMeta(checkpoint_id=self.url, save_id=self.save_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("use_collectives", True) is False:
            raise ConfigError(
                "mlstore's DCP writer commits every rank's chunks in one manifest, so it "
                "needs use_collectives=True",
                url=self.url,
                operation="save",
            )
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank") or 0)
        self.info = None
        self._known = None

    def prepare_local_plan(self, plan: Any) -> Any:
        return plan

    def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
        # Runs on the coordinator before any rank has its plan, so before any rank lists
        # the chunk store: the save lock goes here (see the module docstring).
        self.release()  # a save of this writer that failed on another rank
        self._created, self._started = time.time(), time.perf_counter()
        lock = lock_for_save(self.store, self.layout, self.timeout)
        self._lock = weakref.finalize(self, _release, lock)
        try:
            self._known = listed_chunks(self.store, self.layout)
        except BaseException:
            self.release()
            raise
        return plans

    def write_data(self, plan: Any, planner: Any) -> Any:
        try:
            known = self._known
            if known is None or not self.is_coordinator:
                known = listed_chunks(self.store, self.layout)  # under the coordinator's lock
            results = self._upload(plan.items, planner, known)
        except BaseException:
            if self.is_coordinator:
                self.release()
            raise
        future: Any = Future()
        future.set_result(results)
        return future

    def _upload(self, items: list[Any], planner: Any, known: dict[str, int]) -> list[Any]:
        writer = ChunkWriter(
            self.store, self.layout, known, workers=self.workers, max_bytes=self.max_bytes
        )
        try:
            added: list[tuple[Any, Part, dict[str, Any]]] = []
            for item in items:
                data = planner.resolve_data(item)  # one at a time: it may allocate
                if item.type == WriteItemType.BYTE_IO:
                    view = data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(data)
                    meta: dict[str, Any] = {"type": "bytes"}
                    part = writer.add(cdc_pieces(view))
                else:
                    shape = [int(s) for s in data.shape]
                    meta = {"type": "tensor", "dtype": dtype_name(data.dtype), "shape": shape}
                    part = writer.add(_tensor_pieces(data))
                added.append((item, part, meta))
            stats = writer.finish()
        finally:
            writer.close()
        results = []
        for n, (item, part, meta) in enumerate(added):
            data = {
                "part": part_name(item.index),
                "size": part.size,
                "chunks": [c.as_list() for c in part.chunks],
                "meta": meta,
            }
            if n == 0:
                data["stats"] = stats  # this rank's, counted once
            result = WriteResult(index=item.index, size_in_bytes=part.size, storage_data=data)
            results.append(result)
        return results

    def finish(self, metadata: Any, results: list[list[Any]]) -> None:
        if self._lock is None or not self._lock.alive:
            raise CheckpointError(
                "finish() without the save lock prepare_global_plan() takes",
                url=self.url,
                operation="save",
            )
        try:
            self.info = self._commit(metadata, results)
        finally:
            self.release()

    def _commit(self, metadata: Any, results: list[list[Any]]) -> CheckpointInfo:
        parts: dict[str, Part] = {}
        names: dict[Any, str] = {}
        stats = {"bytes": 0, "uploaded": 0, "chunks": 0, "new_chunks": 0}
        for rank_results in results:
            for result in rank_results:
                data = result.storage_data
                parts[data["part"]] = Part(
                    int(data["size"]), [Chunk(d, int(n)) for d, n in data["chunks"]], data["meta"]
                )
                names[result.index] = data["part"]
                for key, value in data.get("stats", {}).items():
                    stats[key] = stats.get(key, 0) + int(value)
        metadata.storage_data = names
        metadata.storage_meta = self.storage_meta()
        writer = ChunkWriter(self.store, self.layout, self._known or {}, workers=self.workers)
        try:
            parts[METADATA] = writer.add(cdc_pieces(pickle.dumps(metadata)))
            for key, value in writer.finish().items():
                stats[key] += value
        finally:
            writer.close()
        manifest = Manifest(
            kind="dcp",
            parts=parts,
            meta={"torch": torch.__version__, "metadata": METADATA, "ranks": len(results)},
            tags=self.tags,
            created=self._created,
            stats=stats,
            chunks_root=self.layout.root,
        )
        commit_manifest(self.store, self.url, manifest)  # the checkpoint exists
        return CheckpointInfo(
            url=self.url,
            bytes=stats["bytes"],
            uploaded=stats["uploaded"],
            chunks=stats["chunks"],
            new_chunks=stats["new_chunks"],
            seconds=time.perf_counter() - self._started,
        )

    def release(self) -> None:
        """Release the save lock if this writer holds one (a save that failed)."""
        if self._lock is not None:
            self._lock()  # runs once; also what garbage collection and exit run
            self._lock = None

    close = release

    def __enter__(self) -> StorageWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------- conveniences


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def _run(
    call: Callable[..., Any], *, failure: Callable[[], MlstoreError | None], **kwargs: Any
) -> Any:
    """Run a DCP entry point; a failure that was mlstore's on some rank is raised as that
    error (the lowest rank's), not wrapped in DCP's ``CheckpointException``; so is
    ``failure()`` when DCP reports a failure of its own that it caused (a manifest that
    could not be read)."""
    no_dist = _no_dist()
    try:
        with warnings.catch_warnings():
            if no_dist:  # one process: DCP's warning about it says nothing new here
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return call(no_dist=no_dist, **kwargs)
    except CheckpointException as exc:
        failures = cast("dict[int, tuple[BaseException, Any]]", exc.failures)
        for _rank, (error, _trace) in sorted(failures.items()):
            if isinstance(error, MlstoreError):
                raise error from exc
        cause = failure()
        if cause is not None:
            raise cause from exc
        raise


def save(
    state_dict: dict[str, Any],
    url: str | os.PathLike[str],
    *,
    process_group: Any = None,
    planner: Any = None,
    store: Store | None = None,
    chunks: str | None = None,
    tags: Sequence[str] = (),
    workers: int = 16,
    max_bytes: int = MAX_BYTES,
    timeout: float = 600.0,
) -> CheckpointInfo | None:
    """``torch.distributed.checkpoint.save`` to ``url`` through a :class:`StorageWriter`;
    call it on every rank (or in a single process, without a process group).

    Returns:
        on the coordinator, what the save stored and uploaded; ``None`` on other ranks.

    Raises:
        MlstoreError: a rank's storage failed (the lowest such rank's error); the
            checkpoint at ``url`` is still the previous one.
    """
    writer = StorageWriter(
        url,
        store=store,
        chunks=chunks,
        tags=tags,
        workers=workers,
        max_bytes=max_bytes,
        timeout=timeout,
    )
    with writer:
        _run(
            dcp_save,
            failure=lambda: None,
            state_dict=state_dict,
            storage_writer=writer,
            planner=planner,
            process_group=process_group,
        )
    return writer.info


def load(
    state_dict: dict[str, Any],
    url: str | os.PathLike[str],
    *,
    process_group: Any = None,
    planner: Any = None,
    store: Store | None = None,
    workers: int = 16,
    max_bytes: int = MAX_BYTES,
) -> None:
    """``torch.distributed.checkpoint.load`` from ``url`` into ``state_dict``, in place,
    through a :class:`StorageReader`.

    Raises:
        CheckpointError: ``url`` holds no DCP checkpoint, or one with a chunk missing.
        NotFoundError: nothing at ``url``.
    """
    reader = StorageReader(url, store=store, workers=workers, max_bytes=max_bytes)
    _run(
        dcp_load,
        failure=lambda: reader.failure,
        state_dict=state_dict,
        storage_reader=reader,
        planner=planner,
        process_group=process_group,
    )
