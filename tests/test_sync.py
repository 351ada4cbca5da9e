"""``Store.sync``: a tree made to hold what another holds, sending only what differs,
resumable, with ``delete`` and ``dry_run``; and dedupe on write (``write_bytes`` that
sends nothing when the destination holds its content) and write-through.

S3 runs against moto through the counting, fault-injecting proxy: what was sent (PUTs,
DELETEs, GETs) is read from its request log. What the node sees afterwards is read in a
fresh process sharing the node cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from mlstore import ConfigError, PermissionDeniedError, Store
from mlstore.hashing import content_hash
from tests.conftest import run_child
from tests.emulators import ServerProcess
from tests.servers import proxy

MiB = 1024 * 1024


def files(n: int = 40) -> dict[str, bytes]:
    return {
        f"d{i % 3}/k{i:03d}.bin": hashlib.sha256(str(i).encode()).digest() * (1 + i % 4)
        for i in range(n)
    }


def write_local(root: pathlib.Path, tree: dict[str, bytes]) -> None:
    for rel, data in tree.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def sent(endpoint: str, method: str) -> list[str]:
    return [r["path"] for r in proxy.request_log(endpoint) if r["method"] == method]


@pytest.fixture
def s3(s3_bucket: str, s3_fault_proxy: ServerProcess, tmp_path: pathlib.Path) -> Iterator[Any]:
    """A Store through the proxy (its own node cache), the proxy's endpoint, the bucket."""
    with Store(
        options={"s3": {"endpoint_url": s3_fault_proxy.endpoint}},
        cache={"disk_dir": str(tmp_path / "cache")},
        max_workers=8,
    ) as store:
        yield store, s3_fault_proxy.endpoint, f"s3://{s3_bucket}"
        proxy.clear_faults(s3_fault_proxy.endpoint)
        for top in store.ls(f"s3://{s3_bucket}"):
            store.rm(top, recursive=True)


FRESH_READER = """
import json, os
from mlstore import NotFoundError, Store
spec = json.loads(os.environ["SPEC"])
out = {}
with Store(options={"s3": {"endpoint_url": spec["endpoint"]}},
           cache={"disk_dir": spec["cache_dir"]}) as store:
    for url in spec["urls"]:
        try:
            out[url] = store.read_bytes(url, version=spec.get("version")).hex()
        except NotFoundError:
            out[url] = None
print(json.dumps(out))
"""


def read_fresh(
    endpoint: str, cache_dir: pathlib.Path, urls: list[str], version: str | None = None
) -> dict[str, bytes | None]:
    """What a new process on this node reads at ``urls`` (``None``: not found)."""
    spec = {"endpoint": endpoint, "cache_dir": str(cache_dir), "urls": urls, "version": version}
    got = run_child(FRESH_READER, {"SPEC": json.dumps(spec)})
    assert isinstance(got, dict)
    return {url: None if value is None else bytes.fromhex(value) for url, value in got.items()}


# ------------------------------------------------------------------ sync


@pytest.mark.s3
def test_a_second_sync_sends_nothing_and_a_changed_tree_sends_only_its_changes(
    s3: Any, tmp_path: pathlib.Path
) -> None:
    store, endpoint, bucket = s3
    src, dst = tmp_path / "src", f"{bucket}/synced"
    tree = files()
    write_local(src, tree)

    first = store.sync(src, dst)
    assert sorted(first) == sorted(f"{dst}/{rel}" for rel in tree)
    assert first.copied_bytes == sum(map(len, tree.values())) and not first.skipped

    proxy.reset(endpoint)
    again = store.sync(src, dst)
    assert list(again) == [] and len(again.skipped) == len(tree)
    assert sent(endpoint, "PUT") == []  # proven the same: nothing sent again
    assert sent(endpoint, "HEAD") == []  # by the listed ETags (MD5s): no HEAD per object

    (src / "d0/k000.bin").write_bytes(b"changed, and longer than before")
    (src / "d1/new.bin").write_bytes(b"a new file")
    proxy.reset(endpoint)
    third = store.sync(src, dst)
    assert sorted(third) == [f"{dst}/d0/k000.bin", f"{dst}/d1/new.bin"]
    assert len(sent(endpoint, "PUT")) == 2
    assert store.read_bytes(f"{dst}/d0/k000.bin") == b"changed, and longer than before"


@pytest.mark.gcs
def test_a_gcs_tree_another_tool_wrote_resyncs_by_its_listed_base64_md5s(
    gcs_options: dict[str, object], gcs_bucket: str, tmp_path: pathlib.Path
) -> None:
    """Objects written without mlstore's hash (a plain upload, as gsutil makes): GCS lists
    their MD5s in base64, which prove equal content against the local files' MD5s, so
    syncing them down again costs the listing and nothing per object."""
    import urllib.parse
    import urllib.request

    tree = files(12)
    for rel, data in tree.items():  # a plain media upload: no metadata at all
        name = urllib.parse.quote(f"foreign/{rel}", safe="")
        upload = f"{gcs_options['endpoint_url']}/upload/storage/v1/b/{gcs_bucket}/o"
        req = urllib.request.Request(f"{upload}?uploadType=media&name={name}", data, method="POST")
        urllib.request.urlopen(req, timeout=30).close()
    src, dst = f"gs://{gcs_bucket}/foreign", tmp_path / "down"
    with Store(options={"gs": gcs_options}, cache={"enabled": False}) as store:
        assert store.info(f"{src}/d0/k000.bin").content_hash is None  # no mlstore metadata
        assert len(store.sync(src, dst)) == len(tree)
        before = store.stats()
        again = store.sync(src, dst)
        assert list(again) == [] and len(again.skipped) == len(tree)
        # what src is (one info) and its listing: nothing per object
        assert (store.stats() - before).get("requests", "gs") == 2
        (dst / "d0/k000.bin").write_bytes(b"x" * len(tree["d0/k000.bin"]))  # damaged copy
        assert [u.rsplit("/", 2)[-2:] for u in store.sync(src, dst)] == [["d0", "k000.bin"]]
    assert (dst / "d0/k000.bin").read_bytes() == tree["d0/k000.bin"]


@pytest.mark.s3
def test_same_size_other_content_is_copied_never_skipped(s3: Any, tmp_path: pathlib.Path) -> None:
    store, _, bucket = s3
    src, dst = tmp_path / "src", f"{bucket}/same-size"
    write_local(src, {"a.bin": b"A" * 100})
    store.sync(src, dst)
    (src / "a.bin").write_bytes(b"B" * 100)  # same size, same mtime granularity aside
    result = store.sync(src, dst)
    assert list(result) == [f"{dst}/a.bin"]
    assert store.read_bytes(f"{dst}/a.bin") == b"B" * 100


@pytest.mark.s3
def test_delete_removes_what_the_source_lacks_and_a_fresh_process_on_the_node_sees_it(
    s3: Any, tmp_path: pathlib.Path
) -> None:
    store, endpoint, bucket = s3
    src, dst = tmp_path / "src", f"{bucket}/mirror"
    tree = files(12)
    write_local(src, tree)
    store.sync(src, dst)
    urls = [f"{dst}/{rel}" for rel in tree]
    assert read_fresh(endpoint, tmp_path / "cache", urls) == {
        f"{dst}/{rel}": data for rel, data in tree.items()
    }  # the node cache now holds every object

    gone, changed = "d1/k001.bin", "d2/k002.bin"
    (src / gone).unlink()
    (src / changed).write_bytes(b"new bytes")
    result = store.sync(src, dst, delete=True)
    assert result.deleted == [f"{dst}/{gone}"] and result.deleted_bytes == len(tree[gone])
    assert list(result) == [f"{dst}/{changed}"]

    seen = read_fresh(endpoint, tmp_path / "cache", urls)
    assert seen[f"{dst}/{gone}"] is None  # not served from the node's old copy
    assert seen[f"{dst}/{changed}"] == b"new bytes"
    assert sorted(store.find(dst)) == sorted(u for u in urls if not u.endswith(gone))


@pytest.mark.s3
def test_a_dry_run_reports_what_a_real_run_does_and_changes_nothing(
    s3: Any, tmp_path: pathlib.Path
) -> None:
    store, endpoint, bucket = s3
    src, dst = tmp_path / "src", f"{bucket}/dry"
    write_local(src, files(10))
    store.sync(src, dst)
    (src / "d0/k000.bin").write_bytes(b"edited")
    (src / "d1/k001.bin").unlink()
    before = {u: store.read_bytes(u) for u in store.find(dst)}

    proxy.reset(endpoint)
    planned = store.sync(src, dst, delete=True, dry_run=True)
    assert planned.dry_run
    assert sent(endpoint, "PUT") == [] and sent(endpoint, "DELETE") == []
    assert {u: store.read_bytes(u) for u in store.find(dst)} == before

    done = store.sync(src, dst, delete=True)
    assert list(done) == list(planned) == [f"{dst}/d0/k000.bin"]
    assert done.deleted == planned.deleted == [f"{dst}/d1/k001.bin"]
    assert done.skipped == planned.skipped
    assert "would copy 1 objects" in planned.summary()


@pytest.mark.s3
def test_a_failed_sync_deletes_nothing_and_a_rerun_sends_only_the_rest(
    s3: Any, tmp_path: pathlib.Path
) -> None:
    store, endpoint, bucket = s3
    src, dst = tmp_path / "src", f"{bucket}/resume"
    tree = files(30)
    write_local(src, tree)
    store.write_bytes(f"{dst}/stale-extra.bin", b"not in the source")

    # the store refuses every PUT after the first 10 (a definite error: not retried)
    proxy.set_faults(endpoint, {"fault": "status", "status": 403, "method": "PUT", "skip": 10})
    with pytest.raises(PermissionDeniedError) as failed:
        store.sync(src, dst, delete=True, max_workers=1)
    assert dst in str(failed.value)
    assert store.exists(f"{dst}/stale-extra.bin")  # a failed sync never deletes
    proxy.clear_faults(endpoint)

    proxy.reset(endpoint)
    result = store.sync(src, dst, delete=True)
    assert len(sent(endpoint, "PUT")) == len(tree) - 10 == len(result)
    assert len(result.skipped) == 10 and result.deleted == [f"{dst}/stale-extra.bin"]
    assert {u[len(dst) + 1 :]: store.read_bytes(u) for u in store.find(dst)} == tree


def test_overlapping_trees_are_refused_before_anything_is_listed(tmp_path: pathlib.Path) -> None:
    with Store(cache={"enabled": False}) as store:
        for src, dst in [(tmp_path, tmp_path / "inside"), (tmp_path / "inside", tmp_path)]:
            with pytest.raises(ConfigError, match="one is inside the other"):
                store.sync(src, dst, delete=True)
        with pytest.raises(ConfigError, match="max_workers"):
            store.sync(tmp_path / "a", tmp_path / "b", max_workers=0)


def test_local_to_local_sync_with_delete(tmp_path: pathlib.Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_local(src, {"a": b"1", "sub/b": b"22"})
    write_local(dst, {"a": b"1", "sub/c": b"333"})
    with Store(cache={"enabled": False}) as store:
        result = store.sync(src, dst, delete=True)
    assert len(result) == 1 and result[0].endswith("/dst/sub/b")
    assert len(result.skipped) == 1 and result.skipped[0].endswith("/dst/a")
    assert len(result.deleted) == 1 and result.deleted[0].endswith("/dst/sub/c")
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()) == [
        "a",
        "sub/b",
    ]


# ------------------------------------------------------------------ dedupe on write


@pytest.mark.s3
def test_rewriting_the_same_large_content_sends_no_put_and_is_counted(s3: Any) -> None:
    store, endpoint, bucket = s3
    url, data = f"{bucket}/big.bin", os.urandom(9 * MiB)  # above the 8 MiB default
    store.write_bytes(url, data)
    proxy.reset(endpoint)
    before = store.stats()
    store.write_bytes(url, data)
    delta = store.stats() - before
    assert sent(endpoint, "PUT") == [] and sent(endpoint, "POST") == []
    assert delta["dedupe_uploads_skipped"] == 1 and delta["dedupe_bytes_skipped"] == len(data)
    assert delta.get("requests", "s3") == 1  # the one HEAD

    other = bytearray(data)
    other[-1] ^= 1  # same size, other content: sent
    store.write_bytes(url, bytes(other))
    assert store.read_bytes(url) == bytes(other)


@pytest.mark.s3
def test_small_writes_and_dedupe_false_always_send(s3: Any) -> None:
    store, endpoint, bucket = s3
    store.write_bytes(f"{bucket}/small", b"x" * 1000)
    proxy.reset(endpoint)
    store.write_bytes(f"{bucket}/small", b"x" * 1000)  # below the threshold: no HEAD first
    store.write_bytes(f"{bucket}/small", b"x" * 1000, dedupe=False)
    log = proxy.request_log(endpoint)
    assert [r["method"] for r in log] == ["PUT", "PUT"]
    store.write_bytes(f"{bucket}/small", b"x" * 1000, dedupe=True)  # asked for: skipped
    assert store.stats()["dedupe_uploads_skipped"] == 1


@pytest.mark.s3
def test_forged_hash_metadata_does_not_skip_a_write(s3: Any, s3_bucket: str) -> None:
    """Another tool wrote other bytes of the same size under metadata that names our
    content's hash: the store's own MD5 disagrees, so the write is sent."""
    import boto3

    store, endpoint, bucket = s3
    ours = os.urandom(9 * MiB)
    theirs = os.urandom(len(ours))
    client = boto3.client("s3", endpoint_url=endpoint)
    client.put_object(
        Bucket=s3_bucket, Key="forged", Body=theirs, Metadata={"mlstore-xxh3": content_hash(ours)}
    )
    assert store.info(f"{bucket}/forged").content_hash == content_hash(ours)
    store.write_bytes(f"{bucket}/forged", ours)
    assert store.stats()["dedupe_uploads_skipped"] == 0
    assert store.read_bytes(f"{bucket}/forged") == ours


@pytest.mark.s3
def test_write_through_leaves_the_bytes_for_the_next_reader_on_the_node(
    s3: Any, tmp_path: pathlib.Path
) -> None:
    """Kept as never checked: a pinned read needs no request, any other read asks for
    the current version first (so a newer write from elsewhere would be fetched)."""
    _, endpoint, bucket = s3
    cache = tmp_path / "wt-cache"
    url, data = f"{bucket}/written-through", os.urandom(300_000)
    with Store(
        options={"s3": {"endpoint_url": endpoint}},
        cache={"disk_dir": str(cache), "write_through": True},
    ) as writer:
        writer.write_bytes(url, data)
        version = writer.info(url).version
    proxy.reset(endpoint)
    assert read_fresh(endpoint, cache, [url], version=version) == {url: data}
    assert proxy.request_log(endpoint) == []  # a pinned read: no request at all
    assert read_fresh(endpoint, cache, [url]) == {url: data}
    assert [r["method"] for r in proxy.request_log(endpoint)] == ["HEAD"]  # checked, no GET


@pytest.mark.parametrize("cloud", ["s3", "gcs", "azure"])
def test_every_kind_of_write_records_the_content_hash_on_every_cloud(
    cloud: str, request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> None:
    """write_bytes, a streamed write, a multipart write and a copy in from local disk
    each leave mlstore's xxh3-128 in the object's metadata."""
    if cloud == "s3":
        opts = {"s3": request.getfixturevalue("s3_options")}
        prefix = f"s3://{request.getfixturevalue('s3_bucket')}"
    elif cloud == "gcs":
        opts = {"gs": request.getfixturevalue("gcs_options")}
        prefix = f"gs://{request.getfixturevalue('gcs_bucket')}"
    else:
        opts = {"az": request.getfixturevalue("az_options")}
        prefix = f"az://{request.getfixturevalue('az_container')}"
    local = tmp_path / "local.bin"
    local.write_bytes(b"from local disk")
    big = os.urandom(11 * MiB)
    with Store(
        options=opts,
        cache={"enabled": False},
        multipart_threshold=5 * MiB,
        multipart_part_size=5 * MiB,
    ) as store:
        store.write_bytes(f"{prefix}/whole", b"whole")
        with store.open(f"{prefix}/streamed", "wb") as fh:
            fh.write(b"streamed")
        store.write_bytes(f"{prefix}/multipart", big)
        store.copy(local, f"{prefix}/copied")
        expected = {
            "whole": b"whole",
            "streamed": b"streamed",
            "multipart": big,
            "copied": b"from local disk",
        }
        for name, data in expected.items():
            assert store.info(f"{prefix}/{name}").content_hash == content_hash(data), name


def test_recursive_copies_and_syncs_draw_a_bar_on_stderr_only_when_asked_off_a_terminal(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_local(tmp_path / "src", files(5))
    with Store(cache={"enabled": False}) as store:
        store.copy(tmp_path / "src", tmp_path / "quiet", recursive=True)  # not a terminal
        assert capsys.readouterr().err == ""
        store.copy(tmp_path / "src", tmp_path / "shown", recursive=True, progress=True)
        shown = capsys.readouterr()
        assert "copy: 100%" in shown.err and shown.out == ""
        store.sync(tmp_path / "src", tmp_path / "synced", progress=True)
        assert "sync: 100%" in capsys.readouterr().err
        seen: list[tuple[int, int]] = []
        store.sync(
            tmp_path / "src", tmp_path / "synced2", progress=lambda d, t: seen.append((d, t))
        )
        assert seen[-1][0] == seen[-1][1] > 0 and capsys.readouterr().err == ""
