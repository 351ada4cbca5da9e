"""B14: checkpoint save and load of a state dict through the cloud profile (20 ms per
request in front of moto), mlstore beside the tools a user would pick instead.

The state dict is ``n`` float32 tensors of equal size, random (a seeded generator, so
every process builds the same one). Each peer saves it in a fresh process and loads it
in another fresh process (``python -m benchmarks.child``, task ``checkpoint``):

- **torch.save + s3fs**: ``torch.save(sd, fs.open(path, "wb"))`` /
  ``torch.load(fs.open(path, "rb"))`` with ``s3fs.S3FileSystem(endpoint_url=...)``;
- **DCP + FsspecWriter (s3fs)**: ``torch.distributed.checkpoint.save`` with
  ``FsspecWriter("s3://...", endpoint_url=...)`` (its keyword arguments go to
  ``fsspec.url_to_fs``, so to ``S3FileSystem``) / ``FsspecReader``;
- **s3torchconnector DCP**: ``S3StorageWriter`` / ``S3StorageReader``. They take no
  endpoint (their ``S3FileSystem`` makes its own CRT client from the region alone), so
  the writer's and reader's ``fs`` is replaced, right after construction, by
  ``S3FileSystem(region, s3_client=S3Client(region, endpoint=proxy, path style))``:
  the public constructor the connector offers for its own client;
- **mlstore**: ``mlstore.torch.save(sd, url, store=...)`` / ``mlstore.torch.load``, and
  ``mlstore.torch.dcp.save`` / ``load`` (a Store whose node cache is in a fresh
  directory, otherwise the default configuration).

Both DCP writers of the peers run with ``thread_count`` threads (default 1 in torch
and in s3torchconnector; more is what their documentation suggests for throughput),
one file per thread. DCP loads into a state dict of the right shapes allocated before
the timer (as a model's parameters are), so its load process holds the destination
before loading; ``torch.load``-style loads allocate the result.

Figures per peer: save and load MB/s (the save call until it returns; client setup and
imports before the timer), and the peak RSS (``VmHWM``) of the save and of the load
process, with the RSS before the timed part in the note. The loaded tensors' xxh3 must
equal the saved ones' (``verified`` on both rows). Repetitions are interleaved across
peers; each repetition saves under a fresh prefix (so mlstore's first save never
dedupes against an earlier repetition) and the prefix is deleted afterwards.

Dedupe, in the first repetition's save process: after the first save, ``k`` of the
``n`` tensors change (about 10%), and the state dict is saved again to a new URL beside
the first; then every tensor changes slightly (a full training step) and it is saved a
third time. The share uploaded is the proxy's count of request body bytes over the
checkpoint's bytes (mlstore's :class:`~mlstore.checkpoint.CheckpointInfo` beside it).

Staging stall: if ``mlstore.torch.save`` takes ``staging``, the seconds a staged save
blocks the caller against a direct save (and until ``mlstore.checkpoint.flush`` has
uploaded it); otherwise the row says that this build has none.
"""

from __future__ import annotations

import inspect
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import (
    BUCKET,
    MiB,
    Row,
    check,
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
from benchmarks.scenarios import Ctx

PREFIX = "b14"
SEED = 14
THREADS = 8  # thread_count of the peers' DCP writers
TORCH_S3FS = "torch.save + s3fs"
DCP_FSSPEC = f"DCP FsspecWriter over s3fs ({THREADS} threads)"
S3TC = f"s3torchconnector DCP S3StorageWriter ({THREADS} threads)"
ML_TORCH = "mlstore.torch.save"
ML_DCP = "mlstore.torch.dcp.save"
#: why s3torchconnector cannot write here (found in this benchmark; see analysis.md)
ETAG_NOTE = (
    "every upload of the connector is multipart (even of 1 MiB); moto completes it but "
    "answers with a <CompleteMultipartUploadResponse> body and no ETag header (S3 "
    "documents <CompleteMultipartUploadResult>), and the CRT client then fails, so no "
    "save completes"
)
PEERS = {
    TORCH_S3FS: "torch_s3fs",
    DCP_FSSPEC: "dcp_fsspec",
    S3TC: "s3tc",
    ML_TORCH: "mlstore",
    ML_DCP: "mlstore_dcp",
}


def s3torchconnector_available() -> str | None:
    """None if s3torchconnector's DCP writer can be imported, else why not."""
    try:
        from s3torchconnector.dcp import S3StorageWriter  # noqa: F401
    except ImportError as exc:
        return f"s3torchconnector.dcp not importable: {exc}"
    return None


def has_staging() -> bool:
    import mlstore.torch

    return "staging" in inspect.signature(mlstore.torch.save).parameters


# --------------------------------------------------------------------------- in the child


def state_dict(n: int, total: int, seed: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    numel = total // n // 4
    return {f"layer{i:02d}.weight": torch.randn(numel, generator=gen) for i in range(n)}


def digests(sd: dict[str, Any]) -> dict[str, int]:
    return {k: digest(t.contiguous().numpy()) for k, t in sd.items()}


def _s3tc_fs(endpoint: str, reader_constructor: Any = None) -> Any:
    from s3torchconnector import S3ClientConfig
    from s3torchconnector._s3client import S3Client
    from s3torchconnector.dcp.s3_file_system import S3FileSystem

    region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    client = S3Client(
        region, endpoint=endpoint, s3client_config=S3ClientConfig(force_path_style=True)
    )
    return S3FileSystem(region, s3_client=client, reader_constructor=reader_constructor)


def _mlstore(task: dict[str, Any]) -> Any:
    from mlstore import Store

    return Store(
        options={"s3": {"endpoint_url": task["endpoint"]}},
        cache={"disk_dir": task["cache_dir"]},
    )


def _saver(task: dict[str, Any]) -> Callable[[dict[str, Any], str], Any]:
    """``save(sd, name)`` of the task's peer: everything but the save itself set up."""
    peer, endpoint = task["peer"], task["endpoint"]
    base = f"{BUCKET}/{task['prefix']}"
    if peer == "torch_s3fs":
        import s3fs
        import torch

        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)

        def save(sd: dict[str, Any], name: str) -> None:
            with fs.open(f"{base}/{name}.pt", "wb") as f:
                torch.save(sd, f)

        return save
    if peer == "dcp_fsspec":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        def save(sd: dict[str, Any], name: str) -> None:
            writer = FsspecWriter(
                f"s3://{base}/{name}",
                thread_count=task["threads"],
                endpoint_url=endpoint,
                skip_instance_cache=True,
            )
            dcp.save(sd, storage_writer=writer)

        return save
    if peer == "s3tc":
        import torch.distributed.checkpoint as dcp
        from s3torchconnector.dcp import S3StorageWriter

        region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")

        def save(sd: dict[str, Any], name: str) -> None:
            url = f"s3://{base}/{name}"
            writer = S3StorageWriter(region, url, thread_count=task["threads"])
            writer.fs = _s3tc_fs(endpoint)  # the endpoint (see the module docstring)
            writer.path = writer.fs.init_path(url)
            dcp.save(sd, storage_writer=writer)

        return save
    store = _mlstore(task)
    if peer == "mlstore":
        import mlstore.torch

        def save(sd: dict[str, Any], name: str) -> Any:
            return mlstore.torch.save(sd, f"s3://{base}/{name}", store=store)

        return save
    if peer == "mlstore_dcp":
        import mlstore.torch.dcp

        def save(sd: dict[str, Any], name: str) -> Any:
            return mlstore.torch.dcp.save(sd, f"s3://{base}/{name}", store=store)

        return save
    raise ValueError(f"unknown B14 peer {peer!r}")


def _loader(task: dict[str, Any]) -> Callable[[str], dict[str, Any]]:
    """``load(name)`` of the task's peer; a DCP load fills a state dict allocated now."""
    import torch

    peer, endpoint = task["peer"], task["endpoint"]
    base = f"{BUCKET}/{task['prefix']}"
    target: dict[str, Any] = {}
    if peer in ("dcp_fsspec", "s3tc", "mlstore_dcp"):
        numel = task["bytes"] // task["tensors"] // 4
        target = {f"layer{i:02d}.weight": torch.zeros(numel) for i in range(task["tensors"])}
    if peer == "torch_s3fs":
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)

        def load(name: str) -> dict[str, Any]:
            with fs.open(f"{base}/{name}.pt", "rb") as f:
                out: dict[str, Any] = torch.load(f)
            return out

        return load
    if peer == "dcp_fsspec":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        def load(name: str) -> dict[str, Any]:
            reader = FsspecReader(
                f"s3://{base}/{name}", endpoint_url=endpoint, skip_instance_cache=True
            )
            dcp.load(target, storage_reader=reader)
            return target

        return load
    if peer == "s3tc":
        import torch.distributed.checkpoint as dcp
        from s3torchconnector.dcp import S3StorageReader

        region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")

        def load(name: str) -> dict[str, Any]:
            url = f"s3://{base}/{name}"
            reader = S3StorageReader(region, url)
            reader.fs = _s3tc_fs(endpoint, reader._reader_constructor)
            reader.path = reader.fs.init_path(url)
            dcp.load(target, storage_reader=reader)
            return target

        return load
    store = _mlstore(task)
    if peer == "mlstore":
        import mlstore.torch

        def load(name: str) -> dict[str, Any]:
            out: dict[str, Any] = mlstore.torch.load(f"s3://{base}/{name}", store=store)
            return out

        return load
    if peer == "mlstore_dcp":
        import mlstore.torch.dcp

        def load(name: str) -> dict[str, Any]:
            mlstore.torch.dcp.load(target, f"s3://{base}/{name}", store=store)
            return target

        return load
    raise ValueError(f"unknown B14 peer {peer!r}")


def _info(info: Any) -> dict[str, Any] | None:
    if info is None or not hasattr(info, "uploaded"):
        return None
    return {"bytes": info.bytes, "uploaded": info.uploaded, "chunks": info.chunks}


def _counted(endpoint: str, fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn`` (a save) with the proxy's counters zeroed first: seconds, the request
    body bytes and requests the proxy saw, and the save's CheckpointInfo if it has one."""
    proxy_reset(endpoint)
    t0 = time.perf_counter()
    info = fn()
    elapsed = time.perf_counter() - t0
    counts = proxy_counts(endpoint)
    return {
        "elapsed": elapsed,
        "bytes_in": int(counts.get("bytes_in", 0)),
        "requests": int(counts["total"]),
        "info": _info(info),
    }


def save_task(task: dict[str, Any], barrier: Callable[[], object]) -> dict[str, Any]:
    """One peer's timed save in this fresh process; then, if asked, the dedupe saves (a
    second save after ``changed`` tensors changed, a third after all changed) and the
    staged save."""
    import torch

    sd = state_dict(task["tensors"], task["bytes"], task["seed"])
    sums = digests(sd)
    save = _saver(task)
    endpoint = task["endpoint"]
    before = peak_rss()
    barrier()
    first = _counted(endpoint, lambda: save(sd, "first"))
    out: dict[str, Any] = {"first": first, "digests": sums, "before": before, "peak": peak_rss()}
    if task.get("dedupe"):
        keys = list(sd)
        step = max(1, len(keys) // task["changed"])
        changed = keys[::step][: task["changed"]]
        with torch.no_grad():
            for k in changed:
                sd[k].add_(1.0)
        out["changed"] = len(changed)
        out["second"] = _counted(endpoint, lambda: save(sd, "second"))
        gen = torch.Generator().manual_seed(task["seed"] + 1)
        with torch.no_grad():
            for t in sd.values():
                t.add_(torch.randn(t.shape, generator=gen), alpha=1e-4)
        out["third"] = _counted(endpoint, lambda: save(sd, "third"))
    if task.get("staging"):
        out["staging"] = _staged(task, sd)
    return out


def _staged(task: dict[str, Any], sd: dict[str, Any]) -> dict[str, Any]:
    """Seconds a ``staging="local"`` save blocks, and until ``flush`` returns, beside a
    direct save of the same state dict (each to a fresh chunk store, so neither dedupes
    against the saves before it)."""
    import mlstore.checkpoint
    import mlstore.torch

    store = _mlstore(task)
    base = f"s3://{BUCKET}/{task['prefix']}"
    t0 = time.perf_counter()
    mlstore.torch.save(sd, f"{base}/direct/ckpt", store=store)
    direct = time.perf_counter() - t0
    t0 = time.perf_counter()
    mlstore.torch.save(sd, f"{base}/staged/ckpt", store=store, staging="local")
    stall = time.perf_counter() - t0
    mlstore.checkpoint.flush(store, wait=True)
    flushed = time.perf_counter() - t0
    return {"direct": direct, "stall": stall, "flushed": flushed}


def load_task(task: dict[str, Any], barrier: Callable[[], object]) -> dict[str, Any]:
    """One peer's timed load of what its save process wrote, in this fresh process; the
    loaded tensors' xxh3 checked against the saved ones after the peak was read."""
    load = _loader(task)
    before = peak_rss()
    barrier()
    proxy_reset(task["endpoint"])
    t0 = time.perf_counter()
    sd = load("first")
    elapsed = time.perf_counter() - t0
    peak = peak_rss()
    got = digests(sd)
    expected = {k: int(v) for k, v in task["digests"].items()}
    requests = int(proxy_counts(task["endpoint"])["total"])
    return {
        "elapsed": elapsed,
        "before": before,
        "peak": peak,
        "ok": got == expected,
        "requests": requests,
    }


def child(task: dict[str, Any], barrier: Callable[[], object]) -> dict[str, Any]:
    return (save_task if task["op"] == "save" else load_task)(task, barrier)


# --------------------------------------------------------------------------- in the harness


def _delete_prefix(ctx: Ctx, prefix: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=ctx.moto)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    for page in pages:
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})


CEILING = "context: moto ceiling, boto3 upload_fileobj (16 threads, 8 MiB parts)"


def _ceiling(ctx: Ctx, data: bytes, rep: int) -> float:
    """MB/s of one multipart upload of ``data`` by boto3 through the same proxy: what
    the server takes on these cores (no serialization, no hashing; in this process)."""
    import io

    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3", endpoint_url=ctx.proxy)
    config = TransferConfig(
        multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=16
    )
    key = f"{PREFIX}/ceiling-{rep}"
    t0 = time.perf_counter()
    client.upload_fileobj(io.BytesIO(data), BUCKET, key, Config=config)
    elapsed = time.perf_counter() - t0
    client.delete_object(Bucket=BUCKET, Key=key)
    return len(data) / elapsed / 1e6


def b14(ctx: Ctx) -> list[Row]:
    s = ctx.sizes
    size, n = s.b14_bytes, s.b14_tensors
    changed = max(1, round(n * 0.1))
    peers = dict(PEERS)
    missing: dict[str, str] = {}
    why = s3torchconnector_available()
    if why:
        missing[S3TC] = why
        del peers[S3TC]
    staging = has_staging()
    got: dict[str, dict[str, list[dict[str, Any]]]] = {p: {"save": [], "load": []} for p in peers}
    failed: dict[str, str] = {}
    ceiling: list[float] = []
    blob = os.urandom(size)
    set_latency(ctx.proxy, ctx.latency)
    try:
        for rep in range(s.b14_reps):
            ceiling.append(_ceiling(ctx, blob, rep))
            ctx.log(f"    rep {rep + 1}/{s.b14_reps} {CEILING}: {ceiling[-1]:,.0f} MB/s")
            for name, peer in peers.items():
                if name in failed:
                    continue
                slug = f"{PREFIX}/r{rep}-{peer}"
                task = {
                    "task": "checkpoint",
                    "peer": peer,
                    "endpoint": ctx.proxy,
                    "prefix": slug,
                    "bytes": size,
                    "tensors": n,
                    "seed": SEED + rep,
                    "threads": THREADS,
                    "cache_dir": ctx.new_dir(f"b14-{peer}-{rep}-save"),
                }
                try:
                    saved = run_child(
                        {
                            **task,
                            "op": "save",
                            "dedupe": rep == 0,
                            "changed": changed,
                            "staging": rep == 0 and peer == "mlstore" and staging,
                        }
                    )
                    task["cache_dir"] = ctx.new_dir(f"b14-{peer}-{rep}-load")
                    loaded = run_child({**task, "op": "load", "digests": saved["digests"]})
                except RuntimeError as exc:  # a peer that cannot run: its row says why
                    failed[name] = str(exc).strip().splitlines()[-1][:300]
                    ctx.log(f"    {name} FAILED: {exc}")
                    continue
                finally:
                    _delete_prefix(ctx, slug + "/")
                got[name]["save"].append(saved)
                got[name]["load"].append(loaded)
                ctx.log(
                    f"    rep {rep + 1}/{s.b14_reps} {name}: save "
                    f"{size / saved['first']['elapsed'] / 1e6:,.0f} MB/s, load "
                    f"{size / loaded['elapsed'] / 1e6:,.0f} MB/s"
                    f"{'' if loaded['ok'] else '  BYTES WRONG'}"
                )
    finally:
        set_latency(ctx.proxy, 0.0)
    del blob
    return _rows(ctx, got, failed, missing, staging, ceiling)


def _med(values: list[float]) -> float:
    return float(statistics.median(values))


def _rows(
    ctx: Ctx,
    got: dict[str, dict[str, list[dict[str, Any]]]],
    failed: dict[str, str],
    missing: dict[str, str],
    staging: bool,
    ceiling: list[float],
) -> list[Row]:
    s = ctx.sizes
    size, n = s.b14_bytes, s.b14_tensors
    ms = int(ctx.latency * 1000)
    reps = s.b14_reps
    what = f"{size // MiB} MiB, {n} float32 tensors, {ms} ms, {reps} rep{'s' if reps > 1 else ''}"
    names = list(PEERS)

    def absent(scen: str, name: str, unit: str, hib: bool = True) -> Row:
        reason = missing.get(name) or failed.get(name) or "no result"
        if name == S3TC and 'Header "ETag" not found' in reason:
            reason = f"its CRT client cannot write to moto ({reason}): {ETAG_NOTE}"
        if not scen.startswith("B14 save"):
            reason = "see the save row"
        return Row(scen, name, None, unit, higher_is_better=hib, note=f"unavailable: {reason}")

    def ok(name: str) -> bool:
        return all(x["ok"] for x in got[name]["load"])

    # throughput
    scen_s, scen_l = f"B14 save ({what})", f"B14 load ({what})"
    saves, loads = [], []
    for name in names:
        if name not in got or not got[name]["save"]:
            saves.append(absent(scen_s, name, "MB/s"))
            loads.append(absent(scen_l, name, "MB/s"))
            continue
        sv, ld = got[name]["save"], got[name]["load"]
        r = row(scen_s, name, [size / x["first"]["elapsed"] / 1e6 for x in sv], "MB/s",
                verified=ok(name))  # fmt: skip
        reqs = sorted({x["first"]["requests"] for x in sv})
        r.note = (
            f"requests {reqs}; peak RSS {_med([x['peak'] / MiB for x in sv]):.0f} MiB "
            f"(before the save {_med([x['before'] / MiB for x in sv]):.0f} MiB, the state "
            f"dict built)"
        )
        saves.append(r)
        r = row(scen_l, name, [size / x["elapsed"] / 1e6 for x in ld], "MB/s", verified=ok(name))
        r.note = (
            f"requests {sorted({x['requests'] for x in ld})}; peak RSS "
            f"{_med([x['peak'] / MiB for x in ld]):.0f} MiB (before the load "
            f"{_med([x['before'] / MiB for x in ld]):.0f} MiB)"
        )
        loads.append(r)
    top = row(scen_s, CEILING, ceiling, "MB/s")
    top.target = "informative: the server's ceiling"
    top.note = "one object, parts in parallel, bytes from memory; the same proxy and latency"
    saves.append(top)
    for name, r in zip(names, saves, strict=False):
        if name == S3TC and r.median is not None:
            r.note += "; endpoint via S3FileSystem(s3_client=S3Client(endpoint=...))"
    for rows in (saves, loads):
        me = next(r for r in rows if r.peer == ML_TORCH)
        fill_ratios(rows, me)
    peer_saves = [r for r in saves if not r.is_mlstore and r.median is not None and r is not top]
    if peer_saves:
        fastest = max(peer_saves, key=lambda r: r.median or 0)
        for r in saves:
            if r.is_mlstore and r.median is not None:
                ratio = ratio_vs(r, fastest)
                margin = None if ratio is None else ratio / 1.4
                check(r, f">= 1.4x fastest peer ({fastest.peer})", bool(margin and margin >= 1),
                      margin)  # fmt: skip
    for r in loads:
        r.target = r.target or "informative"

    # peak RSS
    rss: list[Row] = []
    for op, label in (("save", "save process"), ("load", "load process")):
        scen = f"B14 peak RSS, {label} ({size // MiB} MiB state dict)"
        for name in names:
            if name not in got or not got[name][op]:
                rss.append(absent(scen, name, "MiB peak RSS", hib=False))
                continue
            runs = got[name][op]
            r = row(scen, name, [x["peak"] / MiB for x in runs], "MiB peak RSS",
                    higher_is_better=False, verified=ok(name))  # fmt: skip
            growth = _med([(x["peak"] - x["before"]) / MiB for x in runs])
            r.note = f"growth during the {op}: {growth:.0f} MiB"
            if op == "load" and name in (DCP_FSSPEC, S3TC, ML_DCP):
                r.note += " (the DCP destination, allocated before, is in 'before')"
            rss.append(r)
        me = next(r for r in rss if r.peer == ML_TORCH and r.scenario == scen)
        fill_ratios([r for r in rss if r.scenario == scen], me)
    for r in rss:
        r.target = "informative"

    # dedupe: share of the checkpoint's bytes uploaded by the second and third saves
    dedupe: list[Row] = []
    for key, label in (
        ("second", "second save, {changed} of {n} tensors changed"),
        ("third", "third save, every tensor changed (a training step)"),
    ):
        first_run = None
        for name in names:
            if name in got and got[name]["save"]:
                first_run = got[name]["save"][0]
                break
        k = first_run.get("changed", 0) if first_run else 0
        scen = "B14 " + label.format(changed=k, n=n) + f" ({size // MiB} MiB)"
        for name in names:
            runs = got.get(name, {}).get("save", [])
            if not runs or key not in runs[0]:
                dedupe.append(absent(scen, name, "% uploaded", hib=False))
                continue
            x = runs[0][key]
            share = 100.0 * x["bytes_in"] / size
            r = row(scen, name, [share], "% uploaded", higher_is_better=False)
            info = x["info"]
            r.note = (
                f"proxy request bytes {x['bytes_in'] / MiB:.1f} MiB in {x['requests']} "
                f"requests; {size / x['elapsed'] / 1e6:,.0f} MB/s"
            )
            if info:
                r.note += (
                    f"; CheckpointInfo uploaded {info['uploaded'] / MiB:.1f} of "
                    f"{info['bytes'] / MiB:.1f} MiB "
                    f"({100.0 * info['uploaded'] / info['bytes']:.1f}%)"
                )
            dedupe.append(r)
        rows = [r for r in dedupe if r.scenario == scen]
        me = next(r for r in rows if r.peer == ML_TORCH)
        fill_ratios(rows, me)
        for r in rows:
            if key == "second" and r.is_mlstore and r.median is not None:
                check(r, "<= 15% uploaded", r.median <= 15.0, 15.0 / max(r.median, 1e-9))
            else:
                r.target = r.target or "informative"

    # staging stall
    scen = f"B14 staging stall ({size // MiB} MiB)"
    stall: list[Row] = []
    runs = got.get(ML_TORCH, {}).get("save", [])
    st = runs[0].get("staging") if runs else None
    if not staging or not st:
        why = "not available in this build (mlstore.torch.save has no staging parameter)"
        if staging:
            why = "staged save did not run"
        r = Row(scen, "mlstore.torch.save(staging='local')", None, "x direct stall",
                higher_is_better=False, note=why)  # fmt: skip
        check(r, "<= 0.2x direct", None)
        stall.append(r)
    else:
        share = st["stall"] / st["direct"]
        r = row(scen, "mlstore.torch.save(staging='local')", [share], "x direct stall",
                higher_is_better=False)  # fmt: skip
        r.note = (
            f"blocked {st['stall']:.2f} s against {st['direct']:.2f} s direct; "
            f"flush(wait=True) returned {st['flushed']:.2f} s after the save began"
        )
        check(r, "<= 0.2x direct", share <= 0.2, 0.2 / share if share else None)
        stall.append(r)
    return saves + loads + rss + dedupe + stall
