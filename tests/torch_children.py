"""What DataLoader workers and spawned ranks import by name, for the torch tests
(``test_torch_workers``, ``test_torch_training``, ``test_torch_distributed``).

A worker started with ``spawn`` or ``forkserver`` unpickles the dataset, so its class
must be importable in a fresh interpreter; a class defined in a test module is not
(pytest imports those with ``--import-mode=importlib``). So the dataset, the decoders
and the programs run as child processes live here, and the children get the repository
root on ``PYTHONPATH`` (:func:`child_env`).

The programs (:func:`loader_run`, :func:`distributed_run`) are started with
``python -c "from tests.torch_children import main; main()" <program> <json>`` by
:func:`run_program`, which returns the JSON they print last. ``-c`` rather than a
script file: a ``spawn`` child then has no main module to re-run, only this one to
import.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

try:
    import torch
    import torch.utils.data
except ModuleNotFoundError:  # pytest imports this module (for doctests) without torch
    import pytest

    pytest.skip("needs PyTorch", allow_module_level=True)

from mlstore import Manifest, Store
from mlstore.hashing import content_hash
from mlstore.torch import MapDataset, PrefetchSampler

ROOT = Path(__file__).resolve().parent.parent
FEATURES = 8
SHUFFLE_SEED = 11  # the DistributedSampler seed of the ranks
#: A training sample: FEATURES float32 inputs, one float32 target, then padding.
_SAMPLE = struct.Struct(f"<{FEATURES + 1}f")


# ------------------------------------------------------------------ objects


def put(endpoint: str, blobs: Mapping[str, bytes]) -> None:
    """Write ``blobs`` (URL to bytes) to the S3 store at ``endpoint``, uncached, eight
    at a time."""
    with (
        Store(options={"s3": {"endpoint_url": endpoint}}, cache={"enabled": False}) as s,
        ThreadPoolExecutor(8) as pool,
    ):
        list(pool.map(lambda url: s.write_bytes(url, blobs[url]), blobs))


def remove(endpoint: str, prefix: str) -> None:
    """Delete everything below ``prefix`` (in bulk)."""
    with Store(options={"s3": {"endpoint_url": endpoint}}, cache={"enabled": False}) as s:
        s.rm(prefix, recursive=True)


# ------------------------------------------------------------------ datasets


class Recorded(MapDataset):
    """A MapDataset whose samples say where they came from: each is
    ``(index, value, pid, requests, retries)``, the last two being the reading
    process's Store counters at that point (so a test can count what workers asked of
    the storage, which the parent's ``store.stats()`` never sees)."""

    def __getitem__(self, i: int) -> tuple[int, Any, int, int, int]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[int, Any, int, int, int]]:
        values = super().__getitems__(indices)
        stats = self._store().stats()
        pid, requests, retries = os.getpid(), stats["requests"], stats["retries"]
        return [(int(i), v, pid, requests, retries) for i, v in zip(indices, values, strict=True)]


def keep(batch: list[Any]) -> list[Any]:
    """A collate function that leaves a batch as the list of its samples."""
    return batch


def training_sample(features: Sequence[float], target: float, size: int) -> bytes:
    """The bytes of one training sample, padded to ``size``."""
    head = _SAMPLE.pack(*features, target)
    return head + os.urandom(max(0, size - len(head)))


def decode(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """A training sample's features and target (see :func:`training_sample`)."""
    values = torch.tensor(_SAMPLE.unpack_from(data), dtype=torch.float32)
    return values[:FEATURES], values[FEATURES:]


# ------------------------------------------------------------------ busy parent threads


class Busy:
    """Threads reading other objects through ``store`` in a loop, checking each read
    against its hash, for a parent that forks its workers in the middle of them.

    :meth:`hold_forks` makes every ``os.fork`` of this process wait until each thread
    is inside a ``read_bytes`` call, and records how many were, so a fork with all of
    them mid-read is what happens rather than what may happen.
    """

    def __init__(self, store: Store, expected: dict[str, str], threads: int) -> None:
        self.store = store
        self.expected = expected
        self.stop = threading.Event()
        self.cond = threading.Condition()
        self.inside = 0
        self.reads = 0
        self.errors: list[str] = []
        self.forks: list[int] = []  # threads inside a read at each fork
        self.threads = [
            threading.Thread(target=self._loop, args=(n,), daemon=True) for n in range(threads)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _loop(self, n: int) -> None:
        urls = sorted(self.expected)
        k = n
        while not self.stop.is_set():
            url = urls[k % len(urls)]
            k += 1
            with self.cond:
                self.inside += 1
                self.cond.notify_all()
            try:
                data = self.store.read_bytes(url)
                if content_hash(data) != self.expected[url]:
                    self.errors.append(f"corrupt read of {url}")
            except Exception as exc:
                self.errors.append(f"{url}: {exc!r}")
            finally:
                with self.cond:
                    self.inside -= 1
                    self.reads += 1
                    self.cond.notify_all()

    def _before_fork(self) -> None:
        with self.cond:
            if self.stop.is_set():
                return  # (a hook stays registered for good: a finished Busy lets forks be)
            self.cond.wait_for(lambda: self.inside == len(self.threads), timeout=60)
            self.forks.append(self.inside)

    def hold_forks(self) -> None:
        os.register_at_fork(before=self._before_fork)

    def finish(self) -> dict[str, Any]:
        self.stop.set()
        deadline = time.monotonic() + 30  # a read takes 0.5 s; one that hangs is reported
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        alive = sum(t.is_alive() for t in self.threads)
        return {"reads": self.reads, "errors": self.errors, "forks": self.forks, "alive": alive}


# ------------------------------------------------------------------ programs


def loader_run(cfg: dict[str, Any]) -> dict[str, Any]:
    """For each ``[method, workers]`` of ``cfg["methods"]`` in turn, a parent with
    DataLoader workers of that start method (see :func:`_start_method`); each method's
    result, or the error that ended it."""
    if any(method == "forkserver" for method, _ in cfg["methods"]):
        # The server imports these once, and each worker forks from it; started now,
        # it imports them while the other methods run.
        torch.multiprocessing.set_forkserver_preload(["tests.torch_children", "s3fs"])
        forkserver.ensure_running()
    results: dict[str, Any] = {}
    for method, workers in cfg["methods"]:
        try:
            results[method] = _start_method(cfg, method, workers)
        except Exception:
            results[method] = {"error": traceback.format_exc()}
    return {"parent": os.getpid(), "methods": results}


def _start_method(cfg: dict[str, Any], method: str, workers: int) -> dict[str, Any]:
    """A Store and a MapDataset made here; threads reading other objects through that
    Store while the workers start; a run with persistent workers and PrefetchSampler
    (two epochs), then one without."""
    store = Store(
        options={"s3": {"endpoint_url": cfg["endpoint"]}},
        # Each read of a busy object asks the store (a HEAD), so those threads keep
        # clients, connections and the cache index in use.
        cache={"policies": {cfg["busy_prefix"]: {"validate": "always"}}},
    )
    dataset = Recorded(cfg["prefix"], transform=content_hash, store=store)  # listed here, once
    busy = Busy(store, cfg["busy"], threads=3)
    busy.start()
    busy.hold_forks()
    try:
        runs = [
            _loader_epochs(dataset, method, workers, persistent) for persistent in (True, False)
        ]
    finally:
        threads = busy.finish()
    store.close()
    return {"runs": runs, "busy": threads}


def _loader_epochs(
    dataset: Recorded, method: str, workers: int, persistent: bool
) -> dict[str, Any]:
    started = time.monotonic()
    dataset._store().cache.clear()  # each run starts cold: its workers and warms fetch
    plain = torch.utils.data.RandomSampler(
        dataset, generator=torch.Generator().manual_seed(int(persistent))
    )
    sampler = PrefetchSampler(plain, dataset, lookahead=8, concurrency=4) if persistent else plain
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=4,
        sampler=sampler,
        num_workers=workers,
        multiprocessing_context=method,
        persistent_workers=persistent,
        collate_fn=keep,
        timeout=60,
    )
    epochs = []
    for _ in range(2 if persistent else 1):
        epochs.append([(i, h, pid) for batch in loader for i, h, pid, *_ in batch])
    run: dict[str, Any] = {"persistent": persistent, "epochs": epochs}
    run["seconds"] = round(time.monotonic() - started, 2)  # for a reader, not asserted
    if isinstance(sampler, PrefetchSampler):
        sampler.settle(timeout=60)
        run["prefetch"] = dict(sampler.counts)
    return run


def _rank(rank: int, cfg: dict[str, Any], manifest: Manifest, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    try:
        # A cache of its own, as on a node of its own: the storage then sees every
        # object each rank needed, and nothing it did not.
        store = Store(
            options={"s3": {"endpoint_url": cfg["endpoint"]}},
            cache={"disk_dir": os.path.join(cfg["cache_root"], f"rank{rank}")},
        )
        dataset = Recorded(manifest, transform=content_hash, store=store)
        shard = torch.utils.data.DistributedSampler(
            dataset, num_replicas=2, rank=rank, shuffle=True, seed=SHUFFLE_SEED
        )
        sampler = PrefetchSampler(shard, dataset, lookahead=8, concurrency=4)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=4,
            sampler=sampler,
            num_workers=2,
            multiprocessing_context="fork",
            persistent_workers=True,
            collate_fn=keep,
            timeout=60,
        )
        epochs = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            epochs.append([(i, h) for batch in loader for i, h, *_ in batch])
        sampler.settle(timeout=60)
        gathered: list[Any] = [None, None]
        dist.all_gather_object(gathered, {"rank": rank, "epochs": epochs})
        if rank == 0:
            Path(cfg["out"]).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def distributed_run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Two ranks (spawned, gloo, TCP rendezvous on loopback) reading one manifest,
    listed once here, each through DistributedSampler wrapped in PrefetchSampler."""
    from tests.emulators import free_port

    store = Store(options={"s3": {"endpoint_url": cfg["endpoint"]}})
    manifest = Manifest.build(cfg["prefix"], store=store)
    torch.multiprocessing.spawn(_rank, args=(cfg, manifest, free_port()), nprocs=2, join=True)
    result: dict[str, Any] = {"ranks": json.loads(Path(cfg["out"]).read_text())}
    return result


PROGRAMS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "loader": loader_run,
    "distributed": distributed_run,
}


def main() -> None:
    name, cfg = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(PROGRAMS[name](cfg)), flush=True)


# ------------------------------------------------------------------ running them


def child_env(cache_dir: str) -> dict[str, str]:
    """The environment for a child: this one (the AWS test credentials) without any
    ``MLSTORE_*`` setting, with ``cache_dir`` as its node cache, and the repository
    root first on ``PYTHONPATH``, so ``tests.*`` and this checkout's ``mlstore`` are
    what every child and worker imports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSTORE_")}
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "MLSTORE_CACHE_DIR": cache_dir, "PYTHONPATH": os.pathsep.join(path)}


def run_program(
    name: str,
    cfg: dict[str, Any],
    *,
    cache_dir: str,
    timeout: float = 240,
    module: str = "tests.torch_children",
) -> dict[str, Any]:
    """Run program ``name`` in a fresh Python process, with ``cache_dir`` as its node
    cache; its JSON result. A child that hangs fails the test at ``timeout``, and is
    killed with every process it started (its workers, its forkserver, its ranks: one
    process group). ``module`` is where the program and its ``main`` live."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from {module} import main; main()",
            name,
            json.dumps(cfg),
        ],
        env=child_env(cache_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        stdout, stderr = child.communicate()
        raise AssertionError(
            f"{name} hung for {timeout:.0f} s; its stderr:\n{stderr[-4000:]}"
        ) from None
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)  # anything it left behind
    assert child.returncode == 0, stderr[-4000:]
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    result["stderr"] = stderr
    return result
