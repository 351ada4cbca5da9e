"""B11: one node cache shared by 1, 2, 4 and 8 processes, beside raw file I/O of the
same bytes by the same number of processes.

- **hits**: every process reads 4 KiB objects already in the node cache, memory tier
  off, so each read is a disk hit (the proxy must see no request at all); raw: the same
  processes ``read()`` files of the same bytes in a plain directory;
- **fills**: every process reads its own 4 KiB objects once from moto (no added
  latency) into a fresh cache; raw: the same processes write the same bytes as new
  files (temp file, then ``rename``, as a fill does). mlstore with its cache off (GETs
  only) shows what the server allows;
- **entries**: a fresh process reads a sample of 4 KiB entries from an index of 1k and
  of 100k entries (filled through :meth:`DiskTier.put` under the keys a Store uses:
  filling 100k through S3 would take minutes); raw: the same reads from a directory
  of 1k and of 100k files.

Processes of one measurement are started, set up, and then given one wall-clock start
time, so they all run in the same window; the aggregate rate is the sum of their rates.
The notes give each process count's scaling over one process and how many cores the
processes kept busy (their CPU time over the window): a rate that stops growing while
cores are idle shows processes waiting on each other, not on the CPU.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.common import (
    BUCKET,
    Child,
    KiB,
    Row,
    check,
    digest,
    fill_ratios,
    proxy_counts,
    proxy_reset,
    row,
)
from benchmarks.peers import make_reader
from benchmarks.scenarios import WARMUP, Ctx, at_least, interleave

SIZE = 4 * KiB
RAW_READ = "raw read()"
RAW_FILL = "raw write+rename"
NO_CACHE = "mlstore, no cache (GETs only)"


# --------------------------------------------------------------------------- data


def _flat(key: str) -> str:
    return key.replace("/", "-")


def _prepare(ctx: Ctx) -> None:
    """Upload B11's 4 KiB objects (a pool per process of the largest count) and write
    each one's bytes as a file named :func:`_flat` in a plain directory."""
    if "b11" in ctx.keys:
        return
    import boto3

    s = ctx.sizes
    client = boto3.client("s3", endpoint_url=ctx.moto)
    mirror = ctx.tmp / "b11-mirror"
    mirror.mkdir(parents=True, exist_ok=True)
    keys = [f"b11/p{p}/{j:05d}" for p in range(max(s.b11_procs)) for j in range(s.b11_pool)]

    def put(key: str) -> None:
        data = os.urandom(SIZE)
        client.put_object(Bucket=BUCKET, Key=key, Body=data)
        (mirror / _flat(key)).write_bytes(data)
        ctx.expected[key] = ctx.expected[_flat(key)] = digest(data)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, keys))
    ctx.keys["b11"] = keys
    ctx.log(f"  {len(keys)} objects of 4 KiB uploaded in {time.perf_counter() - t0:.1f}s")


def _spec(ctx: Ctx, disk_dir: str, *, proxy: bool = True) -> dict[str, Any]:
    # Memory tier off: every read is a disk hit. A long ttl: the hits never revalidate
    # however long the run takes (revalidation is B12's); the hit path is the same.
    return ctx.spec(
        "mlstore",
        proxy=proxy,
        cache={"disk_dir": disk_dir, "memory_bytes": 0, "ttl": 3600},
    )


# --------------------------------------------------------------------------- runs


def _run(ctx: Ctx, tasks: list[dict[str, Any]], *, counted: bool = False) -> list[dict[str, Any]]:
    """Start ``tasks`` as processes, release them with one start time, and return their
    results; ``counted``: the proxy must see no request in the window."""
    children = [Child({"task": "window", **t}) for t in tasks]
    for c in children:
        c.wait_ready()
    proxy_reset(ctx.proxy)
    at = time.time() + 0.05 + 0.01 * len(children)
    for c in children:
        c.go(at)
    results = [c.result() for c in children]
    if counted:
        requests = int(proxy_counts(ctx.proxy)["total"])
        if requests:
            raise RuntimeError(f"B11 hits made {requests} requests: not all were disk hits")
    return results


class Sweep:
    """Aggregate rates of one peer over process counts (samples, bytes, CPU)."""

    def __init__(self) -> None:
        self.samples: dict[int, list[float]] = {}
        self.busy: dict[int, list[float]] = {}
        self.cpu_per_op: dict[int, list[float]] = {}
        self.ok = True

    def add(self, procs: int, results: list[dict[str, Any]]) -> float:
        rate = sum(r["ops"] / r["elapsed"] for r in results)
        window = max(r["elapsed"] for r in results)
        cpu = sum(r["cpu"] for r in results)
        self.samples.setdefault(procs, []).append(rate)
        self.busy.setdefault(procs, []).append(cpu / window)
        self.cpu_per_op.setdefault(procs, []).append(cpu / max(1, sum(r["ops"] for r in results)))
        return rate

    def rows(self, scenario: str, peer: str, unit: str) -> dict[int, Row]:
        out = {}
        for procs, samples in self.samples.items():
            label = f"{procs} proc" + ("s" if procs > 1 else "")
            out[procs] = row(scenario.format(procs=label), peer, samples, unit, verified=self.ok)
        one = out[min(out)].median or 0
        for procs, r in out.items():
            scale = (r.median or 0) / one if one else 0
            busy = sorted(self.busy[procs])[len(self.busy[procs]) // 2]
            per_op = sorted(self.cpu_per_op[procs])[len(self.cpu_per_op[procs]) // 2]
            r.note = f"x{scale:.2f} vs 1 proc; {busy:.1f} cores busy; CPU {per_op * 1e6:.0f} us/op"
        return out


def _sweep(
    ctx: Ctx,
    peers: dict[str, Callable[[int], list[dict[str, Any]]]],
    check_result: Callable[[str, dict[str, Any]], bool],
    counted: set[str],
    counts: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, Sweep]:
    """Every peer at every process count (or those ``counts`` names for it),
    repetitions interleaved."""
    counts = counts or {}
    sweeps = {name: Sweep() for name in peers}

    def runner(name: str, procs: int) -> Callable[[], tuple[float, bool]]:
        def run() -> tuple[float, bool]:
            results = _run(ctx, peers[name](procs), counted=name in counted)
            ok = all(check_result(name, r) for r in results)
            sweeps[name].ok = sweeps[name].ok and ok
            return sweeps[name].add(procs, results), ok

        return run

    runners = {
        f"{name}, {p} procs": runner(name, p)
        for p in ctx.sizes.b11_procs
        for name in peers
        if p in counts.get(name, (p,))
    }
    interleave(ctx.sizes.reps, runners, ctx.log)
    return sweeps


def _table(
    ctx: Ctx, scenario: str, sweeps: dict[str, Sweep], unit: str
) -> tuple[list[Row], dict[str, dict[int, Row]]]:
    """Rows by process count, mlstore first; ratios within each count."""
    by_peer = {name: sw.rows(scenario, name, unit) for name, sw in sweeps.items()}
    rows = []
    for procs in ctx.sizes.b11_procs:
        group = [by_peer[name][procs] for name in sweeps if procs in by_peer[name]]
        fill_ratios(group, group[0])
        rows += group
    return rows, by_peer


# --------------------------------------------------------------------------- parts


def hits(ctx: Ctx) -> list[Row]:
    s = ctx.sizes
    keys = ctx.keys["b11"][: s.b11_hit_keys]
    flat = [_flat(k) for k in keys]
    expected = ctx.exp(keys)
    cache_dir = ctx.new_dir("b11-hits")
    filler = make_reader(_spec(ctx, cache_dir))
    filler.read_many([filler.path(k) for k in [*keys, WARMUP]])
    filler.close()
    raw = {"peer": "local", "root": str(ctx.tmp / "b11-mirror")}

    def tasks(spec: dict[str, Any], names: list[str]) -> Callable[[int], list[dict[str, Any]]]:
        def make(procs: int) -> list[dict[str, Any]]:
            # Each process starts at its own offset: not all on one key at once.
            shift = [len(names) * i // procs for i in range(procs)]
            return [
                {
                    "kind": "hit",
                    "spec": spec,
                    "keys": names[k:] + names[:k],
                    "expected": expected[k:] + expected[:k],
                    "seconds": s.b11_seconds,
                    "cycle": True,
                    "warmup": WARMUP if spec["peer"] == "mlstore" else names[0],
                }
                for k in shift
            ]

        return make

    def good(name: str, r: dict[str, Any]) -> bool:
        if r["bad"]:
            return False
        counts = r.get("counts")
        return counts is None or (counts["disk_hits"] == r["ops"] and counts["requests"] == 0)

    peers = {"mlstore": tasks(_spec(ctx, cache_dir), keys), RAW_READ: tasks(raw, flat)}
    sweeps = _sweep(ctx, peers, good, counted={"mlstore"})
    rows, by_peer = _table(ctx, "B11 hits, {procs}", sweeps, "ops/s")
    top = max(s.b11_procs)
    at_least(by_peer["mlstore"][top], by_peer[RAW_READ][top], 0.8, f"raw read() at {top} procs")
    by_peer["mlstore"][top].note += f"; {len(keys)} objects x 4 KiB, every read a disk hit"
    return rows


def fills(ctx: Ctx) -> list[Row]:
    s = ctx.sizes
    pools = [
        ctx.keys["b11"][p * s.b11_pool : (p + 1) * s.b11_pool] for p in range(max(s.b11_procs))
    ]
    mirror = str(ctx.tmp / "b11-mirror")
    runs = iter(range(1_000_000))  # a new directory per run: none is deleted before a window

    def tasks(kind: str) -> Callable[[int], list[dict[str, Any]]]:
        def make(procs: int) -> list[dict[str, Any]]:
            if kind == "mlstore":
                spec = _spec(ctx, ctx.new_dir(f"b11-fills/{next(runs)}"), proxy=False)
            elif kind == "no-cache":
                spec = ctx.spec("mlstore", cache={"enabled": False})
            else:
                dest = ctx.new_dir(f"b11-fills/{next(runs)}")
                os.mkdir(os.path.join(dest, "tmp"))
                os.mkdir(os.path.join(dest, "files"))
            out = []
            for pool in pools[:procs]:
                task: dict[str, Any] = {
                    "kind": "raw-fill" if kind == "raw" else "fill",
                    "expected": ctx.exp(pool),
                    "seconds": s.b11_seconds,
                    "cycle": kind == "raw",  # mlstore fills each object once
                }
                if kind == "raw":
                    task.update(keys=[_flat(k) for k in pool], source=mirror, dest=dest)
                else:
                    task.update(keys=pool, spec=spec, warmup=WARMUP)
                out.append(task)
            return out

        return make

    def good(name: str, r: dict[str, Any]) -> bool:
        if r["bad"]:
            return False
        if name != RAW_FILL and r["ops"] >= s.b11_pool:
            raise RuntimeError(f"a B11 fill process ran out of objects: raise b11_pool ({name})")
        counts = r.get("counts")
        return name != "mlstore" or (counts is not None and counts["misses"] == r["ops"])

    peers = {"mlstore": tasks("mlstore"), RAW_FILL: tasks("raw"), NO_CACHE: tasks("no-cache")}
    # GETs alone, at the ends of the target's range: enough to show what moto allows.
    sweeps = _sweep(ctx, peers, good, counted=set(), counts={NO_CACHE: (1, 4)})
    shutil.rmtree(ctx.tmp / "work" / "b11-fills", ignore_errors=True)
    rows, by_peer = _table(ctx, "B11 fills, {procs}", sweeps, "fills/s")
    mine = by_peer["mlstore"]
    one, four = mine[1].median, mine[4].median if 4 in mine else None
    if one and four:
        scale = four / one
        check(mine[4], "aggregate from 1 to 4 procs >= 1.0x", scale >= 1.0, scale)
    mine[1].note += "; each process fills its own 4 KiB objects from moto, 0 ms"
    by_peer[NO_CACHE][1].note += "; what moto serves: the ceiling of any fill here"
    return rows


def entries(ctx: Ctx) -> list[Row]:
    rows: list[Row] = []
    for count in ctx.sizes.b11_entries:
        rows += _entries(ctx, count)
    return rows


def _entries(ctx: Ctx, count: int) -> list[Row]:
    """Hits of a fresh process on a sample of ``count`` entries, beside raw reads of a
    directory of ``count`` files."""
    from mlstore._engine.identity import Identity
    from mlstore.cache.disk import DiskTier
    from mlstore.url import parse_url

    cache_dir, raw_dir = ctx.new_dir(f"b11-entries-{count}"), ctx.new_dir(f"b11-raw-{count}")
    spec = _spec(ctx, cache_dir)
    # A Store fills one object first: the node key and version a Store uses, checked.
    reader = make_reader(spec)
    reader.read(reader.path(WARMUP))
    config = reader.store.config  # type: ignore[attr-defined]
    identity = Identity(config)
    tier = DiskTier(cache_dir, config.cache.disk_bytes)
    found = tier.lookup(identity.key(parse_url(reader.path(WARMUP))))
    if found is None or found.version != _etag((ctx.mirror / WARMUP).read_bytes()):
        raise RuntimeError(f"B11: a Store's node key or version is not as assumed ({found})")
    t0 = time.perf_counter()
    keys = [f"b11/entries/{count}/{i:06d}" for i in range(count)]
    for k in keys:
        data = os.urandom(SIZE)
        tier.put(identity.key(parse_url(reader.path(k))), _etag(data), data)
        with open(os.path.join(raw_dir, _flat(k)), "wb") as fh:
            fh.write(data)
        ctx.expected[k] = ctx.expected[_flat(k)] = digest(data)
    tier.close()
    reader.close()
    ctx.log(f"  {count:,} entries put in {time.perf_counter() - t0:.1f}s")

    sample = random.Random(count).sample(keys, min(count, ctx.sizes.b11_sample))
    raw = {"peer": "local", "root": raw_dir}
    runners = {
        "mlstore": _reads_runner(ctx, spec, sample, WARMUP),
        RAW_READ: _reads_runner(ctx, raw, [_flat(k) for k in sample], _flat(sample[0])),
    }
    results = interleave(ctx.sizes.reps, runners, ctx.log)
    label = f"{count // 1000}k" if count >= 1000 else str(count)
    me, raw_row = (
        row(f"B11 4 KiB hit, {label} entries", n, samples, "ops/s", verified=ok)
        for n, (samples, ok) in results.items()
    )
    fill_ratios([me, raw_row], me)
    at_least(me, raw_row, 0.3, f"raw read() of {label} files")
    me.note = f"fresh process, {len(sample):,} entries each read once, memory tier off"
    raw_row.note = f"{len(sample):,} files of a directory of {count:,}"
    return [me, raw_row]


def _reads_runner(
    ctx: Ctx, spec: dict[str, Any], keys: list[str], warmup: str
) -> Callable[[], tuple[float, bool]]:
    """ops/s of a fresh process reading each key once (no request may reach the store)."""

    def run() -> tuple[float, bool]:
        task = {
            "task": "read_keys",
            "spec": spec,
            "keys": keys,
            "expected": ctx.exp(keys),
            "mode": "read",
            "warmup": warmup,
        }
        child = Child(task)
        child.wait_ready()
        proxy_reset(ctx.proxy)
        child.go()
        res = child.result()
        if int(proxy_counts(ctx.proxy)["total"]):
            raise RuntimeError("B11: a read of a cached entry reached the store")
        return res["ops"] / res["elapsed"], bool(res["ok"])

    return run


def _etag(data: bytes) -> str:
    """The version S3 (and moto) give an object written in one PUT."""
    return f'"{hashlib.md5(data).hexdigest()}"'  # S3's ETag, not a security use


def b11(ctx: Ctx) -> list[Row]:
    """Hits and fills by 1-8 processes sharing one node cache; hit cost vs entries."""
    _prepare(ctx)
    return [*hits(ctx), *fills(ctx), *entries(ctx)]
