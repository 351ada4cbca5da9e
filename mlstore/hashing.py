"""Content hashes: xxh3-128, fast enough (>10 GB/s) to run on every byte mlstore moves.

A content id is the 32-character lowercase hex digest. mlstore records it in the
object's metadata when it writes (:data:`METADATA_KEY`), so a later reader can know an
object's content before downloading it. Larger objects also carry per-block digests
(:data:`BLOCKS_KEY`, :func:`block_digests`), so a block read by a ranged GET can be
checked before it is cached.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BLOCKS_KEY",
    "METADATA_KEY",
    "BlockDigests",
    "Hasher",
    "block_digests",
    "content_hash",
    "stale_metadata",
]

#: Metadata key under which mlstore stores an object's xxh3-128 on write
#: (S3 ``x-amz-meta-mlstore-xxh3``, GCS and Azure metadata).
METADATA_KEY = "mlstore-xxh3"
#: Metadata key of the per-block digests (``"<granularity>:<hex><hex>..."``, xxh3-64,
#: 16 hex characters a block).
BLOCKS_KEY = "mlstore-xxh3-blocks"

#: The most block digests one object carries: 96 of them fit S3's 2 KiB of user
#: metadata beside the content hash.
_MAX_BLOCKS = 96
#: The smallest block a digest covers; larger objects double it until they fit.
_MIN_GRANULARITY = 1024 * 1024
_HEX = 16


def content_hash(data: bytes | bytearray | memoryview) -> str:
    """The xxh3-128 hex digest of ``data``.

    >>> content_hash(b"")
    '99aa06d3014798d86001c324468d497f'
    """
    import xxhash

    return str(xxhash.xxh3_128_hexdigest(data))


class Hasher:
    """Incremental xxh3-128 for bytes that arrive in pieces."""

    def __init__(self) -> None:
        import xxhash

        self._h: Any = xxhash.xxh3_128()
        self.length = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)
        self.length += len(data)

    def hexdigest(self) -> str:
        return str(self._h.hexdigest())


def block_digests(data: bytes | bytearray | memoryview) -> str | None:
    """The per-block digest record of ``data``, or ``None`` if one block covers it.

    The block (granularity) is the smallest power of two from 1 MiB up that cuts
    ``data`` into at most 96 blocks: a reader whose block size is a multiple of it
    (the default 8 MiB is, for objects up to 768 MiB) checks every block it fetches.
    """
    import xxhash

    size = len(data)
    granularity = _MIN_GRANULARITY
    while -(-size // granularity) > _MAX_BLOCKS:
        granularity *= 2
    if size <= granularity:
        return None
    view = memoryview(data)
    digests = "".join(
        xxhash.xxh3_64_hexdigest(view[i : i + granularity]) for i in range(0, size, granularity)
    )
    return f"{granularity}:{digests}"


@dataclass(frozen=True)
class BlockDigests:
    """Per-block digests of one object version, as read from its metadata."""

    granularity: int
    digests: tuple[str, ...]

    @classmethod
    def parse(cls, raw: str | None) -> BlockDigests | None:
        """The record :func:`block_digests` made, or ``None`` for anything else."""
        head, sep, body = (raw or "").partition(":")
        if not sep or not head.isdigit() or not body or len(body) % _HEX:
            return None
        granularity = int(head)
        if granularity < _MIN_GRANULARITY:
            return None
        return cls(granularity, tuple(body[i : i + _HEX] for i in range(0, len(body), _HEX)))

    def check(self, start: int, data: bytes, size: int) -> bool | None:
        """Whether ``data``, the bytes at ``start`` of an object of ``size`` bytes, match
        their digests; ``None`` if they are not whole digested blocks (cannot tell)."""
        import xxhash

        g = self.granularity
        end = start + len(data)
        if start % g or (len(data) % g and end != size) or not data:
            return None
        if -(-size // g) != len(self.digests) or end > size:
            return False  # digests of another size: not this content
        view = memoryview(data)
        first = start // g
        return all(
            xxhash.xxh3_64_hexdigest(view[i : i + g]) == self.digests[first + i // g]
            for i in range(0, len(data), g)
        )


_STALE_SEEN: set[str] = set()


def stale_metadata(url: object, what: str) -> None:
    """Say once per URL that ``what`` mlstore recorded in an object's metadata (its
    ``"content hash"``, its ``"block digests"``) is not of the bytes the store holds: a
    tool rewrote the object and kept its metadata. The bytes are served."""
    from mlstore._util.redact import redact_url

    shown = redact_url(str(url))
    if shown in _STALE_SEEN:
        return
    if len(_STALE_SEEN) >= 4096:  # a bound, not a record
        _STALE_SEEN.clear()
    _STALE_SEEN.add(shown)
    logging.getLogger("mlstore").warning(
        "%s: what mlstore recorded in the object's metadata (its %s) does not match its "
        "bytes (a tool rewrote the object and kept its metadata); serving the bytes the "
        "store holds",
        shown,
        what,
    )
