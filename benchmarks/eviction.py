"""B13: a dataset twice the size of the disk cache, read for several epochs in a
reshuffled order: eviction by the sampler's plan (Belady) against LRU.

One process reads ``N`` objects of 16 KiB through a ``MapDataset`` and a
``PrefetchSampler`` over a seeded ``DistributedSampler`` (a new order every epoch, each
known in advance), with a disk tier that holds half of them and the memory tier off.
The figure is the share of reads in the epochs after the first that needed no request
(the Store's own count: the one process makes every read and every warm): with
``plan=True`` the node cache evicts the object whose next use is furthest away; with
``plan=False``, the least recently used.

Beside them, for scale, the same orders replayed offline through an ideal cache of
the same size: LRU, and Belady's optimum (what any eviction rule could at best do with
one read at a time). A warm of the next samples fills the cache ahead of the reads, so
the real runs hold a little less of the dataset for the future than the ideal cache.
"""

from __future__ import annotations

import collections
import shutil
import uuid

from benchmarks.common import BUCKET, Row, check, fill_ratios, row
from benchmarks.scenarios import Ctx

SIZE = 16 * 1024
EPOCHS = 3
SEED = 11


def _orders(n: int) -> list[list[int]]:
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=SEED)
    out = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def simulate(orders: list[list[int]], capacity: int, rule: str) -> float:
    """Hit share of epochs 2.. for an ideal cache of ``capacity`` objects, ``rule``
    ``"lru"`` or ``"opt"`` (Belady: evict the object used furthest in the future)."""
    seq = [i for order in orders for i in order]
    first = len(orders[0])
    nxt: list[int] = [0] * len(seq)
    seen: dict[int, int] = {}
    for t in range(len(seq) - 1, -1, -1):
        nxt[t] = seen.get(seq[t], 1 << 60)
        seen[seq[t]] = t
    cache: collections.OrderedDict[int, int] = collections.OrderedDict()  # item -> next use
    hits = 0
    for t, item in enumerate(seq):
        if item in cache:
            hits += t >= first
            cache.move_to_end(item)
        elif len(cache) >= capacity:
            if rule == "lru":
                cache.popitem(last=False)
            else:
                del cache[max(cache, key=lambda k: cache[k])]
        cache[item] = nxt[t]
    return 100.0 * hits / (len(seq) - first)


def _run(ctx: Ctx, prefix: str, n: int, plan: bool) -> tuple[float, bool]:
    from torch.utils.data import DataLoader, DistributedSampler

    from mlstore import Store
    from mlstore.torch import MapDataset, PrefetchSampler

    disk = ctx.new_dir(f"b13-{uuid.uuid4().hex[:8]}")
    store = Store(
        options={"s3": {"endpoint_url": ctx.moto}},
        cache={"disk_dir": disk, "disk_bytes": n // 2 * SIZE, "memory_bytes": 0},
    )
    ds = MapDataset(prefix, store=store)
    inner = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=SEED)
    sampler = PrefetchSampler(inner, ds, lookahead=32, concurrency=8, plan=plan)
    loader = DataLoader(ds, sampler=sampler, batch_size=32, collate_fn=list)
    ok, gets = True, 0
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        before = store.stats()["requests"]
        got = [b for batch in loader for b in batch]
        sampler.settle()
        ok = ok and sorted(b[:4] for b in got) == sorted(_head(i) for i in range(n))
        if epoch:
            gets += store.stats()["requests"] - before
    sampler.close()
    store.close()
    shutil.rmtree(disk, ignore_errors=True)
    return 100.0 * (1 - gets / (n * (EPOCHS - 1))), ok


def _head(i: int) -> bytes:
    return i.to_bytes(4, "big")


def b13(ctx: Ctx) -> list[Row]:
    """Hit share of epochs 2-3 with a cache of half the dataset: plan vs LRU."""
    from mlstore import Store

    n = 400 if ctx.sizes.reps <= 3 else 1000
    prefix = f"s3://{BUCKET}/b13-{n}/"
    with Store(options={"s3": {"endpoint_url": ctx.moto}}, cache={"enabled": False}) as w:
        if not w.exists(prefix + "00000"):
            for i in range(n):
                w.write_bytes(f"{prefix}{i:05d}", _head(i) + bytes(SIZE - 4))
    runs: dict[str, tuple[list[float], bool]] = {}
    names = {True: "mlstore, sampler's plan (Belady)", False: "mlstore, LRU (plan=False)"}
    for rep in range(max(1, ctx.sizes.reps - 2)):  # the counts vary little
        for plan, name in names.items():
            value, ok = _run(ctx, prefix, n, plan)
            samples, all_ok = runs.get(name, ([], True))
            runs[name] = ([*samples, value], all_ok and ok)
            ctx.log(f"    rep {rep + 1} {name}: {value:.1f}% hits")
    scenario = f"B13 epochs 2-{EPOCHS}, {n} x 16 KiB, disk cache = half"
    rows = {name: row(scenario, name, s, "% hits", verified=ok) for name, (s, ok) in runs.items()}
    orders = _orders(n)
    for rule, label in (("opt", "ideal cache, Belady's optimum"), ("lru", "ideal cache, LRU")):
        rows[label] = row(scenario, label, [simulate(orders, n // 2, rule)], "% hits")
        rows[label].note = "offline replay of the same orders"
    mine, lru = rows[names[True]], rows[names[False]]
    fill_ratios(list(rows.values()), mine)
    ratio = lru.ratio
    check(lru, "plan keeps more hits than LRU", ratio is not None and ratio > 1.0, ratio)
    mine.note = "lookahead 32, 8 warms in flight, batch 32, 1 process"
    return list(rows.values())
