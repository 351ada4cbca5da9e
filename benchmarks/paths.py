"""Per-call cost of mlstore's own code paths, to compare two versions of the code.

The scenarios in ``run.py`` measure mlstore against its peers; this one measures mlstore
against itself. It times the paths the engine owns, where the storage costs little:

- ``read_bytes`` and ``info`` of a ``memory://`` URL, and ``read_bytes`` through a mount
  of two replicas (best of 5 rounds);
- a memory-tier hit of a 256 KiB S3 object;
- the client CPU (``time.process_time``) of one cold 256 KiB read from a moto_server,
  serial, in a fresh process.

To compare two commits, run it once per checkout with that checkout first on the path,
alternating, and compare the medians::

    git worktree add /tmp/before <commit>
    for i in 1 2 3; do
      PYTHONPATH=/tmp/before python benchmarks/paths.py
      PYTHONPATH=$PWD python benchmarks/paths.py
    done

Each run prints one line of JSON naming the mlstore it measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OBJECTS = 101
SIZE = 256 * 1024


def best_of(fn: Callable[[], object], n: int = 5000, rounds: int = 5) -> float:
    """Microseconds per call of ``fn``, the best of ``rounds`` rounds of ``n`` calls."""
    for _ in range(min(n, 500)):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def local_paths() -> dict[str, float]:
    import mlstore

    root = f"memory://paths-{os.getpid()}"
    with mlstore.Store(mounts={"m": [f"{root}/a", f"{root}/b"]}) as store:
        store.write_bytes(f"{root}/a/x.bin", b"x" * 1024)
        return {
            "read_memory_us": best_of(lambda: store.read_bytes(f"{root}/a/x.bin")),
            "info_memory_us": best_of(lambda: store.info(f"{root}/a/x.bin")),
            "read_mount2_us": best_of(lambda: store.read_bytes("mlstore://m/x.bin")),
        }


def s3_child(endpoint: str, bucket: str) -> None:
    """In a fresh process: cold reads of every object, then hits of one."""
    import mlstore

    store = mlstore.Store(options={"s3": {"endpoint_url": endpoint}})
    urls = [f"s3://{bucket}/o{i}" for i in range(OBJECTS)]
    store.read_bytes(urls[0])  # the client and its first connection, outside the timing
    c0 = time.process_time()
    for url in urls[1:]:
        store.read_bytes(url)
    cold = (time.process_time() - c0) / (len(urls) - 1)
    hit = best_of(lambda: store.read_bytes(urls[1]), n=20000)
    print(json.dumps({"cold_read_cpu_ms": cold * 1e3, "memory_hit_us": hit}))


def s3_paths() -> dict[str, float]:
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    import boto3

    from tests.emulators import moto_server

    server = moto_server().start()
    try:
        s3 = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1")
        bucket = "paths"
        s3.create_bucket(Bucket=bucket)
        body = os.urandom(SIZE)
        for i in range(OBJECTS):
            s3.put_object(Bucket=bucket, Key=f"o{i}", Body=body)
        env = dict(os.environ, MLSTORE_CACHE_DIR=tempfile.mkdtemp(prefix="mlstore-paths-"))
        out = subprocess.run(
            [sys.executable, __file__, "--s3-child", server.endpoint, bucket],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
        return result
    finally:
        server.stop()


def main() -> None:
    if sys.argv[1:2] == ["--s3-child"]:
        s3_child(sys.argv[2], sys.argv[3])
        return
    os.environ["MLSTORE_CACHE_DIR"] = tempfile.mkdtemp(prefix="mlstore-paths-")
    import mlstore

    figures = {"mlstore": str(Path(mlstore.__file__).parent), **local_paths(), **s3_paths()}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
