"""The checkpoint layout on storage, and its manifest.

A checkpoint directory holds checkpoints, each a small JSON *manifest* at the URL the
user named, and a content-addressed *chunk store* the manifests point into (by default
``<directory>/.chunks``, shared by every checkpoint saved beside it)::

    s3://bucket/run-7/step-1000             manifest: what to read, in which chunks
    s3://bucket/run-7/step-2000             manifest
    s3://bucket/run-7/.chunks/data/3f/3f9c…  chunk: bytes named by their xxh3-128
    s3://bucket/run-7/.chunks/refs/9a0e…     which manifest URLs use this chunk store
    s3://bucket/run-7/.chunks/locks/save-…   live savers and collectors (see _locks)

A chunk is written once and never changed: its name is the hash of its bytes, so a
second save of the same tensor (or the same stretch of a file) finds it listed and
uploads nothing. The manifest is written last, in one atomic PUT, after every chunk
it names is stored: a reader sees the previous checkpoint or the whole new one, never
a part, and a save killed at any point leaves the previous manifest whole.

xxh3-128 is not a cryptographic hash: the chunk store trusts whoever can write to the
bucket, as every reader of that bucket already does.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

from mlstore.errors import CheckpointError
from mlstore.hashing import content_hash
from mlstore.url import parse_url

__all__ = [
    "FORMAT",
    "Chunk",
    "Layout",
    "Manifest",
    "Part",
    "chunk_name",
    "is_manifest",
]

#: The format marker every manifest starts with.
FORMAT = "mlstore.checkpoint/1"
_HEAD = '{"format": "' + FORMAT + '"'
#: The name of the default chunk store beside the checkpoints.
CHUNKS_DIR = ".chunks"


@dataclass(frozen=True)
class Chunk:
    """A stored chunk: the xxh3-128 of its bytes and their length."""

    digest: str
    size: int

    def as_list(self) -> list[Any]:
        return [self.digest, self.size]


@dataclass
class Part:
    """One stored byte sequence of a checkpoint (a tensor storage, a blob, the pickle),
    as the chunks that make it up, in order."""

    size: int
    chunks: list[Chunk] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def canonical(url: str) -> str:
    """``url`` in the one spelling mlstore gives it (a local path becomes ``file://``),
    without a trailing slash: what refs record and roots are compared by."""
    return str(parse_url(str(url))).rstrip("/")


def chunk_name(digest: str) -> str:
    """The path of a chunk below the chunk store (two-level fan-out)."""
    return f"data/{digest[:2]}/{digest}"


class Layout:
    """Where a chunk store's parts live, from its root URL (no trailing slash)."""

    def __init__(self, root: str) -> None:
        self.root = canonical(root)

    @classmethod
    def beside(cls, manifest_url: str, chunks: str | None = None) -> Layout:
        """The chunk store a checkpoint at ``manifest_url`` uses: ``chunks``, or the
        ``.chunks`` directory next to it."""
        if chunks:
            return cls(chunks)
        parent = canonical(manifest_url).rsplit("/", 1)[0]
        return cls(f"{parent}/{CHUNKS_DIR}")

    def chunk(self, digest: str) -> str:
        return f"{self.root}/{chunk_name(digest)}"

    @property
    def data(self) -> str:
        return f"{self.root}/data/"

    @property
    def refs(self) -> str:
        return f"{self.root}/refs/"

    def ref(self, manifest_url: str) -> str:
        return f"{self.refs}{content_hash(manifest_url.encode())}"

    @property
    def locks(self) -> str:
        return f"{self.root}/locks/"


def _split(url: str) -> tuple[str, str]:
    scheme, sep, rest = url.partition("://")
    return (scheme + sep, rest) if sep else ("", url)


def relative_root(manifest_url: str, root: str) -> str:
    """``root`` as the manifest records it: relative to the manifest's directory when
    both are on the same scheme (so a copied or mounted tree keeps working)."""
    (s1, p1), (s2, p2) = _split(manifest_url), _split(root)
    if s1 != s2 or s1 == "":
        return root
    b1, b2 = p1.split("/", 1)[0], p2.split("/", 1)[0]
    if b1 != b2 and s1 != "file://":
        return root
    return posixpath.relpath(p2, posixpath.dirname(p1.rstrip("/")))


def absolute_root(manifest_url: str, recorded: str) -> str:
    if "://" in recorded:
        return canonical(recorded)
    scheme, path = _split(manifest_url)
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(path.rstrip("/")), recorded))
    if path.startswith("/") and not joined.startswith("/"):
        joined = "/" + joined
    return canonical(scheme + joined)


@dataclass
class Manifest:
    """A checkpoint: its parts, by name, and what wrote it.

    Attributes:
        kind: who wrote it and knows how to read it (``"torch"``, ``"dcp"``, ``"files"``).
        parts: the stored byte sequences, by name.
        meta: the writer's own description (e.g. the pickle's part and tensor dtypes).
        tags: names the checkpoint is kept under by :func:`~mlstore.checkpoint.retain`.
        created: when the save began (seconds since the epoch, the saver's clock).
        stats: what the save stored and what it uploaded.
        chunks_root: the chunk store's root URL.
    """

    kind: str
    parts: dict[str, Part]
    meta: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    stats: dict[str, int] = field(default_factory=dict)
    chunks_root: str = ""

    def digests(self) -> set[str]:
        return {c.digest for part in self.parts.values() for c in part.chunks}

    def dumps(self, url: str) -> bytes:
        body = {
            "format": FORMAT,
            "kind": self.kind,
            "created": self.created,
            "tags": self.tags,
            "chunks": relative_root(url, self.chunks_root),
            "stats": self.stats,
            "meta": self.meta,
            "parts": {
                name: {"size": p.size, "chunks": [c.as_list() for c in p.chunks], "meta": p.meta}
                for name, p in self.parts.items()
            },
        }
        return (
            json.dumps(body, separators=(",", ":")).replace('{"format":', '{"format": ', 1).encode()
        )

    @classmethod
    def loads(cls, url: str, raw: bytes) -> Manifest:
        if not is_manifest(raw):
            raise CheckpointError("not an mlstore checkpoint (no manifest at this URL)", url=url)
        try:
            body = json.loads(raw)
            parts = {
                name: Part(
                    int(p["size"]),
                    [Chunk(str(d), int(n)) for d, n in p["chunks"]],
                    dict(p.get("meta") or {}),
                )
                for name, p in body["parts"].items()
            }
            return cls(
                kind=str(body["kind"]),
                parts=parts,
                meta=dict(body.get("meta") or {}),
                tags=[str(t) for t in body.get("tags") or []],
                created=float(body["created"]),
                stats={k: int(v) for k, v in (body.get("stats") or {}).items()},
                chunks_root=absolute_root(url, str(body["chunks"])),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"the checkpoint manifest is malformed: {exc}", url=url) from exc


def is_manifest(raw: bytes) -> bool:
    """Whether ``raw`` starts like a checkpoint manifest (the first bytes suffice)."""
    return raw[: len(_HEAD)] == _HEAD.encode()
