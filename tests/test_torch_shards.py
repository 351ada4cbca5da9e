"""mlstore.torch.ShardDataset over tar shards on the S3 emulator: grouping into samples,
exactly once per epoch across ranks and workers, deterministic shuffling, streaming,
strict errors for damaged shards, mid-epoch resume, manifests, and torch.distributed."""

from __future__ import annotations

import collections
import io
import itertools
import json
import os
import pickle
import random
import socket
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from mlstore import ConfigError, Manifest, PreconditionFailedError, Store  # noqa: E402
from mlstore.torch import ShardDataset, ShardFormatError  # noqa: E402

pytestmark = pytest.mark.torch
KiB = 1 << 10
REPO = Path(__file__).resolve().parent.parent


def tar_bytes(
    members: list[tuple[str, bytes]],
    *,
    directories: tuple[str, ...] = (),
    fmt: int = tarfile.USTAR_FORMAT,
) -> bytes:
    """A tar archive of ``members`` (regular files, in order) after ``directories``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name in directories:
            entry = tarfile.TarInfo(name)
            entry.type = tarfile.DIRTYPE
            tar.addfile(entry)
        for name, data in members:
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            tar.addfile(entry, io.BytesIO(data))
    return buf.getvalue()


def sample_members(shard: int, count: int) -> list[tuple[str, bytes]]:
    """``count`` samples of two files each (``.bin`` and ``.cls``) for shard ``shard``."""
    out = []
    for i in range(count):
        key = f"s{shard:02d}/{i:03d}"
        out.append((f"{key}.bin", f"{key}-payload".encode() * 3))
        out.append((f"{key}.cls", str(i % 5).encode()))
    return out


def write_shards(store: Store, prefix: str, sizes: list[int]) -> tuple[list[str], list[str]]:
    """Shards of ``sizes`` samples below ``prefix``: their URLs and every sample key."""
    urls, keys = [], []
    for shard, count in enumerate(sizes):
        url = f"{prefix}/shard-{shard:04d}.tar"
        members = sample_members(shard, count)
        store.write_bytes(url, tar_bytes(members))
        urls.append(url)
        keys += [f"s{shard:02d}/{i:03d}" for i in range(count)]
    return urls, keys


def keys_of(samples: Any) -> list[str]:
    return [s["__key__"] for s in samples]


@pytest.fixture
def s3_store(s3_options: dict[str, object]) -> Iterator[Store]:
    with Store(options={"s3": s3_options}) as s:
        yield s


@pytest.fixture
def uncached(s3_options: dict[str, object]) -> Iterator[Store]:
    """A Store without a cache: every read reaches the emulator."""
    with Store(options={"s3": s3_options}, cache={"enabled": False}) as s:
        yield s


# ---------------------------------------------------------------- samples


@pytest.mark.s3
def test_members_group_into_samples_by_key_across_extensions_and_folders(
    s3_store: Store, s3_bucket: str
) -> None:
    """In the three tar formats; names too long for a ustar header come in a GNU
    long-name header or a pax header."""
    deep = "d" * 120
    members = [
        ("train/a.b/0001.jpg", b"jpeg-1"),
        ("train/a.b/0001.seg.png", b"png-1"),
        ("train/a.b/0001.cls", b"3"),
        ("train/README", b"no extension: in no sample"),
        ("train/a.b/0002.jpg", b"jpeg-2"),
        ("train/a.b/0002.cls", b"4"),
        ("0003.json", b"{}"),
    ]
    expected = [
        {"__key__": "train/a.b/0001", "jpg": b"jpeg-1", "seg.png": b"png-1", "cls": b"3"},
        {"__key__": "train/a.b/0002", "jpg": b"jpeg-2", "cls": b"4"},
        {"__key__": "0003", "json": b"{}"},
    ]
    long = [(f"{deep}/0004.txt", b"deep"), (f"{deep}/0004.cls", b"5")]
    long_expected = [{"__key__": f"{deep}/0004", "txt": b"deep", "cls": b"5"}]
    formats = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
    for name, fmt in formats.items():
        url = f"s3://{s3_bucket}/grouping-{name}.tar"
        extra = long if fmt != tarfile.USTAR_FORMAT else []
        shard = tar_bytes(members + extra, directories=("train", "train/a.b"), fmt=fmt)
        s3_store.write_bytes(url, shard)
        samples = list(ShardDataset([url], store=s3_store))
        wanted = expected + (long_expected if extra else [])
        assert samples == [{**e, "__url__": url} for e in wanted], name


@pytest.mark.s3
def test_transform_is_applied_to_every_sample(s3_store: Store, s3_bucket: str) -> None:
    urls, keys = write_shards(s3_store, f"s3://{s3_bucket}/t", [4, 3])

    def label(sample: dict[str, Any]) -> tuple[str, int]:
        return sample["__key__"], int(sample["cls"])

    got = list(ShardDataset(urls, store=s3_store, transform=label))
    assert got == [(k, int(k[-3:]) % 5) for k in keys]


@pytest.mark.s3
def test_a_sample_with_one_extension_twice_is_refused(s3_store: Store, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/twice.tar"
    s3_store.write_bytes(url, tar_bytes([("x/1.jpg", b"a"), ("x/1.cls", b"1"), ("x/1.jpg", b"b")]))
    with pytest.raises(ShardFormatError, match="repeats the extension 'jpg'") as caught:
        list(ShardDataset([url], store=s3_store))
    assert caught.value.member == "x/1.jpg" and caught.value.url == url


@pytest.mark.s3
def test_shards_from_a_prefix_or_a_glob_are_listed_once_and_sorted(
    s3_store: Store, s3_bucket: str
) -> None:
    urls, keys = write_shards(s3_store, f"s3://{s3_bucket}/data", [2, 2, 2])
    s3_store.write_bytes(f"s3://{s3_bucket}/data/index.json", b"not a shard")
    by_prefix = ShardDataset(f"s3://{s3_bucket}/data", store=s3_store)
    by_glob = ShardDataset(f"s3://{s3_bucket}/data/shard-000[02].tar", store=s3_store)
    assert by_prefix.shards == urls
    assert by_glob.shards == [urls[0], urls[2]]
    assert keys_of(by_prefix) == keys
    # Listed in the constructor: a shard added later is not part of the dataset.
    s3_store.write_bytes(f"s3://{s3_bucket}/data/shard-0009.tar", tar_bytes([("z/1.a", b"")]))
    assert keys_of(by_prefix) == keys


@pytest.mark.s3
def test_a_prefix_without_shards_is_an_error(s3_store: Store, s3_bucket: str) -> None:
    with pytest.raises(FileNotFoundError, match="no shards"):
        ShardDataset(f"s3://{s3_bucket}/nothing-here", store=s3_store)


# ---------------------------------------------------------------- splitting


@pytest.mark.s3
@pytest.mark.parametrize(
    ("sizes", "shuffle"),
    [([5, 6, 4, 7, 5, 6, 3], True), ([6, 5, 7], False)],
    ids=["7-shards-shuffled", "3-shards-in-order"],
)
def test_every_sample_once_per_epoch_across_ranks_and_workers(
    s3_store: Store, s3_bucket: str, sizes: list[int], shuffle: bool
) -> None:
    """Two ranks, each with a DataLoader of two workers: four slots. With three shards,
    one slot has none and yields nothing; every sample still comes once."""
    urls, keys = write_shards(s3_store, f"s3://{s3_bucket}/split", sizes)
    per_rank = []
    for rank in (0, 1):
        dataset = ShardDataset(
            urls, store=s3_store, shuffle=shuffle, seed=11, buffer_size=4, rank=rank, world_size=2
        )
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=2, multiprocessing_context="fork"
        )
        per_rank.append(keys_of(loader))
    seen = collections.Counter(per_rank[0] + per_rank[1])
    assert seen == collections.Counter(keys)  # the whole dataset, each sample once
    assert per_rank[0] and per_rank[1]


@pytest.mark.s3
def test_shards_go_to_slots_round_robin(s3_store: Store, s3_bucket: str) -> None:
    urls, _ = write_shards(s3_store, f"s3://{s3_bucket}/rr", [1] * 5)
    served = {
        rank: {s["__url__"] for s in ShardDataset(urls, store=s3_store, rank=rank, world_size=3)}
        for rank in range(3)
    }
    assert served == {0: {urls[0], urls[3]}, 1: {urls[1], urls[4]}, 2: {urls[2]}}


# ---------------------------------------------------------------- determinism


@pytest.mark.s3
def test_shuffle_is_deterministic_per_seed_and_epoch(s3_store: Store, s3_bucket: str) -> None:
    urls, keys = write_shards(s3_store, f"s3://{s3_bucket}/det", [6, 6, 6, 6, 6])

    def order(seed: int, epoch: int, torch_seed: int = 0) -> list[str]:
        torch.manual_seed(torch_seed)  # must not matter
        dataset = ShardDataset(urls, store=s3_store, shuffle=True, seed=seed, buffer_size=8)
        dataset.set_epoch(epoch)
        return keys_of(dataset)

    first = order(seed=1, epoch=0)
    assert order(seed=1, epoch=0, torch_seed=99) == first
    assert sorted(first) == sorted(keys) and first != keys
    # The buffer mixes samples of different shards, not just the shard order.
    shard_changes = sum(a[:3] != b[:3] for a, b in itertools.pairwise(first))
    assert shard_changes > len(urls) - 1
    again = ShardDataset(urls, store=s3_store, shuffle=True, seed=1, buffer_size=8)
    again.set_epoch(1)
    second = keys_of(again)
    assert sorted(second) == sorted(keys) and second != first
    assert keys_of(again) == second  # the epoch stays until set_epoch changes it
    assert order(seed=2, epoch=0) != first
    assert keys_of(ShardDataset(urls, store=s3_store)) == keys  # no shuffle: in order


# ---------------------------------------------------------------- streaming


@pytest.mark.s3
@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cache-blocks"])
def test_a_shard_is_streamed_not_read_whole(
    s3_options: dict[str, object], s3_bucket: str, cached: bool
) -> None:
    """The first sample of a 4 MiB shard arrives after a few 64 KiB reads. Uncached,
    ``readahead`` sets the read size; with the cache on, a shard over the block
    threshold is read in cache blocks (here 64 KiB, with two blocks of read-ahead)."""
    chunk = 64 * KiB
    cache: dict[str, Any] = (
        {"block_size": chunk, "block_threshold": 0, "memory_bytes": 0}
        if cached
        else {"enabled": False}
    )
    members = [(f"{i:04d}.bin", random.Random(i).randbytes(32 * KiB)) for i in range(128)]
    shard = tar_bytes(members)
    url = f"s3://{s3_bucket}/big.tar"
    with Store(options={"s3": s3_options}, cache=cache) as store:
        store.write_bytes(url, shard)
        before = store.stats()
        samples = iter(ShardDataset([url], store=store, readahead=chunk))
        first = next(samples)
        fetched = (store.stats() - before)["bytes_read"]
        assert first["bin"] == members[0][1]
        assert 0 < fetched <= 8 * chunk < len(shard) // 8
        rest = list(samples)
        assert [s["bin"] for s in rest] == [data for _, data in members[1:]]
        assert (store.stats() - before)["bytes_read"] >= len(shard) - 10 * KiB


# ---------------------------------------------------------------- damaged shards


def _layout(shard: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(shard)) as tar:
        return tar.getmembers()


def _damaged(how: str, shard: bytes) -> tuple[bytes, str | None, str]:
    """``shard`` damaged ``how``: its bytes, the member the error names (``None``: no
    member can be), and a phrase of the message."""
    third = _layout(shard)[3]  # x/001.cls: members 0-2 make one whole sample and a half
    if how == "data cut short":
        return shard[: third.offset_data + 1], third.name, "is cut short"
    if how == "header cut short":
        return shard[: third.offset + 200], "x/001.bin", "ends inside the tar header"
    if how == "no end marker":
        return shard[: third.offset], "x/001.bin", "without the tar end-of-archive marker"
    if how == "damaged header":
        damaged = bytearray(shard)
        damaged[third.offset + 130] ^= 0x3F  # inside the size field: a bad checksum
        return bytes(damaged), None, "after member 'x/001.bin', is damaged"
    if how == "garbage":
        return random.Random(0).randbytes(5000), None, "not a tar archive"
    assert how == "empty"
    return b"", None, "empty"


DAMAGE = [
    "data cut short",
    "header cut short",
    "no end marker",
    "damaged header",
    "garbage",
    "empty",
]


@pytest.mark.s3
def test_a_truncated_or_corrupt_shard_raises_naming_shard_and_member(
    s3_store: Store, s3_bucket: str
) -> None:
    whole = tar_bytes(
        [
            ("x/000.bin", b"a" * 700),
            ("x/000.cls", b"0"),
            ("x/001.bin", b"b" * 900),
            ("x/001.cls", b"1" * 600),
            ("x/002.bin", b"c"),
        ]
    )
    for how in DAMAGE:
        data, member, phrase = _damaged(how, whole)
        url = f"s3://{s3_bucket}/damaged/{how.replace(' ', '-')}.tar"
        s3_store.write_bytes(url, data)
        got: list[str] = []
        with pytest.raises(ShardFormatError) as caught:
            for sample in ShardDataset([url], store=s3_store):
                got.append(sample["__key__"])
        error = caught.value
        assert (error.url, error.member) == (url, member), how
        assert url in str(error) and phrase in str(error), how
        assert member is None or repr(member) in str(error), how
        # Only whole samples before the damage came out, none after it.
        assert got == (["x/000"] if how not in ("garbage", "empty") else []), how
        again = pickle.loads(pickle.dumps(error))  # as a DataLoader worker sends it
        assert (type(again), str(again), again.member) == (ShardFormatError, str(error), member)


@pytest.mark.s3
def test_a_damaged_shard_in_a_dataloader_worker_raises_the_same_error(
    s3_store: Store, s3_bucket: str
) -> None:
    urls, _ = write_shards(s3_store, f"s3://{s3_bucket}/w", [3])
    s3_store.write_bytes(urls[0], s3_store.read_bytes(urls[0])[: 3 * 512 + 1])
    loader = torch.utils.data.DataLoader(
        ShardDataset(urls, store=s3_store),
        batch_size=None,
        num_workers=1,
        multiprocessing_context="fork",
    )
    with pytest.raises(ShardFormatError, match=r"s00/000\.cls") as caught:
        list(loader)
    assert urls[0] in str(caught.value)


# ---------------------------------------------------------------- resuming

RESUME_SIZES = [6, 5, 7, 6, 4, 6, 5, 6]  # 45 samples


@pytest.mark.s3
@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled"])
def test_resume_continues_exactly_and_reopens_no_finished_shard(
    uncached: Store, s3_bucket: str, shuffle: bool
) -> None:
    """The first ``k`` samples, then a new dataset resumed from the saved state, give
    the uninterrupted epoch. Shards whose samples were all out before the state was
    saved are deleted before resuming: the resume must not open them."""
    urls, _ = write_shards(uncached, f"s3://{s3_bucket}/resume", RESUME_SIZES)
    shards = {url: uncached.read_bytes(url) for url in urls}

    def dataset() -> ShardDataset:
        d = ShardDataset(urls, store=uncached, shuffle=shuffle, seed=5, buffer_size=6)
        d.set_epoch(2)
        return d

    epoch = keys_of(dataset())
    for k in (0, 1, 13, 31, 44, 45):
        interrupted = dataset()
        stream = iter(interrupted)
        first = keys_of(next(stream) for _ in range(k))
        state = json.loads(json.dumps(interrupted.state_dict()))  # plain data
        assert (state["yielded"], state["epoch"]) == (k, 2)
        finished = [
            url
            for i, url in enumerate(urls)
            if {f"s{i:02d}/{j:03d}" for j in range(RESUME_SIZES[i])} <= set(first)
        ]
        assert bool(finished) == (k >= 13), k  # the test does delete shards
        for url in finished:
            uncached.rm(url)
        resumed = dataset()
        resumed.load_state_dict(state)
        assert first + keys_of(resumed) == epoch, k
        assert resumed.state_dict()["yielded"] == len(epoch), k  # saved again: all done
        for url in finished:
            uncached.write_bytes(url, shards[url])


@pytest.mark.s3
def test_a_state_is_refused_by_another_dataset_or_slot(s3_store: Store, s3_bucket: str) -> None:
    urls, _ = write_shards(s3_store, f"s3://{s3_bucket}/refuse", [3, 3])
    saved = ShardDataset(urls, store=s3_store, shuffle=True, seed=1)
    stream = iter(saved)
    next(stream)
    state = saved.state_dict()
    with pytest.raises(ConfigError, match="seed 1"):
        ShardDataset(urls, store=s3_store, shuffle=True, seed=2).load_state_dict(state)
    with pytest.raises(ConfigError, match="other shards"):
        ShardDataset(urls[:1], store=s3_store, shuffle=True, seed=1).load_state_dict(state)
    with pytest.raises(ConfigError, match="not a ShardDataset state"):
        ShardDataset(urls, store=s3_store, shuffle=True, seed=1).load_state_dict({"epoch": 0})
    other_rank = ShardDataset(urls, store=s3_store, shuffle=True, seed=1, rank=1, world_size=2)
    other_rank.load_state_dict(state)
    with pytest.raises(ConfigError, match="slot 0 of 1"):
        iter(other_rank)


@pytest.mark.s3
def test_a_shard_rewritten_before_a_resume_is_detected(uncached: Store, s3_bucket: str) -> None:
    urls, _ = write_shards(uncached, f"s3://{s3_bucket}/rewritten", [4, 4])
    saved = ShardDataset(urls, store=uncached, shuffle=True, seed=3, buffer_size=4)
    stream = iter(saved)
    for _ in range(2):
        next(stream)
    state = saved.state_dict()
    uncached.write_bytes(urls[0], tar_bytes(sample_members(0, 3)))  # one sample fewer
    uncached.write_bytes(urls[1], tar_bytes(sample_members(1, 3)))
    resumed = ShardDataset(urls, store=uncached, shuffle=True, seed=3, buffer_size=4)
    resumed.load_state_dict(state)
    with pytest.raises(PreconditionFailedError, match="changed"):
        list(resumed)


# ---------------------------------------------------------------- manifests


@pytest.mark.s3
def test_a_manifest_pins_every_shard_to_its_recorded_version(
    s3_store: Store, s3_bucket: str
) -> None:
    urls, keys = write_shards(s3_store, f"s3://{s3_bucket}/m", [3, 4, 2])
    manifest = Manifest.build(f"s3://{s3_bucket}/m/*.tar", store=s3_store)
    pinned = ShardDataset(manifest, store=s3_store)
    assert pinned.shards == urls
    assert keys_of(pinned) == keys
    # The same keys, other bytes: a listing of URLs reads them, the manifest refuses.
    rewritten = sample_members(1, 4)
    s3_store.write_bytes(urls[1], tar_bytes([(n, d + b"!") for n, d in rewritten]))
    assert keys_of(ShardDataset(urls, store=s3_store)) == keys
    with pytest.raises(PreconditionFailedError) as caught:
        list(pinned)
    assert caught.value.url == urls[1] and urls[1] in str(caught.value)
    assert "rebuild the manifest" in str(caught.value)


# ---------------------------------------------------------------- pickling


@pytest.mark.s3
def test_a_pickled_dataset_reads_the_same_stream(s3_store: Store, s3_bucket: str) -> None:
    urls, _ = write_shards(s3_store, f"s3://{s3_bucket}/p", [3, 4])
    dataset = ShardDataset(urls, store=s3_store, shuffle=True, seed=9, buffer_size=3)
    dataset.set_epoch(4)
    stream = iter(dataset)
    next(stream)  # an open shard must not stop pickling
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy.shards == urls and keys_of(copy) == keys_of(dataset)


def test_invalid_arguments_are_refused() -> None:
    urls = ["memory://x/a.tar"]
    bad: list[Callable[[], object]] = [
        lambda: ShardDataset(urls, buffer_size=0),
        lambda: ShardDataset(urls, readahead=-1),
        lambda: ShardDataset(urls, rank=1),
        lambda: ShardDataset(urls, rank=2, world_size=2),
        lambda: ShardDataset([]),
    ]
    for make in bad:
        with pytest.raises(ConfigError):
            make()


# ---------------------------------------------------------------- torch.distributed

_RANK = """
import json, multiprocessing, sys

import torch.distributed as dist
import torch.utils.data

from mlstore import Store
from mlstore.torch import ShardDataset


def main(rank, port, endpoint, out, urls):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    # No rank or world_size given: both come from torch.distributed, and the workers,
    # new processes that do not join the group, get them from the pickled dataset
    # (forkserver pickles it as spawn does; the server imports torch once for both).
    store = Store(options={"s3": {"endpoint_url": endpoint}})
    dataset = ShardDataset(urls, store=store, shuffle=True, seed=4)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["mlstore.torch"])
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=2, multiprocessing_context=context
    )
    keys = [sample["__key__"] for sample in loader]
    dist.barrier()
    with open(out, "w") as f:
        json.dump(keys, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.s3
def test_torch_distributed_ranks_split_the_shards(
    s3_store: Store, s3_options: dict[str, object], s3_bucket: str, tmp_path: Path
) -> None:
    """Two real ranks (gloo over loopback), each with two DataLoader workers started by
    a forkserver: the ranks' samples are disjoint and together exactly the dataset."""
    urls, keys = write_shards(s3_store, f"s3://{s3_bucket}/dist", [4, 3, 5, 4, 2, 3])
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(_RANK))
    port = str(_free_port())
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path]),
        "GLOO_SOCKET_IFNAME": "lo",
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    }
    endpoint = str(s3_options["endpoint_url"])
    outputs = [tmp_path / f"rank-{rank}.json" for rank in (0, 1)]
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), port, endpoint, str(out), *urls],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, out in enumerate(outputs)
    ]
    for rank in ranks:
        _, stderr = rank.communicate(timeout=240)
        assert rank.returncode == 0, stderr[-3000:]
    seen = [set(json.loads(out.read_text())) for out in outputs]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(keys)
    assert sum(len(json.loads(out.read_text())) for out in outputs) == len(keys)
