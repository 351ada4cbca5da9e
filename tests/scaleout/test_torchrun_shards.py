"""Figure S3: two ``torchrun`` launches on localhost (gloo, 2 nodes x 2 ranks), each
"node" with its own ``MLSTORE_NODE_ID`` and disk cache, read tar shards from moto
through the counting proxy, two epochs, DataLoader workers included.

With :class:`~mlstore.torch.ShardSampler` every sample comes once per epoch over the
four ranks, and the cluster sends one GET per shard in the first epoch and none in the
second. A strided ``DistributedSampler`` over the same map-style dataset is run beside
it: each node then fetches nearly every shard (the GETs are reported, and asserted
equal to the shards each node's ranks touched).

Each rank runs this module (``torchrun -m``); its ``__main__`` part is the rank.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from mlstore import Manifest, Store  # noqa: E402
from mlstore.torch import ShardMapDataset, ShardSampler, index_shards, save_index  # noqa: E402
from tests.emulators import ServerProcess  # noqa: E402
from tests.servers import proxy  # noqa: E402
from tests.test_torch_shards import tar_bytes  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.torch]

ROOT = Path(__file__).resolve().parents[2]
NODES = 2
PER_NODE = 2
WORLD = NODES * PER_NODE
EPOCHS = 2
SEED = 17
#: Unequal shards that ShardSampler deals into four ranks of 24 samples each, and 96
#: samples in all, which a DistributedSampler of 4 splits with no padding.
SIZES = [14, 10, 12, 12, 9, 15, 11, 13]


def shard_members(shard: int, count: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(count):
        key = f"s{shard:02d}/{i:03d}"
        out += [(f"{key}.bin", os.urandom(2000 + 37 * i)), (f"{key}.cls", b"%d" % (i % 3))]
    return out


@pytest.fixture
def shards(s3_bucket: str, moto: ServerProcess, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The shards, written to moto directly, and their index (pinned to the versions
    of a manifest), saved once to a local file every rank loads."""
    prefix = f"s3://{s3_bucket}/shards/"
    with Store(options={"s3": {"endpoint_url": moto.endpoint}}, cache={"enabled": False}) as s:
        for shard, count in enumerate(SIZES):
            s.write_bytes(f"{prefix}{shard:04d}.tar", tar_bytes(shard_members(shard, count)))
        index = index_shards(Manifest.build(prefix, store=s), store=s)
    path = tmp_path / "index.json"
    save_index(index, str(path))
    yield {"prefix": prefix, "index": str(path), "bucket": s3_bucket}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(kind: str, shards: dict[str, Any], endpoint: str, tmp: Path) -> dict[str, Any]:
    """Run the ``kind`` sampler on the simulated cluster: each rank's record and the
    object GETs of the shards in each epoch."""
    out = tmp / kind
    out.mkdir()
    cfg = {"kind": kind, "index": shards["index"], "out": str(out), "proxy": endpoint}
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLSTORE_")}
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    proxy.reset(endpoint)
    nodes = []
    try:
        for node in range(NODES):
            env = {
                **base,
                "PYTHONPATH": os.pathsep.join(path),
                "MLSTORE_NODE_ID": f"node-{node}",
                "MLSTORE_CACHE_DIR": str(tmp / f"{kind}-cache-{node}"),
                "MLSTORE_S3_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
                "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
                "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                "GLOO_SOCKET_IFNAME": "lo",
                "OMP_NUM_THREADS": "1",
            }
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nnodes={NODES}",
                f"--nproc-per-node={PER_NODE}",
                f"--node-rank={node}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "-m",
                "tests.scaleout.test_torchrun_shards",
                json.dumps(cfg),
            ]
            # A log file, never a pipe: a full pipe nobody reads yet would block that
            # node, and the collective of every other node with it.
            with (tmp / f"{kind}-node-{node}.log").open("w") as sink:
                nodes.append(
                    subprocess.Popen(
                        command,
                        env=env,
                        stdout=sink,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        for node, child in enumerate(nodes):
            try:
                child.wait(timeout=300)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"torchrun node {node} ({kind}) hung") from None
            output = (tmp / f"{kind}-node-{node}.log").read_text()
            assert child.returncode == 0, f"node {node} ({kind}):\n{output[-4000:]}"
    finally:
        for child in nodes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(WORLD)]
    log = proxy.request_log(endpoint)
    marks = [0, *ranks[0]["log_marks"]]
    shard_path = "/" + shards["prefix"].removeprefix("s3://")
    gets = [
        sum(
            1
            for r in log[lo:hi]
            if r["method"] == "GET" and not r["query"] and r["path"].startswith(shard_path)
        )
        for lo, hi in itertools.pairwise(marks)
    ]
    return {"ranks": ranks, "gets": gets}


def shard_of(key: str) -> int:
    return int(key.split("/", 1)[0][1:])


def touched(ranks: list[dict[str, Any]], epoch: int) -> dict[str, set[int]]:
    """The shards each node's ranks read in ``epoch``."""
    out: dict[str, set[int]] = collections.defaultdict(set)
    for r in ranks:
        out[r["node"]] |= {shard_of(k) for k in r["epochs"][epoch]}
    return out


def check_orders(ranks: list[dict[str, Any]], make: Callable[[int], Any]) -> None:
    """Every sample once per epoch over the ranks, and each rank's samples in the
    order of the sampler ``make(rank)`` builds for that epoch."""
    everything = collections.Counter(
        f"s{s:02d}/{i:03d}" for s, n in enumerate(SIZES) for i in range(n)
    )
    for epoch in range(EPOCHS):
        seen = collections.Counter(k for r in ranks for k in r["epochs"][epoch])
        assert seen == everything, f"epoch {epoch}: not every sample exactly once"
        for r in ranks:
            expected = make(r["rank"])
            expected.set_epoch(epoch)
            order = [f"s{s:02d}/{i:03d}" for s, i in map(_locate, list(expected))]
            assert r["epochs"][epoch] == order, f"rank {r['rank']} epoch {epoch}"


def test_shard_sampler_ranks_fetch_each_shard_once_on_the_cluster(
    shards: dict[str, Any], s3_proxy: ServerProcess, tmp_path: Path
) -> None:
    run = launch("shard", shards, s3_proxy.endpoint, tmp_path)
    check_orders(run["ranks"], lambda rank: ShardSampler(SIZES, rank, WORLD, seed=SEED))
    per_node = touched(run["ranks"], 0)
    assert sum(len(s) for s in per_node.values()) == len(SIZES), "a shard read on two nodes"
    print(
        f"\nS3 ShardSampler, {NODES} nodes x {PER_NODE} ranks, {len(SIZES)} shards, "
        f"{sum(SIZES)} samples: object GETs per epoch {run['gets']}"
    )
    assert run["gets"] == [len(SIZES), 0]


def test_strided_distributed_sampler_fetches_shards_on_every_node(
    shards: dict[str, Any], s3_proxy: ServerProcess, tmp_path: Path
) -> None:
    from torch.utils.data import DistributedSampler

    run = launch("strided", shards, s3_proxy.endpoint, tmp_path)
    check_orders(
        run["ranks"],
        lambda rank: DistributedSampler(range(sum(SIZES)), WORLD, rank, shuffle=True, seed=SEED),
    )
    first, second = touched(run["ranks"], 0), touched(run["ranks"], 1)
    expected = [
        sum(len(s) for s in first.values()),
        sum(len(second[n] - first[n]) for n in second),
    ]
    print(
        f"\nS3 strided DistributedSampler, {NODES} nodes x {PER_NODE} ranks, "
        f"{len(SIZES)} shards: object GETs per epoch {run['gets']} "
        f"(shards x nodes = {len(SIZES) * NODES})"
    )
    assert run["gets"] == expected
    assert run["gets"][0] > len(SIZES), "nodes fetched shards another node also fetched"


_OFFSETS = list(itertools.accumulate(SIZES, initial=0))


def _locate(i: int) -> tuple[int, int]:
    shard = bisect.bisect_right(_OFFSETS, i) - 1
    return shard, i - _OFFSETS[shard]


# ---------------------------------------------------------------- the rank


def keys(batch: list[dict[str, Any]]) -> list[str]:
    return [sample["__key__"] for sample in batch]


def rank_main(cfg: dict[str, Any]) -> None:
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dataset = ShardMapDataset(cfg["index"])
    sampler: Any
    if cfg["kind"] == "shard":
        sampler = ShardSampler(dataset, seed=SEED)  # rank and world from torch.distributed
    else:
        sampler = DistributedSampler(dataset, shuffle=True, seed=SEED)
    loader = DataLoader(dataset, batch_size=5, sampler=sampler, num_workers=2, collate_fn=keys)
    epochs, marks = [], []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        epochs.append([k for batch in loader for k in batch])
        dist.barrier()  # every rank's epoch is read
        if rank == 0:
            marks.append(len(proxy.request_log(cfg["proxy"])))
        dist.barrier()  # counted before anyone reads on
    record = {"rank": rank, "node": os.environ["MLSTORE_NODE_ID"], "epochs": epochs}
    record["log_marks"] = marks
    Path(cfg["out"], f"rank-{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(json.loads(sys.argv[1]))
