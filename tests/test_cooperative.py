"""Figure S5 of issue 17: a cooperative warm over torch.distributed downloads each object
once, and leaves every node holding every object.

Three simulated nodes are three ``torchrun`` launches on localhost (``--nnodes 3``, a
static rendezvous, gloo), each with its own ``MLSTORE_NODE_ID`` and ``MLSTORE_CACHE_DIR``;
the storage is moto behind the counting proxy. The ranks run this module
(``torchrun -m tests.test_cooperative warm <json>``), and so do the fresh
readers that prove what each node holds (``python -m ... read <json>``).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from mlstore.hashing import content_hash
from tests.emulators import ServerProcess, free_port
from tests.servers import proxy

pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.torch]

ROOT = Path(__file__).resolve().parents[1]
NODES = 3
OBJECTS = 300
#: Small rounds, so that the 300 objects (about 0.6 MiB) take several.
CHUNK_BYTES = 64 * 1024
#: Seconds a launch may take before the test fails (a hung collective is a failure).
LAUNCH_TIMEOUT = 300


@pytest.fixture
def objects(s3_bucket: str, moto: ServerProcess) -> Iterator[tuple[str, dict[str, str]]]:
    """OBJECTS small objects below a prefix, written to moto directly; yields the prefix
    and each object's content hash by URL."""
    from tests.torch_children import put, remove

    prefix = f"s3://{s3_bucket}/coop/"
    blobs = {f"{prefix}{i:03d}.bin": os.urandom(1000 + 7 * i) for i in range(OBJECTS)}
    put(moto.endpoint, blobs)
    yield prefix, {url: content_hash(data) for url, data in blobs.items()}
    remove(moto.endpoint, prefix)


def node_env(cache_root: Path, node: int) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MLSTORE_NODE_ID": f"node-{node}",
        "MLSTORE_CACHE_DIR": str(cache_root / f"node-{node}"),
        "OMP_NUM_THREADS": "1",
    }


def run_all(cache_root: Path, commands: list[tuple[list[str], dict[str, str]]]) -> None:
    """Start one process a node and wait for them all; fail naming each that failed.

    Each writes to a log file, never a pipe: a pipe nobody reads yet fills up, and the
    blocked process would hold up the collective of all the others."""
    logs = [cache_root / f"node-{node}.log" for node in range(len(commands))]
    started = []
    for (command, env), log in zip(commands, logs, strict=True):
        with log.open("w") as sink:
            started.append(
                subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
            )
    try:
        for process in started:
            process.wait(timeout=LAUNCH_TIMEOUT)
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
    failed = [
        f"node {i}:\n{log.read_text()[-3000:]}"
        for i, (process, log) in enumerate(zip(started, logs, strict=True))
        if process.returncode
    ]
    assert not failed, "\n".join(failed)


def launch_cluster(cache_root: Path, config: dict[str, Any], per_node: int) -> dict[str, Any]:
    """NODES torchrun launches of ``per_node`` ranks each, every rank calling
    cooperative_warm; the report rank 0 wrote."""
    port = free_port()
    out = cache_root / "report.json"
    out.unlink(missing_ok=True)
    args = json.dumps({**config, "out": str(out)})
    run_all(
        cache_root,
        [
            (
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    f"--nnodes={NODES}",
                    f"--nproc-per-node={per_node}",
                    f"--node-rank={node}",
                    "--master-addr=127.0.0.1",
                    f"--master-port={port}",
                    "-m",
                    "tests.test_cooperative",
                    "warm",
                    args,
                ],
                node_env(cache_root, node),
            )
            for node in range(NODES)
        ],
    )
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def read_on_node(
    cache_root: Path,
    node: int,
    endpoint: str,
    urls: list[str],
    versions: list[str | None] | None = None,
) -> dict[str, Any]:
    """Read every URL (pinned to ``versions``, when given) in a new process on ``node``
    (its cache); the content hashes and the process's requests."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.test_cooperative",
            "read",
            json.dumps([endpoint, urls, versions]),
        ],
        cwd=ROOT,
        env=node_env(cache_root, node),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def object_gets(endpoint: str, prefix: str) -> collections.Counter[str]:
    path = prefix.replace("s3:/", "", 1)
    return collections.Counter(
        r["path"]
        for r in proxy.request_log(endpoint)
        if r["method"] == "GET" and r["path"].startswith(path)
    )


def test_s5_three_nodes_fetch_each_object_once_and_every_node_holds_all(
    objects: tuple[str, dict[str, str]], s3_proxy: ServerProcess, tmp_path: Path
) -> None:
    prefix, hashes = objects
    urls = sorted(hashes)
    config = {"endpoint": s3_proxy.endpoint, "prefix": prefix, "chunk_bytes": CHUNK_BYTES}
    proxy.reset(s3_proxy.endpoint)
    report = launch_cluster(tmp_path, config, per_node=1)

    gets = object_gets(s3_proxy.endpoint, prefix)
    nodes = report["nodes"]
    print(f"\nS5: {NODES} nodes x {OBJECTS} objects -> {sum(gets.values())} cloud GETs")
    for name, n in sorted(nodes.items()):
        print(
            f"  {name}: share {n['share']}, fetched {n['fetched']}, sent {n['sent']}, "
            f"received {n['received']}, rounds {n['rounds']}"
        )
    assert sum(gets.values()) == OBJECTS and set(gets.values()) == {1}  # each object once
    assert report["ok"] and report["objects"] == OBJECTS
    assert sorted(nodes) == [f"node-{i}" for i in range(NODES)]
    assert sum(n["share"] for n in nodes.values()) == OBJECTS
    for n in nodes.values():
        assert n["fetched"] == n["share"] > 0 and n["refetched"] == 0
        assert n["received"] == OBJECTS - n["share"] and n["held"] == 0
        assert n["rounds"] > 1  # the chunk bound split the exchange
    assert sum(n["sent"] for n in nodes.values()) == OBJECTS

    # Every node holds all 300: a fresh process on each reads them all with no request.
    proxy.reset(s3_proxy.endpoint)
    for node in range(NODES):
        read = read_on_node(tmp_path, node, s3_proxy.endpoint, urls)
        assert read["hashes"] == [hashes[u] for u in urls], f"node-{node}: wrong bytes"
        assert read["requests"] == 0, f"node-{node}"
    assert proxy.request_log(s3_proxy.endpoint) == []
    print(f"  then each node, in a fresh process, reads all {OBJECTS}: 0 GETs")

    # Again, with two ranks a node: nothing is fetched or sent, the nodes hold it all.
    report = launch_cluster(tmp_path, config, per_node=2)
    assert report["ok"]
    assert sorted(n["rank"] for n in report["nodes"].values()) == [0, 2, 4]  # lowest a node
    for n in report["nodes"].values():
        assert (n["fetched"], n["cached"], n["sent"], n["received"]) == (0, n["share"], 0, 0)
        assert n["held"] == OBJECTS - n["share"]
    assert sum(object_gets(s3_proxy.endpoint, prefix).values()) == 0


def test_it_needs_an_initialized_process_group() -> None:
    from mlstore.errors import ConfigError
    from mlstore.torch import cooperative_warm

    with pytest.raises(ConfigError, match="init_process_group"):
        cooperative_warm(["s3://bucket/x"])


def launch_ranks(cache_root: Path, config: dict[str, Any], nodes: int) -> dict[str, Any]:
    """``nodes`` plain processes (one rank a node, ``env://`` rendezvous, no torchrun)
    calling cooperative_warm; the report rank 0 wrote."""
    port = free_port()
    out = cache_root / "report.json"
    args = json.dumps({**config, "out": str(out)})
    run_all(
        cache_root,
        [
            (
                [sys.executable, "-m", "tests.test_cooperative", "warm", args],
                {
                    **node_env(cache_root, node),
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port),
                    "RANK": str(node),
                    "WORLD_SIZE": str(nodes),
                },
            )
            for node in range(nodes)
        ],
    )
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def test_a_damaged_copy_is_fetched_again_and_a_missing_object_named_by_every_node(
    objects: tuple[str, dict[str, str]], s3_proxy: ServerProcess, tmp_path: Path
) -> None:
    """A manifest, each object pinned. Node 0 trusts its disk (``verify="never"``) and
    holds a blob of its share that rotted there: it sends those bytes under the digest
    it recorded, node 1 finds the mismatch, keeps nothing and fetches the object itself.
    An object that does not exist is asked for by its owner only, and both nodes report
    it. Node 1 then serves every pinned read from its cache."""
    import mlstore
    from mlstore import _peer

    prefix, hashes = objects
    urls = sorted(hashes)[:40]
    missing = f"{prefix}no-such-object.bin"
    damaged = mlstore.plan([*urls, missing], ["node-0", "node-1"])["node-0"][0]
    options = {"s3": {"endpoint_url": s3_proxy.endpoint}}
    with mlstore.Store(options=options, cache={"enabled": False}) as s:
        versions = [s.info(u).version for u in urls]
    manifest = [[u, 0, v] for u, v in zip(urls, versions, strict=True)]
    cache = {"disk_dir": str(tmp_path / "node-0"), "verify": "never"}
    with mlstore.Store(options=options, cache=cache) as s:
        disk = s.cache.disk
        assert disk is not None
        blob = Path(disk.blob_path(_peer.record(s, damaged).digest))
    rotten = bytearray(blob.read_bytes())
    rotten[len(rotten) // 2] ^= 0xFF
    blob.write_bytes(bytes(rotten))

    proxy.reset(s3_proxy.endpoint)
    config = {
        "endpoint": s3_proxy.endpoint,
        "manifest": [*manifest, [missing, 0, "no-such-version"]],
        "chunk_bytes": CHUNK_BYTES,
        "trust_disk": ["node-0"],
    }
    report = launch_ranks(tmp_path, config, nodes=2)
    nodes = report["nodes"]
    assert not report["ok"]
    for n in nodes.values():
        assert [url for url, _ in n["failures"]] == [missing]
    assert nodes["node-0"]["refetched"] == 0 and nodes["node-1"]["refetched"] == 1
    gets = object_gets(s3_proxy.endpoint, prefix)
    path = prefix.replace("s3:/", "", 1)
    assert gets == {**{u.replace("s3:/", "", 1): 1 for u in urls}, f"{path}no-such-object.bin": 1}

    proxy.reset(s3_proxy.endpoint)
    read = read_on_node(tmp_path, 1, s3_proxy.endpoint, urls, versions)
    assert read == {"hashes": [hashes[u] for u in urls], "requests": 0}


# ------------------------------------------------------------------ the child programs


def _warm(config: dict[str, Any]) -> None:
    """A rank of the job: join the group, warm cooperatively, rank 0 writes the report."""
    import dataclasses

    import torch.distributed as dist

    import mlstore
    from mlstore.torch import cooperative_warm

    dist.init_process_group("gloo")
    cache: dict[str, Any] = {"disk_dir": os.environ["MLSTORE_CACHE_DIR"]}
    if os.environ["MLSTORE_NODE_ID"] in config.get("trust_disk", ()):
        cache["verify"] = "never"
    if "manifest" in config:
        entries = [mlstore.ManifestEntry(u, size, v) for u, size, v in config["manifest"]]
        urls: Any = mlstore.Manifest.from_entries(entries)
    else:
        urls = [config["prefix"]]
    try:
        options = {"s3": {"endpoint_url": config["endpoint"]}}
        with mlstore.Store(options=options, cache=cache) as store:
            report = cooperative_warm(urls, store=store, chunk_bytes=config["chunk_bytes"])
        if dist.get_rank() == 0:
            data = {
                "ok": report.ok,
                "objects": report.objects,
                "nodes": {k: dataclasses.asdict(v) for k, v in report.nodes.items()},
            }
            Path(config["out"]).write_text(json.dumps(data))
    finally:
        dist.destroy_process_group()


def _read(endpoint: str, urls: list[str], versions: list[str | None] | None) -> None:
    """A fresh process on a node: read every URL through the node's cache."""
    import mlstore

    with mlstore.Store(options={"s3": {"endpoint_url": endpoint}}) as store:
        data = store.read_many(urls, versions=versions)
        requests = store.stats()["requests"]
    print(json.dumps({"hashes": [content_hash(d) for d in data], "requests": requests}))


if __name__ == "__main__":
    if sys.argv[1] == "warm":
        _warm(json.loads(sys.argv[2]))
    else:
        _read(*json.loads(sys.argv[2]))
