"""What a large :class:`mlstore.Manifest` costs (issue 13: "a manifest of 1M entries loads
in seconds and costs less than 200 bytes of RAM per entry"), in one run:

    python benchmarks/manifest.py [--n 1000000] [--shape s3|gcs|azure|hashed]

Builds an N-entry manifest in memory from synthetic entries (no store, no LIST): keys
like ``train/shard-00042/sample-0004217.jpg`` below ``s3://bucket/datasets/imagenet/``,
sizes, and per ``--shape`` S3 ETags (``"<32 hex>"``), GCS generations (16 digits), Azure
ETags (``"0x8DC..."``), or S3 ETags plus xxh3-128 content hashes. Saves it as JSON Lines
(and Parquet, if pyarrow is installed) to a local temporary file and loads it back, then
reports:

- save and load seconds (load timed without tracemalloc, which slows allocation);
- bytes of RAM per entry held by the loaded manifest (tracemalloc's current size after a
  second load, once the file's bytes are freed, divided by N) and the peak during load;
- for comparison, the same entries as a list of ``ManifestEntry`` (measured on N/10 of
  them and scaled): what a plain Python list would cost;
- ``m[i]`` and ``m.index(url)`` lookups per second.

Output: the table on stdout, and ``benchmarks/results/manifest.json`` (for other shapes,
``manifest-<shape>.json``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import mlstore  # noqa: E402
from mlstore.manifest import Manifest  # noqa: E402

ROOT = "s3://bucket/datasets/imagenet/"


def rows(n: int, shape: str) -> Any:
    """N synthetic entries in key order: (key, size, version, content_hash)."""
    rng = random.Random(13)
    per_shard = 1000
    for i in range(n):
        key = f"train/shard-{i // per_shard:05d}/sample-{i:07d}.jpg"
        size = rng.randrange(20_000, 400_000)
        if shape == "gcs":
            version = str(1_700_000_000_000_000 + rng.randrange(10**15))
        elif shape == "azure":
            version = f'"0x8DC{rng.getrandbits(48):012X}"'
        else:
            version = f'"{rng.getrandbits(128):032x}"'
        content_hash = f"{rng.getrandbits(128):032x}" if shape == "hashed" else None
        yield key, size, version, content_hash


def synthetic(n: int, shape: str) -> Manifest:
    m = Manifest(ROOT)
    for row in rows(n, shape):
        m._append(*row)
    return m


def held_bytes(load: Any) -> tuple[Any, int, int]:
    """What ``load()`` returns, the bytes it still holds after, and the peak during it."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    value = load()
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return value, current - before, peak - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--shape", choices=["s3", "gcs", "azure", "hashed"], default="s3")
    args = parser.parse_args()
    n, shape = args.n, args.shape
    store = mlstore.Store(cache={"enabled": False})
    result: dict[str, Any] = {"n": n, "shape": shape, "python": platform.python_version()}

    t = time.perf_counter()
    m = synthetic(n, shape)
    result["build_s"] = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        formats = ["jsonl"]
        try:
            import pyarrow  # noqa: F401

            formats.append("parquet")
        except ImportError:
            pass
        store.read_bytes(__file__)  # set the Store up outside what is measured
        for fmt in formats:
            path = os.path.join(tmp, f"manifest.{fmt}")
            t = time.perf_counter()
            m.save(path, store=store)
            result[f"{fmt}_save_s"] = time.perf_counter() - t
            result[f"{fmt}_file_bytes"] = os.path.getsize(path)
            gc.collect()
            t = time.perf_counter()
            loaded = Manifest.load(path, store=store)
            result[f"{fmt}_load_s"] = time.perf_counter() - t
            assert len(loaded) == n and loaded[n // 2] == m[n // 2]
            del loaded
            loaded, held, peak = held_bytes(lambda p=path: Manifest.load(p, store=store))
            result[f"{fmt}_bytes_per_entry"] = held / n
            result[f"{fmt}_peak_bytes_per_entry"] = peak / n
            del loaded

    sample = max(n // 10, 1)
    entries, held, _ = held_bytes(lambda: [m[i] for i in range(sample)])
    result["list_of_entries_bytes_per_entry"] = held / sample
    del entries

    probes = [random.Random(1).randrange(n) for _ in range(100_000)]
    t = time.perf_counter()
    for i in probes:
        m[i]
    result["getitem_per_s"] = len(probes) / (time.perf_counter() - t)
    urls = [m.url(i) for i in probes[:20_000]]
    t = time.perf_counter()
    for u in urls:
        m.index(u)
    result["index_per_s"] = len(urls) / (time.perf_counter() - t)

    for name, value in result.items():
        shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
        print(f"{name:36} {shown}")
    name = "manifest.json" if shape == "s3" else f"manifest-{shape}.json"
    out = REPO / "benchmarks" / "results" / name
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
