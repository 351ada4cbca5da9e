"""The layout of a cache directory, and the rule that mlstore deletes only what it made.

A cache directory is marked (:data:`MARKER`) before anything else is put in it;
mlstore adopts an unmarked directory only when it is empty or holds nothing but mlstore's
own names. It is private (0700, owned by the user, never a symbolic link), and so is
every file in it. A filler's temporary file carries a name mlstore recognises and is
``flock``-ed by the filler for the fill's life: cleanup deletes one only when it can take
that lock, so a filler in another PID namespace (another container sharing the
directory) is never mistaken for a dead one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import logging
import os
import re
import stat

from mlstore.errors import ConfigError

log = logging.getLogger("mlstore.cache")

#: The file that marks a directory as an mlstore cache (see :func:`claim_cache_dir`).
MARKER = ".mlstore-cache"
_MARKER_TEXT = b"mlstore cache directory: mlstore deletes only files it made here\n"
#: What an mlstore of any version puts at the top of its cache directory.
_OWN_NAMES = frozenset(
    {"index.sqlite", "index.sqlite-wal", "index.sqlite-shm", "index.sqlite-journal"}
    | {"index.key", "blobs", "tmp", "locks", "meta", MARKER}
)
_TEMP_SUFFIX = ".mlstore-tmp"
#: A temp file of a filler: ``<pid>-<random>.mlstore-tmp`` (an older mlstore left the
#: suffix out, and such files are still its own inside a marked directory).
_TEMP_NAME = re.compile(r"(\d+)-[0-9a-f]+(?:\.mlstore-tmp)?")
_BLOB_NAME = re.compile(r"[0-9a-f]{32}")


def check_private_dir(path: str) -> None:
    """Create ``path`` 0700 if missing; refuse one that another user owns or that
    others may write to (a shared cache dir would let them plant data), or that is a
    symbolic link (what mlstore would delete there is not the directory it was named)."""
    if os.path.islink(path):
        raise ConfigError(
            f"the cache directory {path!r} is a symbolic link (to "
            f"{os.path.realpath(path)!r}); mlstore does not follow links in a directory it "
            "deletes files from. Name the target itself in CacheConfig(disk_dir=...) or "
            "MLSTORE_CACHE_DIR"
        )
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the cache directory {path!r} ({exc.strerror}); set "
            "CacheConfig(disk_dir=...) or MLSTORE_CACHE_DIR to a writable place"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"the cache directory {path!r} is not a directory")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise ConfigError(
            f"the cache directory {path!r} belongs to another user (uid {st.st_uid}); "
            "mlstore refuses to read a cache others control. Use a directory of your own "
            "(CacheConfig(disk_dir=...) or MLSTORE_CACHE_DIR)"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"the cache directory {path!r} is writable by other users (mode "
            f"{stat.S_IMODE(st.st_mode):o}); run 'chmod 700 {path}' or choose another "
            "directory"
        )
    if st.st_mode & 0o077:
        # Others may read it but never could write to it: nothing can have been planted,
        # so tightening it is safe, and refusing would only break every existing setup
        # whose directory came from a plain mkdir.
        _make_private(path, st, 0o700)
        log.info(
            "made the cache directory %s private (mode %o -> 700)", path, stat.S_IMODE(st.st_mode)
        )


def claim_cache_dir(path: str) -> None:
    """Check ``path`` as :func:`check_private_dir` does, then make sure it is mlstore's.

    mlstore deletes files in its cache directory (dead fillers' temp files, unindexed
    blobs), so it must never take a directory that holds someone else's files for its
    own: ``disk_dir=/scratch/$USER`` would lose the user's ``tmp/``. A directory is
    mlstore's if it holds the marker file; an empty one is claimed by writing the
    marker before anything else; one that holds only names an older mlstore used (with
    its index or its lock stripes) is adopted. Anything else is refused.

    Raises:
        ConfigError: the directory is not private, or holds files that are not mlstore's.
    """
    check_private_dir(path)
    marker = os.path.join(path, MARKER)
    if os.path.isfile(marker) and not os.path.islink(marker):
        return
    names = set(os.listdir(path))
    legacy = names <= _OWN_NAMES and ("index.sqlite" in names or "locks" in names)
    if names - {MARKER} and not legacy:
        shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
        raise ConfigError(
            f"the cache directory {path!r} is not empty ({shown}) and was not made by "
            f"mlstore (it has no {MARKER} file); mlstore deletes files in its cache "
            "directory, so it will not adopt one that may hold yours. Use an empty or new "
            "directory (CacheConfig(disk_dir=...) or MLSTORE_CACHE_DIR), e.g. a "
            "subdirectory of this one"
        )
    with contextlib.suppress(FileExistsError):
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, _MARKER_TEXT)
        finally:
            os.close(fd)


def _private_subdir(path: str) -> None:
    """Create the cache's subdirectory ``path`` 0700, refusing a link or a non-directory
    there (the cache would delete files wherever it points)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(
            f"{path!r} in the cache directory is not a directory (a symbolic link?); "
            "mlstore follows no links inside its cache. Remove it or choose another directory"
        )
    _make_private(path, st, 0o700)


def _create_temp(tmp_dir: str, tag: int | None = None) -> tuple[int, str]:
    """A new temp file in ``tmp_dir``, open for writing and ``flock``-ed for as long as
    the returned descriptor stays open: the lock, not the pid in the name, is what tells
    a cleaner the filler lives (a pid means nothing in another PID namespace).

    A cleaner unlinks a temp file only while holding its lock, so one that took the lock
    between our create and our flock has unlinked it by the time we get the lock: we
    check the link count and start over with a new name. ``tag`` replaces the pid in
    the name (for tests that play a filler from another PID namespace).
    """
    pid = os.getpid() if tag is None else tag
    for _ in range(8):
        path = os.path.join(tmp_dir, f"{pid}-{os.urandom(6).hex()}{_TEMP_SUFFIX}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink > 0:
                return fd, path
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise OSError(errno.EAGAIN, "temp files in the cache keep being removed", tmp_dir)


def _remove_if_unheld(path: str) -> bool:
    """Delete the temp file ``path`` if no process holds its lock; True if deleted."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False  # gone already, or a link: not ours to touch
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its filler lives (in whatever PID namespace)
        st = os.fstat(fd)
        try:
            same = os.lstat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or (same.st_dev, same.st_ino) != (st.st_dev, st.st_ino):
            return False  # renamed into blobs/ and replaced meanwhile: not the file we hold
        os.unlink(path)
        return True
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a live process in this PID namespace."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # someone else's, but alive
    return True


def _make_private(path: str, st: os.stat_result, mode: int) -> None:
    """``chmod`` ``path`` (of stat ``st``) to ``mode`` if others have any access to it."""
    if not st.st_mode & 0o077:
        return
    try:
        os.chmod(path, mode)
    except OSError as exc:
        raise ConfigError(
            f"{path!r} in the cache directory is open to other users (mode "
            f"{stat.S_IMODE(st.st_mode):o}) and cannot be made private ({exc.strerror}); "
            f"run 'chmod -R go= {path}' or choose another directory"
        ) from None


def _private_file(path: str) -> None:
    """Create ``path`` 0600 if missing, or make an existing one 0600 (a cache written by
    an older mlstore, or under a lax umask, may have left it readable).

    An existing file is never opened: closing any descriptor of a SQLite database drops
    every POSIX lock this process holds on it, its connections' included. Without its
    shared lock, another process closing its last connection believes itself the last
    user, checkpoints and deletes the write-ahead log in use here ("disk I/O error").
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:  # made meanwhile by another process
            st = os.stat(path)
        else:
            os.close(fd)  # new: nobody holds a lock on it yet
            return
    if st.st_mode & 0o077:
        os.chmod(path, 0o600)


#: Largest blob read with a single ``read()``. Linux returns at most 0x7ffff000 bytes
#: from one call (and macOS refuses more than 2 GiB), so a larger blob takes several.
_ONE_READ = 1 << 30


def _read_whole(fd: int, size: int) -> bytes:
    """The contents of ``fd`` from its start, expected to be ``size`` bytes.

    A blob that fits is one ``read`` of ``size + 1`` bytes (the extra byte shows a file
    that grew), the hot path. A larger one is read to its end in as many calls as it
    takes: a single call would stop at the kernel's cap, the blob would look truncated
    and be dropped and fetched again on every read. ``FileIO.readall`` sizes one buffer
    from the file's length and loops, so the bytes are not copied a second time.
    """
    if size < _ONE_READ:
        return os.read(fd, size + 1)
    with io.FileIO(fd, "r", closefd=False) as fh:
        return fh.readall()


def live_fillers(root: str) -> int | None:
    """How many fills are in progress in the cache directory ``root``, by any process
    on the node (in any PID namespace): temp files in ``root/tmp`` whose lock is held.
    ``None`` when there is no such directory. Takes each lock shared and for an instant
    only, so it never stalls a filler or a cleaner for longer than a syscall."""
    tmp_dir = os.path.join(root, "tmp")
    try:
        names = [n for n in os.listdir(tmp_dir) if n.endswith(_TEMP_SUFFIX)]
    except OSError:
        return None
    live = 0
    for name in names:
        try:
            fd = os.open(os.path.join(tmp_dir, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # finished meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            live += 1
        finally:
            os.close(fd)  # closing drops the lock, if taken
    return live
