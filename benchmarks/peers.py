"""mlstore and its peers behind one small interface, built from a JSON-able spec so a
child process can build the same reader as the parent.

A reader turns a key (``small/00001``) into its own kind of path once, outside any timed
loop (:meth:`Reader.path`); the timed loops then call :meth:`read`, :meth:`read_many`,
:meth:`readinto` or :meth:`open` with those paths.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.common import BUCKET, Buffer, readinto_full

#: spec["peer"] -> what it is, for the table
DESCRIPTIONS = {
    "mlstore": "mlstore Store (tiered cache)",
    "s3fs": "s3fs (no cache)",
    "simplecache": "fsspec simplecache::s3 (over s3fs)",
    "blockcache": "fsspec blockcache::s3 (over s3fs)",
    "boto3": "boto3 get_object",
    "obstore": "obstore get",
    "msc": "NVIDIA Multi-Storage Client StorageClient (its node cache)",
    "local": "raw local file",
}


def obstore_available() -> bool:
    try:
        import obstore  # noqa: F401
    except ImportError:
        return False
    return True


def msc_available() -> bool:
    try:
        import multistorageclient  # noqa: F401
    except ImportError:
        return False
    return True


class Reader:
    """One way of reading the benchmark's objects."""

    name = "reader"

    def path(self, key: str) -> str:
        return key

    def read(self, path: str) -> Buffer:
        raise NotImplementedError

    def warm_up(self, path: str) -> None:
        """Create the client and its connections (untimed)."""
        self.read(path)

    def read_many(self, paths: Sequence[str]) -> list[Buffer]:
        read = self.read
        return [read(p) for p in paths]

    def readinto(self, path: str, view: memoryview) -> int:
        with self.open(path) as fh:
            return readinto_full(fh, view)

    def open(self, path: str) -> Any:
        raise NotImplementedError

    def stream(self, path: str, chunk: int) -> Any:
        """Yield the object's bytes in pieces of about ``chunk`` bytes."""
        buf = bytearray(chunk)
        view = memoryview(buf)
        with self.open(path) as fh:
            while True:
                n = readinto_full(fh, view)
                if not n:
                    return
                yield view[:n]

    def close(self) -> None:
        pass


class MlstoreReader(Reader):
    def __init__(self, spec: dict[str, Any]) -> None:
        from mlstore import Store

        self.name = "mlstore"
        self.store = Store(
            options={"s3": {"endpoint_url": spec["endpoint"]}},
            cache=spec.get("cache") or {},
            max_workers=spec.get("max_workers"),
            transport=spec.get("transport"),  # "obstore": mlstore[fast]
        )

    def path(self, key: str) -> str:
        return f"s3://{BUCKET}/{key}"

    def read(self, path: str) -> Buffer:
        return self.store.read_bytes(path)

    def warm_up(self, path: str) -> None:
        # A cache hit never touches the backend, so ask for metadata too: the S3
        # client is then built and connected, as every peer's is before timing.
        self.store.info(path)
        self.read(path)

    def read_many(self, paths: Sequence[str]) -> list[Buffer]:
        return self.store.read_many(paths)

    def read_range(self, path: str, start: int, end: int) -> Buffer:
        return self.store.read_bytes(path, start, end)

    def open(self, path: str) -> Any:
        return self.store.open(path, "rb")

    def close(self) -> None:
        self.store.close()


def _s3fs(endpoint: str) -> Any:
    import s3fs

    return s3fs.S3FileSystem(
        endpoint_url=endpoint,
        skip_instance_cache=True,
        use_listings_cache=False,
        config_kwargs={"max_pool_connections": 32},
    )


class S3fsReader(Reader):
    def __init__(self, spec: dict[str, Any]) -> None:
        self.name = "s3fs"
        self.fs = _s3fs(spec["endpoint"])
        self.batched = bool(spec.get("batched"))

    def path(self, key: str) -> str:
        return f"{BUCKET}/{key}"

    def read(self, path: str) -> Buffer:
        return self.fs.cat_file(path)

    def read_many(self, paths: Sequence[str]) -> list[Buffer]:
        if not self.batched:
            return super().read_many(paths)
        got = self.fs.cat(list(paths), on_error="raise")
        return [got[p] for p in paths]

    def open(self, path: str) -> Any:
        return self.fs.open(path, "rb")


class CachedFsReader(Reader):
    """fsspec's ``simplecache::`` (whole files) or ``blockcache::`` (blocks, mmap)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import fsspec

        self.name = spec["peer"]
        opts: dict[str, Any] = {}
        if spec.get("block_size"):
            opts["block_size"] = spec["block_size"]
        self.open_opts = opts
        self.fs = fsspec.filesystem(
            spec["peer"],
            target_protocol="s3",
            target_options={
                "endpoint_url": spec["endpoint"],
                "skip_instance_cache": True,
                "use_listings_cache": False,
            },
            cache_storage=spec["cache_dir"],
            skip_instance_cache=True,
        )

    def path(self, key: str) -> str:
        return f"{BUCKET}/{key}"

    def read(self, path: str) -> Buffer:
        return self.fs.cat_file(path)

    def open(self, path: str) -> Any:
        return self.fs.open(path, "rb", **self.open_opts)


class Boto3Reader(Reader):
    def __init__(self, spec: dict[str, Any]) -> None:
        import boto3
        from botocore.config import Config

        self.name = "boto3"
        self.threads = int(spec.get("threads") or 0)
        self.client = boto3.client(
            "s3",
            endpoint_url=spec["endpoint"],
            config=Config(max_pool_connections=max(10, self.threads), retries={"max_attempts": 1}),
        )
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def read(self, path: str) -> Buffer:
        body = self.client.get_object(Bucket=BUCKET, Key=path)["Body"]
        try:
            return body.read()
        finally:
            body.close()

    def read_many(self, paths: Sequence[str]) -> list[Buffer]:
        if self._pool is None:
            return super().read_many(paths)
        return list(self._pool.map(self.read, paths))

    def stream(self, path: str, chunk: int) -> Any:
        body = self.client.get_object(Bucket=BUCKET, Key=path)["Body"]
        try:
            yield from body.iter_chunks(chunk)
        finally:
            body.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


class ObstoreReader(Reader):
    def __init__(self, spec: dict[str, Any]) -> None:
        from obstore.store import S3Store

        self.name = "obstore"
        self.concurrency = int(spec.get("concurrency") or 0)
        self.store = S3Store(
            BUCKET,
            endpoint=spec["endpoint"],
            region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
            secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            virtual_hosted_style_request=False,
            client_options={"allow_http": True, "pool_max_idle_per_host": "64"},
        )

    def read(self, path: str) -> Buffer:
        import obstore

        return obstore.get(self.store, path).bytes()

    def read_many(self, paths: Sequence[str]) -> list[Buffer]:
        if self.concurrency <= 1:
            return super().read_many(paths)
        import obstore

        async def main() -> list[Buffer]:
            gate = asyncio.Semaphore(self.concurrency)

            async def one(p: str) -> Buffer:
                async with gate:
                    got = await obstore.get_async(self.store, p)
                    return await got.bytes_async()

            return await asyncio.gather(*(one(p) for p in paths))

        return asyncio.run(main())

    def read_range(self, path: str, start: int, end: int) -> Buffer:
        import obstore

        return obstore.get_range(self.store, path, start=start, end=end)

    def stream(self, path: str, chunk: int) -> Any:
        import obstore

        yield from obstore.get(self.store, path).stream(min_chunk_size=chunk)


#: the size of MSC's cache in these runs: far above any dataset here (a full run's
#: largest is about 0.6 GiB), so its evictor never removes an entry mid-scenario
MSC_CACHE_SIZE = "8G"


class MscReader(Reader):
    """NVIDIA Multi-Storage Client: a ``StorageClient`` built from a config dict with
    one S3 profile (the benchmark's bucket on the same endpoint as every peer) and its
    node cache in ``spec["cache_dir"]``.

    ``spec["api"]`` picks how an object is read, both as MSC documents them:
    ``"read"`` is ``client.read(path)`` (cache checked, a miss fetched with one GET and
    written to the cache, no lock), ``"open"`` is ``client.open(path).read()`` (a miss
    costs a HEAD, then one process downloads under a file lock while the others wait).
    ``spec["check_source_version"]`` is MSC's own setting (default on: a HEAD before
    every hit, to compare ETags); off, a hit never reaches the server, like fsspec's
    simplecache.
    """

    PROFILE = "bench"

    def __init__(self, spec: dict[str, Any]) -> None:
        from multistorageclient import StorageClient, StorageClientConfig

        self.name = "msc"
        self.api = spec.get("api", "read")
        config = {
            "profiles": {
                self.PROFILE: {
                    "storage_provider": {
                        "type": "s3",
                        "options": {
                            "base_path": BUCKET,
                            "endpoint_url": spec["endpoint"],
                            "region_name": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                        },
                    },
                    "credentials_provider": {
                        "type": "S3Credentials",
                        "options": {
                            "access_key": os.environ["AWS_ACCESS_KEY_ID"],
                            "secret_key": os.environ["AWS_SECRET_ACCESS_KEY"],
                        },
                    },
                    "caching_enabled": True,
                }
            },
            "cache": {
                "size": MSC_CACHE_SIZE,
                "location": spec["cache_dir"],
                "check_source_version": bool(spec.get("check_source_version", False)),
            },
        }
        self.client = StorageClient(StorageClientConfig.from_dict(config, profile=self.PROFILE))

    def read(self, path: str) -> Buffer:
        if self.api == "open":
            with self.client.open(path, "rb") as fh:
                return fh.read()
        return self.client.read(path)

    def open(self, path: str) -> Any:
        return self.client.open(path, "rb")


class LocalReader(Reader):
    """Plain ``open(path, "rb", buffering=0)`` of a local copy of the same bytes."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.name = "local"
        self.root = spec["root"]

    def path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def read(self, path: str) -> Buffer:
        with open(path, "rb", buffering=0) as fh:
            return fh.read()

    def readinto(self, path: str, view: memoryview) -> int:
        with open(path, "rb", buffering=0) as fh:
            return readinto_full(fh, view)

    def open(self, path: str) -> Any:
        return open(path, "rb")


_READERS: dict[str, type[Reader]] = {
    "mlstore": MlstoreReader,
    "s3fs": S3fsReader,
    "simplecache": CachedFsReader,
    "blockcache": CachedFsReader,
    "boto3": Boto3Reader,
    "obstore": ObstoreReader,
    "msc": MscReader,
    "local": LocalReader,
}


def make_reader(spec: dict[str, Any]) -> Reader:
    return _READERS[spec["peer"]](spec)
