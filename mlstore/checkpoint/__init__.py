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
"""

from __future__ import annotations

from mlstore.checkpoint._chunks import PIECE_BYTES, cdc_pieces, fixed_pieces
from mlstore.checkpoint._flush import FlushReport, flush
from mlstore.checkpoint._format import FORMAT, Chunk, Manifest, Part
from mlstore.checkpoint._io import (
    CheckpointInfo,
    CheckpointReader,
    CheckpointWriter,
    read_manifest,
)
from mlstore.checkpoint._retention import Retention, retain

__all__ = [
    "FORMAT",
    "PIECE_BYTES",
    "CheckpointInfo",
    "CheckpointReader",
    "CheckpointWriter",
    "Chunk",
    "FlushReport",
    "Manifest",
    "Part",
    "Retention",
    "cdc_pieces",
    "fixed_pieces",
    "flush",
    "read_manifest",
    "retain",
]
