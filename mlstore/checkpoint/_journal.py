"""The node's staging area for write-back saves, and the journal that makes it durable.

A staged save (``save(..., staging="local")``) is written to the node's disk first and
uploaded afterwards. Its files live below the disk cache's directory::

    <disk_dir>/staging/
        <id>.lock              held (flock) by whoever owns the save: its saver, then
                               its uploader; free once that process is gone
        <id>/chunks/<digest>   each chunk, fsync'd and renamed into place
        <id>/manifest          the manifest's bytes
        <id>/journal.json      written last, fsync'd and renamed into place: from here
                               on the save exists, whole; before it, it never did

Whether an owner is alive is the lock, not a clock: the kernel drops an flock when its
process dies, however it dies (SIGKILL, OOM), so a journal whose lock can be taken is an
orphan that any mlstore process on the node may finish. The lock is taken before the
save's directory exists and a lock file is unlinked only by a holder, after the
directory is gone; whoever takes a lock checks that the path still names the file it
locked. So a directory that is seen always has its lock, and two processes never both
believe they own one save.

``fcntl.flock`` directly rather than the ``filelock`` package: the disk cache already
locks this way (``mlstore.cache``), and the check that a lock file was not unlinked
between ``open`` and ``flock`` needs the descriptor, which ``filelock`` keeps private.
Neither works on NFS the way it does on a local disk; the cache dir is node-local.

The journal names URLs only (the checkpoint's and its chunk store's): no Store options,
no credentials; a URL that carries credentials is refused before anything is written.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from mlstore._util.redact import redact_url
from mlstore.checkpoint._format import Chunk
from mlstore.errors import ConfigError
from mlstore.store import Store

__all__ = ["Journal", "JournalLock", "StagedDir", "staged_ids", "staging_root", "write_durably"]

#: The staging area's directory below the disk cache's.
STAGING_DIR = "staging"
JOURNAL_VERSION = 1


def staging_root(store: Store, *, url: str | None = None, create: bool = False) -> str:
    """The staging area of ``store``'s node cache (a :class:`ConfigError` naming the
    setting when the store has no disk tier to stage on)."""
    cache = store.config.cache
    if not cache.enabled:
        raise ConfigError(
            "write-back staging keeps checkpoints in the node's disk cache, but the cache "
            "is off (cache.enabled / MLSTORE_CACHE=0): turn it on, or save without staging",
            url=url,
            operation="save",
        )
    if cache.disk_bytes == 0:
        raise ConfigError(
            "write-back staging keeps checkpoints in the node's disk cache, but the disk "
            "tier is off (cache.disk_bytes / MLSTORE_DISK_BYTES=0): give it a budget, or "
            "save without staging",
            url=url,
            operation="save",
        )
    root = os.path.join(cache.resolved_disk_dir, STAGING_DIR)
    if create and not os.path.isdir(root):
        # The cache claims (and checks) its directory first: it adopts no directory
        # that holds files it did not make, and it makes it private (0700).
        _ = store.cache
        try:
            os.makedirs(root, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the staging area {root!r} ({exc.strerror}); set "
                "cache.disk_dir (MLSTORE_CACHE_DIR) to a writable local directory",
                url=url,
                operation="save",
            ) from None
    return root


def refuse_credentials(url: str) -> None:
    """Journals are plain files on the node's disk: a URL with credentials in it
    (user info, a signature) would put them there."""
    if redact_url(url) != url:
        raise ConfigError(
            "cannot stage a checkpoint whose URL carries credentials (they would be "
            "written to the node's disk); give them in the Store's options instead",
            url=redact_url(url),
            operation="save",
        )


def write_durably(path: str, data: bytes | memoryview) -> None:
    """Write ``path`` whole or not at all: a private temp file, fsync'd, renamed over."""
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def fsync_dir(path: str) -> None:
    """Make the renames into ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- locks

_held: set[JournalLock] = set()
_held_guard = threading.Lock()


class JournalLock:
    """An exclusive flock on a staged save's lock file, held by this process."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        with _held_guard:
            _held.add(self)

    @classmethod
    def create(cls, path: str) -> JournalLock:
        """A new lock file, locked (before the save's directory exists)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fresh: nobody else can hold it
        return cls(path, fd)

    @classmethod
    def take(cls, path: str, *, wait: bool = False) -> JournalLock | None:
        """The lock at ``path`` if its owner is gone (``None`` if it is held, or gone)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            mine, now = os.fstat(fd), os.stat(path)
            if (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino):
                return cls(path, fd)
        except OSError as exc:  # held (EWOULDBLOCK), or unlinked by its finisher
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.ENOENT):
                os.close(fd)
                raise
        os.close(fd)
        return None

    def release(self, *, unlink: bool = False) -> None:
        """Let go; with ``unlink``, remove the lock file first (its save is gone)."""
        with _held_guard:
            _held.discard(self)
        if self.fd < 0:
            return
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self.fd)
        self.fd = -1


def _forget_in_child() -> None:
    # A forked child (a DataLoader worker) shares its parent's open lock files; closing
    # its copies leaves the parent's locks as they were, and lets the locks lapse when
    # the parent dies, not when its last child does.
    for lock in list(_held):
        try:
            os.close(lock.fd)
        except OSError:
            pass
        lock.fd = -1
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


# -------------------------------------------------------------------------- journals


@dataclass
class Journal:
    """A staged save's record: what to upload, where, and how the upload went.

    Attributes:
        id: the save's directory name below the staging area.
        url: the checkpoint's manifest URL.
        chunks_root: the chunk store's root URL.
        chunks: every distinct chunk the manifest names, staged below ``chunks/``.
        created: when the save began (the manifest's ``created``: the later of two
            saves to one URL wins).
        state: ``"staged"``, ``"uploading"`` or ``"failed"``.
        attempts: uploads begun; ``error`` says why the last one failed.
    """

    id: str
    url: str
    chunks_root: str
    chunks: list[Chunk]
    created: float
    state: str = "staged"
    attempts: int = 0
    error: str = ""
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    @property
    def total_bytes(self) -> int:
        return sum(c.size for c in self.chunks)

    def dumps(self) -> bytes:
        body: dict[str, Any] = {
            "version": JOURNAL_VERSION,
            "id": self.id,
            "url": self.url,
            "chunks_root": self.chunks_root,
            "chunks": [c.as_list() for c in self.chunks],
            "created": self.created,
            "state": self.state,
            "attempts": self.attempts,
            "error": self.error,
            "host": self.host,
            "pid": self.pid,
        }
        return json.dumps(body, indent=1).encode()

    @classmethod
    def loads(cls, raw: bytes) -> Journal:
        body = json.loads(raw)
        return cls(
            id=str(body["id"]),
            url=str(body["url"]),
            chunks_root=str(body["chunks_root"]),
            chunks=[Chunk(str(d), int(n)) for d, n in body["chunks"]],
            created=float(body["created"]),
            state=str(body.get("state", "staged")),
            attempts=int(body.get("attempts", 0)),
            error=str(body.get("error", "")),
            host=str(body.get("host", "")),
            pid=int(body.get("pid", 0)),
        )


class StagedDir:
    """The files of one staged save."""

    def __init__(self, root: str, save_id: str) -> None:
        self.root = root
        self.id = save_id
        self.path = os.path.join(root, save_id)
        self.lock_path = self.path + ".lock"
        self.chunks = os.path.join(self.path, "chunks")
        self.manifest = os.path.join(self.path, "manifest")
        self.journal = os.path.join(self.path, "journal.json")

    @classmethod
    def new(cls, root: str) -> tuple[StagedDir, JournalLock]:
        """A fresh save's directory, its lock held (taken before the directory exists)."""
        save_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        staged = cls(root, save_id)
        lock = JournalLock.create(staged.lock_path)
        try:
            os.mkdir(staged.path, 0o700)
            os.mkdir(staged.chunks, 0o700)
        except BaseException:
            lock.release(unlink=True)
            raise
        return staged, lock

    def chunk(self, digest: str) -> str:
        return os.path.join(self.chunks, digest)

    def is_whole(self) -> bool:
        return os.path.exists(self.journal)

    def read_journal(self) -> Journal:
        with open(self.journal, "rb") as fh:
            return Journal.loads(fh.read())

    def write_journal(self, journal: Journal) -> None:
        write_durably(self.journal, journal.dumps())
        fsync_dir(self.path)

    def remove(self, lock: JournalLock) -> None:
        """Delete the save's files, then its lock file (held: see the module docstring)."""
        shutil.rmtree(self.path, ignore_errors=True)
        lock.release(unlink=True)


def staged_ids(root: str) -> list[str]:
    """The saves in the staging area (whole or not), oldest first."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if not n.startswith(".") and "." not in n)
