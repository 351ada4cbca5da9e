"""Metadata on the node (issue 14): ``info``, ``exists`` and ``ls`` answers, negative
lookups included, are shared by every process on the node through a bounded diskcache
under ``disk_dir/meta/``, in front of which each process keeps a small LRU.

Every claim about other processes is checked with fresh ``python`` processes sharing one
cache directory; requests are counted by the fault proxy in front of moto_server.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import pickle
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import mlstore
from tests.conftest import run_child
from tests.emulators import ServerProcess
from tests.servers import proxy

pytestmark = pytest.mark.s3

REPO = Path(__file__).resolve().parent.parent


def heads(endpoint: str) -> int:
    return proxy.requests(endpoint, "HEAD")


@pytest.fixture
def endpoint(s3_fault_proxy: ServerProcess) -> str:
    return s3_fault_proxy.endpoint


@pytest.fixture
def cache_dir(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


def make_store(endpoint: str, cache_dir: str, **cache: Any) -> mlstore.Store:
    options = {"endpoint_url": endpoint, **cache.pop("s3", {})}
    return mlstore.Store(options={"s3": options}, cache={"disk_dir": cache_dir, **cache})


_uploaders: dict[str, mlstore.Store] = {}


def upload(endpoint: str, url: str, data: bytes) -> None:
    """Write with a cache-less Store: nothing of the writer's cache plays a part."""
    if endpoint not in _uploaders:
        options = {"s3": {"endpoint_url": endpoint}}
        _uploaders[endpoint] = mlstore.Store(options=options, cache={"enabled": False})
    _uploaders[endpoint].write_bytes(url, data)


# A fresh process's side: run the listed steps through one Store, print what it saw.
CHILD = """
import json, os
import mlstore

spec = json.loads(os.environ["META_SPEC"])
options = {"endpoint_url": spec["endpoint"], **spec.get("s3", {})}
cache = {"disk_dir": spec["cache_dir"], **spec["cache"]}
store = mlstore.Store(options={"s3": options}, cache=cache)
out = []
for op, url in spec["steps"]:
    if op == "info":
        try:
            out.append(store.info(url).size)
        except mlstore.NotFoundError:
            out.append(None)
    elif op == "exists":
        out.append(store.exists(url))
    elif op == "ls":
        out.append(store.ls(url))
    elif op == "write":
        store.write_bytes(url, b"written by a child")
        out.append("written")
    elif op == "rm":
        store.rm(url)
        out.append("removed")
print(json.dumps({"seen": out, "requests": store.stats()["requests"]}))
"""


def in_fresh_process(
    endpoint: str, cache_dir: str, steps: list[tuple[str, str]], **cache: Any
) -> tuple[list[Any], int]:
    """Run ``steps`` in a new Python process; what it saw and how many requests it sent."""
    spec = {
        "endpoint": endpoint,
        "cache_dir": cache_dir,
        "s3": cache.pop("s3", {}),
        "cache": cache,
        "steps": steps,
    }
    result = run_child(CHILD, {"META_SPEC": json.dumps(spec)})
    assert isinstance(result, dict)
    return result["seen"], int(result["requests"])


def meta_rows(cache_dir: str) -> int:
    """Entries in the node's metadata tier, as its database file holds them."""
    db = sqlite3.connect(os.path.join(cache_dir, "meta", "cache.db"))
    try:
        return int(db.execute("SELECT count(*) FROM Cache").fetchone()[0])
    finally:
        db.close()


# ---------------------------------------------------------------- bounded


def test_twenty_thousand_answers_leave_a_bounded_front_and_node_tier(tmp_path: Path) -> None:
    """The tiers themselves, driven with 20,000 distinct answers (no store: moto answers
    some 40 HEADs a second, which would make this a ten-minute test)."""
    from mlstore._engine import cached
    from mlstore.cache._layout import claim_cache_dir
    from mlstore.cache.metadata import NodeMetadata, Remembered

    root = str(tmp_path / "cache")
    claim_cache_dir(root)
    limit = 1024 * 1024

    def answers(ttl: float) -> Remembered[dict[str, object]]:
        node = NodeMetadata(root, limit, lambda name, n: None)
        memo: Remembered[dict[str, object]] = Remembered(
            "info", cached.INFO_ENTRIES, node, lambda v: v, lambda d: d
        )
        for i in range(20_000):
            info = {"size": i, "version": f"{i:032x}", "url": f"s3://bucket/key/{i:05d}"}
            memo.put(f"s3://bucket/key/{i:05d}#0123456789abcdef", info, "ttl", ttl, 1.0, 1.0)
        return memo

    memo = answers(ttl=300)
    assert len(memo.front) == cached.INFO_ENTRIES < 20_000
    assert memo.node is not None
    entries, _ = memo.node.usage()
    memo.node.close()
    assert 0 < entries == meta_rows(root) < 20_000
    assert (Path(root) / "meta" / "cache.db").stat().st_size <= limit + 64 * 1024
    assert memo.lookup("s3://bucket/key/19999#0123456789abcdef", "ttl", 300, 2.0) is not None
    # With ttl=0 nothing is trusted, so nothing is kept, in the process or on the node.
    shutil.rmtree(Path(root) / "meta")
    memo = answers(ttl=0)
    assert len(memo.front) == 0
    assert not (Path(root) / "meta" / "cache.db").exists() or meta_rows(root) == 0


def test_a_store_keeps_a_bounded_front_and_node_tier(
    monkeypatch: pytest.MonkeyPatch, endpoint: str, s3_bucket: str, cache_dir: str
) -> None:
    from mlstore._engine import cached

    monkeypatch.setattr(cached, "INFO_ENTRIES", 50)
    urls = [f"s3://{s3_bucket}/absent/{i:04d}" for i in range(300)]
    limit = 64 * 1024
    with make_store(endpoint, cache_dir, metadata_bytes=limit) as store:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert not any(pool.map(store.exists, urls))
        reads = store._runtime.get().cached
        assert reads is not None and len(reads._info.front) == 50
    assert 0 < meta_rows(cache_dir) < 300
    meta = Path(cache_dir) / "meta"
    assert (meta / "cache.db").stat().st_size <= limit + 16 * 1024
    proxy.reset(endpoint)
    seen, requests = in_fresh_process(endpoint, cache_dir, [("exists", urls[-1])])
    assert seen == [False] and requests == 0, "the newest answers are on the node"


def test_ttl_zero_keeps_no_metadata(endpoint: str, s3_bucket: str, cache_dir: str) -> None:
    urls = [f"s3://{s3_bucket}/kept-{i}.bin" for i in range(20)]
    for url in urls:
        upload(endpoint, url, b"x")
    with make_store(endpoint, cache_dir, ttl=0) as store:
        for url in urls:
            store.info(url)
            store.exists(f"{url}.missing")
        reads = store._runtime.get().cached
        assert reads is not None and len(reads._info.front) == 0
        proxy.reset(endpoint)
        store.info(urls[0])
        assert heads(endpoint) == 1, "ttl=0: asked again"
    path = os.path.join(cache_dir, "meta", "cache.db")
    assert not os.path.exists(path) or meta_rows(cache_dir) == 0


# ---------------------------------------------------------------- node-wide


def test_a_fresh_process_gets_an_info_with_no_request(
    endpoint: str, s3_bucket: str, cache_dir: str
) -> None:
    url = f"s3://{s3_bucket}/shared.bin"
    upload(endpoint, url, b"seven b")
    with make_store(endpoint, cache_dir) as store:
        assert store.info(url).size == 7
        store.ls(f"s3://{s3_bucket}")
    proxy.reset(endpoint)
    steps = [("info", url), ("exists", url), ("ls", f"s3://{s3_bucket}")]
    seen, requests = in_fresh_process(endpoint, cache_dir, steps)
    assert seen == [7, True, [url]]
    assert requests == 0 and heads(endpoint) == 0
    # The tier is as private as the rest of the cache.
    meta = Path(cache_dir) / "meta"
    assert stat.S_IMODE(meta.stat().st_mode) == 0o700
    files = [p for p in meta.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)


def test_another_scope_is_not_served_the_nodes_metadata(
    endpoint: str, moto: ServerProcess, s3_bucket: str, cache_dir: str
) -> None:
    url = f"s3://{s3_bucket}/scoped.bin"
    upload(endpoint, url, b"scoped")
    with make_store(endpoint, cache_dir) as store:
        store.info(url)
        store.ls(f"s3://{s3_bucket}")
    steps = [("info", url), ("ls", f"s3://{s3_bucket}")]
    other_credentials = {"key": "another-key", "secret": "another-secret"}
    _, requests = in_fresh_process(endpoint, cache_dir, steps, s3=other_credentials)
    assert requests == 2, "other credentials: the store is asked"
    _, requests = in_fresh_process(moto.endpoint, cache_dir, steps)
    assert requests == 2, "another endpoint: the store is asked"


def test_no_credential_reaches_the_metadata_tier(
    endpoint: str, s3_bucket: str, cache_dir: str
) -> None:
    url = f"s3://{s3_bucket}/secretive.bin"
    upload(endpoint, url, b"x")
    secret = "s3cr3t-never-on-disk"
    with make_store(endpoint, cache_dir, s3={"key": "AKIDEXAMPLE", "secret": secret}) as store:
        store.info(url)
        store.exists(f"{url}.missing")
        store.ls(f"s3://{s3_bucket}")
    assert meta_rows(cache_dir) == 3
    for path in (Path(cache_dir) / "meta").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes()


# ---------------------------------------------------------------- coherence


@pytest.mark.parametrize("validate", ["never", "ttl"])
def test_a_write_anywhere_on_the_node_reaches_the_next_process(
    validate: str, endpoint: str, s3_bucket: str, cache_dir: str
) -> None:
    kept = f"s3://{s3_bucket}/dir/kept.bin"
    doomed = f"s3://{s3_bucket}/dir/doomed.bin"
    born = f"s3://{s3_bucket}/dir/born.bin"
    for url in (kept, doomed):
        upload(endpoint, url, b"old")
    listing = f"s3://{s3_bucket}/dir"
    ask = [("info", kept), ("exists", doomed), ("exists", born), ("info", born), ("ls", listing)]
    seen, _ = in_fresh_process(endpoint, cache_dir, ask, validate=validate)  # A caches
    assert seen == [3, True, False, None, [doomed, kept]]
    seen, requests = in_fresh_process(endpoint, cache_dir, ask, validate=validate)
    assert requests == 0, "all of it, the negative answers too, is on the node"
    change = [("write", kept), ("rm", doomed), ("write", born)]
    in_fresh_process(endpoint, cache_dir, change, validate=validate)  # B changes
    seen, _ = in_fresh_process(endpoint, cache_dir, ask, validate=validate)  # C reads
    written = len(b"written by a child")
    assert seen == [written, False, True, written, [born, kept]]


@pytest.mark.parametrize("validate", ["never", "ttl"])
def test_a_prefix_remembered_missing_exists_once_an_object_is_written_below_it(
    validate: str, endpoint: str, s3_bucket: str, cache_dir: str
) -> None:
    """What Dask's ``to_parquet`` does: look at the table's directory (missing), write
    its parts below it; the next reader lists and reads the directory."""
    table = f"s3://{s3_bucket}/table"
    part = f"{table}/part.0.parquet"
    ask = [("exists", table), ("info", table)]
    seen, _ = in_fresh_process(endpoint, cache_dir, ask, validate=validate)
    assert seen == [False, None]  # remembered on the node as missing
    in_fresh_process(endpoint, cache_dir, [("write", part)], validate=validate)
    seen, _ = in_fresh_process(endpoint, cache_dir, [*ask, ("ls", table)], validate=validate)
    assert seen == [True, 0, [part]]  # a directory now, in a fresh process
    in_fresh_process(endpoint, cache_dir, [("rm", part)], validate=validate)
    seen, _ = in_fresh_process(endpoint, cache_dir, ask, validate=validate)
    assert seen == [False, None]  # and gone again with its last object


def test_a_negative_lookup_is_shared_and_dropped_by_a_write(
    endpoint: str, s3_bucket: str, cache_dir: str
) -> None:
    url = f"s3://{s3_bucket}/later.bin"
    with make_store(endpoint, cache_dir) as store:
        assert not store.exists(url)
        proxy.reset(endpoint)
        assert not store.exists(url)
        with pytest.raises(mlstore.NotFoundError):
            store.info(url)
        assert heads(endpoint) == 0, "remembered in the process"
        seen, requests = in_fresh_process(endpoint, cache_dir, [("exists", url), ("info", url)])
        assert seen == [False, None] and requests == 0, "and on the node"
        store.write_bytes(url, b"now here")
        assert store.exists(url)  # this Store's write drops its own negative answer
    seen, _ = in_fresh_process(endpoint, cache_dir, [("info", url)])
    assert seen == [len(b"now here")]  # and the node's


# ---------------------------------------------------------------- safety


def test_a_planted_pickle_is_never_unpickled(
    endpoint: str, s3_bucket: str, cache_dir: str, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    url = f"s3://{s3_bucket}/planted.bin"
    upload(endpoint, url, b"genuine")
    with make_store(endpoint, cache_dir) as store:
        store.info(url)
    db = sqlite3.connect(os.path.join(cache_dir, "meta", "cache.db"))
    with db:  # every entry now holds a pickle, in diskcache's pickle mode
        db.execute("UPDATE Cache SET mode = 4, value = ?", (pickle.dumps(Exploit()),))
    db.close()
    proxy.reset(endpoint)
    seen, requests = in_fresh_process(endpoint, cache_dir, [("info", url), ("exists", url)])
    assert not marker.exists()
    assert seen == [len(b"genuine"), True]
    assert requests == 1, "the planted entry is a miss: one HEAD, then remembered"


def test_a_corrupt_metadata_tier_is_a_miss_with_one_warning(
    endpoint: str, s3_bucket: str, cache_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"s3://{s3_bucket}/sound.bin"
    upload(endpoint, url, b"sound")
    with make_store(endpoint, cache_dir) as store:
        store.info(url)
    meta = Path(cache_dir) / "meta"
    for name in ("cache.db-wal", "cache.db-shm"):
        (meta / name).unlink(missing_ok=True)
    (meta / "cache.db").write_bytes(os.urandom(8192))
    proxy.reset(endpoint)
    with caplog.at_level(logging.WARNING, logger="mlstore"):
        with make_store(endpoint, cache_dir) as store:
            assert store.info(url).size == 5
            assert store.exists(f"{url}.missing") is False
            assert store.stats().get("cache_errors", "metadata") >= 1
        with make_store(endpoint, cache_dir) as store:
            assert store.info(url).size == 5  # the tier was rebuilt: served from it
    assert heads(endpoint) == 2
    warnings = [r for r in caplog.records if "metadata" in r.getMessage()]
    assert len(warnings) == 1


def test_the_metadata_tier_works_across_a_fork(
    endpoint: str, s3_bucket: str, cache_dir: str
) -> None:
    parent_url = f"s3://{s3_bucket}/parent.bin"
    child_url = f"s3://{s3_bucket}/child.bin"
    upload(endpoint, parent_url, b"parent")
    upload(endpoint, child_url, b"child!!")
    store = make_store(endpoint, cache_dir)
    store.info(parent_url)  # the parent's connection to the tier is open
    proxy.reset(endpoint)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(60)
            ok = store.info(parent_url).size == 6 and store.info(child_url).size == 7
            code = 0 if ok and store.stats()["requests"] == 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.info(child_url).size == 7  # the child's answer, through the node
    assert heads(endpoint) == 1
    store.close()


def test_import_mlstore_does_not_import_diskcache(tmp_path: Path) -> None:
    code = "import sys, mlstore; print('diskcache' in sys.modules)"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "False"


def test_an_answer_from_the_node_tier_carries_every_field_of_the_info() -> None:
    import dataclasses

    from mlstore._engine.answers import decode_located, encode_located
    from mlstore.backends.base import ObjectInfo
    from mlstore.url import parse_url

    url = parse_url("s3://bucket/dir/object.bin")
    info = ObjectInfo(
        url=url,
        size=123,
        type="directory",  # not the default: every field differs from its default
        version='"etag"',
        mtime=1.5,
        checksums={"md5": "abc"},
        content_hash="0" * 32,
        block_digests="1048576:" + "1" * 32,
    )
    assert all(getattr(info, f.name) != f.default for f in dataclasses.fields(info)), (
        "give every field a value that is not its default, so a field the codec drops fails"
    )
    import json

    encoded = encode_located((url, info))
    assert encoded is not None
    assert decode_located(json.loads(json.dumps(encoded))) == (url, info)
