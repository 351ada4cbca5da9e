"""Retention: drop old checkpoints and the chunks no kept checkpoint names.

Deletion order keeps every survivor whole: manifests first (a checkpoint is gone once
its manifest is), then the chunks no remaining manifest names. The chunk sweep runs
only under a collector's lock with no live save on the store (see ``_locks``); if a
save is running the collection backs off and says so, and the next call collects.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mlstore.checkpoint._chunks import listed_chunks
from mlstore.checkpoint._format import Layout, Manifest, canonical
from mlstore.checkpoint._io import read_manifest
from mlstore.checkpoint._locks import lock_for_collect
from mlstore.errors import CheckpointError, NotFoundError
from mlstore.store import Store, default_store

__all__ = ["Retention", "retain"]


@dataclass
class Retention:
    """What :func:`retain` did (or, with ``dry_run``, would do).

    Attributes:
        kept: the checkpoints kept, newest first.
        deleted: the checkpoints deleted.
        chunks_deleted: chunks no kept checkpoint names, deleted.
        bytes_freed: their bytes.
        deferred: a save was running, so no chunk was deleted (run it again later).
    """

    kept: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    chunks_deleted: int = 0
    bytes_freed: int = 0
    deferred: bool = False


def _checkpoints(store: Store, layout: Layout) -> list[tuple[str, str, Manifest | None]]:
    """(ref URL, manifest URL, manifest or None if gone) for every ref of the store."""
    try:
        refs = store.find(layout.refs)
    except NotFoundError:
        return []
    found = []
    for ref in refs:
        url, manifest = "", None
        try:
            url = store.read_bytes(ref).decode()
            manifest = read_manifest(store, url)  # the latest: chunks are kept by it
        except (NotFoundError, CheckpointError, UnicodeDecodeError):
            pass  # gone, or overwritten with something else: no longer a checkpoint
        if manifest is not None and manifest.chunks_root != layout.root:
            manifest = None  # saved again since, into another chunk store
        found.append((ref, url, manifest))
    return found


def retain(
    directory: str,
    *,
    keep_last: int | None = None,
    keep_tagged: bool = True,
    keep: Iterable[str] = (),
    chunks: str | None = None,
    store: Store | None = None,
    dry_run: bool = False,
) -> Retention:
    """Keep the newest ``keep_last`` checkpoints of a chunk store (all of them if
    ``None``), those with tags (``keep_tagged``) and those in ``keep``; delete the
    others, then every chunk no kept checkpoint names.

    Args:
        directory: where the checkpoints were saved (their chunk store is
            ``<directory>/.chunks`` unless ``chunks`` names another).
        dry_run: report, delete nothing.

    Safe while other processes save into the same store: chunks are swept only when
    no save is running (else ``deferred`` is set and only manifests were dropped).
    """
    if keep_last is not None and keep_last < 0:
        raise CheckpointError(f"keep_last must be 0 or more, got {keep_last}", url=directory)
    store = store or default_store()
    layout = Layout(chunks) if chunks else Layout(canonical(directory) + "/.chunks")
    result = Retention()
    found = _checkpoints(store, layout)
    live = sorted(
        ((url, m) for _, url, m in found if m is not None), key=lambda x: x[1].created, reverse=True
    )
    wanted = {canonical(u) for u in keep}
    kept: list[tuple[str, Manifest]] = []
    for i, (url, manifest) in enumerate(live):
        if (keep_last is None or i < keep_last) or (keep_tagged and manifest.tags) or url in wanted:
            kept.append((url, manifest))
        else:
            result.deleted.append(url)
    result.kept = [url for url, _ in kept]
    if dry_run:
        return result
    for url in result.deleted:
        try:
            store.rm(url)
        except NotFoundError:
            pass
        _drop(store, layout.ref(url))
    lock = lock_for_collect(store, layout)
    if lock is None:
        result.deferred = True
        return result
    with lock:
        # Rescanned under the lock: a save that committed since the scan above is kept.
        # A ref with no manifest behind it now belongs to a saver that died (none is
        # live), and goes.
        named: set[str] = set()
        for ref, _url, found_manifest in _checkpoints(store, layout):
            if found_manifest is None:
                _drop(store, ref)
            else:
                named |= found_manifest.digests()
        # Listed after the lock: every chunk a manifest names was written before it.
        stored = listed_chunks(store, layout)
        doomed = sorted(set(stored) - named)
        with ThreadPoolExecutor(8, thread_name_prefix="mlstore-ckpt-gc") as pool:
            list(pool.map(lambda d: _drop(store, layout.chunk(d)), doomed))
        result.chunks_deleted = len(doomed)
        result.bytes_freed = sum(stored[d] for d in doomed)
    return result


def _drop(store: Store, url: str) -> None:
    try:
        store.rm(url)
    except NotFoundError:
        pass
