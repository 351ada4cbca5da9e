"""``mlstore.ray`` on a real Ray cluster of simulated nodes: figures S1, S2, S4 and S6.

``ray.cluster_utils.Cluster`` starts a head and two worker nodes as separate raylet
processes on this machine; each node has its own ``MLSTORE_NODE_ID`` and cache directory
(the raylet's environment, which its workers inherit), so each is a node to mlstore. S3
is read through the counting proxy in front of moto, so every GET the cluster sends is
counted where it arrives.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

import mlstore
from tests.emulators import ServerProcess
from tests.servers import proxy

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")
ray_data = pytest.importorskip("ray.data")

import mlstore.ray  # noqa: E402 (after the skip: it needs ray)

NODES = ("head", "node-a", "node-b")
OBJECTS = 300
ATTEMPTS = 3  # mlstore's attempts per request on the nodes (MLSTORE_MAX_ATTEMPTS)

pytestmark = [
    pytest.mark.s3,
    pytest.mark.slow,
    # Ray's own modules warn about their deprecations on import and at start.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def object_gets(endpoint: str, path: str = "") -> int:
    """GETs of objects (a listing is a GET with a query string, and not counted)."""
    return sum(
        1
        for r in proxy.request_log(endpoint)
        if r["method"] == "GET" and not r["query"] and path in r["path"]
    )


@pytest.fixture(scope="module")
def node_env(
    s3_proxy: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, str]]:
    """Each simulated node's environment: its name, its own cache, S3 behind the proxy."""
    common = {
        "MLSTORE_S3_ENDPOINT_URL": s3_proxy.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLSTORE_MAX_ATTEMPTS": str(ATTEMPTS),
        "MLSTORE_BACKOFF_BASE": "0.01",
        "MLSTORE_BACKOFF_MAX": "0.05",
    }
    return {
        node: {
            **common,
            "MLSTORE_NODE_ID": node,
            "MLSTORE_CACHE_DIR": str(tmp_path_factory.mktemp(f"{node}-cache")),
        }
        for node in NODES
    }


@pytest.fixture(scope="module")
def cluster(node_env: dict[str, dict[str, str]]) -> Iterator[object]:
    """A head and two worker nodes, one CPU each, and this process connected as driver."""
    quiet = {"num_cpus": 1, "include_dashboard": False}
    started = cluster_utils.Cluster(
        initialize_head=True, head_node_args={**quiet, "env_vars": node_env["head"]}
    )
    try:
        for node in NODES[1:]:
            started.add_node(**quiet, env_vars=node_env[node])
        started.wait_for_nodes()
        ray.init(address=started.address, log_to_driver=False)
        yield started
    finally:
        ray.shutdown()
        started.shutdown()


@pytest.fixture
def driver_on_head(
    node_env: dict[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> mlstore.Store:
    """This process as a process of the head node (its cache and its endpoint)."""
    for name, value in node_env["head"].items():
        monkeypatch.setenv(name, value)
    return mlstore.Store()


def upload(s3_options: dict[str, object], bucket: str, prefix: str, n: int) -> dict[str, bytes]:
    data = {f"s3://{bucket}/{prefix}/{i:03d}.bin": os.urandom(1000) for i in range(n)}
    with mlstore.Store(options={"s3": s3_options}, cache={"enabled": False}) as s:
        for url, body in data.items():
            s.write_bytes(url, body)
    return data


def test_each_node_warms_its_share_and_the_cluster_fetches_every_object_once(
    cluster: object,
    s3_options: dict[str, object],
    s3_bucket: str,
    s3_proxy: ServerProcess,
    driver_on_head: mlstore.Store,
) -> None:
    data = upload(s3_options, s3_bucket, "s1", OBJECTS)
    proxy.reset(s3_proxy.endpoint)
    report = mlstore.ray.warm([f"s3://{s3_bucket}/s1/"], timeout=300, store=driver_on_head)
    assert report.ok, report
    assert sorted(report.nodes) == sorted(NODES)
    assert report.fetched == OBJECTS == object_gets(s3_proxy.endpoint)  # S1
    assert sum(n.gets for n in report.nodes.values()) == OBJECTS
    plan = mlstore.plan(list(data), NODES)
    assert {k: n.objects for k, n in report.nodes.items()} == {k: len(v) for k, v in plan.items()}
    print(f"\nS1: {len(NODES)} nodes, {OBJECTS} objects -> {report.fetched} GETs; {report}")

    proxy.reset(s3_proxy.endpoint)
    again = mlstore.ray.warm([f"s3://{s3_bucket}/s1/"], timeout=300, store=driver_on_head)
    assert again.ok and again.fetched == 0 and object_gets(s3_proxy.endpoint) == 0
    assert sum(n.cached for n in again.nodes.values()) == OBJECTS
    print(f"S1 re-run: {object_gets(s3_proxy.endpoint)} GETs")


def test_a_replicated_warm_fetches_once_a_node_and_ray_data_then_reads_from_the_cache(
    cluster: object,
    s3_options: dict[str, object],
    s3_bucket: str,
    s3_proxy: ServerProcess,
    driver_on_head: mlstore.Store,
) -> None:
    data = upload(s3_options, s3_bucket, "s2", OBJECTS)
    manifest = mlstore.Manifest.build(f"s3://{s3_bucket}/s2/", store=driver_on_head)
    proxy.reset(s3_proxy.endpoint)
    report = mlstore.ray.warm(manifest, replicate=True, timeout=300)
    assert report.ok, report
    # S2: objects x nodes, never x processes (each node's task warms for all its workers)
    assert object_gets(s3_proxy.endpoint) == OBJECTS * len(NODES)
    assert all(n.objects == n.fetched == OBJECTS for n in report.nodes.values())
    print(f"\nS2: replicated over {len(NODES)} nodes -> {object_gets(s3_proxy.endpoint)} GETs")

    proxy.reset(s3_proxy.endpoint)
    fs = mlstore.filesystem("s3")
    rows = ray_data.read_binary_files(
        f"s3://{s3_bucket}/s2/", filesystem=fs, include_paths=True
    ).take_all()
    assert {f"s3://{r['path']}": r["bytes"] for r in rows} == data
    assert object_gets(s3_proxy.endpoint) == 0  # S4
    print(f"S4: Ray Data read of {len(rows)} files after the warm -> 0 GETs")


def test_ray_data_reads_parquet_through_the_filesystem(
    cluster: object, s3_options: dict[str, object], s3_bucket: str, driver_on_head: mlstore.Store
) -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"x": range(1000), "y": [f"row {i}" for i in range(1000)]})
    for part in range(3):
        frame.iloc[part::3].to_parquet(
            f"mlstore::s3://{s3_bucket}/table/part-{part}.parquet",
            storage_options={"s3": s3_options},
        )
    table = ray_data.read_parquet(f"s3://{s3_bucket}/table/", filesystem=mlstore.filesystem("s3"))
    assert sorted(table.to_pandas()["x"]) == list(range(1000))


def test_the_filesystem_pickles_without_a_secret_and_reads_on_another_node(
    cluster: object, s3_bucket: str, s3_options: dict[str, object]
) -> None:
    secret = "s3cr3t-never-pickled"
    fs = mlstore.filesystem("s3", options={"s3": {**s3_options, "secret": secret}})
    assert secret.encode() not in pickle.dumps(fs)
    upload(s3_options, s3_bucket, "pickled", 1)

    @ray.remote(num_cpus=0)
    def read(fs: object, path: str) -> bytes:
        return fs.cat_file(path)  # type: ignore[attr-defined, no-any-return]

    # bare path, as Ray Data hands it over after stripping the scheme
    got = ray.get(read.remote(fs, f"{s3_bucket}/pickled/000.bin"))
    assert len(got) == 1000


def test_ray_data_does_not_retry_what_mlstore_gave_up_on(
    cluster: object,
    s3_options: dict[str, object],
    s3_bucket: str,
    s3_proxy: ServerProcess,
    driver_on_head: mlstore.Store,
) -> None:
    upload(s3_options, s3_bucket, "throttled", 1)
    path = f"/{s3_bucket}/throttled/000.bin"
    proxy.reset(s3_proxy.endpoint)
    proxy.set_faults(
        s3_proxy.endpoint,
        {"fault": "status", "status": 503, "method": "GET", "path": re.escape(path) + "$"},
    )
    try:
        with pytest.raises(Exception) as failed:
            ray_data.read_binary_files(
                f"s3://{s3_bucket}/throttled/", filesystem=mlstore.filesystem("s3")
            ).take_all()
    finally:
        proxy.clear_faults(s3_proxy.endpoint)
    assert "throttled/000.bin" in str(failed.value)
    # mlstore's attempts, once: Ray Data neither re-ran the task nor retried the read
    assert object_gets(s3_proxy.endpoint, path) == ATTEMPTS


def test_a_node_killed_mid_warm_is_named_by_the_timeout_and_a_rerun_fetches_its_share(
    cluster: object,
    node_env: dict[str, dict[str, str]],
    s3_options: dict[str, object],
    s3_bucket: str,
    s3_proxy: ServerProcess,
    driver_on_head: mlstore.Store,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    doomed_env = {
        **node_env["node-a"],
        "MLSTORE_NODE_ID": "doomed",
        "MLSTORE_CACHE_DIR": str(tmp_path_factory.mktemp("doomed-cache")),
    }
    doomed = cluster.add_node(num_cpus=1, include_dashboard=False, env_vars=doomed_env)  # type: ignore[attr-defined]
    cluster.wait_for_nodes()  # type: ignore[attr-defined]
    data = upload(s3_options, s3_bucket, "s6", 120)
    share = mlstore.plan(list(data), [*NODES, "doomed"])["doomed"]
    stuck = "/" + share[0].split("://", 1)[1]
    proxy.reset(s3_proxy.endpoint)
    proxy.set_faults(
        s3_proxy.endpoint,
        {"fault": "stall", "before_headers": True, "method": "GET", "path": re.escape(stuck) + "$"},
    )
    result: dict[str, object] = {}
    warming = threading.Thread(
        target=lambda: result.update(
            report=mlstore.ray.warm([f"s3://{s3_bucket}/s6/"], timeout=60, store=driver_on_head)
        ),
    )
    try:
        warming.start()
        deadline = time.monotonic() + 120
        while object_gets(s3_proxy.endpoint, stuck) == 0:  # the doomed node is mid-warm
            assert time.monotonic() < deadline, "the doomed node never asked for its object"
            time.sleep(0.1)
        cluster.remove_node(doomed, allow_graceful=False)  # type: ignore[attr-defined]
        warming.join()
    finally:
        proxy.clear_faults(s3_proxy.endpoint)
    report = result["report"]
    assert isinstance(report, mlstore.ray.ClusterWarm)
    assert sorted(report.failed) == ["doomed"], report
    assert report.nodes["doomed"].objects == len(share) and report.nodes["doomed"].error
    print(f"\nS6: node killed mid-warm -> {report}")

    proxy.reset(s3_proxy.endpoint)
    again = mlstore.ray.warm([f"s3://{s3_bucket}/s6/"], timeout=300, store=driver_on_head)
    assert again.ok, again
    assert sorted(again.nodes) == sorted(NODES)
    # only the dead node's share is missing; everything else stays where it was warmed
    assert object_gets(s3_proxy.endpoint) == again.fetched == len(share)
    print(f"S6 re-run: {again.fetched} GETs (the dead node's share of {len(share)})")


def test_the_command_line_warms_a_ray_cluster_and_prints_a_line_a_node(
    cluster: object,
    node_env: dict[str, dict[str, str]],
    s3_options: dict[str, object],
    s3_bucket: str,
    s3_proxy: ServerProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    upload(s3_options, s3_bucket, "cli", 30)
    here = {
        **os.environ,
        **node_env["head"],
        "MLSTORE_CACHE_DIR": str(tmp_path_factory.mktemp("cli-cache")),
    }
    command = [
        sys.executable,
        "-m",
        "mlstore",
        "warm",
        f"s3://{s3_bucket}/cli/",
        "--ray",
        cluster.address,
        "--timeout",
        "300",
    ]  # type: ignore[attr-defined]
    proxy.reset(s3_proxy.endpoint)
    done = subprocess.run(command, env=here, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == [f"node {n}" for n in sorted(NODES)]
    assert lines[-1].startswith("warmed 3 nodes: 30 objects in all, 30 fetched")
    assert object_gets(s3_proxy.endpoint) == 30

    again = subprocess.run(
        [*command, "--json", "--replicate"], env=here, capture_output=True, text=True, check=False
    )
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["ok"] and sorted(report["nodes"]) == sorted(NODES)
    # each node fetches what the others held: the objects twice more, in all
    assert report["fetched"] == 60 == object_gets(s3_proxy.endpoint) - 30
    assert all(n["objects"] == 30 and n["gets"] == n["fetched"] for n in report["nodes"].values())
