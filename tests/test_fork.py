"""Forking a process that already used mlstore, as a PyTorch DataLoader does with its
workers: the child reads at once with no traceback, and the parent carries on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from mlstore import Store
from mlstore.cache.disk import DiskTier
from mlstore.hashing import content_hash
from tests.emulators import ServerProcess

MiB = 1 << 20
# Forking with threads running is the point here (Python 3.12+ warns about it).
_FORK_WITH_THREADS = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)

# Run in the forking thread just before a fork (and before mlstore's own preparation:
# ``before`` hooks run in reverse order of registration), so a test can make a parent
# thread move on exactly when the fork starts. Registered once: hooks stay for good.
_before_fork: list[Callable[[], None]] = []


def _run_before_fork() -> None:
    while _before_fork:
        _before_fork.pop()()


os.register_at_fork(before=_run_before_fork)


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _in_child(body: Callable[[], bool]) -> None:
    """Run ``body`` in a forked child and leave with its verdict; SIGALRM kills a child
    that hangs (a generous guard: a healthy child needs a fraction of a second)."""
    code = 1
    try:
        signal.alarm(60)
        code = 0 if body() else 2
    finally:
        os._exit(code)


# ------------------------------------------------------------------ the disk tier's index


@_FORK_WITH_THREADS
def test_a_child_forked_while_a_parent_thread_writes_the_index_uses_it_at_once(
    tmp_path: Path,
) -> None:
    """A parent thread is inside an index transaction when the fork starts. The child
    must not inherit it half done: its own first write would wait on a lock no thread
    of it will ever release (60 s, then ``database is locked``)."""
    tier = DiskTier(str(tmp_path / "cache"), MiB)
    tier.put("s3://b/parent", None, b"from the parent")
    inside, release = threading.Event(), threading.Event()

    def write() -> None:
        with tier._transaction() as db:
            db.execute("UPDATE meta SET value = value WHERE name = 'bytes'")
            inside.set()
            release.wait()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        inside.wait()
        _before_fork.append(release.set)  # the writer goes on while the fork starts
        pid = os.fork()
        if pid == 0:

            def child() -> bool:
                entry = tier.lookup("s3://b/parent")
                seen = entry is not None and tier.read_blob(entry.hash, entry.size)
                tier.put("s3://b/child", None, b"from the child")
                return seen == b"from the parent"

            _in_child(child)
    finally:
        release.set()
        writer.join(timeout=120)
    assert _exit_code(pid) == 0
    entry = tier.lookup("s3://b/child")
    assert entry is not None and tier.read_blob(entry.hash, entry.size) == b"from the child"
    tier.put("s3://b/after", None, b"the parent writes on")
    assert tier.lookup("s3://b/after") is not None
    tier.close()


@pytest.mark.s3
@_FORK_WITH_THREADS
def test_children_forked_while_threads_fill_the_cache_read_at_once(
    s3_options: dict[str, object], s3_bucket: str, tmp_path: Path
) -> None:
    """Many forks while parent threads write, fill and read through the disk tier (a
    DataLoader forking while readahead or ``read_many`` runs): every child reads the
    right bytes through the same Store, and the parent's threads carry on."""
    store = Store(
        options={"s3": s3_options},
        cache={"disk_dir": str(tmp_path / "cache"), "memory_bytes": 0},
    )
    shared = {f"s3://{s3_bucket}/shared/{i:02d}": os.urandom(2048 + i) for i in range(16)}
    for url, data in shared.items():
        store.write_bytes(url, data)
    stop = threading.Event()
    failures: list[BaseException] = []

    def churn(worker: int) -> None:
        try:
            n = 0
            while not stop.is_set():
                url = f"s3://{s3_bucket}/churn/{worker}-{n % 4}"
                data = os.urandom(1024)
                store.write_bytes(url, data)  # forgets the cached copy (an index write)
                assert store.read_bytes(url) == data  # fills it again
                assert store.read_many(list(shared)) == list(shared.values())
                n += 1
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=churn, args=(w,)) for w in range(3)]
    for thread in threads:
        thread.start()
    try:
        for fork in range(10):
            pid = os.fork()
            if pid == 0:

                def child(fork: int = fork) -> bool:
                    mine = f"s3://{s3_bucket}/child/{fork}"
                    store.write_bytes(mine, b"child %d" % fork)
                    ok = store.read_bytes(mine) == b"child %d" % fork
                    return ok and store.read_many(list(shared)) == list(shared.values())

                _in_child(child)
            assert _exit_code(pid) == 0, f"child {fork} failed"
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not failures
    assert store.read_many(list(shared)) == list(shared.values())
    store.close()


# ------------------------------------------------------------------ clients inherited by workers

_DATALOADER = """
import sys

import torch.utils.data

import mlstore
from mlstore.hashing import content_hash
from tests.emulators import ServerProcess

endpoint, bucket, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = mlstore.Store(options={"s3": {"endpoint_url": endpoint}})
urls = [f"s3://{bucket}/sample-{i}" for i in range(count)]
# The parent uses its clients before the workers are forked: a read, an info, an open.
store.read_bytes(urls[0])
store.info(urls[1])
with store.open(urls[2]) as f:
    f.read()


class Samples(torch.utils.data.Dataset):
    def __len__(self):
        return len(urls)

    def __getitem__(self, i):
        return content_hash(store.read_bytes(urls[i]))


loader = torch.utils.data.DataLoader(
    Samples(), batch_size=2, num_workers=2, multiprocessing_context="fork"
)
print(" ".join(h for batch in loader for h in batch))
"""


@pytest.mark.s3
@pytest.mark.torch
def test_dataloader_workers_forked_after_the_parent_read_s3_print_nothing(
    s3_options: dict[str, object], s3_bucket: str, s3_proxy: ServerProcess, tmp_path: Path
) -> None:
    """Workers forked from a parent that already used its S3 clients let go of them
    silently: no asyncio traceback about a different loop on stderr, right data.

    Through the suite's proxy, which keeps connections alive as a real object store
    does (moto_server closes each one): the workers inherit a pool of open connections,
    which is what the parent's client cleanup trips over in a child."""
    pytest.importorskip("torch")
    samples = [os.urandom(4096 + i) for i in range(8)]
    with Store(options={"s3": s3_options}, cache={"enabled": False}) as writer:
        for i, data in enumerate(samples):
            writer.write_bytes(f"s3://{s3_bucket}/sample-{i}", data)
    script = tmp_path / "dataloader.py"
    script.write_text(textwrap.dedent(_DATALOADER))
    endpoint = s3_proxy.endpoint
    run = subprocess.run(
        [sys.executable, str(script), endpoint, s3_bucket, str(len(samples))],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [content_hash(d) for d in samples]
    for sign in ("Traceback", "attached to a different loop", "Exception ignored"):
        assert sign not in run.stderr, run.stderr
