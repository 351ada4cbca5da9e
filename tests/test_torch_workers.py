"""MapDataset and PrefetchSampler in DataLoader workers of every start method, and
through a fault proxy: every sample arrives, right, with no hang (issue 13 items 5, 6).

The start-method runs happen in a child process (``tests.torch_children``): ``spawn``
and ``forkserver`` workers unpickle the dataset, so its class must be importable in a
fresh interpreter, and the child is the parent that makes the Store and the dataset, as
a training script would. DataLoader ``timeout=`` and the child's own timeout turn a
hang into a failure.
"""

from __future__ import annotations

import collections
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402

from mlstore import Store  # noqa: E402
from mlstore.hashing import content_hash  # noqa: E402
from mlstore.torch import PrefetchSampler  # noqa: E402
from tests.emulators import ServerProcess  # noqa: E402
from tests.servers import proxy  # noqa: E402
from tests.torch_children import Recorded, keep, put, remove, run_program  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.s3]
# torch warns when a DataLoader has more workers than the machine has cores (a 1-core
# runner): not a fault of what is tested here.
MORE_WORKERS_THAN_CORES = pytest.mark.filterwarnings(
    "ignore:This DataLoader will create:UserWarning"
)

SAMPLES = 32  # below data/, read by the start-method runs
BUSY = 6  # below busy/, read by the parent's threads meanwhile
FAULTED = 64  # below faults/, read through the fault proxy


@pytest.fixture(scope="module")
def bucket(moto: ServerProcess) -> Iterator[tuple[str, dict[str, str]]]:
    """A bucket for this module's tests, its objects written to moto directly; yields
    its name and every key's content hash."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    keys = [
        *(f"data/{i:03d}.bin" for i in range(SAMPLES)),
        *(f"busy/{i}.bin" for i in range(BUSY)),
        *(f"faults/{i:03d}.bin" for i in range(FAULTED)),
    ]
    blobs = {f"s3://{name}/{key}": os.urandom(2048 + 97 * n) for n, key in enumerate(keys)}
    with Store(options={"s3": {"endpoint_url": moto.endpoint}}) as s:
        s.mkdir(f"s3://{name}")
    put(moto.endpoint, blobs)
    yield name, {url.split("/", 3)[3]: content_hash(data) for url, data in blobs.items()}
    remove(moto.endpoint, f"s3://{name}")


def check_epoch(records: list[Any], hashes: dict[str, str], prefix: str, count: int) -> None:
    """Every sample exactly once, each with its object's content."""
    assert sorted(r[0] for r in records) == list(range(count))
    wrong = [r[0] for r in records if r[1] != hashes[f"{prefix}/{r[0]:03d}.bin"]]
    assert not wrong, f"corrupt samples: {wrong}"


# ------------------------------------------------------------------ every start method

METHODS = [("fork", 4), ("forkserver", 3), ("spawn", 2)]  # and how many workers


@pytest.fixture(scope="module")
def start_methods(
    bucket: tuple[str, dict[str, str]],
    s3_faults: ServerProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """The runs of every start method, made by one child process (one Python and one
    torch start-up for the three: the suite stays fast), one method after the other.

    Through a proxy, which keeps connections alive as a real store does (the workers
    inherit or unpickle a Store with live connections), injecting no fault: it only
    holds each request for a busy object 0.5 s, so those threads spend their time inside
    a read (and little CPU)."""
    name, hashes = bucket
    endpoint = s3_faults.endpoint
    proxy.set_faults(endpoint, {"fault": "latency", "path": f"^/{name}/busy/", "seconds": 0.5})
    try:
        return run_program(
            "loader",
            {
                "methods": METHODS,
                "endpoint": endpoint,
                "prefix": f"s3://{name}/data/",
                "busy_prefix": f"s3://{name}/busy/",
                "busy": {f"s3://{name}/{k}": h for k, h in hashes.items() if "busy/" in k},
            },
            cache_dir=str(tmp_path_factory.mktemp("start-methods-cache")),
        )
    finally:
        proxy.clear_faults(endpoint)


@pytest.mark.parametrize(("method", "workers"), METHODS)
def test_workers_of_every_start_method_read_every_sample_right(
    method: str,
    workers: int,
    bucket: tuple[str, dict[str, str]],
    start_methods: dict[str, Any],
) -> None:
    """A Store and a MapDataset made in the parent serve workers started with
    ``method``: persistent workers with PrefetchSampler for two epochs, then
    non-persistent ones, while three parent threads read other objects through the same
    Store (with ``fork``, each worker is forked while all three are inside a read)."""
    _, hashes = bucket
    out = start_methods["methods"][method]
    assert "error" not in out, out.get("error")
    persistent, fresh = out["runs"]
    assert len(persistent["epochs"]) == 2 and len(fresh["epochs"]) == 1
    pools = []
    for run in (persistent, fresh):
        for epoch in run["epochs"]:
            check_epoch(epoch, hashes, "data", SAMPLES)
            pools.append({pid for _, _, pid in epoch})
    assert start_methods["parent"] not in set().union(*pools), "read in the workers"
    assert [len(p) for p in pools] == [workers] * 3, "every worker took batches"
    assert pools[0] == pools[1], "persistent workers served both epochs"
    assert not pools[2] & pools[0], "non-persistent workers are new processes"
    prefetch = persistent["prefetch"]  # warms that fetched, or found the sample held
    assert prefetch.get("failed", 0) == 0, prefetch
    assert prefetch.get("warmed", 0) + prefetch.get("held", 0) > 0, prefetch

    threads = out["busy"]
    assert threads["alive"] == 0 and not threads["errors"], threads
    assert threads["reads"] > 0
    if method == "fork":  # each worker forked with all three threads inside a read
        assert threads["forks"] == [3] * (2 * workers), threads["forks"]
    else:  # no fork of this process: workers start from a new interpreter
        assert threads["forks"] == [], threads["forks"]
    for sign in ("Traceback", "Exception ignored", "different loop"):
        assert sign not in start_methods["stderr"], start_methods["stderr"][-3000:]


# ------------------------------------------------------------------ faults

# About 5% of data GETs faulted (three rules at 1.7% each), of three kinds. The seeds
# make each rule fire within its first 20 matching requests, so every kind is injected
# in a run of FAULTED samples whatever order the requests arrive in. A reset or a
# truncation is resumed with a ranged GET for the rest of the body: the first of those
# comes back with a byte flipped, so the object put together from the two parts must
# be checked as a whole download would be.
FAULT_RULES = [
    {"fault": "flip", "range": True, "times": 1},
    {"fault": "reset", "probability": 0.017, "seed": 3},
    {"fault": "status", "status": 503, "probability": 0.017, "seed": 6},
    {"fault": "truncate", "probability": 0.017, "seed": 12},
]


@MORE_WORKERS_THAN_CORES
@pytest.mark.faults
def test_workers_and_prefetch_ride_out_resets_503s_truncations_and_flips(
    bucket: tuple[str, dict[str, str]], s3_fault_proxy: ServerProcess
) -> None:
    """Two forked workers and PrefetchSampler read FAULTED samples through a proxy that
    resets, refuses (503) or truncates about 5% of data GETs, and damages a resumed
    body: 0 failed, 0 corrupt, and every faulted object was fetched again."""
    name, hashes = bucket
    endpoint = s3_fault_proxy.endpoint
    store = Store(options={"s3": {"endpoint_url": endpoint}})
    dataset = Recorded(f"s3://{name}/faults/", transform=content_hash, store=store)
    data_path = f"^/{name}/faults/"
    proxy.set_faults(
        endpoint, *({**rule, "method": "GET", "path": data_path} for rule in FAULT_RULES)
    )
    proxy.reset(endpoint)
    sampler = PrefetchSampler(
        RandomSampler(dataset, generator=torch.Generator().manual_seed(5)),
        dataset,
        lookahead=8,
        concurrency=4,
    )
    loader = DataLoader(
        dataset,
        batch_size=4,
        sampler=sampler,
        num_workers=2,
        multiprocessing_context="fork",
        collate_fn=keep,
        timeout=60,
    )
    before = store.stats()
    records = [r for batch in loader for r in batch]
    assert sampler.settle(timeout=60)
    parent = store.stats() - before
    log = proxy.request_log(endpoint)
    faults = proxy.counts(endpoint)["faults"]
    proxy.clear_faults(endpoint)
    store.close()

    check_epoch(records, hashes, "faults", FAULTED)  # 0 failed (the loop ended), 0 corrupt
    assert all(faults.get(kind, 0) > 0 for kind in ("reset", "status", "truncate")), faults
    assert faults.get("flip") == 1, faults
    data = [r for r in log if r["method"] == "GET" and r["path"].startswith(f"/{name}/faults/")]
    faulted = [n for n, r in enumerate(data) if r["fault"]]
    assert 0.02 * len(data) <= len(faulted) <= 0.10 * len(data), (len(faulted), len(data))
    for n in faulted:  # fetched again, and answered whole, after the fault
        again = [r for r in data[n + 1 :] if r["path"] == data[n]["path"] and not r["fault"]]
        assert again and again[-1]["status"] in (200, 206), data[n]["path"]
    workers: dict[int, int] = collections.defaultdict(int)
    for _, _, pid, _, retries in records:
        workers[pid] = max(workers[pid], retries)
    retried = parent["retries"] + sum(workers.values())
    assert retried >= sum(faults.values()), (parent.as_dict(), dict(workers), faults)
    assert sampler.counts["failed"] == 0, sampler.counts  # (a Counter: 0 when absent)
