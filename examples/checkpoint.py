"""Checkpoints: save, change a tenth of the weights, save again, and count bytes uploaded.

What it shows: ``mlstore.torch.save`` stores a state dict as content-addressed chunks
beside the checkpoint, so the second save, after one layer of ten changed, uploads about
a tenth of the bytes. The script prints both saves' figures, loads the second checkpoint
back, and exits non-zero if the second save uploaded half of the first or more.

What it needs: ``pip install "mlstore[s3,torch]"`` and a prefix you can write to (the
script deletes its checkpoints at the end).

Run it against a real bucket::

    python examples/checkpoint.py s3://my-bucket/mlstore-examples/checkpoint

or set ``EXAMPLE_URL`` instead of the argument. ``nox -s examples`` runs it against a
local S3 emulator (moto_server), set through ``MLSTORE_S3_ENDPOINT_URL`` and ``AWS_*``.
"""

from __future__ import annotations

import os
import sys

import torch

import mlstore
import mlstore.torch


def main(root: str) -> None:
    root = root.rstrip("/")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(10)])
    state = {"model": model.state_dict(), "step": 1000}

    first = mlstore.torch.save(state, f"{root}/step-1000")
    print(f"step-1000: uploaded {first.uploaded:,} of {first.bytes:,} bytes")

    with torch.no_grad():
        model[3].weight.add_(0.01)  # one layer of ten changes
        model[3].bias.add_(0.01)
    state["step"] = 2000
    second = mlstore.torch.save(state, f"{root}/step-2000")
    print(
        f"step-2000: uploaded {second.uploaded:,} of {second.bytes:,} bytes "
        f"({second.new_chunks} of {second.chunks} chunks new, "
        f"{second.dedupe_ratio:.0%} deduplicated)"
    )
    assert first.uploaded >= first.bytes * 0.9, "the first save should upload everything"
    assert 0 < second.uploaded < first.uploaded / 2, (
        f"the second save uploaded {second.uploaded} bytes; expected about a tenth "
        f"of the first's {first.uploaded}"
    )

    restored = mlstore.torch.load(f"{root}/step-2000", map_location="cpu")
    assert restored["step"] == 2000
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored["model"][name], tensor), name
    print("loaded step-2000: every tensor matches the model")

    mlstore.rm(root, recursive=True)
    print("checkpoint: OK")


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EXAMPLE_URL")
    sys.exit(main(url) if url else __doc__)  # no URL: print the header, exit 1
