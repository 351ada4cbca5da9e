"""Quickstart: write, read, list, inspect, glob, and see what the cache saved.

What it shows: the one-URL API on a bucket (``write_bytes``, ``read_bytes``, ``ls``,
``info``, ``glob``) and the Store's counters: the second read of an object is served by
the cache, with no request to the bucket.

What it needs: ``pip install "mlstore[s3]"`` and a bucket you can write to (the script
writes below the prefix you give it and deletes what it wrote).

Run it against a real bucket::

    python examples/quickstart.py s3://my-bucket/mlstore-examples/quickstart

or set ``EXAMPLE_URL`` instead of the argument. ``nox -s examples`` runs it against a
local S3 emulator (moto_server), set through ``MLSTORE_S3_ENDPOINT_URL`` and ``AWS_*``.
"""

from __future__ import annotations

import os
import sys

import mlstore


def main(root: str) -> None:
    root = root.rstrip("/")
    store = mlstore.Store()
    for i in range(3):
        store.write_bytes(f"{root}/data/{i}.txt", f"sample {i}\n".encode())

    assert store.read_bytes(f"{root}/data/1.txt") == b"sample 1\n"
    assert store.read_bytes(f"{root}/data/1.txt", start=0, end=6) == b"sample"
    print("ls:", store.ls(f"{root}/data"))
    info = store.info(f"{root}/data/2.txt")
    print(f"info: {info.size} bytes, version {info.version}")
    assert info.size == len(b"sample 2\n")
    assert len(store.glob(f"{root}/data/*.txt")) == 3

    before = store.stats()
    assert store.read_bytes(f"{root}/data/0.txt") == b"sample 0\n"  # fetched, then cached
    assert store.read_bytes(f"{root}/data/0.txt") == b"sample 0\n"  # from the cache
    delta = store.stats() - before
    print(delta)
    protocol = mlstore.parse_url(root).protocol
    gets = delta.requests_by_op().get(protocol, {}).get("get", 0)
    assert gets == 1, f"expected one GET for two reads of one object, saw {gets}"

    store.rm(root, recursive=True)
    assert not store.exists(f"{root}/data/0.txt")
    store.close()
    print("quickstart: OK")


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EXAMPLE_URL")
    sys.exit(main(url) if url else __doc__)  # no URL: print the header, exit 1
