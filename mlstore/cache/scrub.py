"""Checking the disk tier's blobs against their names, and healing the bad ones.

Every blob is named by the xxh3-128 of its bytes, so a blob can be checked with no
other record: re-hash the file and compare. :func:`verify` does that for every blob in
the index and reports the bad ones (a file gone, shorter or longer than recorded, or
bytes that hash to another name) with the entries that point at them; it changes
nothing. :func:`scrub` does the same, then drops each bad blob and its entries through
the tier's own deletion (so the byte count and the other processes' view stay right)
and hands each dropped entry to a ``refetch`` function, which brings the object back
from the store, pinned to the version the entry recorded.

Both run while other processes read and fill the tier. They work from one snapshot of
the index; a blob evicted after the snapshot is skipped, not reported (its file is gone
because the index let it go, not because it broke). A blob that fails is looked up
again, under the index's write lock, before it is reported. Content addressing means a
file of that name, if present, can only ever have been written with those bytes, so a
mismatch is damage, never a race with a filler.

Reads are streamed in 1 MiB pieces, so a multi-GiB blob costs no more memory than a
small one.

:func:`adopt` takes back blob files that a new index does not know (the old index was
damaged and set aside, or deleted): when a disk tier opens an index with no blobs over
a ``blobs/`` that holds some, each file named as a blob is indexed again, with its size
and its time of last change, so the budget counts it and eviction can free it. Its
entries (which key had which blob) went with the old index, so it serves reads again
only by its content hash; it is checked on read as every blob is, or, with
``verify="never"``, hashed before it is adopted (a torn file is deleted instead).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from mlstore.cache.disk import DiskTier
from mlstore.hashing import Hasher

__all__ = ["BadBlob", "Scrubbed", "Verified", "adopt", "entry_url", "scrub", "verify"]

_CHUNK = 1 << 20

#: ``refetch(key, version)``: bring the object of node key ``key`` back into the tier,
#: as of ``version``; True if the entry is back.
Refetch = Callable[[str, "str | None"], bool]


@dataclass(frozen=True)
class BadBlob:
    """A blob whose file does not hold the bytes its name promises.

    Attributes:
        hash: the blob's name, the xxh3-128 its bytes should have.
        size: the size the index records.
        problem: ``"missing"``, ``"wrong size"`` or ``"wrong hash"``.
        entries: ``(key, version)`` of every index entry that points at it.
    """

    hash: str
    size: int
    problem: str
    entries: tuple[tuple[str, str | None], ...]

    @property
    def urls(self) -> list[str]:
        """The URLs of the entries, for people (see :func:`entry_url`)."""
        return [entry_url(key) for key, _ in self.entries]


@dataclass
class Verified:
    """What :func:`verify` found: blobs and bytes checked, and the bad blobs."""

    checked: int = 0
    bytes: int = 0
    bad: list[BadBlob] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad


@dataclass
class Scrubbed(Verified):
    """What :func:`scrub` did: the entries fetched again, and those only dropped."""

    healed: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def entry_url(key: str) -> str:
    """The URL part of a node key, as a person would name the object.

    Keys are ``<physical URL>#<scope digest>`` for whole objects and the same followed
    by ``\\x00<version>\\x00<size>:<block>`` for a block of a large object.

    >>> entry_url("s3://bkt/a.bin#0123456789abcdef")
    's3://bkt/a.bin'
    >>> entry_url("s3://bkt/big.bin#0123456789abcdef\\x00v1\\x00900:3")
    's3://bkt/big.bin (block 3)'
    """
    whole, sep, rest = key.partition("\x00")
    url = whole.rpartition("#")[0] or whole
    if not sep:
        return url
    block = rest.rpartition(":")[2]
    return f"{url} (block {block})" if block.isdigit() else url


def is_whole_object(key: str) -> bool:
    """Whether ``key`` names a whole object that a fetch of its URL can refill (not a
    block, and not a key stored masked because its URL carried a credential)."""
    return "\x00" not in key and "#" in key


def _problem(disk: DiskTier, digest: str, size: int) -> str | None:
    """What is wrong with blob ``digest``, or ``None`` if its bytes match its name."""
    hasher = Hasher()
    try:
        with open(disk.blob_path(digest), "rb", buffering=0) as fh:
            while chunk := fh.read(_CHUNK):
                hasher.update(chunk)
    except FileNotFoundError:
        return "missing"
    if hasher.length != size:
        return "wrong size"
    return None if hasher.hexdigest() == digest else "wrong hash"


def _still_indexed(disk: DiskTier, digest: str) -> bool:
    """Whether the index still holds blob ``digest``, asked under the index's write lock:
    an eviction deletes the file before it commits, so a plain read could still see the
    row of a file already gone. Taking the lock waits for that commit. (Only blobs that
    failed are asked, so the lock is rare.)"""
    with disk._transaction() as db:
        return db.execute("SELECT 1 FROM blobs WHERE hash = ?", (digest,)).fetchone() is not None


def _entries(disk: DiskTier, digest: str) -> tuple[tuple[str, str | None], ...]:
    rows = disk._conn().execute(
        "SELECT key, version FROM entries WHERE hash = ? ORDER BY key", (digest,)
    )
    return tuple((str(key), version) for key, version in rows.fetchall())


def verify(disk: DiskTier, *, on_blob: Callable[[int], None] | None = None) -> Verified:
    """Re-hash every blob in ``disk``'s index; report the bad ones, change nothing.

    Args:
        disk: the node's disk tier.
        on_blob: called with each blob's size once it is checked (a progress bar).
    """
    rows = disk._conn().execute("SELECT hash, size FROM blobs ORDER BY hash").fetchall()
    found = Verified()
    for digest, size in rows:
        problem = _problem(disk, digest, int(size))
        indexed = problem is None or _still_indexed(disk, digest)
        if problem is not None and indexed:
            found.bad.append(BadBlob(digest, int(size), problem, _entries(disk, digest)))
        if indexed:  # (one evicted since the snapshot was not checked: it is gone)
            found.checked += 1
            found.bytes += int(size)
        if on_blob is not None:
            on_blob(int(size))
    return found


def scrub(
    disk: DiskTier,
    refetch: Refetch | None = None,
    *,
    on_blob: Callable[[int], None] | None = None,
) -> Scrubbed:
    """:func:`verify`, then heal: drop each bad blob with its entries, and fetch each
    whole object it held again through ``refetch(key, version)``.

    An entry is *healed* when ``refetch`` brings it back, *dropped* otherwise (no
    ``refetch``, a block of a large object, which the next ranged read refills, a key
    stored masked, or a fetch that failed: the object changed since, or this Store
    cannot reach it). Either way no bad byte is left to serve.
    """
    found = verify(disk, on_blob=on_blob)
    done = Scrubbed(found.checked, found.bytes, found.bad)
    for bad in found.bad:
        entries = _entries(disk, bad.hash) or bad.entries  # as of now: fills may have added
        disk.on_event("integrity_failures", 1)
        disk.drop_blob(bad.hash)
        for key, version in entries:
            healed = refetch is not None and is_whole_object(key) and refetch(key, version)
            (done.healed if healed else done.dropped).append(entry_url(key))
    return done


def adopt(disk: DiskTier) -> int:
    """Index the blob files of ``disk`` if its index knows no blob at all (see the
    module doc); returns how many were adopted (``disk_adopted``), then evicts to the
    budget. Cheap when there is nothing to do: one query."""
    if disk._conn().execute("SELECT 1 FROM blobs LIMIT 1").fetchone() is not None:
        return 0
    found: list[tuple[str, int, float]] = []
    for entry in disk.blob_files():
        with contextlib.suppress(FileNotFoundError):  # evicted meanwhile
            st = entry.stat(follow_symlinks=False)
            found.append((entry.name, st.st_size, st.st_mtime))
    if not disk.verify:  # nothing would check them on read: check them now
        torn = [blob for blob in found if _problem(disk, blob[0], blob[1]) is not None]
        for digest, _, _ in torn:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(disk.blob_path(digest))
        found = [blob for blob in found if blob not in torn]
    if not found:
        return 0
    adopted = 0
    with disk._transaction() as db:
        for digest, size, mtime in found:
            if not os.path.exists(disk.blob_path(digest)):
                continue  # evicted or scrubbed by another process meanwhile
            if db.execute(
                "INSERT OR IGNORE INTO blobs VALUES (?, ?, ?)", (digest, size, mtime)
            ).rowcount:
                db.execute("UPDATE meta SET value = value + ? WHERE name = 'bytes'", (size,))
                adopted += 1
    if adopted:
        disk.on_event("disk_adopted", adopted)
        disk.evict()
    return adopted
