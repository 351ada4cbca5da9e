"""Two epochs of training a small model on samples read from S3 with MapDataset,
PrefetchSampler and two DataLoader workers (issue 13 item 7): the first epoch fetches
each object once for the node, the second fetches nothing, and the model learns."""

from __future__ import annotations

import collections
import random
from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402

from mlstore import Store  # noqa: E402
from mlstore.torch import PrefetchSampler  # noqa: E402
from tests.emulators import ServerProcess  # noqa: E402
from tests.servers import proxy  # noqa: E402
from tests.torch_children import (  # noqa: E402
    FEATURES,
    Recorded,
    decode,
    keep,
    put,
    remove,
    training_sample,
)

pytestmark = [pytest.mark.torch, pytest.mark.s3]
# torch warns when a DataLoader has more workers than the machine has cores (a 1-core
# runner): not a fault of what is tested here.
MORE_WORKERS_THAN_CORES = pytest.mark.filterwarnings(
    "ignore:This DataLoader will create:UserWarning"
)

SAMPLES = 64
SIZE = 3000  # bytes per sample: the features, the target, padding
WEIGHTS = [0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 1.0, -2.0]  # what the model should learn
BIAS = 0.25


@pytest.fixture
def training_set(s3_bucket: str, moto: ServerProcess) -> Iterator[str]:
    """SAMPLES samples of ``y = WEIGHTS . x + BIAS`` below a prefix, written to moto
    directly; yields the prefix."""
    rng = random.Random(1)
    prefix = f"s3://{s3_bucket}/train/"
    blobs = {}
    for i in range(SAMPLES):
        x = [rng.uniform(-1, 1) for _ in range(FEATURES)]
        y = sum(w * v for w, v in zip(WEIGHTS, x, strict=True)) + BIAS
        blobs[f"{prefix}{i:03d}.bin"] = training_sample(x, y, SIZE)
    put(moto.endpoint, blobs)
    yield prefix
    remove(moto.endpoint, prefix)


@MORE_WORKERS_THAN_CORES
def test_the_second_epoch_fetches_nothing_and_the_model_learns(
    training_set: str, s3_proxy: ServerProcess
) -> None:
    """Through the counting proxy with 20 ms added to every request. The workers are
    not persistent, so the second epoch's are new processes with empty memory tiers:
    what they read comes from the node's disk cache, or from the store. Both are
    counted: the proxy's log, the parent's ``store.stats()`` (its warms) and each
    worker's own Store counters, reported with every sample."""
    endpoint = s3_proxy.endpoint
    store = Store(options={"s3": {"endpoint_url": endpoint}})
    dataset = Recorded(training_set, transform=decode, store=store)  # one listing, here
    sampler = PrefetchSampler(
        RandomSampler(dataset, generator=torch.Generator().manual_seed(2)),
        dataset,
        lookahead=16,
        concurrency=8,
    )
    loader = DataLoader(
        dataset,
        batch_size=8,
        sampler=sampler,
        num_workers=2,
        multiprocessing_context="fork",
        collate_fn=keep,
        timeout=60,
    )
    with torch.random.fork_rng():  # the same start every run, the suite's RNG untouched
        torch.manual_seed(0)
        model = torch.nn.Linear(FEATURES, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    epochs = []
    proxy.set_latency(endpoint, 0.02)
    try:
        for _ in range(2):
            proxy.reset(endpoint)
            before = store.stats()
            losses, seen, workers = [], [], collections.Counter[int]()
            for batch in loader:
                x = torch.stack([features for _, (features, _), *_ in batch])
                y = torch.stack([target for _, (_, target), *_ in batch])
                for _step in range(3):
                    optimizer.zero_grad()
                    loss = torch.nn.functional.mse_loss(model(x), y)
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.item())
                for i, _, pid, requests, _ in batch:
                    seen.append(i)
                    workers[pid] = max(workers[pid], requests)
            assert sampler.settle(timeout=60)
            epochs.append(
                {
                    "losses": losses,
                    "seen": sorted(seen),
                    "log": proxy.request_log(endpoint),
                    "parent": (store.stats() - before)["requests"],
                    "workers": workers,
                }
            )
    finally:
        proxy.set_latency(endpoint, 0)
        store.close()

    first, second = epochs
    assert first["seen"] == second["seen"] == list(range(SAMPLES))
    fetched = collections.Counter(r["path"] for r in first["log"] if r["method"] == "GET")
    assert len(fetched) == SAMPLES and set(fetched.values()) == {1}, "one GET per object"
    assert len(first["workers"]) == len(second["workers"]) == 2
    assert not set(first["workers"]) & set(second["workers"]), "new workers in epoch 2"
    # Epoch 2: nothing reached the store, by the proxy's count and by every Store's.
    assert second["log"] == [], second["log"][:5]
    assert second["parent"] == 0
    assert set(second["workers"].values()) == {0}, second["workers"]
    # And the model learned: the loss fell, by a lot.
    assert all(torch.isfinite(torch.tensor(e["losses"])).all() for e in epochs)
    mean = [sum(e["losses"]) / len(e["losses"]) for e in epochs]
    assert mean[1] < mean[0] / 4 and second["losses"][-1] < first["losses"][0] / 10, mean
