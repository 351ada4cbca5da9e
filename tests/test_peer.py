"""Records out of one node's cache and into another's (``mlstore._peer``), in one
process: two Stores with their own cache directories stand for two nodes, and S3 is
moto behind the counting proxy."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import mlstore
from mlstore import _peer
from mlstore.errors import ConfigError, IntegrityError
from mlstore.hashing import content_hash
from tests.emulators import ServerProcess
from tests.servers import proxy

pytestmark = pytest.mark.s3

ROOT = Path(__file__).resolve().parent.parent


def direct(endpoint: str) -> mlstore.Store:
    """A Store that writes to moto uncached (as another tool would)."""
    return mlstore.Store(options={"s3": {"endpoint_url": endpoint}}, cache={"enabled": False})


def node(endpoint: str, cache_dir: Path) -> mlstore.Store:
    return mlstore.Store(
        options={"s3": {"endpoint_url": endpoint}}, cache={"disk_dir": str(cache_dir)}
    )


@pytest.fixture
def url(s3_bucket: str, moto: ServerProcess) -> str:
    target = f"s3://{s3_bucket}/peer/object.bin"
    with mlstore.Store(
        options={"s3": {"endpoint_url": moto.endpoint}}, cache={"enabled": False}
    ) as s:
        s.write_bytes(target, os.urandom(5000))
    return target


@pytest.fixture
def nodes(s3_proxy: ServerProcess, tmp_path: Path) -> Iterator[tuple[mlstore.Store, mlstore.Store]]:
    """A sending and a receiving node, both reading through the proxy."""
    with node(s3_proxy.endpoint, tmp_path / "a") as a, node(s3_proxy.endpoint, tmp_path / "b") as b:
        yield a, b


def gets(endpoint: str, url: str) -> int:
    path = url.replace("s3:/", "", 1)
    return sum(1 for r in proxy.request_log(endpoint) if r["method"] == "GET" and r["path"] == path)


def fresh_read(endpoint: str, cache_dir: Path, url: str, version: str | None) -> dict[str, object]:
    """Read ``url`` (pinned to ``version`` when given) in a new process on the node whose
    cache is ``cache_dir``; its content hash and the process's request count."""
    code = (
        "import json, sys, mlstore\n"
        "from mlstore.hashing import content_hash\n"
        "endpoint, cache, url, version = json.loads(sys.argv[1])\n"
        "s = mlstore.Store(options={'s3': {'endpoint_url': endpoint}}, cache={'disk_dir': cache})\n"
        "data = s.read_bytes(url, version=version)\n"
        "stats = s.stats()\n"
        "print(json.dumps({'hash': content_hash(data), 'requests': stats['requests']}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps([endpoint, str(cache_dir), url, version])],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_record_names_the_version_size_and_digest_of_its_bytes(
    url: str, nodes: tuple[mlstore.Store, mlstore.Store], s3_proxy: ServerProcess
) -> None:
    a, _ = nodes
    proxy.reset(s3_proxy.endpoint)
    rec = _peer.record(a, url)
    assert rec.version == a.info(url).version and rec.version
    assert rec.size == len(rec.data) == 5000
    assert rec.digest == content_hash(rec.data)
    assert rec.checked > 0.0  # fetched unpinned: its version was current then
    assert "data" not in repr(rec) and len(repr(rec)) < 200
    again = _peer.record(a, url)  # now from the node's cache: no second GET
    assert again == rec
    assert gets(s3_proxy.endpoint, url) == 1


def test_an_ingested_record_is_read_by_a_fresh_process_with_no_request(
    url: str, nodes: tuple[mlstore.Store, mlstore.Store], s3_proxy: ServerProcess, tmp_path: Path
) -> None:
    a, b = nodes
    rec = _peer.record(a, url)
    assert not _peer.holds(b, url)
    assert _peer.ingest(b, rec) is True
    assert _peer.holds(b, url) and _peer.holds(b, url, rec.version)
    assert _peer.ingest(b, rec) is False  # held already: nothing kept twice
    proxy.reset(s3_proxy.endpoint)
    for version in (None, rec.version):
        read = fresh_read(s3_proxy.endpoint, tmp_path / "b", url, version)
        assert read == {"hash": rec.digest, "requests": 0}
    assert proxy.request_log(s3_proxy.endpoint) == []


def test_a_pinned_record_is_kept_as_its_version_and_checked_before_an_unpinned_read(
    url: str, nodes: tuple[mlstore.Store, mlstore.Store], s3_proxy: ServerProcess, tmp_path: Path
) -> None:
    a, b = nodes
    version = a.info(url).version
    rec = _peer.record(a, url, version)
    pinned = dataclasses.replace(rec, checked=0.0)  # known only by its pin
    assert _peer.ingest(b, pinned, version) is True
    proxy.reset(s3_proxy.endpoint)
    assert fresh_read(s3_proxy.endpoint, tmp_path / "b", url, version)["requests"] == 0
    # Not pinned: the store is asked which version is current (a HEAD), and the cached
    # bytes serve it only because that is the version they were kept as: no GET.
    read = fresh_read(s3_proxy.endpoint, tmp_path / "b", url, None)
    assert read["hash"] == rec.digest
    assert gets(s3_proxy.endpoint, url) == 0
    assert [r["method"] for r in proxy.request_log(s3_proxy.endpoint)] == ["HEAD"]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(
            lambda r: dataclasses.replace(r, data=bytes([r.data[0] ^ 1]) + r.data[1:]), id="bytes"
        ),
        pytest.param(lambda r: dataclasses.replace(r, digest="0" * 32), id="digest"),
        pytest.param(lambda r: dataclasses.replace(r, data=r.data[:-1]), id="short"),
        pytest.param(lambda r: dataclasses.replace(r, size=r.size + 1), id="size"),
        pytest.param(lambda r: dataclasses.replace(r, version="not-the-pin"), id="version"),
    ],
)
def test_a_record_that_fails_a_check_is_refused_and_the_cache_left_as_it_was(
    url: str, nodes: tuple[mlstore.Store, mlstore.Store], change: object
) -> None:
    a, b = nodes
    rec = _peer.record(a, url)
    bad = change(rec)  # type: ignore[operator]
    with pytest.raises(IntegrityError, match="fetch the object from the store instead") as err:
        _peer.ingest(b, bad, rec.version)
    assert err.value.url == url and err.value.operation == "peer"
    assert not _peer.holds(b, url) and not _peer.holds(b, url, rec.version)
    assert b.cache.disk is not None and b.cache.disk.count() == 0


def test_a_copy_of_a_held_version_with_other_bytes_is_refused(
    url: str, nodes: tuple[mlstore.Store, mlstore.Store]
) -> None:
    a, b = nodes
    rec = _peer.record(a, url)
    assert b.read_bytes(url) == rec.data  # b holds that version, fetched itself
    other = b"another content under the same version"
    forged = dataclasses.replace(rec, data=other, size=len(other), digest=content_hash(other))
    with pytest.raises(IntegrityError, match="differs from the one this node holds"):
        _peer.ingest(b, forged)
    kept = _peer.record(b, url)
    assert (kept.version, kept.digest, kept.data) == (rec.version, rec.digest, rec.data)


def test_a_node_that_saw_a_newer_version_keeps_it(
    url: str, nodes: tuple[mlstore.Store, mlstore.Store], moto: ServerProcess
) -> None:
    a, b = nodes
    old = _peer.record(a, url)
    with mlstore.Store(
        options={"s3": {"endpoint_url": moto.endpoint}}, cache={"enabled": False}
    ) as s:
        s.write_bytes(url, b"the new version")
    assert b.read_bytes(url) == b"the new version"  # b fetched it after old was current
    assert _peer.ingest(b, old) is False
    assert b.read_bytes(url) == b"the new version"
    assert _peer.record(b, url).data == b"the new version"


def test_objects_the_node_does_not_cache_are_refused(tmp_path: Path) -> None:
    with node("http://127.0.0.1:1", tmp_path / "n") as s:
        s.write_bytes("memory://peer/x", b"x")
        assert not _peer.cached(s, "memory://peer/x")
        with pytest.raises(ConfigError, match="cannot be shared with peers"):
            _peer.record(s, "memory://peer/x")
        rec = _peer.Record("memory://peer/x", None, 1, content_hash(b"x"), 0.0, b"x")
        with pytest.raises(ConfigError, match="cannot be shared with peers"):
            _peer.ingest(s, rec)
