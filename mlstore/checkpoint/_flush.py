"""Uploading staged saves: this process's background uploader, and :func:`flush`.

One uploader thread per process takes staged saves in the order they were staged and,
for each, does what a direct save does, from the node's disk: takes the chunk store's
save lock (so retention leaves its chunks alone), lists the chunk store, uploads the
chunks it lacks (``workers`` at a time; each request retried by the Store's retry
layer), writes the ref, then the manifest, releases the lock, and deletes the staged
files. Before each save it resumes the orphans on the node: staged saves whose process
died (their journal's lock is free).

Order. Of two saves to one URL the later (by the manifest's ``created``, when the save
began) wins, whatever order their uploads finish in: just before a manifest is written
the one at the URL is read from the storage itself, and a newer one is left in place
(the staged save is *superseded* and dropped). On one node that read and the write are
made under a per-URL lock file, so no two uploads interleave there; between nodes a
later save's manifest can be overwritten only by an earlier save whose commit runs
within that one read-and-write of it.

A failed upload keeps its journal (``state: "failed"`` and the error) and is logged
with its URL; the next flush, or the next staged save on the node, tries it again.
The uploads run on plain threads the uploader starts itself, not on a
``concurrent.futures`` pool: those refuse work once the interpreter begins to exit,
and the exit hook below waits for the uploads exactly then (registered so that it
runs before ``concurrent.futures`` closes, see :func:`_wait_before_pools_close`).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlstore._util.redact import redact_url
from mlstore.checkpoint._chunks import listed_chunks
from mlstore.checkpoint._format import Chunk, Layout, Manifest, is_manifest
from mlstore.checkpoint._journal import (
    Journal,
    JournalLock,
    StagedDir,
    staged_ids,
    staging_root,
)
from mlstore.checkpoint._locks import lock_for_save
from mlstore.errors import CheckpointError, IntegrityError, NotFoundError
from mlstore.hashing import content_hash
from mlstore.store import Store, default_store

__all__ = ["FlushReport", "flush", "uploader"]

log = logging.getLogger("mlstore.checkpoint")

#: Seconds an upload waits for a running chunk collection (as a direct save does).
LOCK_TIMEOUT = 600.0
#: Parallel chunk uploads of one staged save.
WORKERS = 8

FlushProgress = Callable[[int, int], None]


@dataclass
class FlushReport:
    """What a :func:`flush` did.

    Attributes:
        uploaded: checkpoints whose staged saves are now committed to storage.
        superseded: staged saves dropped unuploaded: a later save of the same URL
            had committed already.
        failed: checkpoints whose upload failed; their journals stay for the next flush.
        busy: staged saves another live process on the node is uploading.
        pending: this process's uploads still running (``wait=False`` only).
        discarded: staging directories of saves killed before they were staged whole.
        bytes: bytes uploaded.
    """

    uploaded: list[str] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    discarded: int = 0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        """No upload failed."""
        return not self.failed

    def merge(self, other: FlushReport) -> None:
        self.uploaded += other.uploaded
        self.superseded += other.superseded
        self.busy += other.busy
        self.pending += other.pending
        self.discarded += other.discarded
        self.bytes += other.bytes
        done = set(self.uploaded) | set(self.superseded)
        failed = [u for u in [*self.failed, *other.failed] if u not in done]
        self.failed = list(dict.fromkeys(failed))


class _Progress:
    def __init__(self, callback: FlushProgress | None, total: int) -> None:
        self.callback = callback
        self.total = total
        self.done = 0
        self._lock = threading.Lock()

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            done = self.done
        if self.callback is not None:
            self.callback(done, self.total)


def _parallel(fn: Callable[[Chunk], None], items: Sequence[Chunk], workers: int) -> None:
    """``fn`` over ``items`` on up to ``workers`` threads; the first failure is raised
    after the others stopped taking items."""
    it = iter(items)
    guard = threading.Lock()
    errors: list[BaseException] = []

    def run() -> None:
        while True:
            with guard:
                item = None if errors else next(it, None)
            if item is None:
                return
            try:
                fn(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                with guard:
                    errors.append(exc)
                return

    threads = [
        threading.Thread(target=run, name="mlstore-ckpt-flush", daemon=True)
        for _ in range(max(1, min(workers, len(items))))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@contextlib.contextmanager
def _commit_lock(root: str, url: str) -> Iterator[None]:
    """The node-wide lock of one URL's manifest commits (its file removed after use)."""
    path = os.path.join(root, f".commit-{content_hash(url.encode())}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # unlinked by its last holder meanwhile: take the new one
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _at_url(store: Store, url: str, created: float) -> str | None:
    """``"superseded"`` if a later save's manifest is at ``url``, ``"uploaded"`` if this
    save's is (it committed before its process died), else ``None``."""
    try:
        raw, _version = store.read_versioned(url)  # the storage's own, never a cached copy
    except NotFoundError:
        return None
    if not is_manifest(raw):
        return None
    try:
        there = Manifest.loads(url, raw)
    except CheckpointError:
        return None
    if there.created > created:
        return "superseded"
    return "uploaded" if there.created == created else None


def _put_chunk(store: Store, staged: StagedDir, layout: Layout, chunk: Chunk) -> None:
    with open(staged.chunk(chunk.digest), "rb") as fh:
        data = fh.read()
    if len(data) != chunk.size or content_hash(data) != chunk.digest:
        raise IntegrityError(
            f"the staged chunk {staged.chunk(chunk.digest)} does not match its name (the "
            "node's disk changed it); this staged save cannot be uploaded",
            url=layout.chunk(chunk.digest),
            operation="flush",
        )
    store.write_bytes(layout.chunk(chunk.digest), data, dedupe=False)


def _commit(
    store: Store, staged: StagedDir, journal: Journal, workers: int, progress: _Progress
) -> tuple[str, int]:
    url, layout = journal.url, Layout(journal.chunks_root)
    early = _at_url(store, url, journal.created)
    if early is not None:
        progress.advance(journal.total_bytes)
        return early, 0
    remote_lock = lock_for_save(store, layout, LOCK_TIMEOUT)
    try:
        known = listed_chunks(store, layout)
        missing = [c for c in journal.chunks if c.digest not in known]
        sent = sum(c.size for c in missing)
        progress.advance(journal.total_bytes - sent)

        def put(chunk: Chunk) -> None:
            _put_chunk(store, staged, layout, chunk)
            progress.advance(chunk.size)

        _parallel(put, missing, workers)
        with open(staged.manifest, "rb") as fh:
            manifest = Manifest.loads(url, fh.read())
        manifest.stats.update(uploaded=sent, new_chunks=len(missing))
        with _commit_lock(staged.root, url):
            late = _at_url(store, url, journal.created)
            if late is not None:
                return late, sent
            # The same order as CheckpointWriter.commit: the ref, then the manifest.
            store.write_bytes(layout.ref(url), url.encode())
            store.write_bytes(url, manifest.dumps(url))
    finally:
        remote_lock.release()
    return "uploaded", sent


def upload(
    store: Store,
    staged: StagedDir,
    lock: JournalLock,
    report: FlushReport,
    *,
    workers: int = WORKERS,
    progress: _Progress | None = None,
) -> None:
    """Finish one staged save whose lock is held; the lock is released either way."""
    progress = progress or _Progress(None, 0)
    try:
        journal = staged.read_journal()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning(
            "mlstore: cannot read the staging journal %s (%s); left as is", staged.journal, exc
        )
        report.failed.append(staged.journal)
        lock.release()
        return
    journal.state, journal.attempts, journal.error = "uploading", journal.attempts + 1, ""
    try:
        staged.write_journal(journal)
        outcome, sent = _commit(store, staged, journal, workers, progress)
    except Exception as exc:  # noqa: BLE001 - any failure leaves the journal for a retry
        journal.state, journal.error = "failed", f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):
            staged.write_journal(journal)
        log.warning(
            "mlstore: the staged checkpoint %s did not upload (%s); it stays staged on "
            "this node and the next `mlstore flush` or staged save retries it",
            redact_url(journal.url),
            journal.error,
        )
        report.failed.append(journal.url)
        lock.release()
        return
    getattr(report, outcome).append(journal.url)
    report.bytes += sent
    staged.remove(lock)


def resume_orphans(
    store: Store,
    root: str,
    *,
    workers: int = WORKERS,
    progress: FlushProgress | None = None,
) -> FlushReport:
    """Finish every staged save on the node whose process is gone."""
    report = FlushReport()
    todo: list[tuple[StagedDir, JournalLock, int]] = []
    for save_id in staged_ids(root):
        staged = StagedDir(root, save_id)
        lock = JournalLock.take(staged.lock_path)
        if lock is None:  # a live save or upload (or one finished meanwhile)
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                report.busy.append(staged.read_journal().url)
            continue
        if not staged.is_whole():  # killed while staging: it never existed
            staged.remove(lock)
            report.discarded += 1
            continue
        try:
            size = staged.read_journal().total_bytes
        except (OSError, ValueError, KeyError, TypeError):
            size = 0
        todo.append((staged, lock, size))
    meter = _Progress(progress, sum(size for _s, _l, size in todo))
    for staged, lock, _size in todo:
        upload(store, staged, lock, report, workers=workers, progress=meter)
    return report


# ------------------------------------------------------------- the process's uploader


class Uploader:
    """This process's background uploads, in the order they were staged."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._guard = threading.Lock()
        self._pending: dict[str, str] = {}  # save id -> URL
        self._report = FlushReport()
        self._thread: threading.Thread | None = None

    def submit(
        self, store: Store, staged: StagedDir, lock: JournalLock, *, url: str, workers: int
    ) -> None:
        """Upload a staged save (its lock handed over), after resuming the node's orphans."""
        with self._guard:
            self._pending[staged.id] = url
            self._queue.put(("orphans", store, staged.root, workers))
            self._queue.put(("save", store, staged, lock, workers))
            self._start()

    def resume_later(self, store: Store, root: str, workers: int) -> None:
        with self._guard:
            self._queue.put(("orphans", store, root, workers))
            self._start()

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, name="mlstore-ckpt-uploader", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                report = FlushReport()
                if item[0] == "save":
                    _kind, store, staged, lock, workers = item
                    upload(store, staged, lock, report, workers=workers)
                    with self._guard:
                        self._pending.pop(staged.id, None)
                else:
                    _kind, store, root, workers = item
                    report = resume_orphans(store, root, workers=workers)
                    report.busy = []  # this process's own saves, mostly: not news
                with self._guard:
                    self._report.merge(report)
            except Exception:
                log.exception("mlstore: the checkpoint uploader failed")
            finally:
                self._queue.task_done()

    def pending(self) -> list[str]:
        """URLs of this process's staged saves not uploaded yet."""
        with self._guard:
            return list(self._pending.values())

    def join(self) -> FlushReport:
        """Wait for every upload queued so far; what they did since the last join."""
        self._queue.join()
        with self._guard:
            report, self._report = self._report, FlushReport()
        return report


_uploader: Uploader | None = None
_uploader_guard = threading.Lock()


def uploader() -> Uploader:
    """This process's uploader (started on first use; a forked child gets its own)."""
    global _uploader
    with _uploader_guard:
        if _uploader is None or _uploader.pid != os.getpid():
            _uploader = Uploader()
            _wait_before_pools_close()
        return _uploader


def _wait_before_pools_close() -> None:
    """Have exit wait for the uploads before ``concurrent.futures`` stops taking work.

    The SDKs under the Store (botocore's, for one) submit to executors, and those refuse
    new work from the moment the interpreter begins to exit, before any ``atexit``
    hook. Threading's own exit hooks run earlier, newest first: registered after
    ``concurrent.futures.thread``'s, ours runs before it. The ``atexit`` hook stays as
    the fallback where that (private) hook is missing.
    """
    import concurrent.futures.thread  # noqa: F401 - its exit hook must come first

    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        with contextlib.suppress(RuntimeError):  # already exiting
            register(_wait_at_exit)


def _forget_in_child() -> None:
    global _uploader, _uploader_guard
    _uploader, _uploader_guard = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


@atexit.register
def _wait_at_exit() -> None:
    """A normal exit waits for this process's staged uploads (interrupt to leave them
    to the next ``mlstore flush``)."""
    current = _uploader
    if current is None or current.pid != os.getpid():
        return
    pending = current.pending()
    if pending:
        log.warning(
            "mlstore: waiting for %d staged checkpoint upload(s) before exiting: %s",
            len(pending),
            ", ".join(redact_url(u) for u in pending),
        )
    current.join()


def flush(
    store: Store | None = None,
    *,
    wait: bool = True,
    progress: FlushProgress | None = None,
    workers: int = WORKERS,
) -> FlushReport:
    """Upload the staged checkpoints of this node.

    With ``wait`` (the default), waits for this process's own staged uploads, then
    finishes every staged save on the node whose process is gone (killed mid-upload,
    or exited while an upload was failing), and reports what happened. Without it,
    hands those to this process's background uploader and returns at once.

    Args:
        store: the Store to upload through (default: the default Store). Its cache
            settings locate the staging area; its options (endpoints, credentials)
            are used for the upload, since a journal records URLs only.
        progress: called with (bytes done, bytes to do) as orphans' chunks go up.
        workers: parallel chunk uploads.

    Raises:
        ConfigError: the Store has no disk cache, so nothing can be staged on it.
    """
    store = store or default_store()
    root = staging_root(store)
    current = _uploader if _uploader is not None and _uploader.pid == os.getpid() else None
    if not wait:
        mine = uploader()
        mine.resume_later(store, root, workers)
        return FlushReport(pending=mine.pending())
    report = current.join() if current is not None else FlushReport()
    report.merge(resume_orphans(store, root, workers=workers, progress=progress))
    return report
