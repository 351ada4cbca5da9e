"""B15: ``cp -r`` of a tree of small objects through the cloud profile (20 ms per request
in front of moto): mlstore ``Store.copy(recursive=True)`` beside s3fs ``put`` / ``get``
with ``recursive=True``.

The tree is ``n`` objects of 4 KiB (random, seeded) in 8 folders on the local disk.
Each peer copies it up (local -> S3, a fresh prefix per repetition) and down (S3 ->
a fresh local directory) in a fresh process (``python -m benchmarks.child``, task
``copy``); the client is made and has made one request before the timer. Uploads are
verified with one listing straight from moto: every key there, each ETag the MD5 of the
local file; downloads by the xxh3 of every file written. Repetitions are interleaved
across peers; the medians are compared.

A third row runs the same upload again onto the finished copy, as a user re-runs an
interrupted one: ``Store.sync`` (which sends only what differs, proven by content:
here the listed ETags against the local files' MD5s) beside s3fs ``put`` (which has no
skip and sends every object again).

mlstore runs with its defaults (``max_workers`` 32, a node cache in a fresh
directory); s3fs with its defaults (fsspec's batch size for ``put``/``get``).
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BUCKET,
    KiB,
    Row,
    check,
    digest,
    fill_ratios,
    proxy_counts,
    proxy_reset,
    ratio_vs,
    row,
    run_child,
    set_latency,
)
from benchmarks.scenarios import Ctx

PREFIX = "b15"
SIZE = 4 * KiB
ML = "mlstore Store.copy(recursive=True)"
S3FS = "s3fs put/get(recursive=True)"
PEERS = {ML: "mlstore", S3FS: "s3fs"}


def make_tree(root: Path, n: int, seed: int = 15) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {f"f{i % 8}/obj{i:05d}.bin": rng.randbytes(SIZE) for i in range(n)}
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


# --------------------------------------------------------------------------- in the child


def _copier(task: dict[str, Any]) -> tuple[Callable[[str, str], Any], Callable[[], Any]]:
    """``(copy(src, dst), warm_up())`` of the task's peer and direction."""
    endpoint, up = task["endpoint"], task["op"] in ("put", "resync")
    if task["peer"] == "s3fs":
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)

        def copy(src: str, dst: str) -> Any:
            if up:
                return fs.put(src + "/", dst.removeprefix("s3://") + "/", recursive=True)
            return fs.get(src.removeprefix("s3://") + "/", dst + "/", recursive=True)

        return copy, lambda: fs.ls(BUCKET)
    from mlstore import Store

    store = Store(options={"s3": {"endpoint_url": endpoint}}, cache={"disk_dir": task["cache_dir"]})

    def copy_ml(src: str, dst: str) -> Any:
        if task["op"] == "resync":  # the same copy again: only what differs is sent
            return store.sync(src, dst)
        return store.copy(src, dst, recursive=True)

    return copy_ml, lambda: store.ls(f"s3://{BUCKET}/{PREFIX}")


def child(task: dict[str, Any], barrier: Callable[[], object]) -> dict[str, Any]:
    copy, warm_up = _copier(task)
    warm_up()
    barrier()
    proxy_reset(task["endpoint"])
    t0 = time.perf_counter()
    copy(task["src"], task["dst"])
    elapsed = time.perf_counter() - t0
    counts = proxy_counts(task["endpoint"])
    out: dict[str, Any] = {
        "elapsed": elapsed,
        "requests": int(counts["total"]),
        "peak": int(counts.get("peak_in_flight", 0)),
    }
    if task["op"] == "get":
        root = Path(task["dst"])
        out["digests"] = {
            p.relative_to(root).as_posix(): digest(p.read_bytes())
            for p in root.rglob("*")
            if p.is_file()
        }
    return out


# --------------------------------------------------------------------------- in the harness


def _client(ctx: Ctx) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=ctx.moto)


def _listed(ctx: Ctx, prefix: str) -> dict[str, str]:
    """Key (below ``prefix``) -> ETag, straight from moto."""
    pages = _client(ctx).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {
        o["Key"][len(prefix) :]: o["ETag"].strip('"') for p in pages for o in p.get("Contents", [])
    }


def _delete(ctx: Ctx, prefix: str) -> None:
    client = _client(ctx)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    for page in pages:
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})


def b15(ctx: Ctx) -> list[Row]:
    from mlstore import Store

    s = ctx.sizes
    n, reps = s.b15_objects, s.b15_reps
    src = ctx.tmp / "b15-src"
    files = make_tree(src, n)
    md5s = {k: hashlib.md5(v, usedforsecurity=False).hexdigest() for k, v in files.items()}
    sums = {k: digest(v) for k, v in files.items()}
    source = f"{PREFIX}/source/"
    with Store(options={"s3": {"endpoint_url": ctx.moto}}, cache={"enabled": False}) as st:
        st.copy(src, f"s3://{BUCKET}/{source}", recursive=True)  # the tree to download
    got: dict[str, dict[str, list[dict[str, Any]]]] = {
        p: {"put": [], "get": [], "resync": []} for p in PEERS
    }
    set_latency(ctx.proxy, ctx.latency)
    try:
        for rep in range(reps):
            for name, peer in PEERS.items():
                up = f"{PREFIX}/r{rep}-{peer}/"
                base = {"task": "copy", "peer": peer, "endpoint": ctx.proxy}
                put = run_child(
                    {
                        **base,
                        "op": "put",
                        "src": str(src),
                        "dst": f"s3://{BUCKET}/{up.rstrip('/')}",
                        "cache_dir": ctx.new_dir(f"b15-{peer}-{rep}-put"),
                    }
                )
                put["ok"] = _listed(ctx, up) == md5s
                again = run_child(
                    {
                        **base,
                        "op": "resync",
                        "src": str(src),
                        "dst": f"s3://{BUCKET}/{up.rstrip('/')}",
                        "cache_dir": ctx.new_dir(f"b15-{peer}-{rep}-resync"),
                    }
                )
                again["ok"] = _listed(ctx, up) == md5s
                got[name]["resync"].append(again)
                _delete(ctx, up)
                down = ctx.new_dir(f"b15-{peer}-{rep}-down")
                os.rmdir(down)  # the copy makes it
                get = run_child(
                    {
                        **base,
                        "op": "get",
                        "src": f"s3://{BUCKET}/{source.rstrip('/')}",
                        "dst": down,
                        "cache_dir": ctx.new_dir(f"b15-{peer}-{rep}-get"),
                    }
                )
                get["ok"] = get.pop("digests") == sums
                got[name]["put"].append(put)
                got[name]["get"].append(get)
                ctx.log(
                    f"    rep {rep + 1}/{reps} {name}: put {put['elapsed']:.2f} s "
                    f"({put['requests']} requests, peak {put['peak']} in flight), get "
                    f"{get['elapsed']:.2f} s, again {again['elapsed']:.2f} s "
                    f"({again['requests']} requests)"
                    f"{'' if put['ok'] and get['ok'] and again['ok'] else '  WRONG'}"
                )
    finally:
        set_latency(ctx.proxy, 0.0)
        _delete(ctx, f"{PREFIX}/")
    return _rows(ctx, got)


def _rows(ctx: Ctx, got: dict[str, dict[str, list[dict[str, Any]]]]) -> list[Row]:
    s = ctx.sizes
    ms = int(ctx.latency * 1000)
    rows: list[Row] = []
    labels = (
        ("put", "cp -r local -> S3"),
        ("get", "cp -r S3 -> local"),
        ("resync", "the same upload again (mlstore sync; s3fs put)"),
    )
    for op, label in labels:
        scen = f"B15 {label} ({s.b15_objects:,} x 4 KiB, {ms} ms)"
        mine: list[Row] = []
        for name in PEERS:
            runs = got[name][op]
            r = row(scen, name, [x["elapsed"] for x in runs], "s",
                    higher_is_better=False, verified=all(x["ok"] for x in runs))  # fmt: skip
            r.note = (
                f"requests {sorted({x['requests'] for x in runs})}; peak in flight "
                f"{sorted({x['peak'] for x in runs})}"
            )
            mine.append(r)
        me = next(r for r in mine if r.peer == ML)
        fill_ratios(mine, me)
        other = next(r for r in mine if r.peer == S3FS)
        ratio = ratio_vs(me, other)
        margin = None if ratio is None else ratio / 2.0
        if op == "resync":
            me.target = "informative"
        else:
            check(me, ">= 2x s3fs", bool(margin and margin >= 1), margin)
        other.target = "informative"
        rows += mine
    return rows
