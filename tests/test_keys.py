"""Keys are data: mlstore never rewrites a key into another one.

Object stores allow any key, empty path segments included (``dir//key.txt`` is not
``dir/key.txt``), and tools make such keys (string concatenation of a prefix ending in
``/``). Folding them would list one object twice and read the wrong object's bytes.
"""

from __future__ import annotations

import pytest

import mlstore


def test_parsing_keeps_empty_segments_of_object_keys() -> None:
    assert mlstore.parse_url("s3://bkt/dir//key.txt").path == "dir//key.txt"
    assert mlstore.parse_url("gs://bkt/a///b").path == "a///b"
    assert mlstore.parse_url("az://cnt/x//y/").path == "x//y/"
    assert str(mlstore.parse_url("s3://bkt/dir//key.txt")) == "s3://bkt/dir//key.txt"
    assert mlstore.parse_url("s3://bkt/dir/key.txt") != mlstore.parse_url("s3://bkt/dir//key.txt")


@pytest.mark.parametrize("cloud", ["s3", "gs", "az"])
def test_keys_with_empty_segments_are_their_own_objects(
    cloud: str, request: pytest.FixtureRequest
) -> None:
    if cloud == "s3":
        options, bucket = (
            request.getfixturevalue("s3_options"),
            request.getfixturevalue("s3_bucket"),
        )
    elif cloud == "gs":
        options, bucket = (
            request.getfixturevalue("gcs_options"),
            request.getfixturevalue("gcs_bucket"),
        )
    else:
        options = request.getfixturevalue("az_options")
        bucket = request.getfixturevalue("az_container")
    root = f"{cloud}://{bucket}/dir"
    with mlstore.Store(options={cloud: options}) as store:
        store.write_bytes(f"{root}/key.txt", b"single")
        store.write_bytes(f"{root}//key.txt", b"double")
        assert store.read_bytes(f"{root}//key.txt") == b"double"
        assert store.read_bytes(f"{root}/key.txt") == b"single"
        found = store.find(root)
        assert sorted(found) == [f"{root}//key.txt", f"{root}/key.txt"]
        assert [store.read_bytes(u) for u in sorted(found)] == [b"double", b"single"]
        store.rm(f"{root}//key.txt")
        assert store.find(root) == [f"{root}/key.txt"]
