"""``mlstore.dask`` on a real multi-process Dask cluster of two simulated nodes.

A ``dask scheduler`` process and two ``dask worker --nworkers 2`` processes (Nanny
workers), each "node" with its own ``MLSTORE_NODE_ID`` and disk cache directory, read
S3 through the counting proxy in front of moto, so the GETs the cluster sends are
counted where they arrive.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import mlstore
from tests.emulators import ServerProcess
from tests.servers import proxy

distributed = pytest.importorskip("distributed")
pytest.importorskip("dask.dataframe")

import mlstore.dask  # noqa: E402 (after the skip: it needs distributed)

NODES = ("node-a", "node-b")
DASK = [sys.executable, "-m"]
QUIET = ["--host", "127.0.0.1", "--no-dashboard"]
TWO_WORKERS = ["--nworkers", "2", "--nthreads", "2", "--local-directory"]  # + a dir
OBJECTS = 40

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def object_gets(endpoint: str) -> int:
    """GETs of objects (a listing is a GET with a query string, and not counted)."""
    return sum(1 for r in proxy.request_log(endpoint) if r["method"] == "GET" and not r["query"])


@pytest.fixture(scope="module")
def cluster(
    s3_proxy: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, str]]]:
    """The scheduler's address, and each node's cache directory."""
    env = {
        "MLSTORE_S3_ENDPOINT_URL": s3_proxy.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    scheduler = ServerProcess(
        "dask scheduler",
        [*DASK, "distributed.cli.dask_scheduler", "--port", "0", *QUIET],
        r"Scheduler at:\s+tcp://127\.0\.0\.1:(?P<port>\d+)",
        env=env,
    )
    started = [scheduler]  # stopped in the end however far the start got
    try:
        scheduler.start()
        address = f"tcp://127.0.0.1:{scheduler.port}"
        caches = {node: str(tmp_path_factory.mktemp(f"{node}-cache")) for node in NODES}
        scratch = {node: str(tmp_path_factory.mktemp(f"{node}-dask")) for node in NODES}
        for node in NODES:
            worker = ServerProcess(
                f"dask worker {node}",
                [
                    *DASK,
                    "distributed.cli.dask_worker",
                    address,
                    *QUIET,
                    *TWO_WORKERS,
                    scratch[node],
                ],
                # the scheduler's port: the worker process itself listens on none of its own
                r"Registered to:\s+tcp://127\.0\.0\.1:(?P<port>\d+)",
                env={**env, "MLSTORE_NODE_ID": node, "MLSTORE_CACHE_DIR": caches[node]},
            )
            started.append(worker)
            worker.start()
        yield address, caches
    finally:
        for server in reversed(started):
            server.stop()


@pytest.fixture
def client(cluster: tuple[str, dict[str, str]]) -> Iterator[object]:
    with distributed.Client(cluster[0], timeout=60) as c:
        c.wait_for_workers(2 * len(NODES), timeout=60)
        yield c


@pytest.fixture
def dataset(s3_options: dict[str, object], s3_bucket: str) -> list[str]:
    urls = [f"s3://{s3_bucket}/train/{i:03d}.bin" for i in range(OBJECTS)]
    with mlstore.Store(options={"s3": s3_options}, cache={"enabled": False}) as s:
        for url in urls:
            s.write_bytes(url, os.urandom(1000))
    return urls


@pytest.fixture
def here(s3_options: dict[str, object]) -> Iterator[mlstore.Store]:
    """The client's Store, which lists what the cluster warms."""
    with mlstore.Store(options={"s3": s3_options}) as store:
        yield store


def test_each_node_warms_its_share_once_with_one_task_a_node(
    client: object,
    dataset: list[str],
    s3_bucket: str,
    s3_proxy: ServerProcess,
    here: mlstore.Store,
) -> None:
    proxy.reset(s3_proxy.endpoint)
    report = mlstore.dask.warm(client, [f"s3://{s3_bucket}/train/"], timeout=120, store=here)
    assert report.ok, report
    assert sorted(report.nodes) == sorted(NODES)  # one task a node, not one a worker
    assert report.fetched == OBJECTS == object_gets(s3_proxy.endpoint)  # S7
    shares = {node: n.objects for node, n in report.nodes.items()}
    assert shares == {k: len(v) for k, v in mlstore.plan(dataset, NODES).items()}

    proxy.reset(s3_proxy.endpoint)
    again = mlstore.dask.warm(client, [f"s3://{s3_bucket}/train/"], timeout=120, store=here)
    assert again.ok and again.fetched == 0 and object_gets(s3_proxy.endpoint) == 0

    proxy.reset(s3_proxy.endpoint)
    everywhere = mlstore.dask.warm(client, dataset, replicate=True, timeout=120, store=here)
    # each node now fetches what the other one held: the objects once more, no more
    assert everywhere.ok and object_gets(s3_proxy.endpoint) == OBJECTS
    assert all(n.objects == OBJECTS for n in everywhere.nodes.values())


def test_a_failed_object_is_reported_by_its_node_and_the_rest_are_warmed(
    client: object, dataset: list[str], s3_bucket: str, here: mlstore.Store
) -> None:
    manifest = mlstore.Manifest.build(f"s3://{s3_bucket}/train/", store=here)
    gone = dataset[7]
    here.rm(gone)  # after the manifest recorded it
    report = mlstore.dask.warm(client, manifest, timeout=120)
    assert not report.ok
    failed = {node: n.failures for node, n in report.nodes.items() if n.failures}
    assert len(failed) == 1
    ((url, message),) = next(iter(failed.values()))
    assert url == gone and gone in message
    assert sum(n.objects for n in report.nodes.values()) == OBJECTS
    assert report.fetched == OBJECTS - 1  # the others were all warmed


def test_dask_dataframe_reads_through_mlstore_on_the_cluster(
    client: object,
    s3_options: dict[str, object],
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dask.dataframe as dd
    import pandas as pd

    frame = pd.DataFrame({"x": range(100), "y": [f"v{i}" for i in range(100)]})
    table = f"mlstore::s3://{s3_bucket}/table"
    # Settings from the environment, as on the workers (there: through the proxy).
    monkeypatch.setenv("MLSTORE_S3_ENDPOINT_URL", str(s3_options["endpoint_url"]))
    for i in range(4):
        frame.iloc[i * 25 : (i + 1) * 25].to_parquet(f"{table}/part-{i}.parquet", index=False)
    read = dd.read_parquet(table).compute().sort_values("x")  # each part read by a worker
    assert read["x"].tolist() == frame["x"].tolist() and read["y"].tolist() == frame["y"].tolist()


def test_the_plugin_gives_every_worker_the_same_settings(client: object) -> None:
    client.register_plugin(mlstore.dask.MlstorePlugin(cache={"memory_bytes": "64MiB"}))  # type: ignore[attr-defined]
    seen = client.run(lambda: mlstore.default_store().config.cache.memory_bytes)  # type: ignore[attr-defined]
    assert set(seen.values()) == {64 * 2**20} and len(seen) == 2 * len(NODES)
    client.unregister_worker_plugin("mlstore")  # type: ignore[attr-defined]


def test_the_command_line_warms_a_dask_cluster(
    cluster: tuple[str, dict[str, str]],
    dataset: list[str],
    s3_bucket: str,
    s3_proxy: ServerProcess,
    tmp_path: Path,
) -> None:
    import json
    import subprocess

    env = {
        **os.environ,
        "MLSTORE_S3_ENDPOINT_URL": s3_proxy.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "MLSTORE_CACHE_DIR": str(tmp_path / "cache"),
    }
    proxy.reset(s3_proxy.endpoint)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlstore",
            "warm",
            f"s3://{s3_bucket}/train/",
            "--dask",
            cluster[0],
            "--replicate",
            "--json",
            "--timeout",
            "120",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert sorted(report["nodes"]) == sorted(NODES)
    assert all(n["objects"] == OBJECTS and n["ok"] for n in report["nodes"].values())
    # what each node fetched is what the proxy saw: nothing twice on one node
    assert report["fetched"] == object_gets(s3_proxy.endpoint)
