"""One dataset in two clouds behind a mount: reads go on when the first cloud dies.

What it shows: a mount ``mlstore://shards/`` over two replicas, an S3 prefix first and a
GCS prefix second. The script writes its files to both (``replicate=True``), reads them
by their ``mlstore://`` names (all from S3), then the S3 side dies and the same reads,
by the same names, are answered by GCS: ``stats()`` counts the failovers. The reads after
the outage go through a Store without a cache, so every byte really comes from a cloud.
The script exits non-zero unless every read returns the bytes written and some failed
over.

How S3 dies: when ``EXAMPLE_KILL_PID`` names the process (group) of the S3 server, as
``nox -s examples`` sets it for its own S3 emulator, the script SIGKILLs it. Without it
(real buckets), the S3 replica is made unreachable instead: the reading Store's S3
endpoint is a local port nothing listens on.

What it needs: ``pip install "mlstore[s3,gcs]"``, an S3 prefix and a GCS prefix you can
write to (the script deletes what it wrote, where it still can).

Run it against real buckets::

    python examples/multicloud_mounts.py s3://my-bucket/mlstore-examples gs://my-bucket/mlstore-examples

or set ``EXAMPLE_URL`` and ``EXAMPLE_SECOND_URL``. ``nox -s examples`` runs it against
moto_server and fake-gcs-server, set through ``MLSTORE_S3_ENDPOINT_URL``,
``MLSTORE_GCS_ENDPOINT_URL``, ``STORAGE_EMULATOR_HOST`` and ``AWS_*``.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

import mlstore

FILES = {f"train/{i:02d}.bin": bytes([i]) * 1000 for i in range(8)}


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(first: str, second: str) -> None:
    mounts = {"shards": [first.rstrip("/"), second.rstrip("/")]}
    writer = mlstore.Store(mounts=mounts)
    for key, data in FILES.items():
        writer.write_bytes(f"mlstore://shards/{key}", data, replicate=True)
    print("replicas:", [str(u) for u in writer.resolve("mlstore://shards/train/00.bin")])
    names = sorted(writer.glob("mlstore://shards/train/*.bin"))
    assert len(names) == len(FILES), names
    assert writer.read_many(names) == list(FILES.values())
    print(f"before the outage: {len(names)} reads, failovers {writer.stats()['failovers']}")

    pid = os.environ.get("EXAMPLE_KILL_PID")
    options: dict[str, dict[str, object]] = {}
    if pid:
        os.killpg(int(pid), signal.SIGKILL)
        print(f"killed the S3 server (process group {pid})")
    else:
        options["s3"] = {"endpoint_url": f"http://127.0.0.1:{closed_port()}"}
        print("S3 made unreachable for the reading Store")

    reader = mlstore.Store(
        mounts=mounts,
        options=options,
        cache=mlstore.CacheConfig(enabled=False),
        retry=mlstore.RetryPolicy(max_attempts=2, backoff_base=0.05),
    )
    for name in names:
        key = name.removeprefix("mlstore://shards/")
        assert reader.read_bytes(name) == FILES[key], name
    failovers = reader.stats().get("failovers", "s3")
    print(f"after the outage: {len(names)} reads answered, failovers from s3: {failovers}")
    assert failovers > 0, "the reads did not fail over; was S3 really down?"

    second_only = mlstore.Store()
    second_only.rm(second.rstrip("/"), recursive=True)
    if not pid:
        writer.rm(first.rstrip("/"), recursive=True)
    print("multicloud_mounts: OK")


if __name__ == "__main__":
    args = sys.argv[1:3] if len(sys.argv) > 2 else []
    first = args[0] if args else os.environ.get("EXAMPLE_URL")
    second = args[1] if args else os.environ.get("EXAMPLE_SECOND_URL")
    sys.exit(main(first, second) if first and second else __doc__)
