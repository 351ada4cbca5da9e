"""The ranks of ``test_torch_dcp``: two processes (spawned, gloo, a TCP rendezvous on
loopback) saving or loading one DCP checkpoint through :mod:`mlstore.torch.dcp`.

Started by :func:`tests.torch_children.run_program` with
``module="tests.torch_dcp_children"``; the launcher prints the ranks' results as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

try:
    import torch
    import torch.distributed as dist
except ModuleNotFoundError:  # pytest imports this module (for doctests) without torch
    import pytest

    pytest.skip("needs PyTorch", allow_module_level=True)

from mlstore import Store
from mlstore.torch import dcp as mdcp

TENSORS = 10  # per rank
CHANGED = 3  # the tensor of rank 0 that version 2 changes


def _random(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def full_dtensor() -> torch.Tensor:
    """The whole of the sharded tensor (the same on every rank)."""
    return _random(42, 8, 6)


def state(rank: int, version: int) -> dict[str, Any]:
    """What ``rank`` saves in checkpoint ``version`` (DTensor apart): ten tensors of its
    own (version 2 changes one of rank 0's), a replicated tensor, and non-tensor values
    (one per rank, one replicated)."""
    sd: dict[str, Any] = {}
    for i in range(TENSORS):
        changed = version == 2 and rank == 0 and i == CHANGED
        sd[f"rank{rank}.w{i}"] = _random(100 * rank + i + (1000 if changed else 0), 64, 256)
    sd["replicated"] = _random(7, 128)
    sd[f"rank{rank}.note"] = f"rank {rank}"
    sd["step"] = 1000
    return sd


def _empty_like(sd: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in sd.items()}


def _check(rank: int, sd: dict[str, Any], version: int) -> dict[str, Any]:
    """How ``sd``, just loaded (the DTensor sharded by columns), differs from what was
    saved in ``version``."""
    expected = state(rank, version)
    whole = sd.pop("dt").full_tensor()
    return {
        "version": version,
        "dt_equal": bool(torch.equal(whole, full_dtensor())),
        "mismatched": [
            k
            for k, v in expected.items()
            if not (torch.equal(sd[k], v) if isinstance(v, torch.Tensor) else sd[k] == v)
        ],
        "loaded": sorted(sd),
    }


def _rank(rank: int, cfg: dict[str, Any], port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from tests.servers import proxy

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    try:
        mesh = init_device_mesh("cpu", (2,))
        store = Store(
            options={"s3": {"endpoint_url": cfg["endpoint"]}},
            cache={"disk_dir": os.path.join(cfg["cache_root"], f"rank{rank}")},
        )
        result: dict[str, Any] = {"rank": rank, "saved": [], "loaded": []}
        for step in cfg["steps"]:
            mode, version, url = step["mode"], step["version"], step["url"]
            if step.get("reset_proxy"):
                dist.barrier()
                if rank == 0:
                    proxy.reset(cfg["endpoint"])
                dist.barrier()
            if mode == "save":
                sd: dict[str, Any] = state(rank, version)
                sd["dt"] = distribute_tensor(full_dtensor(), mesh, [Shard(0)])
                info = mdcp.save(sd, url, store=store)
                result["saved"].append(dataclasses.asdict(info) if info is not None else None)
            else:
                sd = _empty_like(state(rank, version))
                # Loaded sharded the other way: a resharding load reads slices of shards.
                sd["dt"] = distribute_tensor(torch.zeros(8, 6), mesh, [Shard(1)])
                mdcp.load(sd, url, store=store)
                result["loaded"].append(_check(rank, sd, version))
        gathered: list[Any] = [None, None]
        dist.all_gather_object(gathered, result)
        if rank == 0:
            Path(cfg["out"]).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def ranks_run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Two ranks taking ``cfg["steps"]`` in turn: each saves (``"mode": "save"``) or
    loads checkpoint ``"url"`` (version ``"version"`` of :func:`state`), after
    resetting the proxy's log if ``"reset_proxy"``. The ranks are forked from this
    process, which has imported torch already: fresh processes, without two more
    imports of torch each."""
    from tests.emulators import free_port

    torch.multiprocessing.start_processes(
        _rank, args=(cfg, free_port()), nprocs=2, join=True, start_method="fork"
    )
    return {"ranks": json.loads(Path(cfg["out"]).read_text())}


PROGRAMS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"ranks": ranks_run}


def main() -> None:
    name, cfg = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(PROGRAMS[name](cfg)), flush=True)
