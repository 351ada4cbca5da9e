"""A node cache shared by tenants of different uids (issue 17, figure S8).

Pods of different users on one Kubernetes node mount one hostPath as the node cache.
Here each "pod" is a process started as another uid (the suite runs as root to do so)
on one cache root, reading S3 through the counting proxy in front of moto, so every
GET a tenant sends is counted where it arrives.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import mlstore
from mlstore.cache.tenancy import Ledger, fair_shares, prepare_tenants_dir, prune_tenants
from mlstore.config import CacheConfig
from mlstore.errors import ConfigError
from tests.emulators import ServerProcess
from tests.servers import proxy

SIZE = 64 * 1024  # bytes of each object
BUDGET = 8 * SIZE  # the node's disk budget, for all tenants together
OBJECTS = 6  # each tenant's working set: 3/4 of the budget
UIDS = (1001, 1002)
NO_PORT = ["--port", "0", "--addr", "127.0.0.1"]  # any free port, for the exporter
REPO = str(Path(__file__).resolve().parent.parent)

# A tenant: read every URL through its own Store, optionally try to open a file of
# another tenant's (asserting the OS refuses), and report.
TENANT = """
    import json, os, sys
    import mlstore

    urls, foreign = json.loads(sys.argv[1]), sys.argv[2:]
    with mlstore.Store() as store:
        sizes = [len(store.read_bytes(url)) for url in urls]
        root = store.config.cache.resolved_disk_dir
    for path in foreign:
        try:
            open(path, "rb").close()
        except PermissionError:
            pass
        else:
            raise AssertionError(f"uid {os.getuid()} opened another tenant's {path}")
    print(json.dumps({"uid": os.getuid(), "root": root, "sizes": sizes}))
"""


def object_gets(endpoint: str) -> int:
    """GETs of objects (a listing is a GET with a query string, and not counted)."""
    return sum(1 for r in proxy.request_log(endpoint) if r["method"] == "GET" and not r["query"])


@pytest.fixture(scope="module")
def child_python() -> tuple[str, str]:
    """An interpreter other uids may run, and the PYTHONPATH that gives it mlstore and
    the test environment's packages (a virtualenv in root's home is out of their reach)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("starting processes of other uids needs root")
    path = os.pathsep.join([REPO, sysconfig.get_paths()["purelib"]])
    version = "python{}.{}".format(*sys.version_info[:2])
    for python in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        try:
            probe = subprocess.run(
                [python, "-c", "import mlstore, s3fs"],
                user=UIDS[0],
                group=UIDS[0],
                extra_groups=[],
                env={"PYTHONPATH": path},
                capture_output=True,
                check=False,
            )
        except OSError:  # not this uid's to run
            continue
        if probe.returncode == 0:
            return python, path
    why = f"no {version} here that uid {UIDS[0]} may run with the test packages"
    if os.environ.get("MLSTORE_REQUIRE_EMULATORS") == "1":  # CI: figure S8 must run
        pytest.fail(f"MLSTORE_REQUIRE_EMULATORS=1 but {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture
def node_root() -> Iterator[str]:
    """A node cache root as a hostPath is (root's, 0755, in a place the other uids can
    enter: pytest's own tmp dirs are root's only), with its ``tenants/`` made by root as
    the node's DaemonSet makes it when it starts."""
    root = tempfile.mkdtemp(prefix="mlstore-tenancy-")
    os.chmod(root, 0o755)
    prepare_tenants_dir(os.path.join(root, "cache", "tenants"))
    yield os.path.join(root, "cache")
    shutil.rmtree(root)


@pytest.fixture
def dataset(s3_options: dict[str, object], s3_bucket: str) -> list[str]:
    urls = [f"s3://{s3_bucket}/train/{i:02d}.bin" for i in range(OBJECTS)]
    with mlstore.Store(options={"s3": s3_options}, cache={"enabled": False}) as s:
        for url in urls:
            s.write_bytes(url, os.urandom(SIZE))
    return urls


@pytest.fixture
def env(child_python: tuple[str, str], node_root: str, s3_proxy: ServerProcess) -> dict[str, str]:
    """The environment of every tenant (and of root's prune) on the node."""
    return tenant_env(child_python[1], node_root, s3_proxy)


def tenant_env(python_path: str, node_root: str, s3_proxy: ServerProcess) -> dict[str, str]:
    return {
        "PYTHONPATH": python_path,
        "MLSTORE_CACHE_DIR": node_root,
        "MLSTORE_CACHE_TENANCY": "uid",
        "MLSTORE_DISK_BYTES": str(BUDGET),
        "MLSTORE_MEMORY_BYTES": "0",
        "MLSTORE_VALIDATE": "never",
        "MLSTORE_S3_ENDPOINT_URL": s3_proxy.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def start_tenant(
    python: tuple[str, str], uid: int | None, env: dict[str, str], urls: list[str], *foreign: str
) -> subprocess.Popen[str]:
    """A tenant process, as ``uid`` (``None``: as this process's uid)."""
    return subprocess.Popen(
        [python[0], "-c", textwrap.dedent(TENANT), json.dumps(urls), *foreign],
        user=uid,
        group=uid,
        extra_groups=None if uid is None else [],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(child: subprocess.Popen[str]) -> dict[str, object]:
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err[-3000:]
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def run_tenant(
    python: tuple[str, str], uid: int | None, env: dict[str, str], urls: list[str], *foreign: str
) -> dict[str, object]:
    return finish(start_tenant(python, uid, env, urls, *foreign))


def blob_files(tenant_dir: str) -> list[Path]:
    return [p for p in Path(tenant_dir, "blobs").glob("*/*") if p.is_file()]


def bytes_on_disk(root: str) -> int:
    """Bytes of blob files of every tenant under the node cache ``root``."""
    tenants = Path(root, "tenants")
    dirs = [d for d in tenants.iterdir() if d.is_dir()]
    return sum(p.stat().st_size for d in dirs for p in blob_files(str(d)))


@pytest.mark.s3
@pytest.mark.slow
def test_two_uids_share_one_node_cache_apart_within_one_budget(
    child_python: tuple[str, str], env: dict[str, str], dataset: list[str], s3_proxy: ServerProcess
) -> None:
    node_root = env["MLSTORE_CACHE_DIR"]
    first, second = UIDS
    tenants = os.path.join(node_root, "tenants")

    proxy.reset(s3_proxy.endpoint)
    one = run_tenant(child_python, first, env, dataset)
    assert one["sizes"] == [SIZE] * OBJECTS
    assert one["root"] == os.path.join(tenants, f"uid-{first}")
    assert object_gets(s3_proxy.endpoint) == OBJECTS

    # The second tenant reads the same objects: never served the first's entries, it
    # makes its own GETs; and the OS refuses it the first's blob files.
    theirs = [str(p) for p in blob_files(os.path.join(tenants, f"uid-{first}"))]
    assert len(theirs) == OBJECTS
    proxy.reset(s3_proxy.endpoint)
    two = run_tenant(child_python, second, env, dataset, *theirs[:2])
    assert two["sizes"] == [SIZE] * OBJECTS
    assert object_gets(s3_proxy.endpoint) == OBJECTS

    assert stat.S_IMODE(os.stat(tenants).st_mode) == 0o1777
    for uid in UIDS:
        st = os.stat(os.path.join(tenants, f"uid-{uid}"))
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, 0o700)

    # One budget for the node: the second tenant kept only what the first left room for.
    assert bytes_on_disk(node_root) <= BUDGET
    usage = Ledger(tenants, "").usage()
    assert usage == {f"uid-{first}": OBJECTS * SIZE, f"uid-{second}": BUDGET - OBJECTS * SIZE}

    # A restarted first tenant (a fresh process) finds its entries: no GET.
    proxy.reset(s3_proxy.endpoint)
    again = run_tenant(child_python, first, env, dataset)
    assert again["sizes"] == [SIZE] * OBJECTS
    assert object_gets(s3_proxy.endpoint) == 0

    # Root (the node's DaemonSet) prunes every tenant to a fair share of a smaller
    # limit, each as its own uid: the files stay their owners'.
    pruned = subprocess.run(
        [child_python[0], "-m", "mlstore", "cache", "prune", "--to", str(4 * SIZE), "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert pruned.returncode == 0, pruned.stderr[-3000:]
    report = json.loads(pruned.stdout)
    assert [(r["tenant"], r["after"]) for r in report["tenants"]] == [(f"uid-{first}", 2 * SIZE)]
    assert bytes_on_disk(node_root) == 4 * SIZE
    for path in Path(tenants, f"uid-{first}").rglob("*"):
        assert path.lstat().st_uid == first, path

    # The DaemonSet's loop does the same on its schedule: a budget of 2 objects now.
    with subprocess.Popen(
        [child_python[0], "-m", "mlstore", "cache", "serve", "--prune-every", "0.1", *NO_PORT],
        env={**env, "MLSTORE_DISK_BYTES": str(2 * SIZE)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as serve:
        try:
            assert serve.stdout is not None
            assert "; pruning every tenant to 128.0 KiB every 0.1 s" in serve.stdout.readline()
            lines = {serve.stdout.readline().strip() for _ in UIDS}
            assert lines == {f"pruned 64.0 KiB of uid-{uid}" for uid in UIDS}
            serve.send_signal(signal.SIGTERM)
            assert serve.wait(timeout=60) == 0
        finally:
            if serve.poll() is None:
                serve.kill()
    assert bytes_on_disk(node_root) == 2 * SIZE


@pytest.mark.s3
@pytest.mark.slow
def test_two_uids_filling_at_once_hold_the_one_budget(
    child_python: tuple[str, str], env: dict[str, str], dataset: list[str]
) -> None:
    node_root = env["MLSTORE_CACHE_DIR"]
    children = [start_tenant(child_python, uid, env, dataset) for uid in UIDS]
    for child in children:
        assert finish(child)["sizes"] == [SIZE] * OBJECTS
    # Each alone would keep 6 objects (12 in all); together they keep at most 8.
    held = bytes_on_disk(node_root)
    assert SIZE <= held <= BUDGET
    assert sum(Ledger(os.path.join(node_root, "tenants"), "").usage().values()) == held


# ------------------------------------------------------------------ no other uid needed


@pytest.mark.s3
@pytest.mark.slow
def test_namespace_tenants_keep_their_own_entries_within_one_budget(
    node_root: str, dataset: list[str], s3_proxy: ServerProcess
) -> None:
    python = (sys.executable, REPO)
    base = {**tenant_env(REPO, node_root, s3_proxy), "MLSTORE_CACHE_TENANCY": "namespace"}
    for name in ("team-a", "team-b"):
        proxy.reset(s3_proxy.endpoint)
        done = run_tenant(python, None, {**base, "POD_NAMESPACE": name}, dataset)
        assert done["root"] == os.path.join(node_root, "tenants", f"ns-{name}")
        assert object_gets(s3_proxy.endpoint) == OBJECTS  # never served team-a's entries
        st = os.stat(str(done["root"]))
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.getuid(), 0o700)
    assert bytes_on_disk(node_root) == BUDGET  # team-b kept what team-a left room for
    proxy.reset(s3_proxy.endpoint)
    run_tenant(python, None, {**base, "MLSTORE_TENANT": "team-a"}, dataset)
    assert object_gets(s3_proxy.endpoint) == 0  # team-a again: all its own entries


@pytest.mark.s3
@pytest.mark.slow
def test_disk_cap_all_counts_every_tenants_index_and_metadata_in_the_node_budget(
    node_root: str, dataset: list[str], s3_proxy: ServerProcess
) -> None:
    """Under ``disk_cap="all"`` each tenant counts its index, metadata and stats files
    in what it records, and root's prune cuts the node's files, all of them, to the
    budget. (A tenant's files exist even when it may cache nothing, so the node is cut
    back by the next prune, not by that tenant: it cannot touch the others'.)"""
    python = (sys.executable, REPO)
    base = {
        **tenant_env(REPO, node_root, s3_proxy),
        "MLSTORE_CACHE_TENANCY": "namespace",
        "MLSTORE_DISK_CAP": "all",
    }
    for name in ("team-a", "team-b"):
        done = run_tenant(python, None, {**base, "POD_NAMESPACE": name}, dataset)
        assert done["sizes"] == [SIZE] * OBJECTS
    tenants = os.path.join(node_root, "tenants")
    blobs = bytes_on_disk(node_root)
    assert sum(Ledger(tenants, "").usage().values()) > blobs > 0  # the files are counted

    prune_tenants(tenants, BUDGET, caps_all=True)
    every_file = sum(p.stat().st_size for p in Path(tenants).glob("ns-*/**/*") if p.is_file())
    assert bytes_on_disk(node_root) < every_file <= BUDGET


def test_default_is_one_private_tree_as_before(tmp_path: Path) -> None:
    config = CacheConfig(disk_dir=str(tmp_path))
    assert config.tenancy == "none"
    assert config.resolved_disk_dir == config.node_cache_dir == str(tmp_path)


def test_uid_tenancy_puts_the_tier_in_the_uids_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLSTORE_CACHE_TENANCY", "uid")
    config = CacheConfig(disk_dir=str(tmp_path))
    assert config.resolved_disk_dir == str(tmp_path / "tenants" / f"uid-{os.getuid()}")
    assert config.node_cache_dir == str(tmp_path)


def test_namespace_tenancy_is_keyed_by_mlstore_tenant_then_pod_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "team-a")
    config = CacheConfig(disk_dir=str(tmp_path), tenancy="namespace")
    assert config.resolved_disk_dir == str(tmp_path / "tenants" / "ns-team-a")
    monkeypatch.setenv("MLSTORE_TENANT", "team-b")
    assert config.resolved_disk_dir == str(tmp_path / "tenants" / "ns-team-b")


def test_namespace_tenancy_without_a_name_names_the_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    with pytest.raises(ConfigError, match="MLSTORE_TENANT nor POD_NAMESPACE"):
        CacheConfig(disk_dir=str(tmp_path), tenancy="namespace")
    monkeypatch.setenv("POD_NAMESPACE", "../etc")
    with pytest.raises(ConfigError, match=re.escape("POD_NAMESPACE='../etc' is not a tenant name")):
        CacheConfig(disk_dir=str(tmp_path), tenancy="namespace")


def test_tenants_dir_is_made_like_tmp(
    tmp_path: Path,
) -> None:
    tenants = str(tmp_path / "node" / "tenants")
    prepare_tenants_dir(tenants)
    assert stat.S_IMODE(os.stat(tenants).st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(tmp_path / "node").st_mode) == 0o755
    os.chmod(tenants, 0o755)  # ours, made by a plain mkdir: made like /tmp again
    prepare_tenants_dir(tenants)
    assert stat.S_IMODE(os.stat(tenants).st_mode) == 0o1777


def test_a_tenants_dir_others_may_write_to_without_the_sticky_bit_is_refused(
    tmp_path: Path,
) -> None:
    tenants = str(tmp_path / "node" / "tenants")
    prepare_tenants_dir(tenants)
    if os.geteuid() != 0:
        pytest.skip("giving the directory to another uid needs root")
    os.chown(tenants, UIDS[0], UIDS[0])  # not ours: not ours to fix either
    os.chmod(tenants, 0o777)
    with pytest.raises(ConfigError, match="without the sticky bit"):
        prepare_tenants_dir(tenants)


def test_a_tenants_cap_is_the_budget_less_the_others_with_a_floor(tmp_path: Path) -> None:
    tenants = str(tmp_path / "tenants")
    prepare_tenants_dir(tenants)
    for name, held in (("uid-1", 0), ("uid-2", 600), ("ns-x", 300)):
        os.mkdir(os.path.join(tenants, name), 0o700)
        Ledger(tenants, name).publish(held)
    assert Ledger(tenants, "uid-1").cap(1000) == 100
    Ledger(tenants, "ns-x").publish(900)
    assert Ledger(tenants, "uid-1").cap(1000) == 1000 // (8 * 3)  # the floor
    os.rmdir(os.path.join(tenants, "ns-x"))  # a tenant whose directory is gone
    assert Ledger(tenants, "uid-1").usage() == {"uid-1": 0, "uid-2": 600}


def test_fair_shares_leave_what_a_small_tenant_does_not_use_to_the_others() -> None:
    assert fair_shares({"a": 10, "b": 70, "c": 40}, 90) == {"a": 10, "b": 40, "c": 40}
    assert fair_shares({"a": 50, "b": 50}, 60) == {"a": 30, "b": 30}
    assert fair_shares({"a": 5, "b": 5}, 60) == {"a": 5, "b": 5}


def test_a_ledger_that_cannot_be_written_is_logged_once_and_reads_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tenants = str(tmp_path / "tenants")
    prepare_tenants_dir(tenants)
    os.mkdir(os.path.join(tenants, "uid-1"), 0o700)
    os.mkdir(os.path.join(tenants, "uid-1.usage"))  # in the way of the file
    ledger = Ledger(tenants, "uid-1")
    with caplog.at_level("WARNING", logger="mlstore.cache"):
        ledger.publish(5)
        ledger.publish(6)
    assert [r.getMessage()[:40] for r in caplog.records] == [
        "cannot record the cache usage of tenant "
    ]
    assert ledger.usage() == {"uid-1": 0}
    assert not [n for n in os.listdir(tenants) if n.endswith(".tmp")]
