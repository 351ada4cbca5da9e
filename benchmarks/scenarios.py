"""The scenarios of BENCHMARKS.md (B1-B11; B11 in scaling.py), each run for mlstore and
the peers that can do the same work, in the same run, on the same server and data.

Every scenario returns :class:`~benchmarks.common.Row` objects: the median of several
repetitions per peer (repetitions are interleaved across peers, so drift of a noisy
machine hits all of them alike), the ratio of mlstore to each peer, and the targets.
"""

from __future__ import annotations

import gc
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BUCKET,
    GiB,
    KiB,
    MiB,
    Row,
    check,
    digest,
    dir_bytes,
    fill_ratios,
    proxy_counts,
    proxy_gets,
    proxy_reset,
    ratio_vs,
    row,
    run_child,
    set_latency,
    timed,
    timed_passes,
    verify,
)
from benchmarks.peers import Reader, make_reader, msc_available, obstore_available

SMALL = 256 * KiB
LARGE = 64 * MiB
RANGE = 64 * KiB
WARMUP = "warmup/0"
#: NVIDIA Multi-Storage Client's rows: its cache without (as fsspec's simplecache) and
#: with (MSC's default) the HEAD it sends before a hit to compare ETags
MSC_NOTE = "check_source_version off: a hit sends no request; cached bytes not checked"
MSC_B2_DEFAULT = "msc (warm, default config)"


@dataclass
class Sizes:
    """How much work each scenario does (quick mode: smaller counts)."""

    reps: int
    min_seconds: float  # per repetition of an in-memory loop
    small: int  # 256 KiB objects (B1, B2, B4, B5, B10)
    serial_subset: int  # of them, for serial peers (B4)
    cloud_serial_subset: int  # of them, for serial peers under 20 ms latency (B5)
    large: int  # 64 MiB objects (B3, B8)
    dup: int  # objects of the 30% duplicate dataset (B9)
    b7_keys: int
    b7_reps: int
    stream: int  # bytes of the object streamed through open() (B10)
    memory_budget: int  # memory tier budget of B10
    stream_reps: int = 2  # RSS peaks vary little; moto makes each run slow (B10)
    b9_reps: int = 2  # byte counts vary little between repetitions
    uncached_ranges: int = 40  # B8 reads for peers that GET every range
    ranges: int = 200  # random 64 KiB reads (B8)
    processes: int = 8  # B7
    b11_procs: tuple[int, ...] = (1, 2, 4, 8)  # processes sharing one node cache (B11)
    b11_seconds: float = 0.5  # each timed window of B11's processes
    b11_hit_keys: int = 1000  # 4 KiB objects every B11 hit process reads
    b11_pool: int = 250  # 4 KiB objects of each B11 fill process (more than it fills)
    b11_entries: tuple[int, ...] = (1_000, 100_000)  # index sizes of B11's hit cost
    b11_sample: int = 1000  # entries read by a fresh process at each index size
    b6_samples: int = 4000  # 64 KiB samples of B6's DataLoader epochs
    b6_reps: int = 3  # each B6 repetition runs every loader in a fresh process
    b14_bytes: int = 1 * GiB  # the state dict of B14's checkpoints
    b14_tensors: int = 32  # of equal size, float32
    b14_reps: int = 3  # each B14 repetition saves and loads every peer in fresh processes
    b15_objects: int = 2000  # 4 KiB objects of B15's tree (cp -r)
    b15_reps: int = 3  # each B15 repetition copies up and down with every peer, fresh processes

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(
                reps=3,
                min_seconds=0.3,
                small=300,
                serial_subset=150,
                cloud_serial_subset=60,
                large=2,
                dup=200,
                b7_keys=100,
                b7_reps=2,
                stream=256 * MiB,
                memory_budget=32 * MiB,
                b6_samples=1000,
                b6_reps=1,
                b14_bytes=256 * MiB,
                b14_reps=2,
            )
        return cls(
            reps=5,
            min_seconds=1.0,
            small=1000,
            serial_subset=300,
            cloud_serial_subset=100,
            large=4,
            dup=1000,
            b7_keys=1000,
            b7_reps=1,  # a GET count; 8 x 1,000 simplecache reads take over a minute
            stream=1 * GiB,
            memory_budget=128 * MiB,
            stream_reps=1,
            uncached_ranges=100,
            b11_seconds=2.0,
            b11_hit_keys=2000,
            b11_pool=1000,
            b11_sample=3000,
        )


@dataclass
class Ctx:
    """What every scenario needs: servers, data, sizes, a scratch directory."""

    sizes: Sizes
    moto: str
    proxy: str
    tmp: Path
    latency: float = 0.02
    expected: dict[str, int] = field(default_factory=dict)
    object_size: dict[str, int] = field(default_factory=dict)
    keys: dict[str, list[str]] = field(default_factory=dict)
    unique_dup_bytes: int = 0
    dup_contents: dict[str, bytes] = field(default_factory=dict)  # B9's objects
    mlstore_workers: int = 32
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)

    @property
    def mirror(self) -> Path:
        return self.tmp / "mirror"

    def new_dir(self, name: str) -> str:
        """A fresh, empty, private directory (caches are refused if others can write)."""
        path = self.tmp / "work" / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True, mode=0o700)
        return str(path)

    def spec(self, peer: str, *, proxy: bool = False, **kw: Any) -> dict[str, Any]:
        return {"peer": peer, "endpoint": self.proxy if proxy else self.moto, **kw}

    def exp(self, keys: Sequence[str]) -> list[int]:
        return [self.expected[k] for k in keys]


# --------------------------------------------------------------------------- data


def prepare(ctx: Ctx) -> None:
    """Upload the benchmark's objects to moto and keep local copies of the same bytes."""
    import boto3
    from boto3.s3.transfer import TransferConfig

    from mlstore import Store

    s = ctx.sizes
    client = boto3.client("s3", endpoint_url=ctx.moto)
    client.create_bucket(Bucket=BUCKET)
    ctx.mirror.mkdir(parents=True, exist_ok=True)

    def put(key: str, data: bytes, *, mirror: bool = True) -> None:
        client.put_object(Bucket=BUCKET, Key=key, Body=data)
        ctx.expected[key] = digest(data)
        ctx.object_size[key] = len(data)
        if mirror:
            path = ctx.mirror / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    t0 = time.perf_counter()
    put(WARMUP, os.urandom(SMALL))
    ctx.keys["small"] = [f"small/{i:05d}" for i in range(s.small)]
    for k in ctx.keys["small"]:
        put(k, os.urandom(SMALL))
    ctx.keys["large"] = [f"large/{i}" for i in range(s.large)]
    for k in ctx.keys["large"]:
        put(k, os.urandom(LARGE))

    # B9: 30% of the objects repeat the content of another one. Written by mlstore, so
    # their metadata carries the content hash (a claim until this node proves it).
    writer = Store(options={"s3": {"endpoint_url": ctx.moto}}, cache={"enabled": False})
    rng = random.Random(9)
    unique_count = s.dup - round(0.3 * s.dup)
    uniques = [os.urandom(SMALL) for _ in range(unique_count)]
    contents = uniques + [rng.choice(uniques) for _ in range(s.dup - unique_count)]
    rng.shuffle(contents)
    ctx.keys["dup"] = [f"dup/{i:05d}" for i in range(s.dup)]
    for k, data in zip(ctx.keys["dup"], contents, strict=True):
        writer.write_bytes(f"s3://{BUCKET}/{k}", data)
        ctx.dup_contents[k] = data
        ctx.expected[k] = digest(data)
        ctx.object_size[k] = len(data)
    ctx.unique_dup_bytes = unique_count * SMALL
    writer.close()

    # B10: one large object, uploaded in parts, never held whole in this process.
    import xxhash

    big = ctx.tmp / "stream.bin"
    h = xxhash.xxh3_64()
    with open(big, "wb") as fh:
        left = s.stream
        while left:
            piece = os.urandom(min(left, 16 * MiB))
            h.update(piece)
            fh.write(piece)
            left -= len(piece)
    client.upload_file(
        str(big),
        BUCKET,
        "stream/big",
        Config=TransferConfig(multipart_chunksize=16 * MiB, max_concurrency=4),
    )
    ctx.expected["stream/big"] = h.intdigest()
    ctx.object_size["stream/big"] = s.stream
    big.unlink()
    ctx.log(f"data uploaded in {time.perf_counter() - t0:.1f}s")


# --------------------------------------------------------------------------- helpers


def interleave(
    reps: int, runners: dict[str, Callable[[], tuple[float, bool]]], log: Callable[[str], None]
) -> dict[str, tuple[list[float], bool]]:
    """Run every runner ``reps`` times, round-robin; each returns (value, bytes_ok)."""
    out: dict[str, tuple[list[float], bool]] = {name: ([], True) for name in runners}
    for rep in range(reps):
        for name, fn in runners.items():
            gc.collect()
            value, ok = fn()
            samples, all_ok = out[name]
            samples.append(value)
            out[name] = (samples, all_ok and ok)
            log(f"    rep {rep + 1}/{reps} {name}: {value:,.3f}{'' if ok else '  BYTES WRONG'}")
    return out


def rows_from(
    scenario: str,
    results: dict[str, tuple[list[float], bool]],
    unit: str,
    *,
    higher_is_better: bool = True,
    notes: dict[str, str] | None = None,
) -> list[Row]:
    notes = notes or {}
    return [
        row(
            scenario,
            name,
            samples,
            unit,
            higher_is_better=higher_is_better,
            verified=ok,
            note=notes.get(name, ""),
        )
        for name, (samples, ok) in results.items()
    ]


def find(rows: Sequence[Row], peer: str) -> Row:
    return next(r for r in rows if r.peer == peer)


def best(rows: Sequence[Row], prefix: str) -> Row:
    """The best row whose peer name starts with ``prefix``."""
    cands = [r for r in rows if r.peer.startswith(prefix) and r.median is not None]
    key = (lambda r: r.median) if cands[0].higher_is_better else (lambda r: -r.median)
    return max(cands, key=key)


def at_least(r: Row, ref: Row, factor: float, label: str) -> None:
    """Target: mlstore row ``r`` is at least ``factor`` times as good as ``ref``."""
    ratio = r.ratio if ref is r else ref.ratio
    ok = ratio is not None and ratio >= factor
    check(ref, f"mlstore >= {factor:g}x {label}", ok, None if ratio is None else ratio / factor)


def cold_reader(ctx: Ctx, spec: dict[str, Any]) -> Reader:
    """A reader with a fresh cache (if it has one) and a warm connection pool."""
    reader = make_reader(spec)
    reader.warm_up(reader.path(WARMUP))
    return reader


def read_many_runner(
    ctx: Ctx,
    spec_fn: Callable[[], dict[str, Any]],
    keys: Sequence[str],
    cpu: list[float] | None = None,
) -> Callable[[], tuple[float, bool]]:
    """ops/s of one cold ``read_many`` over ``keys`` by a fresh reader; the client's CPU
    time per object (all threads of this process) goes to ``cpu``."""
    expected = ctx.exp(keys)

    def run() -> tuple[float, bool]:
        reader = cold_reader(ctx, spec_fn())
        paths = [reader.path(k) for k in keys]
        cpu0 = time.process_time()
        elapsed, out = timed(lambda: reader.read_many(paths))
        if cpu is not None:
            cpu.append((time.process_time() - cpu0) / len(keys))
        ok = verify(out, expected)
        del out
        reader.close()
        return len(keys) / elapsed, ok

    return run


def _cold(
    ctx: Ctx,
    scenario: str,
    *,
    proxy: bool,
    serial_keys: int,
    extra: dict[str, Callable[[], dict[str, Any]]] | None = None,
) -> list[Row]:
    """Cold read_many by mlstore and every peer (and ``extra`` readers); serial peers
    read the first keys only."""
    keys = ctx.keys["small"]
    subset = keys[:serial_keys]
    specs = {**_cold_specs(ctx, proxy=proxy), **(extra or {})}
    cpu: dict[str, list[float]] = {n: [] for n in specs}
    runners = {
        n: read_many_runner(ctx, s, subset if "serial" in n else keys, cpu[n])
        for n, s in specs.items()
    }
    results = interleave(ctx.sizes.reps, runners, ctx.log)
    notes = {}
    for n in specs:
        count = len(subset) if "serial" in n else len(keys)
        mid = sorted(cpu[n])[len(cpu[n]) // 2] * 1000
        notes[n] = f"{count} objects; client CPU {mid:.2f} ms/object"
    return rows_from(scenario, results, "ops/s", notes=notes)


# --------------------------------------------------------------------------- B1


def b1(ctx: Ctx) -> list[Row]:
    """Warm memory-tier hit, 256 KiB, read_bytes (ops/s)."""
    keys = ctx.keys["small"]
    expected = ctx.exp(keys)
    mls = make_reader(ctx.spec("mlstore", cache={"disk_dir": ctx.new_dir("b1-mlstore")}))
    simple = make_reader(ctx.spec("simplecache", cache_dir=ctx.new_dir("b1-simplecache")))
    local = make_reader({"peer": "local", "root": str(ctx.mirror)})
    readers = {"mlstore": mls, "simplecache (warm)": simple}
    if msc_available():
        readers["msc (warm)"] = make_reader(ctx.spec("msc", cache_dir=ctx.new_dir("b1-msc")))
    readers["local read()"] = local
    for name, r in readers.items():  # fill the caches (untimed)
        if name != "local read()":
            r.read_many([r.path(k) for k in keys])
    assert mls.store.cache.memory.size() >= len(keys) * SMALL  # type: ignore[attr-defined]

    def runner(reader: Reader) -> Callable[[], tuple[float, bool]]:
        paths = [reader.path(k) for k in keys]
        size = SMALL
        read = reader.read

        def run() -> tuple[float, bool]:
            # Results are dropped as they come (keeping a pass's hundreds of buffers
            # alive would measure page faults); every length is checked, and every 16th
            # result (a different one each pass) is kept and hashed after the timer.
            kept: list[tuple[int, Any]] = []
            short = 0

            def one_pass() -> None:
                nonlocal short
                offset = len(kept) % 16
                for i, p in enumerate(paths):
                    data = read(p)
                    if len(data) != size:
                        short += 1
                    if i % 16 == offset:
                        kept.append((i, data))

            elapsed, passes, _ = timed_passes(one_pass, ctx.sizes.min_seconds)
            ok = short == 0 and all(digest(d) == expected[i] for i, d in kept)
            return passes * len(paths) / elapsed, ok

        return run

    results = interleave(ctx.sizes.reps, {n: runner(r) for n, r in readers.items()}, ctx.log)
    for r in readers.values():
        r.close()
    rows = rows_from("B1", results, "ops/s")
    me = find(rows, "mlstore")
    fill_ratios(rows, me)
    check(me, ">= 200k ops/s", (me.median or 0) >= 200_000, (me.median or 0) / 200_000)
    at_least(me, find(rows, "simplecache (warm)"), 10, "simplecache warm")
    return rows


# --------------------------------------------------------------------------- B2


def b2(ctx: Ctx) -> list[Row]:
    """Warm disk-tier hit in a fresh process (memory tier empty), 256 KiB, verify on."""
    keys = ctx.keys["small"]
    expected = ctx.exp(keys)
    mls_dir = ctx.new_dir("b2-mlstore")
    simple_dir = ctx.new_dir("b2-simplecache")
    specs = {
        "mlstore": ctx.spec("mlstore", cache={"disk_dir": mls_dir, "verify": "always"}),
        "simplecache (warm)": ctx.spec("simplecache", cache_dir=simple_dir),
    }
    if msc_available():
        specs["msc (warm)"] = ctx.spec("msc", cache_dir=ctx.new_dir("b2-msc"))
        # MSC's default: a HEAD before every hit, to compare the cached ETag
        specs[MSC_B2_DEFAULT] = ctx.spec(
            "msc", cache_dir=ctx.new_dir("b2-msc-default"), check_source_version=True
        )
    specs["local read()"] = {"peer": "local", "root": str(ctx.mirror)}
    for name in [n for n in specs if n != "local read()"]:  # fill the caches (untimed)
        r = make_reader(specs[name])
        r.read_many([r.path(k) for k in [*keys, WARMUP]])
        r.close()

    def runner(spec: dict[str, Any]) -> Callable[[], tuple[float, bool]]:
        def run() -> tuple[float, bool]:
            task = {
                "task": "read_keys",
                "spec": spec,
                "keys": keys,
                "expected": expected,
                "mode": "read",
                "warmup": WARMUP,
            }
            res = run_child(task)
            return res["ops"] / res["elapsed"], bool(res["ok"])

        return run

    results = interleave(ctx.sizes.reps, {n: runner(s) for n, s in specs.items()}, ctx.log)
    rows = rows_from(
        "B2",
        results,
        "ops/s",
        notes={
            "mlstore": "fresh process, each key read once, xxh3 verify on",
            "msc (warm)": MSC_NOTE,
            MSC_B2_DEFAULT: "check_source_version on (MSC's default): a HEAD per hit",
        },
    )
    me = find(rows, "mlstore")
    fill_ratios(rows, me)
    at_least(me, find(rows, "simplecache (warm)"), 1.5, "simplecache warm")
    at_least(me, find(rows, "local read()"), 0.6, "raw local read()")
    return rows


# --------------------------------------------------------------------------- B3


def b3(ctx: Ctx) -> list[Row]:
    """Warm disk-tier hit of 64 MiB objects via open().readinto, in a fresh process (GB/s)."""
    keys = ctx.keys["large"]
    expected = ctx.exp(keys)
    specs = {
        "mlstore": ctx.spec(
            "mlstore",
            cache={"disk_dir": ctx.new_dir("b3-mlstore"), "block_threshold": LARGE},
        ),
        "mlstore (block-cached)": ctx.spec(
            "mlstore",
            cache={"disk_dir": ctx.new_dir("b3-mlstore-blocks"), "block_threshold": 16 * MiB},
        ),
        "simplecache (warm)": ctx.spec("simplecache", cache_dir=ctx.new_dir("b3-simplecache")),
    }
    if msc_available():
        specs["msc (warm)"] = ctx.spec("msc", cache_dir=ctx.new_dir("b3-msc"))
    specs["local readinto()"] = {"peer": "local", "root": str(ctx.mirror)}
    for name in [n for n in specs if n != "local readinto()"]:
        r = make_reader(specs[name])  # fill the disk caches (untimed)
        for k in keys:
            r.readinto(r.path(k), memoryview(bytearray(LARGE)))
        r.read(r.path(WARMUP))
        r.close()

    def runner(spec: dict[str, Any]) -> Callable[[], tuple[float, bool]]:
        def run() -> tuple[float, bool]:
            task = {
                "task": "read_keys",
                "spec": spec,
                "keys": keys,
                "expected": expected,
                "mode": "readinto",
                "size": LARGE,
                "warmup": WARMUP,
            }
            res = run_child(task)
            return res["bytes"] / res["elapsed"] / 1e9, bool(res["ok"])

        return run

    results = interleave(ctx.sizes.reps, {n: runner(s) for n, s in specs.items()}, ctx.log)
    rows = rows_from(
        "B3",
        results,
        "GB/s",
        notes={
            "mlstore": "whole-object entry (block_threshold 64 MiB), fresh process",
            "mlstore (block-cached)": "block_threshold 16 MiB, 8 MiB blocks (informative)",
            "msc (warm)": f"open().readinto; {MSC_NOTE}",
        },
    )
    me = find(rows, "mlstore")
    fill_ratios(rows, me)
    at_least(me, find(rows, "local readinto()"), 0.8, "raw local readinto()")
    return rows


# --------------------------------------------------------------------------- B4, B5


def _cold_specs(ctx: Ctx, *, proxy: bool) -> dict[str, Callable[[], dict[str, Any]]]:
    w = ctx.mlstore_workers
    specs: dict[str, Callable[[], dict[str, Any]]] = {
        "mlstore": lambda: ctx.spec(
            "mlstore", proxy=proxy, cache={"disk_dir": ctx.new_dir("cold-mlstore")}
        ),
        "s3fs cat (batched)": lambda: ctx.spec("s3fs", proxy=proxy, batched=True),
        "s3fs serial": lambda: ctx.spec("s3fs", proxy=proxy),
        f"boto3 ({w} threads)": lambda: ctx.spec("boto3", proxy=proxy, threads=w),
        "boto3 serial": lambda: ctx.spec("boto3", proxy=proxy),
        "simplecache serial": lambda: ctx.spec(
            "simplecache", proxy=proxy, cache_dir=ctx.new_dir("cold-simplecache")
        ),
    }
    if obstore_available():
        specs[f"obstore (async, {w} in flight)"] = lambda: ctx.spec(
            "obstore", proxy=proxy, concurrency=w
        )
        specs["obstore serial"] = lambda: ctx.spec("obstore", proxy=proxy)
    return specs


def b4(ctx: Ctx) -> list[Row]:
    """Cold read_many of 256 KiB objects, no added latency (ops/s)."""
    fast: dict[str, Callable[[], dict[str, Any]]] = {}
    if obstore_available():  # the obstore transport (issue 12 item 5)
        fast["mlstore[fast]"] = lambda: ctx.spec(
            "mlstore", cache={"disk_dir": ctx.new_dir("cold-mlstore-fast")}, transport="obstore"
        )
    rows = _cold(ctx, "B4", proxy=False, serial_keys=ctx.sizes.serial_subset, extra=fast)
    me = find(rows, "mlstore")
    fill_ratios(rows, me)
    at_least(me, best(rows, "s3fs"), 1.7, "best s3fs")
    if obstore_available():
        at_least(me, best(rows, "obstore"), 1.0, "best obstore")
        mine = find(rows, "mlstore[fast]")
        for ref, factor, label in (
            (best(rows, "obstore"), 1.0, "best obstore"),
            (find(rows, "s3fs cat (batched)"), 2.0, "s3fs batched"),
        ):
            got = ratio_vs(mine, ref)
            met = got is not None and got >= factor
            check(mine, f"mlstore[fast] >= {factor:g}x {label}", met, got and got / factor)
    return rows


def b5(ctx: Ctx) -> list[Row]:
    """Cold read_many through the cloud profile (20 ms per request), ops/s."""
    keys = ctx.keys["small"]
    specs = _cold_specs(ctx, proxy=True)
    # The server path's own limit: the fastest raw client through the proxy, no latency.
    fastest = next((n for n in specs if n.startswith("obstore (async")), None)
    fastest = fastest or next(n for n in specs if n.startswith("boto3 ("))
    set_latency(ctx.proxy, 0.0)
    ceiling = interleave(
        ctx.sizes.reps,
        {f"ceiling: {fastest} via proxy, 0 ms": read_many_runner(ctx, specs[fastest], keys)},
        ctx.log,
    )
    ms = int(ctx.latency * 1000)
    set_latency(ctx.proxy, ctx.latency)
    try:
        rows = _cold(ctx, f"B5 ({ms} ms)", proxy=True, serial_keys=ctx.sizes.cloud_serial_subset)
    finally:
        set_latency(ctx.proxy, 0.0)
    me = find(rows, "mlstore")
    floor_ops = ctx.mlstore_workers / ctx.latency
    floor = row(
        me.scenario,
        f"latency floor ({ctx.mlstore_workers} x {ms} ms in flight)",
        [floor_ops],
        "ops/s",
        note=f"requests x latency / concurrency = {len(keys) / floor_ops:.3f} s",
    )
    ceil_row = rows_from(me.scenario, ceiling, "ops/s")[0]
    ceil_row.note = "the server path's own limit (moto + proxy + client on the same cores)"
    rows += [floor, ceil_row]
    fill_ratios(rows, me)
    at_least(me, find(rows, "s3fs serial"), 10, "s3fs serial")
    # within 1.5x of the floor: mlstore's rate >= floor rate / 1.5
    within = (floor.ratio or 0) * 1.5
    check(floor, "mlstore within 1.5x of it", within >= 1, within)
    eff = min(floor_ops, ceil_row.median or floor_ops)
    ceil_row.target = "informative: floor incl. server limit"
    ceil_row.note += f"; mlstore / min(floor, ceiling) = {(me.median or 0) / eff:.2f}"
    return rows


# --------------------------------------------------------------------------- B7


def b7(ctx: Ctx) -> list[Row]:
    """8 processes cold-read the same objects at once: GETs at the proxy."""
    s = ctx.sizes
    keys = ctx.keys["small"][: s.b7_keys]
    expected = ctx.exp(keys)
    ms = int(ctx.latency * 1000)
    scen = f"B7 ({s.processes} procs, {ms} ms)"
    # kind -> the spec of its readers, given a fresh cache directory they all share
    kinds: dict[str, Callable[[str], dict[str, Any]]] = {
        "mlstore": lambda d: ctx.spec("mlstore", proxy=True, cache={"disk_dir": d}),
        "simplecache": lambda d: ctx.spec("simplecache", proxy=True, cache_dir=d),
    }
    if msc_available():  # MSC's two documented reads: read() takes no lock, open() does
        kinds["msc read()"] = lambda d: ctx.spec("msc", proxy=True, cache_dir=d)
        kinds["msc open().read()"] = lambda d: ctx.spec("msc", proxy=True, cache_dir=d, api="open")

    def runner(kind: str) -> Callable[[], tuple[float, bool]]:
        def run() -> tuple[float, bool]:
            d = ctx.new_dir("b7-" + "".join(c if c.isalnum() else "-" for c in kind))
            spec = kinds[kind](d)
            tasks = [
                {
                    "task": "many_readers",
                    "spec": spec,
                    "keys": keys,
                    "expected": expected,
                    "warmup": WARMUP,
                }
                for _ in range(s.processes)
            ]
            from benchmarks.common import Child

            children = [Child(t) for t in tasks]
            for c in children:
                c.wait_ready()
            proxy_reset(ctx.proxy)
            t0 = time.perf_counter()
            for c in children:
                c.go()
            results = [c.result() for c in children]
            wall = time.perf_counter() - t0
            gets = proxy_gets(ctx.proxy)
            total = int(proxy_counts(ctx.proxy)["total"])
            bad = sum(int(r["bad"]) for r in results)
            walls[kind].append(wall)
            totals[kind].append(total)
            bads[kind].append(bad)
            return float(gets), bad == 0

        return run

    walls: dict[str, list[float]] = {k: [] for k in kinds}
    totals: dict[str, list[int]] = {k: [] for k in kinds}
    bads: dict[str, list[int]] = {k: [] for k in kinds}
    set_latency(ctx.proxy, ctx.latency)
    try:
        results = interleave(s.b7_reps, {k: runner(k) for k in kinds}, ctx.log)
    finally:
        set_latency(ctx.proxy, 0.0)
    rows = rows_from(scen, results, "GETs", higher_is_better=False)
    for r in rows:
        name = r.peer
        r.note = (
            f"{len(keys)} objects; all requests {sorted(totals[name])}; "
            f"wall {min(walls[name]):.1f}-{max(walls[name]):.1f} s"
        )
        if any(bads[name]):
            r.note += f"; {max(bads[name])} reads returned wrong bytes"
    wall_rows = [row(scen, f"{n} wall time", walls[n], "s", higher_is_better=False) for n in walls]
    rows += wall_rows
    me = find(rows, "mlstore")
    fill_ratios(rows[: len(kinds)], me)
    fill_ratios(wall_rows, wall_rows[0])
    gets = me.median or 0
    check(me, f"= {len(keys)} GETs", gets <= len(keys), len(keys) / gets if gets else None)
    for r in rows[: len(kinds)]:
        if not r.is_mlstore:
            r.target = f"informative (up to {s.processes * len(keys)})"
    return rows


# --------------------------------------------------------------------------- B8


def b8(ctx: Ctx) -> list[Row]:
    """200 random 64 KiB reads in one 64 MiB object, cold then warm (reads/s)."""
    key = ctx.keys["large"][0]
    data = (ctx.mirror / key).read_bytes()
    rng = random.Random(8)
    offsets = [rng.randrange(0, LARGE - RANGE) for _ in range(ctx.sizes.ranges)]
    expected = [digest(data[o : o + RANGE]) for o in offsets]
    del data
    block = 8 * MiB
    mls_cache = {"block_threshold": 16 * MiB, "block_size": block}

    def by_file(reader: Reader) -> list[Any]:
        out = []
        with reader.open(reader.path(key)) as fh:
            for o in offsets:
                fh.seek(o)
                out.append(fh.read(RANGE))
        return out

    def by_range(reader: Reader) -> list[Any]:
        path = reader.path(key)
        return [reader.read_range(path, o, o + RANGE) for o in offsets]  # type: ignore[attr-defined]

    # Peers without a cache make one GET per read, and moto copies the whole object for
    # every ranged GET (about 60 ms for 64 MiB): they get the first few offsets only.
    few = offsets[: ctx.sizes.uncached_ranges]

    def by_file_few(reader: Reader) -> list[Any]:
        out = []
        with reader.open(reader.path(key)) as fh:
            for o in few:
                fh.seek(o)
                out.append(fh.read(RANGE))
        return out

    def by_range_few(reader: Reader) -> list[Any]:
        path = reader.path(key)
        return [reader.read_range(path, o, o + RANGE) for o in few]  # type: ignore[attr-defined]

    peers: dict[str, tuple[Callable[[bool], dict[str, Any]], Callable[[Reader], list[Any]]]] = {
        "mlstore open/seek/read": (
            lambda p: ctx.spec(
                "mlstore", proxy=p, cache={**mls_cache, "disk_dir": ctx.new_dir("b8-m1")}
            ),
            by_file,
        ),
        "mlstore read_bytes(start, end)": (
            lambda p: ctx.spec(
                "mlstore", proxy=p, cache={**mls_cache, "disk_dir": ctx.new_dir("b8-m2")}
            ),
            by_range,
        ),
        # With its defaults, mlstore caches an object of up to 64 MiB whole (one GET),
        # as blockcache's default 50 MiB blocks fetch this one in two.
        "mlstore open/seek/read (defaults)": (
            lambda p: ctx.spec("mlstore", proxy=p, cache={"disk_dir": ctx.new_dir("b8-m3")}),
            by_file,
        ),
        "mlstore read_bytes(start, end) (defaults)": (
            lambda p: ctx.spec("mlstore", proxy=p, cache={"disk_dir": ctx.new_dir("b8-m4")}),
            by_range,
        ),
        "blockcache (s3fs default 50 MiB blocks)": (
            lambda p: ctx.spec("blockcache", proxy=p, cache_dir=ctx.new_dir("b8-bc1")),
            by_file,
        ),
        "blockcache (8 MiB blocks)": (
            lambda p: ctx.spec(
                "blockcache", proxy=p, cache_dir=ctx.new_dir("b8-bc2"), block_size=block
            ),
            by_file,
        ),
        "s3fs open/seek/read (no cache)": (lambda p: ctx.spec("s3fs", proxy=p), by_file_few),
    }
    if obstore_available():
        peers["obstore get_range"] = (lambda p: ctx.spec("obstore", proxy=p), by_range_few)

    warm_results: dict[str, tuple[list[float], bool]] = {}

    def runner(
        name: str, spec_fn: Callable[[bool], dict[str, Any]], how: Callable[[Reader], list[Any]]
    ) -> Callable[[bool], Callable[[], tuple[float, bool]]]:
        def make(proxy: bool) -> Callable[[], tuple[float, bool]]:
            def run() -> tuple[float, bool]:
                reader = cold_reader(ctx, spec_fn(proxy))
                elapsed, out = timed(lambda: how(reader))
                ok = verify(out, expected[: len(out)])
                if not proxy:  # warm: the same reads again, from what the cold pass cached
                    gc.collect()
                    w_elapsed, w_out = timed(lambda: how(reader))
                    samples, w_ok = warm_results.get(name, ([], True))
                    samples.append(len(w_out) / w_elapsed)
                    warm_results[name] = (samples, w_ok and verify(w_out, expected[: len(w_out)]))
                reader.close()
                return len(out) / elapsed, ok

            return run

        return make

    makers = {n: runner(n, s, h) for n, (s, h) in peers.items()}
    rows: list[Row] = []
    cold = interleave(ctx.sizes.reps, {n: m(False) for n, m in makers.items()}, ctx.log)
    blocks = f"block_threshold 16 MiB, {block // MiB} MiB blocks"
    note = {"mlstore open/seek/read": blocks, "mlstore read_bytes(start, end)": blocks}
    note["mlstore open/seek/read (defaults)"] = "whole object (block_threshold 64 MiB)"
    note["mlstore read_bytes(start, end) (defaults)"] = "whole object (block_threshold 64 MiB)"
    note["s3fs open/seek/read (no cache)"] = f"first {len(few)} reads (one GET each)"
    note["obstore get_range"] = f"first {len(few)} reads (one GET each)"
    cold_rows = rows_from("B8 cold", cold, "reads/s", notes=note)
    warm_rows = rows_from("B8 warm", warm_results, "reads/s", notes=note)
    warm_rows = [r for r in warm_rows if not r.peer.startswith(("obstore", "s3fs"))]
    set_latency(ctx.proxy, ctx.latency)
    try:
        cloud = interleave(ctx.sizes.reps, {n: m(True) for n, m in makers.items()}, ctx.log)
    finally:
        set_latency(ctx.proxy, 0.0)
    ms = int(ctx.latency * 1000)
    cloud_rows = rows_from(f"B8 cold ({ms} ms)", cloud, "reads/s", notes=note)
    for group in (cold_rows, warm_rows, cloud_rows):
        me = best(group, "mlstore")
        fill_ratios(group, me)
        at_least(me, best(group, "blockcache"), 1.0, "best blockcache")
        rows += group
    return rows


# --------------------------------------------------------------------------- B9


def b9(ctx: Ctx) -> list[Row]:
    """30% duplicate content: disk bytes and remote bytes against the unique bytes."""
    keys = ctx.keys["dup"]
    expected = ctx.exp(keys)
    unique = ctx.unique_dup_bytes
    total = sum(ctx.object_size[k] for k in keys)
    disk: dict[str, list[float]] = {}
    remote: dict[str, list[float]] = {}
    oks: dict[str, bool] = {}

    def record(name: str, disk_b: float | None, remote_b: float, ok: bool) -> None:
        if disk_b is not None:
            disk.setdefault(name, []).append(disk_b / unique)
        remote.setdefault(name, []).append(remote_b / unique)
        oks[name] = oks.get(name, True) and ok

    modes = (
        "read_many",
        "info, then read_many",
        "info, then serial reads",
        "written on this node, info, then read_many",
    )
    for rep in range(ctx.sizes.b9_reps):
        for mode in modes:
            d = ctx.new_dir("b9-mlstore")
            if mode.startswith("written on this node"):
                from mlstore import Store

                # The dataset written again (same bytes, so the same ETags) by a Store
                # on this node: the node has proven each object's hash for its version.
                # (Through the proxy, as the reader: the same endpoint is the same scope.)
                with Store(
                    options={"s3": {"endpoint_url": ctx.proxy}}, cache={"disk_dir": d}
                ) as writer:
                    for k, data in ctx.dup_contents.items():
                        writer.write_bytes(f"s3://{BUCKET}/{k}", data)
            reader = make_reader(ctx.spec("mlstore", proxy=True, cache={"disk_dir": d}))
            store = reader.store  # type: ignore[attr-defined]
            paths = [reader.path(k) for k in keys]
            if mode != "read_many":
                for p in paths:  # a HEAD each: the content hash comes from the metadata
                    store.info(p)
            proxy_reset(ctx.proxy)
            before = store.stats()["bytes_read"]
            if mode.endswith("serial reads"):
                out = [store.read_bytes(p) for p in paths]
            else:
                out = store.read_many(paths)
            ok = verify(out, expected)
            del out
            remote_b = store.stats()["bytes_read"] - before
            gets = proxy_gets(ctx.proxy)
            blobs = dir_bytes(os.path.join(d, "blobs"))
            name = f"mlstore ({mode})"
            record(name, blobs, remote_b, ok)
            ctx.log(f"    rep {rep + 1} {name}: disk {blobs:,} remote {remote_b:,} GETs {gets}")
            reader.close()
        d = ctx.new_dir("b9-simplecache")
        reader = make_reader(ctx.spec("simplecache", proxy=True, cache_dir=d))
        paths = [reader.path(k) for k in keys]
        proxy_reset(ctx.proxy)
        out = reader.read_many(paths)
        ok = verify(out, expected)
        del out
        gets = proxy_gets(ctx.proxy)
        record("simplecache", dir_bytes(d), gets * SMALL, ok)
        ctx.log(f"    rep {rep + 1} simplecache: disk {dir_bytes(d):,} GETs {gets}")
        reader.close()

    rows: list[Row] = []
    head = f"{len(keys)} x 256 KiB, {unique / total:.0%} unique"
    disk_rows = [
        row("B9 disk bytes", n, v, "x unique", higher_is_better=False, verified=oks[n], note=head)
        for n, v in disk.items()
    ]
    remote_rows = [
        row("B9 remote bytes", n, v, "x unique", higher_is_better=False, verified=oks[n])
        for n, v in remote.items()
    ]
    me_disk = find(disk_rows, "mlstore (read_many)")
    fill_ratios(disk_rows, me_disk)
    for r in disk_rows:
        if r.is_mlstore:
            m = r.median or 0
            check(r, "= unique bytes (1.00)", m <= 1.0 + 1e-9, 1 / m if m else None)
    me_remote = find(remote_rows, "mlstore (written on this node, info, then read_many)")
    fill_ratios(remote_rows, me_remote)
    for r in remote_rows:
        if r.peer.startswith("mlstore (written on this node"):
            m = r.median or 0
            check(r, "= unique bytes when hashes proven", m <= 1.0 + 1e-9, 1 / m if m else None)
    find(remote_rows, "mlstore (read_many)").target = "informative (hashes unknown: no HEAD)"
    for r in remote_rows:
        if r.peer.startswith("mlstore (info"):
            r.target = "informative (hashes from metadata, not proven on this node: fetched)"
    rows += disk_rows + remote_rows
    return rows


# --------------------------------------------------------------------------- B10


def b10(ctx: Ctx) -> list[Row]:
    """Memory: the memory tier keeps its budget; streaming a large object keeps RSS low."""
    s = ctx.sizes
    keys = ctx.keys["small"]
    budget = s.memory_budget
    warm = ctx.new_dir("b10-warm")
    r = make_reader(ctx.spec("mlstore", cache={"disk_dir": warm}))
    r.read_many([r.path(k) for k in [*keys, WARMUP]])
    r.close()
    fill: list[float] = []
    rss: list[float] = []
    ok = True
    for rep in range(s.reps):
        res = run_child(
            {
                "task": "memory_budget",
                "spec": ctx.spec("mlstore", cache={"disk_dir": warm, "memory_bytes": budget}),
                "keys": keys,
                "expected": ctx.exp(keys),
                "warmup": WARMUP,
                "passes": 2,
            }
        )
        fill.append(max(res["tier_bytes"], res["tier_max_seen"]) / res["budget"])
        rss.append((res["rss_after"] - res["rss_before"]) / res["budget"])
        ok = ok and bool(res["ok"])
        ctx.log(f"    rep {rep + 1} memory tier: {res}")
    rows = [
        row(
            "B10 memory tier",
            "mlstore (tier bytes / budget)",
            fill,
            "x budget",
            higher_is_better=False,
            verified=ok,
            note=f"budget {budget // MiB} MiB, {len(keys)} x 256 KiB read twice",
        ),
        row(
            "B10 memory tier",
            "mlstore (RSS growth / budget)",
            rss,
            "x budget",
            higher_is_better=False,
            note="informative: process RSS after minus before the reads",
        ),
    ]
    me = rows[0]
    me.ratio = 1.0
    m = me.median or 0
    check(me, "0.9-1.1", 0.9 <= m <= 1.1, min(m / 0.9, 1.1 / m) if m else None)

    size = s.stream
    chunk = 1 * MiB
    specs: dict[str, Callable[[], dict[str, Any]]] = {
        "mlstore open() (default config)": lambda: ctx.spec(
            "mlstore", cache={"disk_dir": ctx.new_dir("b10-stream")}
        ),
        "mlstore open() (memory_bytes=0)": lambda: ctx.spec(
            "mlstore", cache={"disk_dir": ctx.new_dir("b10-stream0"), "memory_bytes": 0}
        ),
        "s3fs open()": lambda: ctx.spec("s3fs"),
        "boto3 get_object iter_chunks": lambda: ctx.spec("boto3"),
    }
    if obstore_available():
        specs["obstore get().stream()"] = lambda: ctx.spec("obstore")
    extra: dict[str, list[dict[str, Any]]] = {}

    def runner(
        name: str, spec_fn: Callable[[], dict[str, Any]]
    ) -> Callable[[], tuple[float, bool]]:
        def run() -> tuple[float, bool]:
            res = run_child(
                {
                    "task": "stream",
                    "spec": spec_fn(),
                    "key": "stream/big",
                    "size": size,
                    "expected": ctx.expected["stream/big"],
                    "chunk": chunk,
                    "warmup": WARMUP,
                }
            )
            extra.setdefault(name, []).append(res)
            return res["peak"] / MiB, bool(res["ok"])

        return run

    results = interleave(s.stream_reps, {n: runner(n, f) for n, f in specs.items()}, ctx.log)
    scen = f"B10 stream {size // MiB} MiB"
    stream_rows = rows_from(scen, results, "MiB peak RSS", higher_is_better=False)
    for r in stream_rows:
        runs = extra[r.peer]
        base = sorted(x["baseline_peak"] for x in runs)[len(runs) // 2] / MiB
        growth = sorted((x["peak"] - x["baseline_peak"]) for x in runs)[len(runs) // 2] / MiB
        secs = sorted(x["elapsed"] for x in runs)[len(runs) // 2]
        r.note = (
            f"before streaming {base:.0f} MiB, growth {growth:.0f} MiB; "
            f"{size / secs / 1e9:.2f} GB/s"
        )
    me = find(stream_rows, "mlstore open() (default config)")
    fill_ratios(stream_rows, me)
    check(me, "< 128 MiB", (me.median or 0) < 128, 128 / me.median if me.median else None)
    rows += stream_rows
    return rows


def b6(ctx: Ctx) -> list[Row]:
    """DataLoader epochs with peers: in its own module, which builds on this one."""
    from benchmarks import dataloader

    return dataloader.b6(ctx)


def b11(ctx: Ctx) -> list[Row]:
    """Processes sharing one node cache: in its own module, which builds on this one."""
    from benchmarks import scaling

    return scaling.b11(ctx)


def b12(ctx: Ctx) -> list[Row]:
    """Hits past the ttl (stale-while-revalidate): in its own module."""
    from benchmarks import staleness

    return staleness.b12(ctx)


def b13(ctx: Ctx) -> list[Row]:
    """A dataset twice the disk cache: eviction by the sampler's plan vs LRU."""
    from benchmarks import eviction

    return eviction.b13(ctx)


def b14(ctx: Ctx) -> list[Row]:
    """Checkpoint save/load beside torch.save, DCP and s3torchconnector: in its own module."""
    from benchmarks import checkpoint

    return checkpoint.b14(ctx)


def b15(ctx: Ctx) -> list[Row]:
    """See :mod:`benchmarks.copying` (not `copy`: run.py as a script would shadow the stdlib)."""
    from benchmarks import copying

    return copying.b15(ctx)


def b16(ctx: Ctx) -> list[Row]:
    """CLI start time beside the imports of SDK-based CLIs: see :mod:`benchmarks.startup`."""
    from benchmarks import startup

    return startup.b16(ctx)


SCENARIOS: dict[str, tuple[str, Callable[[Ctx], list[Row]]]] = {
    "B1": ("warm memory-tier hit, 256 KiB, read_bytes", b1),
    "B2": ("warm disk-tier hit in a fresh process, 256 KiB, verify on", b2),
    "B3": ("warm disk-tier hit, 64 MiB objects, open().readinto", b3),
    "B4": ("cold read_many of 256 KiB objects, no added latency", b4),
    "B5": ("cold read_many, cloud profile (latency per request)", b5),
    "B6": ("DataLoader epochs (map-style, 4 workers)", b6),
    "B7": ("8 processes cold-read the same objects: GETs", b7),
    "B8": ("200 random 64 KiB reads in a 64 MiB object", b8),
    "B9": ("30% duplicate content: disk and remote bytes", b9),
    "B10": ("memory: tier budget, RSS while streaming", b10),
    "B11": ("1-8 processes sharing a node cache: hits, fills, hit cost vs entries", b11),
    "B12": ("disk hits after the ttl ran out, beside fresh hits: no revalidation cliff", b12),
    "B13": ("a dataset twice the disk cache, reshuffled epochs: Belady by plan vs LRU", b13),
    "B14": ("checkpoint save/load of a state dict at 20 ms; dedupe of a second save", b14),
    "B15": ("cp -r of 2,000 x 4 KiB objects at 20 ms: Store.copy vs s3fs put/get", b15),
    "B16": ("CLI start: mlstore --help beside import s3fs / boto3", b16),
}
