"""Node identity (``mlstore.node_key``), rendezvous plans (``mlstore.plan``) and
``mlstore warm --node-shard NODE --nodes-from FILE`` on three simulated nodes (each its
own cache directory) that share one S3 prefix behind the counting proxy."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mlstore
from mlstore.errors import ConfigError
from tests.emulators import ServerProcess
from tests.servers import proxy
from tests.test_cli_commands import cli, config_for, ok, one_line_error

URLS = [f"s3://bucket/data/{i:05d}.bin" for i in range(10_000)]
NODES = [f"node-{i}" for i in range(8)]


def owners(shares: dict[str, list[str]]) -> dict[str, str]:
    return {url: node for node, urls in shares.items() for url in urls}


# ------------------------------------------------------------------------------ node_key


@pytest.fixture
def no_node_vars(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("MLSTORE_NODE_ID", raising=False)
    monkeypatch.delenv("NODE_NAME", raising=False)
    return monkeypatch


def test_node_key_prefers_mlstore_node_id_then_node_name_then_the_host_name(
    no_node_vars: pytest.MonkeyPatch,
) -> None:
    assert mlstore.node_key() == socket.gethostname()
    no_node_vars.setenv("NODE_NAME", "gke-pool-1-abc")
    assert mlstore.node_key() == "gke-pool-1-abc"
    no_node_vars.setenv("MLSTORE_NODE_ID", "rack2.node7")
    assert mlstore.node_key() == "rack2.node7"
    no_node_vars.setenv("MLSTORE_NODE_ID", "")  # empty values are skipped
    assert mlstore.node_key() == "gke-pool-1-abc"
    no_node_vars.setenv("NODE_NAME", "")
    assert mlstore.node_key() == socket.gethostname()


@pytest.mark.parametrize("bad", ["a/b", "two words", "tab\there", "x" * 254, "ü", "a#b"])
@pytest.mark.parametrize("var", ["MLSTORE_NODE_ID", "NODE_NAME"])
def test_a_value_that_cannot_name_a_node_is_refused_naming_its_variable(
    no_node_vars: pytest.MonkeyPatch, var: str, bad: str
) -> None:
    no_node_vars.setenv(var, bad)
    with pytest.raises(ConfigError, match=f"environment variable {var}"):
        mlstore.node_key()


def test_the_longest_node_name_is_accepted(no_node_vars: pytest.MonkeyPatch) -> None:
    no_node_vars.setenv("MLSTORE_NODE_ID", "n" * 253)
    assert mlstore.node_key() == "n" * 253


# ---------------------------------------------------------------------------------- plan


def test_every_url_goes_to_exactly_one_node_in_input_order() -> None:
    urls = URLS[:500][::-1]  # not sorted: each share keeps the order given
    shares = mlstore.plan(urls, NODES)
    assert list(shares) == NODES
    assert sorted(u for share in shares.values() for u in share) == sorted(urls)
    for share in shares.values():
        assert share == [u for u in urls if u in set(share)]


def test_every_node_is_a_key_even_with_nothing_to_do() -> None:
    assert mlstore.plan([], ["a", "b"]) == {"a": [], "b": []}
    shares = mlstore.plan(["s3://b/x"], ["a", "b", "c"])
    assert sorted(shares) == ["a", "b", "c"]
    assert sorted(map(len, shares.values())) == [0, 0, 1]


def test_a_manifest_is_planned_by_its_entries_urls(tmp_path: Path) -> None:
    for i in range(20):
        (tmp_path / f"{i}.bin").write_bytes(b"x" * i)
    manifest = mlstore.Manifest.build(str(tmp_path))
    urls = [e.url for e in manifest]
    assert mlstore.plan(manifest, ["a", "b", "c"]) == mlstore.plan(urls, ["a", "b", "c"])


def test_the_plan_is_the_same_in_a_fresh_process() -> None:
    code = (
        "import json, sys, mlstore\n"
        "urls = [f's3://bucket/data/{i:05d}.bin' for i in range(2000)]\n"
        "nodes = [f'node-{i}' for i in range(8)]\n"
        "json.dump(mlstore.plan(urls, nodes), sys.stdout)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},  # hash() would differ: xxh3 does not
    )
    assert json.loads(child.stdout) == mlstore.plan(URLS[:2000], NODES)


def test_shares_are_balanced_within_1_3_of_the_mean() -> None:
    sizes = [len(share) for share in mlstore.plan(URLS, NODES).values()]
    mean = len(URLS) / len(NODES)
    assert max(sizes) <= 1.3 * mean and min(sizes) >= mean / 1.3, sizes


def test_a_new_node_takes_about_a_ninth_and_nothing_moves_between_old_nodes() -> None:
    before = owners(mlstore.plan(URLS, NODES))
    after = owners(mlstore.plan(URLS, [*NODES, "node-8"]))
    moved = [u for u in URLS if before[u] != after[u]]
    assert all(after[u] == "node-8" for u in moved)  # the rendezvous property
    assert len(moved) == sum(1 for u in URLS if after[u] == "node-8")
    assert 0.8 / 9 * len(URLS) <= len(moved) <= 1.2 / 9 * len(URLS), len(moved)


def test_removing_a_node_moves_only_its_urls() -> None:
    before = owners(mlstore.plan(URLS, NODES))
    after = owners(mlstore.plan(URLS, [n for n in NODES if n != "node-3"]))
    moved = {u for u in URLS if before[u] != after[u]}
    assert moved == {u for u in URLS if before[u] == "node-3"}
    assert moved  # node-3 had a share
    # The order of the node list does not matter either.
    assert owners(mlstore.plan(URLS, NODES[::-1])) == before


def test_node_share_is_the_plan_for_one_node() -> None:
    shares = mlstore.plan(URLS[:300], ["a", "b", "c"])
    for node in "abc":
        assert mlstore.node_share(URLS[:300], node, ["a", "b", "c"]) == shares[node]
    with pytest.raises(ConfigError, match="node: 'd' is not one of the 3 nodes"):
        mlstore.node_share(URLS[:300], "d", ["a", "b", "c"])


@pytest.mark.parametrize(
    ("nodes", "says"),
    [
        ([], "nodes: the list of nodes is empty"),
        (["a", "b", "a"], "nodes[2]: node 'a' is listed twice"),
        (["a", "b/c"], "nodes[1]: 'b/c' is not a node name"),
        (["a", ""], "nodes[1]"),
    ],
)
def test_bad_node_lists_are_refused_naming_the_field(nodes: list[str], says: str) -> None:
    with pytest.raises(ConfigError, match=says.replace("[", r"\[").replace("]", r"\]")):
        mlstore.plan(URLS[:10], nodes)


def test_one_string_is_not_taken_for_a_list_of_urls() -> None:
    with pytest.raises(ConfigError, match="urls: give a list of URLs"):
        mlstore.plan("s3://bucket/data/", ["a"])


# ---------------------------------------------------------------- warm --node-shard (CLI)

COUNT = 60


@pytest.fixture
def prefix(s3_options: dict[str, object], s3_bucket: str) -> str:
    url = f"s3://{s3_bucket}/cluster/"
    with mlstore.Store(options={"s3": s3_options}, cache={"enabled": False}) as s:
        for i in range(COUNT):
            s.write_bytes(f"{url}{i:02d}.bin", os.urandom(100 + i))
    return url


def node_env(tmp_path: Path, endpoint: str, node: str) -> dict[str, str]:
    home = tmp_path / node
    home.mkdir()
    return {**config_for(home, endpoint), "MLSTORE_CACHE_DIR": str(home / "cache")}


def object_gets(endpoint: str, bucket: str) -> list[str]:
    """Object GETs through the proxy since its reset (listings are GETs of the bucket)."""
    return [
        r["path"]
        for r in proxy.request_log(endpoint)
        if r["method"] == "GET" and r["path"].startswith(f"/{bucket}/cluster/")
    ]


@pytest.mark.s3
def test_three_nodes_warm_disjoint_shares_that_cover_the_prefix_once(
    s3_proxy: ServerProcess, s3_bucket: str, prefix: str, tmp_path: Path
) -> None:
    nodes_file = tmp_path / "nodes.txt"
    nodes_file.write_text("# the job's nodes\nnode-a\n\nnode-b   # rack 2\nnode-c\n")
    envs = {n: node_env(tmp_path, s3_proxy.endpoint, n) for n in ("node-a", "node-b", "node-c")}
    shard = ["--node-shard", "auto", "--nodes-from", str(nodes_file)]
    proxy.reset(s3_proxy.endpoint)
    reports = {}
    for node, env in envs.items():
        done = cli("warm", "--json", *shard, prefix, env={**env, "MLSTORE_NODE_ID": node})
        reports[node] = json.loads(ok(done))
    gets = object_gets(s3_proxy.endpoint, s3_bucket)
    assert len(gets) == COUNT and len(set(gets)) == COUNT  # each object fetched once
    for node, report in reports.items():
        assert report["node"] == node and report["nodes"] == 3
        assert report["total_objects"] == COUNT
        assert report["fetched"] == report["share_objects"] == report["objects"]
    assert sum(r["share_objects"] for r in reports.values()) == COUNT

    # Each node holds exactly its share: the plan every node computed is the same.
    expected = mlstore.plan([f"{prefix}{i:02d}.bin" for i in range(COUNT)], list(envs))
    for node in envs:
        assert reports[node]["share_objects"] == len(expected[node])

    # A second run on every node: all cached, nothing fetched. The text summary names
    # the share.
    proxy.reset(s3_proxy.endpoint)
    for node, env in envs.items():
        out = ok(
            cli("warm", "--node-shard", node, "--nodes-from", str(nodes_file), prefix, env=env)
        )
        share = len(expected[node])
        assert out.startswith(f"warmed {share} of {COUNT} objects (node {node}, 1 of 3 shares), ")
        assert f"(0 fetched, {share} already cached, 0 failed)" in out
    assert object_gets(s3_proxy.endpoint, s3_bucket) == []


@pytest.mark.s3
def test_warm_reads_the_node_list_from_stdin(
    s3_proxy: ServerProcess, s3_bucket: str, prefix: str, tmp_path: Path
) -> None:
    env = node_env(tmp_path, s3_proxy.endpoint, "solo")
    done = cli(
        "warm",
        "--json",
        "--node-shard",
        "solo",
        "--nodes-from",
        "-",
        prefix,
        env=env,
        stdin="solo\n",
    )
    report = json.loads(ok(done))
    assert report["share_objects"] == report["total_objects"] == report["fetched"] == COUNT


@pytest.mark.s3
def test_nodes_share_a_manifest_the_same_way(
    s3_proxy: ServerProcess,
    s3_options: dict[str, object],
    s3_bucket: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    manifest_path = str(tmp_path / "cluster.jsonl")
    with mlstore.Store(options={"s3": s3_options}, cache={"enabled": False}) as s:
        manifest = mlstore.Manifest.build(prefix, store=s)
        manifest.save(manifest_path)
    expected = mlstore.plan(manifest, ["x", "y"])
    proxy.reset(s3_proxy.endpoint)
    for node in ("x", "y"):
        env = node_env(tmp_path, s3_proxy.endpoint, node)
        argv = ["--json", "--node-shard", node, "--nodes-from", "-", "--manifest", manifest_path]
        report = json.loads(ok(cli("warm", *argv, env=env, stdin="x\ny\n")))
        assert report["fetched"] == report["share_objects"] == len(expected[node])
    gets = object_gets(s3_proxy.endpoint, s3_bucket)
    assert sorted(gets) == sorted(f"/{s3_bucket}/cluster/{i:02d}.bin" for i in range(COUNT))


@pytest.mark.s3
@pytest.mark.parametrize(
    ("argv", "nodes", "says"),
    [
        (["--node-shard", "node-z"], "node-a\nnode-b\n", "node 'node-z' is not in --nodes-from"),
        (["--node-shard", "node-a"], None, "--node-shard NODE and --nodes-from FILE go together"),
        ([], "node-a\n", "--node-shard NODE and --nodes-from FILE go together"),
        (["--node-shard", "node-a"], "node-a\nnode-a\n", "line 2: node 'node-a' is listed twice"),
        (["--node-shard", "node-a"], "node-a\nbad name\n", "line 2: 'bad name' is not a node name"),
        (["--node-shard", "node-a"], "# nobody\n", "names no node"),
        (["--ray", "--node-shard", "node-a"], "node-a\n", "are for one node; with --ray"),
        (["--dask", "tcp://127.0.0.1:1", "--timeout", "0"], None, "--timeout: must be"),
        (["--replicate"], None, "--replicate and --timeout go with --ray or --dask"),
    ],
)
def test_a_bad_shard_is_a_one_line_error(
    s3_proxy: ServerProcess,
    prefix: str,
    tmp_path: Path,
    argv: list[str],
    nodes: str | None,
    says: str,
) -> None:
    env = node_env(tmp_path, s3_proxy.endpoint, "node-a")
    if nodes is not None:
        (tmp_path / "nodes.txt").write_text(nodes)
        argv = [*argv, "--nodes-from", str(tmp_path / "nodes.txt")]
    proxy.reset(s3_proxy.endpoint)
    one_line_error(cli("warm", *argv, prefix, env=env), says)
    assert proxy.request_log(s3_proxy.endpoint) == []  # refused before any listing


@pytest.mark.s3
def test_a_warm_with_a_deadline_returns_by_it_naming_what_it_could_not_warm(
    s3_proxy: ServerProcess, prefix: str, tmp_path: Path
) -> None:
    """The warm under a node's deadline (cooperative warm-ups use it): one object's GET
    stalls at the proxy; the rest are warmed, the stalled one is named, and the call
    returns by the deadline instead of waiting for the stalled read."""
    from mlstore.cli_warm import warm_objects

    urls = [f"{prefix}{i:02d}.bin" for i in range(10)]
    stuck = urls[7]
    proxy.reset(s3_proxy.endpoint)
    proxy.set_faults(
        s3_proxy.endpoint,
        {
            "fault": "stall",
            "before_headers": True,
            "method": "GET",
            "path": re.escape("/" + stuck.split("://", 1)[1]) + "$",
        },
    )
    store = mlstore.Store(
        options={"s3": {"endpoint_url": s3_proxy.endpoint}},
        cache={"disk_dir": str(tmp_path / "cache")},
        retry={"max_attempts": 1, "read_timeout": 30.0},
    )
    with store:
        named: dict[str, str] = {}
        started = time.monotonic()
        done = warm_objects(
            store,
            [(url, None, 0) for url in urls],
            jobs=4,
            on_failure=named.__setitem__,
            deadline=started + 3.0,
        )
        returned = time.monotonic() - started
        proxy.clear_faults(s3_proxy.endpoint)
        assert returned < 30.0, "it waited for the stalled read (30 s without a byte)"
        assert done.fetched == 9 and done.cached == 0
        assert done.failures == [(stuck, "not warmed by the deadline")]
        assert named == {stuck: "not warmed by the deadline"}
        assert all(store.exists(url) for url in urls)  # the store still answers


# ------------------------------------------------------- cluster warm reports (Ray, Dask)


def test_a_cluster_report_names_each_node_and_what_failed() -> None:
    from mlstore._nodewarm import ClusterWarm, NodeWarm

    a = NodeWarm(worker="w1", objects=3)
    a.take({"fetched": 2, "fetched_bytes": 200, "cached": 1, "gets": 2, "failures": []})
    b = NodeWarm(worker="w2", objects=2, error="timed out")
    c = NodeWarm(worker="w3", objects=1)
    c.take(
        {
            "fetched": 0,
            "fetched_bytes": 0,
            "cached": 0,
            "gets": 3,
            "failures": [("s3://b/gone.bin", "not found")],
        }
    )
    report = ClusterWarm({"node-b": b, "node-a": a, "node-c": c})
    assert not report.ok and report.fetched == 2 and sorted(report.failed) == ["node-b", "node-c"]
    lines = report.lines()
    assert lines[0].startswith("node node-a: 3 objects, 2 fetched (200 bytes, 2 GETs)")
    assert lines[1].endswith("; no report: timed out")
    assert lines[-1] == "warmed 3 nodes: 6 objects in all, 2 fetched, 2 node(s) with failures"
    data = json.loads(json.dumps(report.as_dict()))
    assert data["nodes"]["node-c"]["failures"] == [{"url": "s3://b/gone.bin", "error": "not found"}]
    assert data["nodes"]["node-a"]["ok"] and not data["ok"]
    assert "node-b: 0 of 2 fetched (timed out)" in repr(report)
    assert "1 failed (first: not found)" in repr(report)


@pytest.mark.s3
def test_an_unreachable_scheduler_is_a_one_line_error_before_any_listing(
    s3_proxy: ServerProcess, prefix: str, tmp_path: Path
) -> None:
    pytest.importorskip("distributed")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env = node_env(tmp_path, s3_proxy.endpoint, "node-a")
    proxy.reset(s3_proxy.endpoint)
    done = cli("warm", prefix, "--dask", f"tcp://127.0.0.1:{closed}", "--timeout", "2", env=env)
    one_line_error(done, "cannot reach the scheduler")
    assert proxy.request_log(s3_proxy.endpoint) == []
