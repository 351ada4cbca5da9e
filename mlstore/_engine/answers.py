"""How metadata answers travel to the node-wide metadata tier: as JSON, and only when
no URL in them carries a credential (such answers stay in their process).

Every field of :class:`~mlstore.backends.base.ObjectInfo` is carried: an answer taken
from the node must be the answer the store gave.
"""

from __future__ import annotations

from typing import Any

from mlstore.backends.base import ObjectInfo
from mlstore.cache.metadata import clear_of_credentials
from mlstore.url import URL

__all__ = [
    "decode_listing",
    "decode_located",
    "directories",
    "encode_listing",
    "encode_located",
]


def directories(url: URL) -> list[URL]:
    """``url`` and every directory above it, spelt with and without a trailing slash
    (the listings a write there may change)."""
    parts = url.path.rstrip("/").split("/") if url.path.strip("/") else []
    found = [URL(url.protocol, url.bucket, "")]
    for i in range(1, len(parts) + 1):
        path = "/".join(parts[:i])
        found += [URL(url.protocol, url.bucket, path), URL(url.protocol, url.bucket, path + "/")]
    return found


def _encode_info(info: ObjectInfo) -> dict[str, Any] | None:
    """``info`` as JSON, or ``None`` if its URL carries a credential."""
    if not clear_of_credentials(str(info.url)):
        return None
    u = info.url
    return {
        "url": [u.protocol, u.bucket, u.path],
        "size": info.size,
        "type": info.type,
        "version": info.version,
        "mtime": info.mtime,
        "checksums": dict(info.checksums),
        "content_hash": info.content_hash,
        "block_digests": info.block_digests,
    }


def _decode_info(d: dict[str, Any]) -> ObjectInfo:
    protocol, bucket, path = (str(part) for part in d["url"])
    checksums = d.get("checksums") or {}
    return ObjectInfo(
        url=URL(protocol, bucket, path),
        size=int(d["size"]),
        type=str(d.get("type", "file")),
        version=None if d.get("version") is None else str(d["version"]),
        mtime=None if d.get("mtime") is None else float(d["mtime"]),
        checksums={str(k): str(v) for k, v in checksums.items()},
        content_hash=None if d.get("content_hash") is None else str(d["content_hash"]),
        block_digests=None if d.get("block_digests") is None else str(d["block_digests"]),
    )


def encode_located(located: tuple[URL, ObjectInfo]) -> dict[str, Any] | None:
    target, info = located
    encoded = _encode_info(info)
    if encoded is None or not clear_of_credentials(str(target)):
        return None
    return {"target": [target.protocol, target.bucket, target.path], "info": encoded}


def decode_located(d: dict[str, Any]) -> tuple[URL, ObjectInfo]:
    protocol, bucket, path = (str(part) for part in d["target"])
    return URL(protocol, bucket, path), _decode_info(d["info"])


def encode_listing(entries: list[ObjectInfo]) -> dict[str, Any] | None:
    encoded = [_encode_info(e) for e in entries]
    return None if any(e is None for e in encoded) else {"entries": encoded}


def decode_listing(d: dict[str, Any]) -> list[ObjectInfo]:
    return [_decode_info(e) for e in d["entries"]]
