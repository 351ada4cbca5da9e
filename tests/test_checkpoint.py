"""Checkpoints (mlstore.checkpoint, mlstore.torch.save/load) on real storage: round
trips on every backend, dedupe across saves, atomicity under SIGKILL at every write,
verified chunks, and retention racing saves in other processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pyfastcdc")

import mlstore  # noqa: E402
from mlstore import CheckpointError, IntegrityError, NotFoundError, Store  # noqa: E402
from mlstore.checkpoint import CheckpointReader, read_manifest, retain  # noqa: E402
from mlstore.torch import load, save  # noqa: E402
from tests.emulators import ServerProcess  # noqa: E402
from tests.servers import proxy  # noqa: E402

pytestmark = [pytest.mark.torch]

KiB, MiB = 1024, 1024 * 1024
ROOT = str(Path(__file__).resolve().parent.parent)


def state(seed: int, layers: int = 10) -> dict[str, Any]:
    """A small model's state dict: ``layers`` distinct tensors and some Python."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Any] = {
        f"layer{i}.weight": torch.randn(64, 64, generator=g) for i in range(layers)
    }
    sd["step"] = seed
    return sd


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.stride() == b.stride()
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return bool(a == b)


def chunk_puts(endpoint: str) -> list[str]:
    return [
        r["path"]
        for r in proxy.request_log(endpoint)
        if r["method"] == "PUT" and "/.chunks/data/" in r["path"]
    ]


@pytest.fixture
def s3_dir(s3_bucket: str, s3_proxy: ServerProcess) -> Iterator[tuple[Store, str]]:
    with Store(options={"s3": {"endpoint_url": s3_proxy.endpoint}}) as store:
        proxy.reset(s3_proxy.endpoint)
        yield store, f"s3://{s3_bucket}/run"


# ------------------------------------------------------------------ round trips


def tricky() -> dict[str, Any]:
    base = torch.arange(100, dtype=torch.float32)
    return {
        "view": base[10:20],  # a view: shares base's storage
        "base": base,
        "strided": torch.arange(60.0).reshape(6, 10).t(),
        "bf16": torch.arange(7, dtype=torch.bfloat16),
        "int": torch.tensor([1, -2, 3], dtype=torch.int64),
        "bool": torch.tensor([True, False]),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(3.5),
        "nested": {"list": [torch.ones(2), 1, "x"], "tuple": (torch.zeros(1), None)},
        "blob": os.urandom(2 * MiB + 17),  # bytes large enough to be cut by content
        "param": torch.nn.Parameter(torch.randn(3, 3)),
    }


@pytest.mark.parametrize("backend", ["file", "memory", "s3", "gs", "az"])
def test_save_then_load_in_a_fresh_process_gives_back_every_tensor_exactly(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    options: dict[str, Any] = {}
    if backend == "file":
        url = f"file://{tmp_path}/ckpt/model.pt"
    elif backend == "memory":
        url = "memory://ckpt-roundtrip/model.pt"
    elif backend == "s3":
        options = {"s3": request.getfixturevalue("s3_options")}
        url = f"s3://{request.getfixturevalue('s3_bucket')}/ckpt/model.pt"
    elif backend == "gs":
        options = {"gs": request.getfixturevalue("gcs_options")}
        url = f"gs://{request.getfixturevalue('gcs_bucket')}/ckpt/model.pt"
    else:
        options = {"az": request.getfixturevalue("az_options")}
        url = f"az://{request.getfixturevalue('az_container')}/ckpt/model.pt"
    obj = tricky()
    with Store(options=options) as store:
        info = save(obj, url, store=store)
        assert info.bytes >= obj["base"].nbytes + len(obj["blob"]) and info.uploaded == info.bytes
        got = load(url, store=store)
        assert same(got, obj)
        assert got["view"].untyped_storage().data_ptr() == got["base"].untyped_storage().data_ptr()
        assert isinstance(got["param"], torch.nn.Parameter)
    if backend == "memory":
        return  # memory:// lives in one process
    child = f"""
        import json, mlstore, torch
        from mlstore.torch import load
        got = load({url!r}, store=mlstore.Store(options={json.dumps(options)!s}))
        print(json.dumps([got["base"].sum().item(), len(got["blob"]), got["strided"].stride()]))
    """
    out = run_py(child)
    assert out == [float(obj["base"].sum()), len(obj["blob"]), list(obj["strided"].stride())]


def run_py(code: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_map_location_moves_storages_as_torch_load_does(tmp_path: Path) -> None:
    url = f"{tmp_path}/m.pt"
    save({"w": torch.ones(2)}, url)
    seen: list[str] = []

    def where(storage: Any, location: str) -> Any:
        seen.append(location)
        return None  # default placement

    assert same(load(url, map_location="cpu"), {"w": torch.ones(2)})
    assert same(load(url, map_location={"cpu": "cpu"}), {"w": torch.ones(2)})
    assert same(load(url, map_location=where), {"w": torch.ones(2)}) and seen == ["cpu"]
    assert load(url, map_location=torch.device("cpu"))["w"].device.type == "cpu"


class Custom:
    def __init__(self, x: int) -> None:
        self.x = x


def test_weights_only_refuses_arbitrary_objects_unless_the_caller_trusts_the_file(
    tmp_path: Path,
) -> None:
    url = f"{tmp_path}/c.pt"
    save({"obj": Custom(3), "w": torch.ones(1)}, url)
    with pytest.raises(CheckpointError, match="weights_only") as caught:
        load(url)
    assert "c.pt" in str(caught.value)
    assert load(url, weights_only=False)["obj"].x == 3


def test_bad_urls_get_typed_errors_naming_them(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"nothing\.pt"):
        load(f"{tmp_path}/nothing.pt")
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(1)}, plain)  # a torch.save file is not an mlstore checkpoint
    with pytest.raises(CheckpointError, match=r"plain\.pt.*not an mlstore checkpoint"):
        load(str(plain))
    with pytest.raises(TypeError, match="map_location"):
        save({"w": torch.ones(1)}, f"{tmp_path}/ok.pt")
        load(f"{tmp_path}/ok.pt", map_location=3)  # type: ignore[arg-type]


def test_a_load_sees_the_last_save_to_a_url_even_one_made_from_another_node(
    s3_bucket: str, s3_options: dict[str, object], tmp_path: Path
) -> None:
    """Manifests are read from the storage: a node that cached the old one still loads
    the new one (its chunks, immutable, are served from the cache)."""
    url = f"s3://{s3_bucket}/latest/model.pt"
    node = {"MLSTORE_CACHE_DIR": str(tmp_path / "node")}
    code = f"""
        import json, sys, mlstore
        from mlstore.torch import load, save
        import torch
        store = mlstore.Store(options={{"s3": {json.dumps(s3_options)}}})
        if sys.argv[1:] == ["save"]:
            save({{"v": 1, "w": torch.ones(8)}}, {url!r}, store=store)
        print(json.dumps(load({url!r}, store=store)["v"]))
    """
    os.makedirs(node["MLSTORE_CACHE_DIR"], mode=0o700)
    env = {**os.environ, "PYTHONPATH": ROOT, **node}

    def child(*args: str) -> Any:
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert child("save") == 1 and child() == 1  # the node caches the manifest's bytes
    with Store(options={"s3": s3_options}, cache={"enabled": False}) as elsewhere:
        save({"v": 2, "w": torch.ones(8)}, url, store=elsewhere)  # another node's save
    assert child() == 2


# ------------------------------------------------------------------ dedupe


def test_a_second_save_uploads_only_what_changed(
    s3_dir: tuple[Store, str], s3_proxy: ServerProcess
) -> None:
    store, run = s3_dir
    sd = state(1)
    first = save(sd, f"{run}/step-1", store=store)
    assert first.uploaded == first.bytes and first.dedupe_ratio == 0.0
    sd["layer3.weight"] += 1  # one tensor of ten changes (and the step number)
    sd["step"] = 2
    proxy.reset(s3_proxy.endpoint)
    second = save(sd, f"{run}/step-2", store=store)
    tensor = sd["layer3.weight"].nbytes
    pickle_part = second.uploaded - tensor
    assert second.bytes == first.bytes
    assert 0 < pickle_part < 4 * KiB, "the changed tensor and the small pickle, nothing else"
    assert second.new_chunks == 2 and len(chunk_puts(s3_proxy.endpoint)) == 2
    assert second.dedupe_ratio > 0.85
    # Every weight moved (a full training step): nothing dedupes, and it says so.
    for k in sd:
        if k.endswith("weight"):
            sd[k] *= 1.01
    third = save(sd, f"{run}/step-3", store=store)
    assert third.uploaded >= 10 * tensor and third.dedupe_ratio < 0.01
    assert same(
        load(f"{run}/step-2", store=store),
        {**state(1), "layer3.weight": state(1)["layer3.weight"] + 1, "step": 2},
    )


def test_identical_tensors_in_one_save_are_stored_once(tmp_path: Path) -> None:
    w = torch.randn(128, 128)
    info = save({"a": w, "b": w.clone()}, f"{tmp_path}/dup.pt")
    assert info.uploaded < 1.1 * w.nbytes + 4 * KiB < info.bytes


def test_blobs_dedupe_by_content_after_an_insertion(tmp_path: Path) -> None:
    """A blob edited near its start keeps most of its chunks (content-defined cuts)."""
    blob = os.urandom(24 * MiB)
    save({"tokenizer": blob}, f"{tmp_path}/a.pt")
    info = save({"tokenizer": b"inserted" + blob}, f"{tmp_path}/b.pt")
    assert info.uploaded < 0.3 * len(blob)
    assert load(f"{tmp_path}/b.pt")["tokenizer"] == b"inserted" + blob


# ------------------------------------------------------------------ verification


def test_a_chunk_with_other_bytes_is_refused_never_loaded(tmp_path: Path) -> None:
    url = f"{tmp_path}/v.pt"
    save({"w": torch.arange(1000.0)}, url)
    manifest = read_manifest(mlstore.default_store(), url)
    name = next(n for n in manifest.parts if n.startswith("storage/"))
    digest = manifest.parts[name].chunks[0].digest
    path = tmp_path / ".chunks" / "data" / digest[:2] / digest
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with Store(cache={"enabled": False}) as fresh:
        with pytest.raises(IntegrityError, match="do not match"):
            load(url, store=fresh)
        path.unlink()
        with pytest.raises(CheckpointError, match=r"v\.pt.*not stored"):
            load(url, store=fresh)


def test_a_manifest_names_its_chunk_store_relative_so_a_copied_tree_still_loads(
    tmp_path: Path,
) -> None:
    save({"w": torch.arange(10.0)}, f"{tmp_path}/a/m.pt")
    Store().copy(f"{tmp_path}/a", f"{tmp_path}/b", recursive=True)
    import shutil

    shutil.rmtree(tmp_path / "a")
    assert same(load(f"{tmp_path}/b/m.pt"), {"w": torch.arange(10.0)})


# ------------------------------------------------------------------ atomicity

_SAVER = """
import os, sys, mlstore
from mlstore.checkpoint import CheckpointWriter
store = mlstore.Store(options={"s3": {"endpoint_url": sys.argv[1]}}, cache={"enabled": False})
real = store.write_bytes
def gated(url, data, **kw):
    print("write", url, flush=True)
    sys.stdin.readline()  # the test lets each write through, or kills us here
    return real(url, data, **kw)
store.write_bytes = gated
seed = int(sys.argv[3])
with CheckpointWriter(sys.argv[2], kind="bytes", store=store, workers=1) as w:
    for i in range(3):
        w.add_pieces(f"p{i}", [memoryview(bytes([seed, i]) * 50_000)])
    w.add_bytes("meta", b"same in every save")  # dedupes after the first save
    w.commit({"seed": seed})
print("saved", flush=True)
"""


def test_a_save_killed_before_any_write_leaves_the_previous_checkpoint_whole(
    s3_bucket: str, s3_options: dict[str, object]
) -> None:
    """SIGKILL before each of the save's writes in turn (chunks, ref, manifest, its
    lock): the URL serves the previous checkpoint until the manifest is written, and
    the new one whole after."""
    endpoint = str(s3_options["endpoint_url"])
    url = f"s3://{s3_bucket}/atomic/latest.pt"
    store = Store(options={"s3": s3_options}, cache={"enabled": False})

    def run(seed: int, kill_at: int | None) -> list[str]:
        """The writes the save made (a killed save: the last one never happened)."""
        child = subprocess.Popen(
            [sys.executable, "-c", _SAVER, endpoint, url, str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        assert child.stdin is not None and child.stdout is not None
        writes: list[str] = []
        for line in child.stdout:
            if line.startswith("saved"):
                break
            writes.append(line.split(" ", 1)[1].strip())
            if kill_at is not None and len(writes) == kill_at + 1:
                os.kill(child.pid, signal.SIGKILL)
                writes.pop()  # killed before it
                break
            child.stdin.write("\n")
            child.stdin.flush()
        child.stdin.close()
        child.stdout.close()
        child.wait(timeout=60)
        return writes

    def seed() -> int:
        with CheckpointReader(url, store=store) as reader:
            assert reader.read("p1") == bytes([reader.manifest.meta["seed"], 1]) * 50_000
            return int(reader.manifest.meta["seed"])

    writes = run(0, None)  # the previous checkpoint
    assert writes[-1] == url, "the manifest is the save's last write"
    old = 0
    for kill_at in range(len(writes)):
        made = run(kill_at + 1, kill_at)  # a new save (other bytes), killed before write k
        if url not in made:
            assert seed() == old, f"killed after {made}: the previous checkpoint, whole"
        else:
            assert seed() == kill_at + 1, "the manifest was written: the new one, whole"
            old = kill_at + 1
    # What the killed saves left (their chunks, a dead lock) is collected later.
    result = retain(f"s3://{s3_bucket}/atomic", keep_last=1, store=store)
    assert result.kept == [url] and not result.deferred and result.chunks_deleted > 0
    assert seed() == old


# ------------------------------------------------------------------ retention


def test_retention_keeps_the_newest_and_the_tagged_and_frees_the_rest(tmp_path: Path) -> None:
    d = str(tmp_path)
    infos = [save(state(i), f"{d}/step-{i}", tags=["best"] if i == 1 else ()) for i in range(5)]
    dry = retain(d, keep_last=2, dry_run=True)
    assert sorted(dry.deleted) == sorted(infos[i].url for i in (0, 2))
    assert all(load(f"{d}/step-{i}")["step"] == i for i in range(5)), "a dry run deletes nothing"
    done = retain(d, keep_last=2)
    assert set(done.kept) == {infos[i].url for i in (1, 3, 4)}
    assert done.chunks_deleted == 2 * 11 and done.bytes_freed > 2 * 10 * 64 * 64 * 4
    for i in (0, 2):
        with pytest.raises(NotFoundError):
            load(f"{d}/step-{i}")
    assert [load(f"{d}/step-{i}")["step"] for i in (1, 3, 4)] == [1, 3, 4]
    assert retain(d, keep_last=0, keep_tagged=False).kept == []
    left = [p for p in (tmp_path / ".chunks" / "data").rglob("*") if p.is_file()]
    assert left == [], "every chunk went"
    with pytest.raises(CheckpointError, match="keep_last"):
        retain(d, keep_last=-1)


_LOCK_HOLDER = """
import sys, mlstore
from mlstore.checkpoint._format import Layout
from mlstore.checkpoint._locks import lock_for_collect, lock_for_save
store = mlstore.Store(options={"s3": {"endpoint_url": sys.argv[1]}}, cache={"enabled": False})
layout = Layout(sys.argv[2])
if sys.argv[3] == "save":
    lock = lock_for_save(store, layout, timeout=60)
else:
    lock = lock_for_collect(store, layout)
print("held", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
"""


def hold(kind: str, endpoint: str, root: str) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, endpoint, root, kind],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def let_go(child: subprocess.Popen[str]) -> None:
    """Let a lock holder release its lock and end."""
    out, _ = child.communicate("\n", timeout=60)
    assert child.returncode == 0 and "released" in out


def test_a_collection_backs_off_while_a_save_in_another_process_runs(
    s3_bucket: str, s3_options: dict[str, object]
) -> None:
    endpoint = str(s3_options["endpoint_url"])
    d = f"s3://{s3_bucket}/race"
    store = Store(options={"s3": s3_options}, cache={"enabled": False})
    save(state(0), f"{d}/old", store=store)
    save(state(1), f"{d}/new", store=store)
    saver = hold("save", endpoint, f"{d}/.chunks")  # a save between its listing and commit
    try:
        result = retain(d, keep_last=1, store=store)
        assert result.deferred and result.chunks_deleted == 0
        assert result.deleted == [f"{d}/old"], "manifests go; the chunks wait"
        stored = {u for u in store.find(f"{d}/.chunks/data/")}
        assert len(stored) == 2 * 11, "not one chunk deleted under a live save"
    finally:
        let_go(saver)
    result = retain(d, keep_last=1, store=store)
    assert not result.deferred and result.chunks_deleted == 11
    assert load(f"{d}/new", store=store)["step"] == 1


def test_a_save_waits_for_a_running_collection_then_stores_what_it_needs(
    s3_bucket: str, s3_options: dict[str, object]
) -> None:
    endpoint = str(s3_options["endpoint_url"])
    d = f"s3://{s3_bucket}/race2"
    store = Store(options={"s3": s3_options}, cache={"enabled": False})
    save(state(0), f"{d}/a", store=store)
    collector = hold("gc", endpoint, f"{d}/.chunks")
    try:
        with pytest.raises(mlstore.CheckpointBusyError, match="collector"):
            from mlstore.checkpoint import CheckpointWriter

            with CheckpointWriter(f"{d}/b", kind="torch", store=store, timeout=0.5):
                pass
    finally:
        let_go(collector)
    assert save(state(0), f"{d}/b", store=store).uploaded < 4 * KiB


_SAVE_LOOP = """
import sys, mlstore, torch
from mlstore.torch import save
store = mlstore.Store(options={"s3": {"endpoint_url": sys.argv[1]}}, cache={"enabled": False})
for i in range(int(sys.argv[3])):
    g = torch.Generator().manual_seed(i % 3)  # seeds repeat: saves dedupe against chunks
    sd = {f"w{k}": torch.randn(64, 64, generator=g) for k in range(4)}
    sd["step"] = i
    save(sd, f"{sys.argv[2]}/step-{i}", store=store)
print("done", flush=True)
"""

_RETAIN_LOOP = """
import sys, json, mlstore
from mlstore.checkpoint import retain
store = mlstore.Store(options={"s3": {"endpoint_url": sys.argv[1]}}, cache={"enabled": False})
deferred = collected = 0
for _ in range(int(sys.argv[3])):
    r = retain(sys.argv[2], keep_last=1, store=store)
    deferred += r.deferred
    collected += r.chunks_deleted
print(json.dumps([deferred, collected]), flush=True)
"""


def test_saves_and_retention_racing_in_two_processes_lose_no_kept_checkpoint(
    s3_bucket: str, s3_options: dict[str, object]
) -> None:
    endpoint = str(s3_options["endpoint_url"])
    d = f"s3://{s3_bucket}/stress"
    env = {**os.environ, "PYTHONPATH": ROOT}
    saver = subprocess.Popen(
        [sys.executable, "-c", _SAVE_LOOP, endpoint, d, "12"], stdout=subprocess.PIPE, env=env
    )
    collector = subprocess.Popen(
        [sys.executable, "-c", _RETAIN_LOOP, endpoint, d, "25"], stdout=subprocess.PIPE, env=env
    )
    saver.communicate(timeout=300)
    collector.communicate(timeout=300)
    assert saver.returncode == 0 and collector.returncode == 0
    store = Store(options={"s3": s3_options}, cache={"enabled": False})
    # Whatever survived loads whole: no manifest names a chunk retention deleted.
    survivors = [u for u in store.ls(d) if "/step-" in u]
    assert f"{d}/step-11" in survivors
    for url in survivors:
        with CheckpointReader(url, store=store) as reader:
            got = load(url, store=store)
            assert got["step"] == int(url.rsplit("-", 1)[1]) and reader.manifest.kind == "torch"
    final = retain(d, keep_last=1, store=store)
    assert final.kept == [f"{d}/step-11"] and not final.deferred
    assert load(f"{d}/step-11", store=store)["step"] == 11
