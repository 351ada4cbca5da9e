"""Parsing and normalising URLs, and resolving mounts."""

from __future__ import annotations

import os
import pathlib

import pytest

import mlstore
from mlstore.errors import ConfigError, PermissionDeniedError
from mlstore.url import SCHEMES, URL, parse_url, resolve_mount


@pytest.mark.parametrize(
    ("text", "protocol", "bucket", "path", "canonical"),
    [
        ("s3://bucket/a/b.bin", "s3", "bucket", "a/b.bin", "s3://bucket/a/b.bin"),
        ("s3a://bucket/a/b.bin", "s3", "bucket", "a/b.bin", "s3://bucket/a/b.bin"),
        ("S3://bucket/key", "s3", "bucket", "key", "s3://bucket/key"),
        ("s3://bucket", "s3", "bucket", "", "s3://bucket"),
        ("s3://bucket/", "s3", "bucket", "", "s3://bucket"),
        ("s3://bucket/dir/", "s3", "bucket", "dir/", "s3://bucket/dir/"),
        ("gs://bkt/x", "gs", "bkt", "x", "gs://bkt/x"),
        ("gcs://bkt/x", "gs", "bkt", "x", "gs://bkt/x"),
        ("az://container/k/v", "az", "container", "k/v", "az://container/k/v"),
        ("abfs://container/k", "az", "container", "k", "az://container/k"),
        (
            "abfss://container@acct.dfs.core.windows.net/k",
            "az",
            "container",
            "k",
            "az://container/k",
        ),
        ("memory://a/b", "memory", "", "a/b", "memory://a/b"),
        ("memory:///a/b", "memory", "", "a/b", "memory://a/b"),
        ("https://host.example/p/q.bin", "https", "host.example", "/p/q.bin", None),
        ("http://127.0.0.1:8080/p?x=1&y=2", "http", "127.0.0.1:8080", "/p?x=1&y=2", None),
        ("https://host.example", "https", "host.example", "/", "https://host.example/"),
        ("mlstore://imagenet/train/0.jpg", "mlstore", "imagenet", "train/0.jpg", None),
        ("file:///tmp/x.bin", "file", "", "/tmp/x.bin", "file:///tmp/x.bin"),
        ("file://localhost/tmp/x.bin", "file", "", "/tmp/x.bin", "file:///tmp/x.bin"),
        ("local:///tmp/x.bin", "file", "", "/tmp/x.bin", "file:///tmp/x.bin"),
        ("/tmp/x.bin", "file", "", "/tmp/x.bin", "file:///tmp/x.bin"),
        ("/tmp//a///b", "file", "", "/tmp/a/b", "file:///tmp/a/b"),
    ],
)
def test_parse_and_normalise(
    text: str, protocol: str, bucket: str, path: str, canonical: str | None
) -> None:
    url = parse_url(text)
    assert (url.protocol, url.bucket, url.path) == (protocol, bucket, path)
    assert str(url) == (canonical or text)
    # normalising twice changes nothing
    assert parse_url(str(url)) == url


@pytest.mark.parametrize(
    ("text", "path"),
    [
        # Object keys are data (issue 11, item 26): "a//b" is another object than "a/b".
        ("s3://bucket//a///b", "/a///b"),
        ("gs://bucket/a//b/", "a//b/"),
        ("mlstore://ds//train//0.jpg", "/train//0.jpg"),
        # memory:// paths are fsspec memory file system paths, which fold slashes.
        ("memory://x//y", "x/y"),
    ],
)
def test_slashes_of_object_keys_are_kept(text: str, path: str) -> None:
    assert parse_url(text).path == path


def test_relative_path_becomes_absolute(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_url("data/x.bin") == URL("file", "", str(tmp_path / "data" / "x.bin"))
    assert parse_url("./x.bin") == URL("file", "", str(tmp_path / "x.bin"))
    assert parse_url("file://relative/x") == URL("file", "", str(tmp_path / "relative" / "x"))


def test_home_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_url("~/x.bin").path == str(tmp_path / "x.bin")
    assert parse_url("file://~/x.bin").path == str(tmp_path / "x.bin")


def test_path_objects_are_accepted(tmp_path: pathlib.Path) -> None:
    assert parse_url(tmp_path / "a") == URL("file", "", str(tmp_path / "a"))


def test_file_urls_are_taken_literally(tmp_path: pathlib.Path) -> None:
    # A file called "a%20b" lists as file://.../a%20b and must read back from that URL.
    url = parse_url(f"file://{tmp_path}/a%20b")
    assert url.path == f"{tmp_path}/a%20b"
    assert parse_url(str(url)) == url


def test_url_objects_pass_through() -> None:
    url = parse_url("s3://bucket/k")
    assert parse_url(url) is url


def test_join_and_name() -> None:
    assert parse_url("s3://b1/a").join("x", "y/") == parse_url("s3://b1/a/x/y")
    assert parse_url("s3://b1").join("x") == parse_url("s3://b1/x")
    assert parse_url("/tmp/a").join("b/c") == parse_url("/tmp/a/b/c")
    assert parse_url("s3://b1/a/b.bin").name == "b.bin"
    assert parse_url("s3://b1/a/dir/").name == "dir"


def test_repr_hides_credentials() -> None:
    url = parse_url("https://user:pw@host/a?sig=S3CR3T")
    assert "S3CR3T" not in repr(url)
    assert "pw" not in repr(url)


def test_unknown_scheme_lists_supported_ones() -> None:
    with pytest.raises(ConfigError) as info:
        parse_url("ftp://host/file")
    message = str(info.value)
    assert "'ftp'" in message
    for scheme in SCHEMES:
        assert f"{scheme}://" in message
    assert info.value.url == "ftp://host/file"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("s3:///key", "no bucket"),
        ("s3://", "no bucket"),
        ("gs:///k", "no bucket"),
        ("mlstore:///x", "no mount name"),
        ("s3://bucket/a\x00b", "NUL"),
        ("/tmp/a\x00b", "NUL"),
        ("s3://b/k", "not a valid bucket"),
        ("s3://bad bucket/k", "not a valid bucket"),
        ("s3://user@bucket/k", "not a valid bucket"),
        ("http://host:port/x", "malformed"),
        ("http://host:99999/x", "malformed"),
        ("https:///path", "needs a host"),
        ("mlstore::s3://bucket/k", "chained"),
    ],
)
def test_malformed_urls(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_url(text)


def test_non_string_is_refused() -> None:
    with pytest.raises(ConfigError, match="int"):
        parse_url(5)  # type: ignore[arg-type]


# ------------------------------------------------------------------ mounts


def test_mount_resolves_to_its_replicas_in_order() -> None:
    store = mlstore.Store(mounts={"imagenet": ["s3://bucket-a/imagenet/", "gs://bucket-b/in"]})
    assert store.resolve("mlstore://imagenet/train/0.jpg") == [
        parse_url("s3://bucket-a/imagenet/train/0.jpg"),
        parse_url("gs://bucket-b/in/train/0.jpg"),
    ]
    assert store.resolve("mlstore://imagenet") == [
        parse_url("s3://bucket-a/imagenet"),
        parse_url("gs://bucket-b/in"),
    ]


def test_single_string_mount(tmp_path: pathlib.Path) -> None:
    store = mlstore.Store(mounts={"local": str(tmp_path)})
    assert store.resolve("mlstore://local/a/b") == [URL("file", "", str(tmp_path / "a" / "b"))]


def test_physical_urls_resolve_to_themselves() -> None:
    assert mlstore.Store().resolve("s3://bucket/k") == [parse_url("s3://bucket/k")]


def test_unknown_mount_lists_known_ones() -> None:
    store = mlstore.Store(mounts={"alpha": "memory://a", "beta": "memory://b"})
    with pytest.raises(ConfigError, match=r"unknown mount 'gamma'.*alpha, beta"):
        store.resolve("mlstore://gamma/x")


def test_unknown_mount_without_any_mounts() -> None:
    with pytest.raises(ConfigError, match="none configured"):
        mlstore.Store().read_bytes("mlstore://ds/x")


def test_mount_pointing_at_a_mount_is_refused() -> None:
    with pytest.raises(ConfigError, match="another mount"):
        mlstore.Store(mounts={"a": "memory://a", "b": "mlstore://a/sub"})


def test_dotdot_cannot_leave_a_mount(tmp_path: pathlib.Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"outside")
    (tmp_path / "ds").mkdir()
    store = mlstore.Store(mounts={"ds": str(tmp_path / "ds")})
    with pytest.raises(PermissionDeniedError, match=r"\.\."):
        store.read_bytes("mlstore://ds/../secret.txt")
    with pytest.raises(PermissionDeniedError):
        store.write_bytes("mlstore://ds/a/../../escaped", b"x")
    assert not os.path.exists(tmp_path / "escaped")


@pytest.mark.parametrize(
    "path",
    [
        "%2e%2e/%2e%2e/private/x",
        "%2E%2E/private/x",
        "a/.%2e/.%2E/private/x",
        "%2e./private/x",
        "..%2f..%2fprivate/x",
        "%2e%2e%2F%2e%2e%2Fprivate%2Fx",
        "a%2f..%2f..%2fx",
        "..%5c..%5cprivate/x",
        "..%5C%2e%2e%5Cx",
        "a\\..\\..\\x",
        "%252e%252e/%252e%252e/private/x",  # decoded twice by a proxy, then a server
    ],
)
@pytest.mark.parametrize("prefix", ["https://example.com/pub/ds", "memory://ds", "s3://bkt/ds"])
def test_encoded_dot_segments_cannot_leave_a_mount(prefix: str, path: str) -> None:
    url = parse_url(f"mlstore://ds/{path}")
    with pytest.raises(PermissionDeniedError, match=r"\.\.") as err:
        resolve_mount(url, {"ds": [prefix]})
    assert f"mlstore://ds/{path}" in str(err.value)


@pytest.mark.parametrize(
    "path", ["a%20b", "v1%2e2/x", "...", "..x/y", "x../y", "%2e/y", "a%2fb", "x%5cy"]
)
def test_encoded_names_that_stay_in_the_mount_resolve(path: str) -> None:
    url = parse_url(f"mlstore://ds/{path}")
    assert resolve_mount(url, {"ds": ["https://example.com/pub/ds"]}) == [
        parse_url(f"https://example.com/pub/ds/{path}")
    ]
