"""B6: PyTorch DataLoader epochs, map-style, batch 32, 64 KiB samples, cloud profile.

Every loader reads the same objects (``b6/`` in the benchmark bucket) through the same
latency proxy, with the same ``RandomSampler`` (a seeded generator), default collation,
``fork`` workers and ``persistent_workers`` (epoch 2 reuses epoch 1's workers):

- **s3fs Dataset**: a plain ``torch.utils.data.Dataset`` whose ``__getitem__`` is
  ``S3FileSystem.cat_file`` (one filesystem per worker, made lazily in the worker);
- **mlstore**: ``mlstore.torch.MapDataset`` over the prefix (listed once, before the
  timer, into a manifest), a Store with a fresh node cache; 4 workers, 2 epochs; and 2
  workers wrapped in ``PrefetchSampler`` (epoch 1), and 2 workers without it;
- **s3torchconnector**: ``S3MapDataset.from_prefix`` (its CRT client, one per worker),
  ``transform`` reading the whole object; it has no cache, so its epoch 2 reads again;
- **MSC**: NVIDIA Multi-Storage Client ships no torch dataset (its ``contrib.torch`` is
  ``torch.load``/``save`` and a checkpoint filesystem), so a thin ``Dataset`` over a
  ``StorageClient`` per worker (``client.read``, its node cache on, as in the other
  scenarios).

Each loader runs in a fresh process (``python -m benchmarks.child``): imports and
clients of one peer never reach another's workers, and each starts from a cold cache
in its own fresh directory. The timer runs from ``iter(loader)`` to the last batch
(worker start included in epoch 1, for all alike); the loop hashes every sample (xxh3)
and an epoch counts only if it delivered each object exactly once with the right bytes.
The proxy counts the requests of each epoch. Worker RSS is each worker's ``VmHWM``
(``/proc/<pid>/status``), read by the loader's process after the last epoch while the
persistent workers live; a forked worker starts with the pages it shares with its
parent, so the RSS at its start (read in ``worker_init_fn``) is given beside it.

moto serves a few hundred GETs/s on these 2 cores: the raw-client ceiling through the
same proxy (0 ms and the cloud profile's latency) is measured in the same run.
"""

from __future__ import annotations

import collections
import functools
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.common import (
    BUCKET,
    KiB,
    MiB,
    Row,
    check,
    current_rss,
    digest,
    fill_ratios,
    peak_rss,
    proxy_counts,
    proxy_reset,
    ratio_vs,
    row,
    run_child,
    set_latency,
)
from benchmarks.peers import MscReader, msc_available, obstore_available
from benchmarks.scenarios import Ctx, at_least, interleave, read_many_runner

SAMPLE = 64 * KiB
BATCH = 32
PREFIX = "b6/"
SEED = 6
TICK = os.sysconf("SC_CLK_TCK")
MLSTORE_4 = "mlstore MapDataset (4 workers)"
PREFETCH_2 = "mlstore MapDataset + PrefetchSampler (2 workers)"
PLAIN_2 = "mlstore MapDataset (2 workers, no prefetch)"
S3FS = "s3fs Dataset (4 workers)"
S3TC = "s3torchconnector S3MapDataset (4 workers)"
MSC = "msc Dataset over StorageClient (4 workers)"


def s3torchconnector_available() -> bool:
    try:
        import s3torchconnector  # noqa: F401
    except ImportError:
        return False
    return True


def _prepare(ctx: Ctx) -> list[str]:
    """Upload B6's samples (random bytes, so every digest is distinct)."""
    if "b6" not in ctx.keys:
        import boto3

        client = boto3.client("s3", endpoint_url=ctx.moto)
        keys = [f"{PREFIX}{i:05d}" for i in range(ctx.sizes.b6_samples)]

        def put(key: str) -> None:
            data = os.urandom(SAMPLE)
            client.put_object(Bucket=BUCKET, Key=key, Body=data)
            ctx.expected[key] = digest(data)
            ctx.object_size[key] = SAMPLE

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, keys))
        ctx.keys["b6"] = keys
    return ctx.keys["b6"]


# --------------------------------------------------------------------------- in the child


class S3fsDataset:
    """What most code does today: ``fs.cat_file`` per sample, one filesystem per worker."""

    def __init__(self, endpoint: str, paths: list[str]) -> None:
        self.endpoint, self.paths = endpoint, paths
        self._fs: Any = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> bytes:
        if self._fs is None:  # in the worker, on its first sample
            import s3fs

            self._fs = s3fs.S3FileSystem(endpoint_url=self.endpoint, skip_instance_cache=True)
        data: bytes = self._fs.cat_file(self.paths[i])
        return data


class MscDataset:
    """A thin map-style dataset over MSC's ``StorageClient`` (one per worker, lazily)."""

    def __init__(self, spec: dict[str, Any], paths: list[str]) -> None:
        self.spec, self.paths = spec, paths
        self._reader: MscReader | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> bytes:
        if self._reader is None:
            self._reader = MscReader(self.spec)
        return bytes(self._reader.read(self.paths[i]))


def _read_all(reader: Any) -> bytes:
    data: bytes = reader.read()
    return data


def _dataset(task: dict[str, Any]) -> Any:
    """The task's dataset, listed (where it lists) before the timer."""
    peer, endpoint = task["peer"], task["endpoint"]
    keys: list[str] = task["keys"]
    if peer == "s3fs":
        return S3fsDataset(endpoint, [f"{BUCKET}/{k}" for k in keys])
    if peer == "msc":
        spec = {"endpoint": endpoint, "cache_dir": task["cache_dir"]}
        return MscDataset(spec, keys)
    if peer == "mlstore":
        from mlstore import Store
        from mlstore.torch import MapDataset

        store = Store(
            options={"s3": {"endpoint_url": endpoint}}, cache={"disk_dir": task["cache_dir"]}
        )
        return MapDataset(f"s3://{BUCKET}/{PREFIX}", store=store)
    if peer == "s3torchconnector":
        from s3torchconnector import S3ClientConfig, S3MapDataset

        ds = S3MapDataset.from_prefix(
            f"s3://{BUCKET}/{PREFIX}",
            region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            endpoint=endpoint,
            s3client_config=S3ClientConfig(force_path_style=True),
            transform=_read_all,
        )
        len(ds)  # lists now, in this process, as the sampler would
        return ds
    raise ValueError(f"unknown B6 peer {peer!r}")


def _worker_started(path: str, worker_id: int) -> None:
    with open(path, "a") as fh:
        fh.write(f"{os.getpid()} {current_rss()}\n")


def _vm_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_ticks(pid: int | str = "self") -> int:
    """utime + stime of a process (all its threads), in clock ticks; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _busy_ticks() -> int:
    """Ticks every core of the machine spent busy (not idle, not waiting on I/O)."""
    with open("/proc/stat") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4]


def _worker_pids(path: str) -> list[int]:
    try:
        with open(path) as fh:
            return [int(line.split()[0]) for line in fh]
    except FileNotFoundError:
        return []


def epochs(task: dict[str, Any], barrier: Callable[[], object]) -> dict[str, Any]:
    """Run ``task["epochs"]`` epochs of one loader (in a fresh process); per epoch the
    wall time, the samples, whether every object came exactly once with its bytes, and
    the requests the proxy saw; then each worker's peak RSS."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    ds = _dataset(task)
    if len(ds) != len(task["keys"]):
        raise RuntimeError(f"{task['peer']} dataset has {len(ds)} samples, not {len(task['keys'])}")
    sampler: Any = RandomSampler(ds, generator=torch.Generator().manual_seed(SEED))
    if task.get("prefetch"):
        from mlstore.torch import PrefetchSampler

        sampler = PrefetchSampler(sampler, ds)
    pids = os.path.join(task["cache_dir"], "..", os.path.basename(task["cache_dir"]) + ".pids")
    loader = DataLoader(
        ds,
        batch_size=BATCH,
        sampler=sampler,
        num_workers=task["workers"],
        multiprocessing_context="fork",
        persistent_workers=True,
        worker_init_fn=functools.partial(_worker_started, pids),
    )
    expected = collections.Counter(task["expected"])
    endpoint = task["endpoint"]
    barrier()
    out: list[dict[str, Any]] = []
    for _ in range(task["epochs"]):
        proxy_reset(endpoint)
        seen: collections.Counter[int] = collections.Counter()
        cpu0 = sum(_cpu_ticks(p) for p in ["self", *_worker_pids(pids)])
        busy0 = _busy_ticks()
        t0 = time.perf_counter()
        for batch in loader:
            for sample in batch:
                seen[digest(sample)] += 1
        elapsed = time.perf_counter() - t0
        cpu = sum(_cpu_ticks(p) for p in ["self", *_worker_pids(pids)]) - cpu0
        busy = _busy_ticks() - busy0
        counts = proxy_counts(endpoint)
        n = sum(seen.values())
        out.append(
            {
                "elapsed": elapsed,
                "samples": n,
                "ok": seen == expected,
                "requests": int(counts["total"]),
                "gets": int(counts["methods"].get("GET", 0)),
                "client_cpu": cpu / TICK,  # seconds: the loader's process and its workers
                "busy_cpu": busy / TICK,  # seconds: every process of the machine
            }
        )
    workers = []
    with open(pids) as fh:
        for line in fh:
            pid, start = (int(x) for x in line.split())
            workers.append({"pid": pid, "start": start, "peak": _vm_hwm(pid)})
    result = {"epochs": out, "workers": workers, "main_peak": peak_rss()}
    if task.get("prefetch"):
        result["prefetch"] = dict(sampler.counts)
    del loader
    return result


# --------------------------------------------------------------------------- in the harness


def _runs(ctx: Ctx) -> dict[str, dict[str, Any]]:
    """name -> the task fields of each loader (peers that are not installed left out)."""
    runs: dict[str, dict[str, Any]] = {
        S3FS: {"peer": "s3fs", "workers": 4, "epochs": 1},
        MLSTORE_4: {"peer": "mlstore", "workers": 4, "epochs": 2},
        PREFETCH_2: {"peer": "mlstore", "workers": 2, "epochs": 1, "prefetch": True},
        PLAIN_2: {"peer": "mlstore", "workers": 2, "epochs": 1},
    }
    if s3torchconnector_available():
        runs[S3TC] = {"peer": "s3torchconnector", "workers": 4, "epochs": 2}
    if msc_available():
        runs[MSC] = {"peer": "msc", "workers": 4, "epochs": 2}
    return runs


def _ceiling(ctx: Ctx, keys: list[str]) -> dict[str, tuple[list[float], bool]]:
    """The fastest raw client's GETs/s of the same objects through the same proxy, at
    0 ms and at the cloud profile's latency: what the server allows on these cores."""
    w = ctx.mlstore_workers
    if obstore_available():
        client, peer, opts = f"obstore async, {w} in flight", "obstore", {"concurrency": w}
    else:
        client, peer, opts = f"boto3, {w} threads", "boto3", {"threads": w}
    out: dict[str, tuple[list[float], bool]] = {}
    for latency in (0.0, ctx.latency):
        set_latency(ctx.proxy, latency)
        name = f"context: moto ceiling, {client}, {int(latency * 1000)} ms"
        runner = read_many_runner(ctx, lambda: ctx.spec(peer, proxy=True, **opts), keys)
        out.update(interleave(ctx.sizes.b6_reps, {name: runner}, ctx.log))
    set_latency(ctx.proxy, 0.0)
    return out


def _mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB"


def b6(ctx: Ctx) -> list[Row]:
    """DataLoader epochs (samples/s), the server's ceiling, and each worker's peak RSS."""
    keys = _prepare(ctx)
    expected = ctx.exp(keys)
    runs = _runs(ctx)
    got: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    failed: dict[str, str] = {}
    ceiling = _ceiling(ctx, keys)
    set_latency(ctx.proxy, ctx.latency)
    try:
        for rep in range(ctx.sizes.b6_reps):
            for name, fields in runs.items():
                if name in failed:
                    continue
                slug = "".join(c if c.isalnum() else "-" for c in name)
                task = {
                    "task": "dataloader",
                    **fields,
                    "endpoint": ctx.proxy,
                    "keys": keys,
                    "expected": expected,
                    "cache_dir": ctx.new_dir(f"b6-{slug}-{rep}"),
                }
                try:
                    res = run_child(task)
                except RuntimeError as exc:  # a peer that cannot run: its row says why
                    failed[name] = str(exc).strip().splitlines()[-1][:300]
                    ctx.log(f"    {name} FAILED: {exc}")
                    continue
                got[name].append(res)
                rates = [f"{e['samples'] / e['elapsed']:,.0f}" for e in res["epochs"]]
                ctx.log(f"    rep {rep + 1} {name}: samples/s by epoch {rates}")
    finally:
        set_latency(ctx.proxy, 0.0)
    return _rows(ctx, len(keys), runs, got, failed, ceiling)


def _rows(
    ctx: Ctx,
    n: int,
    runs: dict[str, dict[str, Any]],
    got: dict[str, list[dict[str, Any]]],
    failed: dict[str, str],
    ceiling: dict[str, tuple[list[float], bool]],
) -> list[Row]:
    ms = int(ctx.latency * 1000)
    reps = ctx.sizes.b6_reps  # B6's own count, whatever the run's --reps
    size = f"{n:,} x 64 KiB, batch {BATCH}, {ms} ms, {reps} rep{'s' if reps > 1 else ''}"
    scen1, scen2 = f"B6 epoch 1 ({size})", f"B6 epoch 2, warm ({size})"
    setup = f"RandomSampler(seed {SEED}), fork, persistent workers"

    def epoch_row(scen: str, name: str, e: int, label: str | None = None) -> Row:
        results = [] if name in failed else got[name]
        if not results:
            why = failed.get(name, "no result")
            return Row(scen, label or name, None, "samples/s", note=f"did not run: {why}")
        rates = [r["epochs"][e]["samples"] / r["epochs"][e]["elapsed"] for r in results]
        ok = all(r["epochs"][e]["ok"] for r in results)
        eps = [r["epochs"][e] for r in results]
        reqs = sorted({x["requests"] for x in eps})
        gets = sorted({x["gets"] for x in eps})
        cpu = statistics.median(x["client_cpu"] / x["samples"] * 1000 for x in eps)
        busy = statistics.median(x["busy_cpu"] / x["elapsed"] for x in eps)
        note = (
            f"{setup}; requests {reqs} (GETs {gets}); client CPU {cpu:.2f} ms/sample; "
            f"machine busy {busy:.1f} of {os.cpu_count()} cores"
        )
        if "prefetch" in runs[name] and results:
            note += f"; prefetch counts {results[-1].get('prefetch')}"
        return row(scen, label or name, rates, "samples/s", verified=ok, note=note)

    first = [epoch_row(scen1, name, 0) for name in runs]
    for name, (samples, ok) in ceiling.items():
        first.append(row(scen1, name, samples, "samples/s", verified=ok, note="raw GETs/s"))
    me = next(r for r in first if r.peer == MLSTORE_4)
    fill_ratios(first, me)
    s3fs_row = next(r for r in first if r.peer == S3FS)
    s3fs_row.note += "; s3fs cat_file sends a HEAD (the size, for its chunked path) per GET"
    top = [r for r in first if r.peer.startswith("context")][-1]  # at the profile's latency
    if top.median and s3fs_row.median:
        s3fs_row.note += f"; the {ms} ms ceiling is {top.median / s3fs_row.median:.1f}x this"
    at_least(me, s3fs_row, 5, "s3fs Dataset epoch 1")
    pre = next(r for r in first if r.peer == PREFETCH_2)
    share = ratio_vs(pre, me)  # 2 workers + prefetch / 4 workers
    ok = share is not None and share >= 1 / 1.5
    check(pre, ">= 0.67x mlstore 4 workers (within 1.5x)", ok, share and share * 1.5)
    for r in first:
        if r.peer.startswith("context"):
            r.target = "informative: the server's ceiling"

    second = [epoch_row(scen2, name, 1) for name, fields in runs.items() if fields["epochs"] > 1]
    second.append(epoch_row(scen2, S3FS, 0, label=f"{S3FS}, its epoch 1"))
    me2 = next(r for r in second if r.peer == MLSTORE_4)
    me2.note += "; memory tier (per process, default 512 MiB) and node disk cache"
    fill_ratios(second, me2)
    at_least(me2, second[-1], 20, "s3fs Dataset epoch 1")

    rss = []
    for name in runs:
        if name in failed or not got[name]:
            continue
        peaks = [max(w["peak"] or 0 for w in r["workers"]) for r in got[name]]
        start = max(w["start"] for r in got[name] for w in r["workers"])
        growth = max((w["peak"] or 0) - w["start"] for r in got[name] for w in r["workers"])
        main = max(r["main_peak"] for r in got[name])
        note = (
            f"{len(got[name][0]['workers'])} workers, each starting at up to {_mib(start)} "
            f"(pages shared with the parent by fork) and growing by up to {_mib(growth)}; "
            f"the loader's own process peaks at {_mib(main)}"
        )
        rss.append(
            row(f"B6 worker RSS ({n:,} samples)", name, [p / MiB for p in peaks], "MiB peak RSS",
                higher_is_better=False, note=note)
        )  # fmt: skip
    if rss:
        fill_ratios(rss, next(r for r in rss if r.peer == MLSTORE_4))
        for r in rss:
            r.target = "informative"
    return first + second + rss
