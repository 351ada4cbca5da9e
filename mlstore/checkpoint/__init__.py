"""Checkpoints: atomic, deduplicated by content, on any storage mlstore writes to.

A checkpoint is a manifest at the URL it is saved to, naming chunks in a
content-addressed chunk store beside it. Chunks already stored are not uploaded again,
so a second save of a model whose weights changed in part uploads about that part.
The manifest is written last: a reader sees the previous checkpoint or the whole new
one. :func:`retain` drops old checkpoints and the chunks nothing names, safely while
other processes save. With ``staging="local"`` a save returns once the checkpoint is
on the node's disk and uploads in the background; :func:`flush` waits for that, and
finishes uploads a killed process left behind.

This module needs no torch; :func:`mlstore.torch.save` and :func:`mlstore.torch.load`
(and the DCP storage writer and reader) build on it.

The building blocks below :class:`CheckpointWriter` (:class:`ChunkWriter`,
:class:`ChunkReader`, :class:`Layout`, :func:`lock_for_save`, :func:`commit_manifest`)
are exported for savers whose chunks are uploaded by several processes and committed by
one, as :mod:`mlstore.torch.dcp` does.
"""

from __future__ import annotations

from mlstore.checkpoint._chunks import (
    PIECE_BYTES,
    ChunkReader,
    ChunkWriter,
    cdc_pieces,
    fixed_pieces,
    listed_chunks,
    wait_all,
)
from mlstore.checkpoint._flush import FlushReport, flush
from mlstore.checkpoint._format import FORMAT, Chunk, Layout, Manifest, Part, canonical
from mlstore.checkpoint._io import (
    CheckpointInfo,
    CheckpointReader,
    CheckpointWriter,
    commit_manifest,
    read_manifest,
)
from mlstore.checkpoint._locks import Lock, lock_for_save
from mlstore.checkpoint._retention import Retention, retain

__all__ = [
    "FORMAT",
    "PIECE_BYTES",
    "CheckpointInfo",
    "CheckpointReader",
    "CheckpointWriter",
    "Chunk",
    "ChunkReader",
    "ChunkWriter",
    "FlushReport",
    "Layout",
    "Lock",
    "Manifest",
    "Part",
    "Retention",
    "canonical",
    "cdc_pieces",
    "commit_manifest",
    "fixed_pieces",
    "flush",
    "listed_chunks",
    "lock_for_save",
    "read_manifest",
    "retain",
    "wait_all",
]
