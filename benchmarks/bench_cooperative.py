"""Cooperative warm against every node downloading: where does the crossover lie?

Three simulated nodes (three processes in one gloo group on loopback, each with its own
``MLSTORE_NODE_ID`` and fresh cache directory) fill their caches with the same objects
from moto behind the latency proxy, two ways:

- **download**: every node warms every object itself (16 at a time), as a cluster
  without cooperation does: GETs = objects x nodes;
- **cooperative**: :func:`mlstore.torch.cooperative_warm`: each node fetches its share
  (16 at a time) and the nodes exchange the rest over the group: GETs = objects.

The time is the wall clock from a barrier before the warm to a barrier after it (every
node done), process start and imports excluded. Object sizes and the proxy's added
first-byte latency vary; the total bytes per case are held near ``--megabytes`` (at
most ``MAX_OBJECTS`` objects).

    python -m benchmarks.bench_cooperative [--quick] [--megabytes 24]

On loopback the "network between nodes" is as fast as the one to the storage, so this
is the case least favourable to cooperation: on a real cluster the storage is further
(cross-region, cross-cloud, or billed per GB) and the crossover moves toward smaller
objects. Timings belong here, never in the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import MiB, aws_env, proxy_gets, proxy_reset, proxy_server, set_latency
from tests.emulators import free_port, moto_server

NODES = 3
JOBS = 16
SIZES = (4 * 1024, 64 * 1024, 1 * MiB, 8 * MiB)
LATENCIES = (0.0, 0.02)
BUCKET = "coop-bench"
#: Most objects a case uses (small objects: the request rate, not the bytes, decides).
MAX_OBJECTS = 1536


def _node(rank: int, case: dict[str, Any]) -> None:
    """One node of the group (spawned): warm ``case["urls"]`` one way, time it."""
    os.environ["MLSTORE_NODE_ID"] = f"node-{rank}"
    import torch.distributed as dist

    import mlstore
    from mlstore.torch import cooperative_warm

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{case['port']}", rank=rank, world_size=NODES
    )
    cache = {"disk_dir": os.path.join(case["scratch"], f"node-{rank}"), "memory_bytes": 0}
    with mlstore.Store(options={"s3": {"endpoint_url": case["endpoint"]}}, cache=cache) as s:
        s.info(case["urls"][0])  # the client and its connections, outside the timing
        dist.barrier()
        start = time.perf_counter()
        if case["how"] == "cooperative":
            report = cooperative_warm(case["urls"], store=s, chunk_bytes=case["chunk_bytes"])
            assert report.ok, report
        else:
            with ThreadPoolExecutor(JOBS) as pool:
                list(pool.map(s.warm, case["urls"]))
        dist.barrier()
        seconds = time.perf_counter() - start
    if rank == 0:
        Path(case["out"]).write_text(json.dumps({"seconds": seconds}))
    dist.destroy_process_group()


def _run(case: dict[str, Any]) -> float:
    import torch.multiprocessing as mp

    scratch = tempfile.mkdtemp(prefix="coop-bench-")
    try:
        out = os.path.join(scratch, "out.json")
        mp.spawn(
            _node,
            args=({**case, "scratch": scratch, "out": out, "port": free_port()},),
            nprocs=NODES,
        )
        return float(json.loads(Path(out).read_text())["seconds"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _upload(endpoint: str, size: int, count: int) -> list[str]:
    import mlstore

    urls = [f"s3://{BUCKET}/{size}/{i:05d}.bin" for i in range(count)]
    options = {"s3": {"endpoint_url": endpoint}}
    with (
        mlstore.Store(options=options, cache={"enabled": False}) as s,
        ThreadPoolExecutor(8) as pool,
    ):
        list(pool.map(lambda u: s.write_bytes(u, os.urandom(size)), urls))
    return urls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two sizes, one latency")
    parser.add_argument("--megabytes", type=float, default=24.0, help="bytes per case (MiB)")
    parser.add_argument("--chunk-mib", type=float, default=32.0, help="chunk_bytes (MiB)")
    parser.add_argument("--sizes", help="object sizes in KiB, comma-separated")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    sizes = (64 * 1024, 1 * MiB) if args.quick else SIZES
    if args.sizes:
        sizes = tuple(int(k) * 1024 for k in args.sizes.split(","))
    latencies = (0.02,) if args.quick else LATENCIES
    aws_env()
    moto = moto_server().start()
    proxy = proxy_server(moto.endpoint).start()
    rows = []
    try:
        import mlstore

        with mlstore.Store(options={"s3": {"endpoint_url": moto.endpoint}}) as s:
            s.mkdir(f"s3://{BUCKET}")
        print(
            f"{'size':>8} {'objects':>7} {'latency':>7} {'download':>9} {'coop':>9} "
            f"{'GETs d/c':>11}  faster"
        )
        for size in sizes:
            count = min(MAX_OBJECTS, max(NODES, int(args.megabytes * MiB // size)))
            urls = _upload(moto.endpoint, size, count)
            for latency in latencies:
                set_latency(proxy.endpoint, latency)
                got = {}
                for how in ("download", "cooperative"):
                    proxy_reset(proxy.endpoint)
                    case = {
                        "how": how,
                        "urls": urls,
                        "endpoint": proxy.endpoint,
                        "chunk_bytes": int(args.chunk_mib * MiB),
                    }
                    got[how] = (_run(case), proxy_gets(proxy.endpoint))
                (d, dg), (c, cg) = got["download"], got["cooperative"]
                winner = "cooperative" if c < d else "download"
                print(
                    f"{size // 1024:>6}Ki {count:>7} {latency * 1000:>5.0f}ms {d:>8.2f}s "
                    f"{c:>8.2f}s {dg:>5}/{cg:<5}  {winner} ({max(c, d) / min(c, d):.2f}x)"
                )
                rows.append(
                    {
                        "size": size,
                        "objects": count,
                        "latency": latency,
                        "download_s": d,
                        "cooperative_s": c,
                        "download_gets": dg,
                        "cooperative_gets": cg,
                    }
                )
    finally:
        proxy.stop()
        moto.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
