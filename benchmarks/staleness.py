"""B12: disk hits after the ttl ran out, beside fresh disk hits (no revalidation cliff).

Two fresh processes read the same 4 KiB objects (B11's), each once, from one node cache
with the memory tier off, so every read is a disk hit:

- **fresh**: every copy within its ttl: no request at all;
- **past the ttl**: every copy older than its ttl, within the stale window (the
  default since stale-while-revalidate): served at once while one process of the node
  checks it in the background. After the window the processes wait for their checks,
  and the proxy's HEAD count says how many the node made (the target: one per object,
  not one per read);
- **past the ttl, checks through mlstore[fast]**: the same, with the obstore transport
  (when installed), whose HEADs cost the hits' cores less;
- **past the ttl, no window** (``stale_while_revalidate=0``, what every release before
  it did): each read makes its HEAD first. Fewer objects: each costs a request.

Each repetition reads a fresh copy of one filled cache directory, so every run finds the
same stamps (a check restamps its entry, and the next run would find it fresh).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import Child, Row, fill_ratios, proxy_counts, proxy_reset, row
from benchmarks.peers import make_reader, obstore_available
from benchmarks.scaling import _prepare
from benchmarks.scenarios import WARMUP, Ctx, at_least, interleave

PROCS = 2
TTL = 1.0  # every copy is older than this by the time it is read
WINDOW = 86_400.0  # and younger than this
SYNC_KEYS = 100


def _spec(
    ctx: Ctx, disk_dir: str, ttl: float, window: float, transport: str | None = None
) -> dict[str, Any]:
    cache = {
        "disk_dir": disk_dir,
        "memory_bytes": 0,
        "ttl": ttl,
        "stale_while_revalidate": window,
    }
    return ctx.spec("mlstore", proxy=True, cache=cache, transport=transport)


def b12(ctx: Ctx) -> list[Row]:
    """Disk hits past the ttl vs fresh ones, 2 processes: ops/s and HEADs per object."""
    _prepare(ctx)
    keys = ctx.keys["b11"][: ctx.sizes.b11_hit_keys]
    base = ctx.new_dir("b12-base")
    filler = make_reader(_spec(ctx, base, 3600.0, 0.0))
    filler.read_many([filler.path(k) for k in [*keys, WARMUP]])
    filler.close()
    filled = time.time()
    copies = iter(range(1_000_000))
    heads: dict[str, list[float]] = {}

    def runner(
        name: str, ttl: float, window: float, names: list[str], transport: str | None = None
    ) -> Callable[[], Any]:
        expected = ctx.exp(names)

        def run() -> tuple[float, bool]:
            time.sleep(max(0.0, filled + TTL + 0.1 - time.time()))  # all copies past TTL
            disk_dir = str(ctx.tmp / "work" / f"b12-{next(copies)}")
            shutil.copytree(base, disk_dir)
            spec = _spec(ctx, disk_dir, ttl, window, transport)
            shift = [len(names) * i // PROCS for i in range(PROCS)]
            children = [
                Child(
                    {
                        "task": "window",
                        "kind": "hit",
                        "spec": spec,
                        "keys": names[k:] + names[:k],
                        "expected": expected[k:] + expected[:k],
                        "seconds": 120.0,
                        "cycle": False,
                        "warmup": WARMUP,
                        "settle": True,
                    }
                )
                for k in shift
            ]
            for c in children:
                c.wait_ready()
            proxy_reset(ctx.proxy)
            at = time.time() + 0.1
            for c in children:
                c.go(at)
            results = [c.result() for c in children]
            made = int(proxy_counts(ctx.proxy)["methods"].get("HEAD", 0))
            heads.setdefault(name, []).append(made / len(names))
            shutil.rmtree(disk_dir, ignore_errors=True)
            ok = all(
                not r["bad"]
                and r["ops"] == len(names)
                and r.get("settled", True)
                and r["counts"]["disk_hits"] == r["ops"]
                for r in results
            )
            return sum(r["ops"] / r["elapsed"] for r in results), ok

        return run

    fresh, stale, cliff = (
        "fresh hits",
        "hits past the ttl (stale-while-revalidate)",
        "hits past the ttl, no window (before)",
    )
    runners = {
        fresh: runner(fresh, 3600.0, 0.0, keys),
        stale: runner(stale, TTL, WINDOW, keys),
        cliff: runner(cliff, TTL, 0.0, keys[:SYNC_KEYS]),
    }
    fast = "hits past the ttl, checks through mlstore[fast]"
    if obstore_available():  # the checks' HEADs through the obstore transport
        runners[fast] = runner(fast, TTL, WINDOW, keys, "obstore")
    results = interleave(ctx.sizes.reps, runners, ctx.log)
    rows = {
        name: row(f"B12 disk hits, {PROCS} procs", name, samples, "ops/s", verified=ok)
        for name, (samples, ok) in results.items()
    }
    mine = rows[stale]
    fill_ratios(list(rows.values()), mine)
    at_least(mine, rows[fresh], 0.5, "fresh hits")
    for name, r in rows.items():
        per_object = sorted(heads[name])[len(heads[name]) // 2]
        r.note = f"{per_object:.2f} HEADs per object for the node"
    rows[fresh].note += f"; {len(keys)} objects x 4 KiB read once by each process"
    rows[cliff].note += f"; {SYNC_KEYS} objects"
    return [mine, *(rows[n] for n in rows if n != stale)]
