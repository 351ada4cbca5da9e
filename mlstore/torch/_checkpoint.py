"""``save`` and ``load``: torch objects as deduplicated, atomic checkpoints.

The object is pickled as ``torch.save`` pickles it, except that every tensor storage
is handed to the checkpoint's chunk store instead of being written into the pickle:
its bytes go up in fixed pieces (each a chunk named by its xxh3-128, skipped when the
store already holds it), straight from the tensor's memory, on a pool of uploads.
Large ``bytes`` in the object (a tokenizer file, a serialized optimizer shard) are
cut by content (FastCDC) and stored the same way. The pickle itself, now small, is one
more part. Nothing holds a serialized copy of the whole: peak memory is the object
plus the pieces in flight.

``load`` reads the manifest, allocates every storage, fetches all their chunks at
once (verified against their names), then unpickles — by default with torch's
weights-only unpickler, as ``torch.load`` does.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeAlias, cast

import torch
import torch.serialization

from mlstore.checkpoint import PIECE_BYTES, CheckpointInfo, CheckpointReader, CheckpointWriter
from mlstore.errors import CheckpointError
from mlstore.store import Store

__all__ = ["load", "save"]

#: ``bytes`` at least this long are stored as parts of their own (cut by content).
BLOB_BYTES = 1024 * 1024
#: Persistent ids: ("storage", kind, part name, ...); torch's weights-only unpickler
#: passes on only ids whose first item is "storage".
_STORAGE, _BLOB = "mlstore.storage", "mlstore.blob"

MapLocation: TypeAlias = (
    str
    | torch.device
    | dict[str, str]
    | Callable[[torch.UntypedStorage, str], torch.UntypedStorage | None]
    | None
)


def _u8(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over ``storage`` (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _new_storage(size: int) -> torch.UntypedStorage:
    new: Any = torch.UntypedStorage
    return cast("torch.UntypedStorage", new(size))


def _pieces(storage: torch.UntypedStorage) -> Iterator[memoryview]:
    flat = _u8(storage)
    for start in range(0, storage.nbytes(), PIECE_BYTES):
        piece = flat[start : start + PIECE_BYTES]
        if piece.device.type != "cpu":
            piece = piece.cpu()  # one piece at a time, not the whole storage
        array: Any = piece.numpy()
        yield memoryview(array)


class _Saver(pickle.Pickler):
    def __init__(self, file: io.BytesIO, writer: CheckpointWriter) -> None:
        super().__init__(file, protocol=2)
        self.writer = writer
        self.names: dict[int, str] = {}
        self.blobs = 0

    def persistent_id(self, obj: Any) -> tuple[Any, ...] | None:
        if isinstance(obj, torch.storage.TypedStorage):
            storage, dtype = obj._untyped_storage, obj.dtype
        elif isinstance(obj, torch.UntypedStorage):
            storage, dtype = obj, torch.uint8
        elif isinstance(obj, (bytes, bytearray)) and len(obj) >= BLOB_BYTES:
            name = f"blob/{self.blobs}"
            self.blobs += 1
            self.writer.add_bytes(name, obj if isinstance(obj, bytes) else memoryview(obj))
            return ("storage", _BLOB, name, isinstance(obj, bytearray))
        else:
            return None
        key = storage._cdata
        name = self.names.get(key) or f"storage/{len(self.names)}"
        if key not in self.names:
            self.names[key] = name
            location = torch.serialization.location_tag(storage)
            self.writer.add_pieces(name, _pieces(storage), {"location": location})
        return ("storage", _STORAGE, name, str(dtype).removeprefix("torch."))


def save(
    obj: Any,
    url: str,
    *,
    store: Store | None = None,
    chunks: str | None = None,
    tags: Sequence[str] = (),
    workers: int = 16,
    max_bytes: int = 256 * 1024 * 1024,
    progress: Callable[[int, int], None] | None = None,
    staging: str | None = None,
) -> CheckpointInfo:
    """Save ``obj`` (a state dict, or anything ``torch.save`` takes) to ``url``.

    Atomic: the checkpoint at ``url`` is the previous one until the save's manifest is
    written, last. Deduplicated: chunks the store already holds (from earlier saves
    beside ``url``, or identical tensors in ``obj``) are not uploaded again.

    Args:
        store: the Store to write through (default: the default Store).
        chunks: the chunk store's root URL (default: ``.chunks`` beside ``url``;
            checkpoints dedupe against those sharing it).
        tags: names :func:`mlstore.checkpoint.retain` keeps the checkpoint under.
        workers: parallel uploads.
        max_bytes: bytes of pieces in flight at most (bounds memory beyond ``obj``).
        progress: called with (bytes done, bytes found so far) as chunks finish.
        staging: ``"local"``: write the checkpoint to the node's disk cache and
            return; the upload continues in the background, and a process killed
            meanwhile leaves it for :func:`mlstore.checkpoint.flush` (``mlstore
            flush``). The checkpoint at ``url`` is the previous one until it commits.

    Returns:
        what the save stored and uploaded (:class:`~mlstore.checkpoint.CheckpointInfo`).
    """
    with CheckpointWriter(
        str(url),
        kind="torch",
        store=store,
        chunks=chunks,
        tags=tags,
        workers=workers,
        max_bytes=max_bytes,
        progress=progress,
        staging=staging,
    ) as writer:
        buf = io.BytesIO()
        _Saver(buf, writer).dump(obj)
        writer.add_bytes("pickle", buf.getbuffer())
        return writer.commit({"torch": torch.__version__})


def _restorer(
    map_location: MapLocation,
) -> Callable[[torch.UntypedStorage, str], torch.UntypedStorage]:
    restore: Any = torch.serialization.default_restore_location
    if map_location is None:
        return cast("Callable[[torch.UntypedStorage, str], torch.UntypedStorage]", restore)
    if isinstance(map_location, (str, torch.device)):
        device = str(map_location)
        return lambda storage, _location: restore(storage, device)
    if isinstance(map_location, dict):
        table = dict(map_location)
        return lambda storage, location: restore(storage, table.get(location, location))
    if callable(map_location):
        fn = map_location

        def call(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
            moved = fn(storage, location)
            return restore(storage, location) if moved is None else moved

        return call
    raise TypeError(f"map_location must be a device, a dict or a callable, not {map_location!r}")


def load(
    url: str,
    map_location: MapLocation = None,
    *,
    store: Store | None = None,
    weights_only: bool = True,
    workers: int = 16,
) -> Any:
    """Load the checkpoint :func:`save` wrote at ``url``.

    Args:
        map_location: as for ``torch.load``: a device, a ``{saved: new}`` dict of
            locations, or ``fn(storage, location)``.
        weights_only: unpickle with torch's weights-only unpickler (tensors, containers
            and primitives only, as ``torch.load`` does by default); ``False`` runs the
            full unpickler, which can run any code the checkpoint names: only for
            checkpoints you trust.
        workers: parallel chunk reads.

    Raises:
        CheckpointError: ``url`` holds no checkpoint, or one with a chunk missing.
        NotFoundError: nothing at ``url``.
    """
    restore = _restorer(map_location)
    with CheckpointReader(str(url), store=store, workers=workers) as reader:
        manifest = reader.manifest
        if manifest.kind != "torch":
            raise CheckpointError(
                f"a {manifest.kind!r} checkpoint, not one mlstore.torch.save wrote",
                url=str(url),
                operation="load",
            )
        buffers: dict[str, torch.UntypedStorage] = {}
        targets: dict[str, memoryview] = {}
        for name, part in manifest.parts.items():
            if name.startswith("storage/"):
                storage = buffers[name] = _new_storage(part.size)
                if part.size:
                    array: Any = _u8(storage).numpy()
                    targets[name] = memoryview(array)
        reader.fill(targets)
        pickled = reader.read("pickle")
        placed: dict[str, torch.UntypedStorage] = {}

        def persistent_load(pid: Any) -> Any:
            kind, name = pid[1], pid[2]
            if kind == _BLOB:
                data = reader.read(name)
                return bytearray(data) if pid[3] else data
            if kind != _STORAGE or name not in buffers:
                raise CheckpointError(f"the pickle names an unknown part {pid!r}", url=str(url))
            if name not in placed:
                location = str(manifest.parts[name].meta.get("location", "cpu"))
                placed[name] = restore(buffers[name], location)
            dtype = getattr(torch, str(pid[3]))
            typed: Any = torch.storage.TypedStorage
            return typed(wrap_storage=placed[name], dtype=dtype, _internal=True)

        unpickler: Any
        if weights_only:
            from torch import _weights_only_unpickler

            unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(pickled))
        else:
            unpickler = pickle.Unpickler(io.BytesIO(pickled))
        unpickler.persistent_load = persistent_load
        try:
            return unpickler.load()
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"cannot unpickle with weights_only=True: {exc} (pass weights_only=False "
                "only for a checkpoint you trust)",
                url=str(url),
                operation="load",
            ) from exc
