"""Savers and collectors of one chunk store, kept apart by lock objects on the store.

A save may skip uploading a chunk because it is listed; a collector deletes chunks no
manifest names. Run at once, the collector could delete a chunk the save has counted
on before its manifest names it. So each announces itself with a small object below
``locks/`` before it looks, in the manner of restic's repository locks:

- a **saver** writes ``locks/save-<id>``, then lists ``locks/``; while a live collector
  is listed, it waits for it to finish (collections are short) and then proceeds.
- a **collector** writes ``locks/gc-<id>``, then lists ``locks/``; if a live saver is
  listed, it removes its own lock and backs off: saves come first.

Each writes before it lists, and object stores list what was written before (S3, GCS
and Azure are strongly consistent), so of two that overlap at least one sees the
other: a collector deletes nothing while a save that started before its listing is
live, and a save that started after it waits. Savers never wait on savers.

A lock is *live* while its holder keeps rewriting it (every :data:`REFRESH` seconds);
one not rewritten for :data:`LAPSE` seconds belongs to a killed process and is
ignored, as is one taken on this host by a process that no longer exists (a lock
records its host and PID; a reused PID only keeps a lock alive longer, which is safe).
Ages are measured on the storage's own clock (the listed modification times against
that of the lock just written), so the clocks of the nodes do not matter.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from mlstore.checkpoint._format import Layout
from mlstore.errors import CheckpointBusyError, NotFoundError
from mlstore.store import Store

__all__ = ["LAPSE", "REFRESH", "Lock"]

#: Seconds between rewrites of a held lock.
REFRESH = 20.0
#: Seconds after its last rewrite that a lock counts as its holder's death.
LAPSE = 120.0


class Lock:
    """A held lock (``kind`` ``"save"`` or ``"gc"``); a context manager that releases it."""

    def __init__(self, store: Store, layout: Layout, kind: str) -> None:
        self.store = store
        self.layout = layout
        self.kind = kind
        self.url = f"{layout.locks}{kind}-{uuid.uuid4().hex}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        body = {"kind": self.kind, "host": socket.gethostname(), "pid": os.getpid()}
        self.store.write_bytes(self.url, json.dumps(body).encode())

    def others(self, kind: str) -> list[str]:
        """The live locks of ``kind`` other than this one."""
        try:
            mine = self.store.info(self.url).mtime
        except NotFoundError:
            mine = None
        found = []
        try:
            listed = self.store.ls(self.layout.locks, detail=True, refresh=True)
        except NotFoundError:
            listed = []
        for info in listed:
            name = str(info.url).rsplit("/", 1)[-1]
            if str(info.url) == self.url or not name.startswith(kind + "-"):
                continue
            if mine is not None and info.mtime is not None and mine - info.mtime > LAPSE:
                continue  # its holder stopped rewriting it long ago: dead
            if self._holder_died(str(info.url)):
                continue
            found.append(str(info.url))
        return found

    def _holder_died(self, url: str) -> bool:
        """Whether the lock at ``url`` was taken on this host by a process that is
        gone (a SIGKILLed save need not block collection until its lock lapses)."""
        try:
            body = json.loads(self.store.read_bytes(url))
        except NotFoundError:
            return True  # released while we looked
        except ValueError:
            return False
        if body.get("host") != socket.gethostname() or not isinstance(body.get("pid"), int):
            return False  # another node: only the lapse tells
        try:
            os.kill(body["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, another user's
        return False

    def acquire(self) -> None:
        self._write()
        self._thread = threading.Thread(
            target=self._keep, name="mlstore-checkpoint-lock", daemon=True
        )
        self._thread.start()

    def _keep(self) -> None:
        while not self._stop.wait(REFRESH):
            try:
                self._write()
            except Exception:  # noqa: BLE001 - the next rewrite may succeed; a lapse is safe
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.store.rm(self.url)
        except NotFoundError:
            pass

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_for_save(store: Store, layout: Layout, timeout: float) -> Lock:
    """Announce a save; returns once no live collector is at work (a
    :class:`~mlstore.errors.CheckpointBusyError` after ``timeout`` seconds)."""
    lock = Lock(store, layout, "save")
    lock.acquire()
    deadline = time.monotonic() + timeout
    pause = 0.05
    while lock.others("gc"):
        if time.monotonic() > deadline:
            lock.release()
            raise CheckpointBusyError(
                f"a chunk collector held the checkpoint store for over {timeout:g} s",
                url=layout.root,
                operation="save",
            )
        time.sleep(pause)
        pause = min(pause * 2, 1.0)
    return lock


def lock_for_collect(store: Store, layout: Layout) -> Lock | None:
    """Announce a collection; ``None`` (and no lock left) if a live save runs."""
    lock = Lock(store, layout, "gc")
    lock.acquire()
    if lock.others("save"):
        lock.release()
        return None
    return lock
