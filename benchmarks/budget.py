"""R26: the largest total the disk tier held under 6 processes x 4 threads of fillers.

Every thread reads distinct 1 MiB objects from moto_server once, through a Store whose
disk budget is 4 MiB (memory tier off), while a sampler (the test suite's, which counts
only files it can prove were on disk together) watches ``blobs/`` and ``tmp/``:

    python benchmarks/budget.py [--runs 5] [--each 3]

Prints the peak of each run and the largest overshoot over the budget, in MiB and as a
multiple of the budget. tests/test_cache_budget.py asserts the same figure, once.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import MiB, aws_env  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--each", type=int, default=3, help="objects per thread")
    args = parser.parse_args(argv)
    aws_env()
    from mlstore import Store
    from mlstore.cache.disk import DiskTier
    from mlstore.hashing import content_hash
    from tests.emulators import moto_server
    from tests.test_cache_budget import _HANG, Sampler, _fill, upload

    processes, threads, budget = 6, 4, 4 * MiB
    server = moto_server().start()
    try:
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        with Store(options={"s3": {"endpoint_url": server.endpoint}}) as store:
            store.mkdir(f"s3://{bucket}")
        rng = random.Random(26)
        objects = {
            f"s3://{bucket}/{i:03d}.bin": rng.randbytes(MiB)
            for i in range(processes * threads * args.each)
        }
        upload(server.endpoint, objects)
        pairs = [(url, content_hash(data)) for url, data in objects.items()]
        ctx = multiprocessing.get_context("spawn")
        worst = 0
        for run in range(args.runs):
            cache_dir = str(Path(tempfile.mkdtemp(prefix="mlstore-budget-")) / "cache")
            DiskTier(cache_dir, budget).close()
            start, results = ctx.Barrier(processes * threads), ctx.Queue()
            sampler = Sampler(cache_dir)
            sampler.start()
            children = []
            for p in range(processes):
                work = [pairs[(p * threads + t) * args.each :][: args.each] for t in range(threads)]
                child = ctx.Process(
                    target=_fill, args=(server.endpoint, cache_dir, budget, work, start, results)
                )
                child.start()
                children.append(child)
            wrong = [w for _ in children for w in results.get(timeout=_HANG)[0]]
            for child in children:
                child.join(_HANG)
            sampler.done.set()
            sampler.join(_HANG)
            worst = max(worst, sampler.peak)
            print(f"run {run + 1}: peak {sampler.peak / MiB:.2f} MiB, wrong reads {len(wrong)}")
        over = max(0, worst - budget)
        print(
            f"largest overshoot over the {budget / MiB:.0f} MiB budget: {over / MiB:.2f} MiB "
            f"(peak {worst / MiB:.2f} MiB = {worst / budget:.2f}x the budget)"
        )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
