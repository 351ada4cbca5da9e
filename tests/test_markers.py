"""Folder markers: zero-byte objects whose key ends with ``/``.

The S3 console, Hadoop and Spark, and many sync tools create one for every "folder"
(``data/``, ``data/sub/``); GCS's console and Azure's tools do the same. They are
directories, never files: ``find`` does not list them, ``ls`` shows them as
directories (and not the listed directory itself), and ``cp -r`` of a tree that has
them copies its files. The markers are made on each real emulator with its own SDK or
API, as the tools that make them do.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

import mlstore
from mlstore.cli import main as cli

# The tree every test builds: files, and a marker for each folder (one folder empty).
FILES = {"data/a.txt": b"a", "data/sub/b.txt": b"bb"}
MARKERS = ("data/", "data/sub/", "data/empty/")

Put = Callable[[str, bytes], None]


def s3_put(options: dict[str, object], bucket: str) -> Put:
    import boto3

    client = boto3.client("s3", endpoint_url=str(options["endpoint_url"]), region_name="us-east-1")
    return lambda key, body: client.put_object(Bucket=bucket, Key=key, Body=body)


def gcs_put(options: dict[str, object], bucket: str) -> Put:
    def put(key: str, body: bytes) -> None:
        query = urllib.parse.urlencode({"uploadType": "media", "name": key})
        url = f"{options['endpoint_url']}/upload/storage/v1/b/{bucket}/o?{query}"
        request = urllib.request.Request(url, data=body, method="POST")
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert json.load(answer)["name"] == key

    return put


def az_put(connection_string: str, container: str) -> Put:
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(connection_string)
    return lambda key, body: service.get_blob_client(container, key).upload_blob(body)


@pytest.fixture(params=["s3", "gs", "az"])
def tree(request: pytest.FixtureRequest) -> tuple[mlstore.Store, str]:
    """A Store and the URL of a ``data/`` tree with folder markers, on each cloud."""
    cloud = request.param
    if cloud == "s3":
        options = request.getfixturevalue("s3_options")
        bucket = request.getfixturevalue("s3_bucket")
        put = s3_put(options, bucket)
    elif cloud == "gs":
        options = request.getfixturevalue("gcs_options")
        bucket = request.getfixturevalue("gcs_bucket")
        put = gcs_put(options, bucket)
    else:
        options = request.getfixturevalue("az_options")
        bucket = request.getfixturevalue("az_container")
        put = az_put(request.getfixturevalue("az_connection_string"), bucket)
    for key in MARKERS:
        put(key, b"")
    for key, body in FILES.items():
        put(key, body)
    store = mlstore.Store(options={cloud: options})
    request.addfinalizer(store.close)
    return store, f"{cloud}://{bucket}/data"


def test_find_lists_files_not_markers(tree: tuple[mlstore.Store, str]) -> None:
    store, root = tree
    assert store.find(root) == [f"{root}/a.txt", f"{root}/sub/b.txt"]


def test_ls_shows_markers_as_directories(tree: tuple[mlstore.Store, str]) -> None:
    store, root = tree
    entries = {str(e.url): e.type for e in store.ls(root, detail=True)}
    assert entries == {
        f"{root}/a.txt": "file",
        f"{root}/empty": "directory",
        f"{root}/sub": "directory",
    }
    assert store.info(f"{root}/empty").is_dir
    assert store.glob(f"{root}/**/*.txt") == [f"{root}/a.txt", f"{root}/sub/b.txt"]


def test_a_tree_with_markers_copies_to_a_local_directory(
    tree: tuple[mlstore.Store, str], tmp_path: Path
) -> None:
    store, root = tree
    store.copy(root, str(tmp_path / "copy"), recursive=True)
    copied = {
        str(p.relative_to(tmp_path / "copy")): p.read_bytes()
        for p in (tmp_path / "copy").rglob("*")
        if p.is_file()
    }
    assert copied == {"a.txt": b"a", "sub/b.txt": b"bb"}


def test_the_cli_copies_a_tree_with_markers(
    s3_options: dict[str, object], s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put = s3_put(s3_options, s3_bucket)
    for key in MARKERS:
        put(key, b"")
    for key, body in FILES.items():
        put(key, body)
    monkeypatch.setenv("MLSTORE_S3_ENDPOINT_URL", str(s3_options["endpoint_url"]))
    assert cli(["cp", "-r", f"s3://{s3_bucket}/data", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "sub" / "b.txt").read_bytes() == b"bb"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", "sub"]
