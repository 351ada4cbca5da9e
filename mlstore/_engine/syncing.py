"""Sync: make a destination tree hold what a source tree holds, sending only what differs.

A sync is a recursive copy that skips every object the destination provably holds
already (the content proofs of :mod:`.copying`: the mlstore content hash, an S3 ETag
within one store, an MD5; never size or time alone), so it is resumable: run it again
after a failure and only what is still missing or different is sent. With ``delete``,
objects below the destination that the source does not have are deleted afterwards,
and only if every copy succeeded (a sync that fails half way never deletes). With
``dry_run`` nothing is written or deleted: the result says what a real run would do
(working that out costs the same listings and, for objects of equal size, the same
HEADs as the real run).

A source and a destination that overlap (one below the other) are refused before
anything is listed: a sync with ``delete`` would otherwise remove what it copies.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING

from mlstore._engine.copying import Copier, CopyResult, Tally
from mlstore._util.units import human_size
from mlstore.backends.base import ObjectInfo
from mlstore.errors import ConfigError
from mlstore.url import URL

if TYPE_CHECKING:
    from mlstore._engine.writer import Progress

__all__ = ["SyncResult", "sync"]


class SyncResult(CopyResult):
    """What :meth:`mlstore.Store.sync` did (or, with ``dry_run``, would do).

    It is the list of destination URLs written (to be written, in a dry run), like a
    :class:`~mlstore.store.CopyResult`, with what was left alone, and:

    Attributes:
        deleted: destination URLs deleted (``delete=True``): the source has no such
            object.
        deleted_bytes: their size.
        dry_run: nothing was written or deleted; the lists say what would have been.
    """

    def __init__(
        self,
        written: Iterable[str] = (),
        *,
        skipped: Iterable[str] = (),
        skipped_bytes: int = 0,
        copied_bytes: int = 0,
        deleted: Iterable[str] = (),
        deleted_bytes: int = 0,
        dry_run: bool = False,
    ) -> None:
        super().__init__(
            written, skipped=skipped, skipped_bytes=skipped_bytes, copied_bytes=copied_bytes
        )
        self.deleted = list(deleted)
        self.deleted_bytes = deleted_bytes
        self.dry_run = dry_run

    def summary(self) -> str:
        """One line: what was sent, left alone and deleted."""
        verb = ("would copy", "would delete") if self.dry_run else ("copied", "deleted")
        parts = [
            f"{verb[0]} {len(self)} objects ({human_size(self.copied_bytes)})",
            f"{len(self.skipped)} already there ({human_size(self.skipped_bytes)})",
        ]
        if self.deleted or self.dry_run:
            parts.append(f"{verb[1]} {len(self.deleted)} ({human_size(self.deleted_bytes)})")
        return ", ".join(parts)

    def __repr__(self) -> str:
        dry = ", dry_run=True" if self.dry_run else ""
        return f"SyncResult({self.summary()}{dry})"


def _overlap(src: URL, dst: URL) -> bool:
    a, b = str(src).rstrip("/") + "/", str(dst).rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def sync(
    copier: Copier,
    src: URL,
    dst: URL,
    *,
    delete: bool,
    dry_run: bool,
    progress: Progress | None = None,
) -> SyncResult:
    """Sync ``src`` to ``dst`` with ``copier`` (which skips what is there already)."""
    if _overlap(src, dst):
        raise ConfigError(
            f"cannot sync {src} to {dst}: one is inside the other (a sync could delete "
            "or copy what it is reading); pick a destination outside the source"
        )
    pairs, there = copier.plan(src, dst, recursive=True, list_dst=True)
    tally = Tally(sum(e.size for e, _ in pairs), progress)
    if dry_run:
        needed = copier.parallel(functools.partial(copier.needed, there=there), pairs)
    else:
        needed = copier.each(pairs, there, tally)
        tally.finish()
    done = copier.result(pairs, needed)
    result = SyncResult(
        done,
        skipped=done.skipped,
        skipped_bytes=done.skipped_bytes,
        copied_bytes=done.copied_bytes,
        dry_run=dry_run,
    )
    if delete and there:
        wanted = {str(target) for _, target in pairs}
        extra = [(e, e.url) for url, e in sorted(there.items()) if url not in wanted]
        extra = [(e, u) for e, u in extra if not e.is_dir]
        if not dry_run:
            copier.parallel(functools.partial(_remove, copier), extra)
        result.deleted = [str(u) for _, u in extra]
        result.deleted_bytes = sum(e.size for e, _ in extra)
    return result


def _remove(copier: Copier, entry: ObjectInfo, url: URL) -> bool:
    """Delete one destination object no longer in the source (the node forgets it)."""
    w = copier.writer
    w.rm(w.resolve(url), recursive=False, replicate=False)
    return True
