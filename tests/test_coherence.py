"""The node cache never serves the wrong bytes (issue 11, section A).

The node cache is shared by every process on the node, so these tests run each step in
a fresh process (a real ``python`` child sharing one cache directory), the way training
jobs, DataLoader workers and a shell share it.

- A write, copy or delete through mlstore reaches the node cache whatever the writing
  process read before, under every consistency policy, for a mount URL and its physical
  URL alike.
- A cached object belongs to the endpoint and the mount target it was read from: two
  Stores with one bucket name on two endpoints, or one mount name for two prefixes, are
  never served each other's objects.
- A cached object is served only to a Store with the same credentials (scope) as the
  one that fetched it: another Store asks the server, which may refuse it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import mlstore
from tests.conftest import run_child, start_emulator
from tests.emulators import ServerProcess, moto_server
from tests.servers import proxy

# A child's side of the coherence test: read, change or read back a set of URLs.
CHILD = """
import json, os, sys
import mlstore

spec = json.loads(os.environ["COHERENCE_SPEC"])
store = mlstore.Store(
    options={"s3": {"endpoint_url": spec["endpoint"]}},
    mounts={"ds": [spec["prefix"]]},
    cache={"validate": spec["validate"]},
)

def read(url):
    try:
        return store.read_bytes(url).decode()
    except mlstore.NotFoundError:
        return None

out = {}
step = spec["step"]
for name, urls in spec["cases"].items():
    reader, changer = urls["reader"], urls["changer"]
    if step == "read":
        out[name] = read(reader)
    elif step == "change":
        how = urls["how"]
        if how == "write_bytes":
            store.write_bytes(changer, b"new")
        elif how == "open_wb":
            with store.open(changer, "wb") as fh:
                fh.write(b"new")
        elif how == "copy":
            store.copy(urls["source"], changer)
        elif how == "rm":
            store.rm(changer)
        out[name] = read(changer)
print(json.dumps(out))
"""


@pytest.mark.parametrize("validate", ["never", "ttl", "always"])
def test_every_change_reaches_the_node_cache_across_processes(
    validate: str, s3_options: dict[str, object], s3_bucket: str, tmp_path: Path
) -> None:
    prefix = f"s3://{s3_bucket}/data"
    mlstore_env = {"MLSTORE_CACHE_DIR": str(tmp_path / "cache")}
    cases: dict[str, dict[str, str]] = {}
    with mlstore.Store(options={"s3": s3_options}, cache={"enabled": False}) as s:
        s.write_bytes(f"{prefix}/source.bin", b"new")
        for how in ("write_bytes", "open_wb", "copy", "rm"):
            for reader_kind, changer_kind in (("physical", "physical"), ("mount", "physical")):
                for_mount = (reader_kind, changer_kind) == ("mount", "physical")
                key = f"{how}-{reader_kind}.bin"
                physical = f"{prefix}/{key}"
                s.write_bytes(physical, b"old")
                cases[f"{how} {reader_kind}"] = {
                    "how": how,
                    "reader": f"mlstore://ds/{key}" if for_mount else physical,
                    "changer": physical,
                    "source": f"{prefix}/source.bin",
                }
        # and the other way round: read the physical URL, change it through the mount
        s.write_bytes(f"{prefix}/via-mount.bin", b"old")
        cases["write_bytes via mount"] = {
            "how": "write_bytes",
            "reader": f"{prefix}/via-mount.bin",
            "changer": "mlstore://ds/via-mount.bin",
        }

    def step(name: str) -> dict[str, str | None]:
        spec = {
            "endpoint": s3_options["endpoint_url"],
            "prefix": prefix,
            "validate": validate,
            "step": name,
            "cases": cases,
        }
        got = run_child(CHILD, {**mlstore_env, "COHERENCE_SPEC": json.dumps(spec)})
        assert isinstance(got, dict)
        return got

    assert set(step("read").values()) == {"old"}  # every object now on the node's disk
    expected = {name: (None if c["how"] == "rm" else "new") for name, c in cases.items()}
    assert step("change") == expected  # the changing process reads its own change
    assert step("read") == expected  # and so does the next process on the node


@pytest.fixture
def second_s3(aws_test_credentials: None) -> Iterator[ServerProcess]:
    """Another S3 endpoint: its own moto_server, with buckets of the same names."""
    server = start_emulator(moto_server)
    yield server
    server.stop()


def test_one_bucket_name_on_two_endpoints_is_two_objects(
    s3_options: dict[str, object], second_s3: ServerProcess, tmp_path: Path
) -> None:
    bucket = f"same-{uuid.uuid4().hex[:12]}"
    cache = {"disk_dir": str(tmp_path / "cache")}
    first = mlstore.Store(options={"s3": s3_options}, cache=cache)
    second = mlstore.Store(options={"s3": {"endpoint_url": second_s3.endpoint}}, cache=cache)
    url = f"s3://{bucket}/model.bin"
    for store, content in ((first, b"from the first endpoint"), (second, b"from the second")):
        store.mkdir(f"s3://{bucket}")
        store.write_bytes(url, content)
    try:
        assert first.read_bytes(url) == b"from the first endpoint"  # now on the node's disk
        assert second.read_bytes(url) == b"from the second"
        third = mlstore.Store(options={"s3": {"endpoint_url": second_s3.endpoint}}, cache=cache)
        assert third.read_bytes(url) == b"from the second"
        assert third.stats()["requests"] == 0  # same endpoint: served by the node cache
    finally:
        for store in (first, second):
            store.rm(f"s3://{bucket}", recursive=True)
            store.close()


def test_one_mount_name_for_two_prefixes_is_two_objects(
    s3_options: dict[str, object], s3_bucket: str, tmp_path: Path
) -> None:
    cache = {"disk_dir": str(tmp_path / "cache")}
    options = {"s3": s3_options}
    one = mlstore.Store(options=options, cache=cache, mounts={"ds": f"s3://{s3_bucket}/one"})
    two = mlstore.Store(options=options, cache=cache, mounts={"ds": f"s3://{s3_bucket}/two"})
    one.write_bytes("mlstore://ds/x.bin", b"one")
    two.write_bytes("mlstore://ds/x.bin", b"two")
    assert one.read_bytes("mlstore://ds/x.bin") == b"one"
    assert two.read_bytes("mlstore://ds/x.bin") == b"two"
    assert one.read_bytes(f"s3://{s3_bucket}/two/x.bin") == b"two"  # the physical object


def test_a_store_with_other_credentials_is_not_served_from_the_node_cache(
    s3_fault_proxy: ServerProcess, s3_bucket: str, tmp_path: Path
) -> None:
    endpoint = s3_fault_proxy.endpoint
    cache = {"disk_dir": str(tmp_path / "cache")}

    def store(key: str) -> mlstore.Store:
        options = {"endpoint_url": endpoint, "key": key, "secret": f"{key}-secret"}
        return mlstore.Store(options={"s3": options}, cache=cache)

    url = f"s3://{s3_bucket}/private.bin"
    owner = store("owner-key")
    owner.write_bytes(url, b"for the owner")
    assert owner.read_bytes(url) == b"for the owner"  # cached on the node
    # From now on the server refuses every read (as it would a tenant without access).
    proxy.set_faults(
        endpoint,
        *({"fault": "status", "status": 403, "method": method} for method in ("GET", "HEAD")),
    )
    with pytest.raises(mlstore.PermissionDeniedError):
        store("tenant-key").read_bytes(url)
    again = store("owner-key")  # the same credentials: the node cache serves them
    assert again.read_bytes(url) == b"for the owner"
    assert again.stats()["requests"] == 0


def test_bytes_always_belong_to_the_version_the_store_reports(
    s3_options: dict[str, object], s3_bucket: str, tmp_path: Path
) -> None:
    import boto3

    cache = {"disk_dir": str(tmp_path / "cache")}
    url = f"s3://{s3_bucket}/report.bin"
    with mlstore.Store(options={"s3": s3_options}, cache=cache) as first:
        first.write_bytes(url, b"version one")
        assert first.read_bytes(url) == b"version one"  # on the node's disk now
    # Replaced by another tool: the node cache still holds version one, trusted by ttl.
    client = boto3.client("s3", endpoint_url=str(s3_options["endpoint_url"]))
    client.put_object(Bucket=s3_bucket, Key="report.bin", Body=b"version two, longer")
    with mlstore.Store(options={"s3": s3_options}, cache=cache) as second:
        info = second.info(url)  # asks the store: the new size and ETag
        assert info.size == len(b"version two, longer")
        assert second.read_bytes(url, 0, 9) == b"version t"
        assert second.read_bytes(url) == b"version two, longer"
        with second.open(url) as fh:
            assert fh.read() == b"version two, longer"
    with mlstore.Store(options={"s3": s3_options}, cache=cache) as third:
        assert third.info(url).size == len(b"version two, longer")
        with third.open(url) as fh:  # a fresh process's open, after its info
            assert fh.read() == b"version two, longer"


def test_exists_after_rm_is_false_through_the_store_and_fsspec(
    s3_options: dict[str, object], s3_bucket: str
) -> None:
    import fsspec

    url = f"s3://{s3_bucket}/gone.bin"
    with mlstore.Store(options={"s3": s3_options}) as store:
        store.write_bytes(url, b"x")
        assert store.exists(url)
        store.rm(url)
        assert not store.exists(url)
    fs = fsspec.filesystem("mlstore", options={"s3": s3_options})
    fs.pipe_file(url, b"y")
    assert fs.exists(url)
    fs.rm(url)
    assert not fs.exists(url)


@pytest.mark.parametrize("validate", ["never", "ttl"])
def test_a_recursive_rm_reaches_the_node_cache_of_every_object_below(
    validate: str, s3_options: dict[str, object], s3_bucket: str, tmp_path: Path
) -> None:
    prefix = f"s3://{s3_bucket}/run"
    env = {"MLSTORE_CACHE_DIR": str(tmp_path / "cache")}
    with mlstore.Store(options={"s3": s3_options}, cache={"enabled": False}) as s:
        for name in ("a.bin", "sub/b.bin"):
            s.write_bytes(f"{prefix}/{name}", b"old")
    code = """
import json, os, sys
import mlstore
spec = json.loads(os.environ["SPEC"])
store = mlstore.Store(options={"s3": {"endpoint_url": spec["endpoint"]}},
                      cache={"validate": spec["validate"]})
if spec["step"] == "rm":
    store.rm(spec["prefix"], recursive=True)
out = {}
for url in spec["urls"]:
    try:
        out[url] = [store.exists(url), store.read_bytes(url).decode()]
    except mlstore.NotFoundError:
        out[url] = [store.exists(url), None]
print(json.dumps(out))
"""
    urls = [f"{prefix}/a.bin", f"{prefix}/sub/b.bin"]

    def step(name: str) -> object:
        spec = {
            "endpoint": s3_options["endpoint_url"],
            "validate": validate,
            "step": name,
            "prefix": prefix,
            "urls": urls,
        }
        return run_child(code, {**env, "SPEC": json.dumps(spec)})

    assert step("read") == {url: [True, "old"] for url in urls}  # cached on the node
    gone = {url: [False, None] for url in urls}
    assert step("rm") == gone  # the deleting process sees its delete
    assert step("read") == gone  # and so does the next process on the node
