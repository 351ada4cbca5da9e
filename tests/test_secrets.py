"""Canary secrets never reach reprs, logs (mlstore's or the SDKs' at DEBUG), exception
text, tracebacks or pickles — on S3, GCS and Azure, against their real emulators."""

from __future__ import annotations

import logging
import os
import pickle
import sqlite3
import stat
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import pytest

import mlstore
from mlstore import Store

MiB = 1024 * 1024


def exercise(store: Store, root: str) -> list[BaseException]:
    """Every kind of call a user makes, including failing ones; returns the errors."""
    errors: list[BaseException] = []
    store.write_bytes(f"{root}/a.bin", b"payload" * 100)
    with store.open(f"{root}/b.txt", "w") as fh:
        fh.write("text")
    assert store.read_bytes(f"{root}/a.bin", 3, 30) == (b"payload" * 100)[3:30]
    with store.open(f"{root}/a.bin") as fh:
        fh.seek(10)
        fh.read(10)
        repr(fh)
    repr(store.info(f"{root}/a.bin"))
    store.ls(root, detail=True)
    store.find(root)
    for bad in (f"{root}/missing.bin", f"{root}/missing/"):
        try:
            store.read_bytes(bad)
        except mlstore.MlstoreError as exc:
            errors.append(exc)
    try:
        with store.open(f"{root}/a.bin") as fh:
            fh.read(5)
            store.write_bytes(f"{root}/a.bin", b"changed under the reader")
            fh.read()
    except mlstore.MlstoreError as exc:
        errors.append(exc)
    store.rm(f"{root}/b.txt")
    return errors


def assert_no_canary(
    canaries: list[str], store: Store, errors: list[BaseException], logs: str
) -> None:
    views: dict[str, str] = {
        "repr(store)": repr(store),
        "str(store)": str(store),
        "repr(store.config)": repr(store.config),
        "stats": str(store.stats()),
        "logs": logs,
    }
    for proto, backend in store._runtime.get().calls.built.items():
        views[f"repr(backend {proto})"] = repr(backend)
    for i, err in enumerate(errors):
        views[f"error {i} str"] = str(err)
        views[f"error {i} repr"] = repr(err)
        views[f"error {i} traceback"] = "".join(traceback.format_exception(err))
    pickled = pickle.dumps(store)
    for canary in canaries:
        for where, text in views.items():
            assert canary not in text, f"canary {canary[:6]}... leaked into {where}"
        assert canary.encode() not in pickled, "canary leaked into pickle.dumps(store)"


def run_canary(
    caplog: pytest.LogCaptureFixture,
    make_store: Callable[[], Store],
    root: str,
    canaries: list[str],
    fs_kwargs: dict[str, Any],
) -> None:
    with caplog.at_level(logging.DEBUG):  # every logger, the SDKs' included
        store = make_store()
        errors = exercise(store, root)
        fs = fsspec.filesystem("mlstore", **fs_kwargs)
        fs_blob = pickle.dumps(fs)
        fs_repr = repr(fs)
    assert errors, "the failing calls did fail"
    assert caplog.records, "DEBUG logging was captured"
    assert_no_canary(canaries, store, errors, caplog.text)
    for canary in canaries:
        assert canary.encode() not in fs_blob and canary not in fs_repr
    store.close()


@pytest.mark.s3
def test_s3_canary(
    caplog: pytest.LogCaptureFixture, s3_options: dict[str, object], s3_bucket: str
) -> None:
    key, secret, token = (
        "AKIACANARY" + uuid.uuid4().hex[:10].upper(),
        uuid.uuid4().hex * 2,
        ("CANARYTOKEN" + uuid.uuid4().hex),
    )
    opts = {**s3_options, "key": key, "secret": secret, "token": token}
    run_canary(
        caplog,
        lambda: Store(options={"s3": opts}),
        f"s3://{s3_bucket}/canary",
        [key, secret, token],
        {"options": {"s3": opts}},
    )


@pytest.mark.gcs
def test_gcs_canary(
    caplog: pytest.LogCaptureFixture, gcs_options: dict[str, object], gcs_bucket: str
) -> None:
    from google.oauth2.credentials import Credentials

    token = "ya29.CANARY" + uuid.uuid4().hex  # an OAuth access token; the emulator ignores it
    opts = {**gcs_options, "token": Credentials(token=token)}
    run_canary(
        caplog,
        lambda: Store(options={"gs": opts}),
        f"gs://{gcs_bucket}/canary",
        [token],
        {"options": {"gs": opts}},
    )


@pytest.mark.azure
def test_azure_canary(
    caplog: pytest.LogCaptureFixture, az_connection_string: str, az_container: str
) -> None:
    from tests.emulators import AZURITE_KEY

    opts = {"connection_string": az_connection_string}
    run_canary(
        caplog,
        lambda: Store(options={"az": opts}),
        f"az://{az_container}/canary",
        [AZURITE_KEY, az_connection_string],
        {"options": {"az": opts}},
    )


# ---------------------------------------------------------------- every exit of a URL


def _http_canary_urls(http_server: tuple[Any, str], size: int) -> tuple[str, list[str], bytes]:
    """A file on the test HTTP server and its URL with a canary password and signature."""
    server, root = http_server
    name = f"c-{uuid.uuid4().hex[:10]}.bin"
    data = os.urandom(size)
    Path(root, name).write_bytes(data)
    password, sig = "PWCANARY" + uuid.uuid4().hex, "SIGCANARY" + uuid.uuid4().hex
    url = f"http://user:{password}@127.0.0.1:{server.port}/{name}?sig={sig}&X-Amz-Date=1"
    return url, [password, sig], data


def _shown(fh: Any) -> str:
    """Everything a file object shows of itself: repr, str and its name/url attributes."""
    parts = [repr(fh), str(fh)]
    for attr in ("name", "url"):
        parts.append(str(getattr(fh, attr, "")))
    return " ".join(parts)


def test_read_files_show_no_url_credentials(http_server: tuple[Any, str], tmp_path: Path) -> None:
    """Every kind of read file the Store and fsspec hand out (fetched whole, in blocks,
    from the memory tier, from a blob file on disk, pinned and uncached, text) hides the
    URL's password and signature."""
    small_url, canaries, small = _http_canary_urls(http_server, 1000)
    big_url, big_canaries, big = _http_canary_urls(http_server, 5 * MiB)
    canaries += big_canaries
    cache = {"disk_dir": str(tmp_path / "cache"), "block_threshold": 64 * MiB}
    blocks = {"disk_dir": str(tmp_path / "blocks"), "block_threshold": MiB, "block_size": MiB}
    seen: dict[str, str] = {}
    with Store(cache=cache) as store:
        for label, url, data in (("small", small_url, small), ("big", big_url, big)):
            for attempt in ("miss", "hit"):
                with store.open(url) as fh:
                    assert fh.read() == data
                    seen[f"{label} {attempt}"] = _shown(fh)
            with store.open(url, "r", encoding="latin-1") as text:
                seen[f"{label} text"] = _shown(text) + _shown(text.buffer)
            with store.open(url, version=None, buffer_size=4096) as fh:
                seen[f"{label} buffered"] = _shown(fh)
            info = store.info(url)
            with store.open(url, version=info.version) as fh:  # pinned: uncached
                assert fh.read(10) == data[:10]
                seen[f"{label} pinned"] = _shown(fh) + _shown(getattr(fh, "raw", None))
    # a new process's view: served by a blob file of the disk tier
    with Store(cache=cache) as store, store.open(big_url) as fh:
        assert fh.read() == big
        seen["big disk"] = _shown(fh) + _shown(getattr(fh, "raw", None))
    # a large object read block by block
    with Store(cache=blocks) as store, store.open(big_url) as fh:
        assert fh.read() == big
        seen["big blocks"] = _shown(fh) + _shown(getattr(fh, "raw", None))
    fs = fsspec.filesystem("mlstore", cache=cache, skip_instance_cache=True)
    with fs.open("mlstore::" + small_url) as fh:
        assert fh.read() == small
        seen["fsspec"] = _shown(fh)
    with fsspec.open("mlstore::" + big_url, "rb") as fh:
        seen["fsspec chained"] = _shown(fh)
    leaked = sorted(w for w, text in seen.items() if any(c in text for c in canaries))
    assert not leaked, f"canaries leaked into the read files of {leaked}"


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_disk_index_stores_no_url_credentials(http_server: tuple[Any, str], tmp_path: Path) -> None:
    """Keys with credentials reach the disk tier as the redacted URL plus a keyed digest:
    the canaries are in no file of the cache directory, and two URLs that differ only in
    their signature still get entries of their own."""
    small_url, canaries, small = _http_canary_urls(http_server, 1000)
    big_url, big_canaries, big = _http_canary_urls(http_server, 3 * MiB)
    canaries += big_canaries
    other_sig = small_url.replace(canaries[1], "SIGCANARY" + uuid.uuid4().hex)
    canaries.append(other_sig.split("sig=")[1].split("&")[0])
    root = tmp_path / "cache"
    cache = {"disk_dir": str(root), "block_threshold": MiB, "block_size": MiB}
    with Store(cache=cache) as store:
        assert store.read_bytes(small_url) == small
        assert store.read_bytes(other_sig) == small
        assert store.read_bytes(big_url, 10, 2 * MiB + 5) == big[10 : 2 * MiB + 5]
        with store.open(big_url) as fh:
            assert fh.read() == big
    with Store(cache=cache) as store:  # served from the disk tier under the stored keys
        assert store.read_bytes(small_url) == small
        assert store.read_bytes(other_sig) == small
        assert store.stats().get("hits", "disk") == 2
    db = sqlite3.connect(str(root / "index.sqlite"))
    try:
        keys = [row[0] for row in db.execute("SELECT key FROM entries")]
    finally:
        db.close()
    assert len(keys) == 2 + 3, keys  # two whole objects, three blocks
    assert all("127.0.0.1" in k for k in keys), keys  # still readable by a person
    for path in _files_under(root):
        content = path.read_bytes()
        for canary in canaries:
            assert canary.encode() not in content, f"canary in {path.relative_to(root)}"


@pytest.mark.s3
def test_nested_client_kwargs_are_masked_in_sdk_debug_logs(
    caplog: pytest.LogCaptureFixture, s3_options: dict[str, object], s3_bucket: str
) -> None:
    """An access key id given inside ``client_kwargs`` is masked in botocore's DEBUG
    logs (its request headers carry it), and so is a credential nested deeper."""
    key_id = "AKIANESTED" + uuid.uuid4().hex[:10].upper()
    secret = "NESTEDSECRET" + uuid.uuid4().hex
    opts = {
        **s3_options,
        "client_kwargs": {"aws_access_key_id": key_id, "aws_secret_access_key": secret},
    }
    with caplog.at_level(logging.DEBUG), Store(options={"s3": opts}) as store:
        store.write_bytes(f"s3://{s3_bucket}/nested.bin", b"n" * 100)
        assert store.read_bytes(f"s3://{s3_bucket}/nested.bin") == b"n" * 100
    assert caplog.records and "nested.bin" in caplog.text
    for canary in (key_id, secret):
        assert canary not in caplog.text, f"{canary[:10]}... reached a DEBUG log"


def test_credentials_nested_under_any_name_are_masked(caplog: pytest.LogCaptureFixture) -> None:
    """``register_options`` finds credentials by name at any depth, and a mapping whose
    own name is a credential's (``credentials={...}``) has all its values masked."""
    from mlstore._util.redact import register_options

    deep, inner = "DEEPCANARY" + uuid.uuid4().hex, "INNERCANARY" + uuid.uuid4().hex
    register_options(
        {
            "client_kwargs": {"config": {"aws_access_key_id": deep}},
            "credentials": {"client_id": "x", "value": inner},
        }
    )
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("some.sdk").debug("headers %s and %s", deep, inner)
    assert deep not in caplog.text and inner not in caplog.text


def _modes(root: Path) -> dict[str, str]:
    """The paths under ``root`` (and itself) whose mode is not 0600 (files) or 0700
    (directories), with the mode they have."""
    wrong: dict[str, str] = {}
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        want = 0o700 if path.is_dir() else 0o600
        if mode != want:
            wrong[str(path.relative_to(root))] = oct(mode)
    return wrong


def test_every_cache_file_is_private(http_server: tuple[Any, str], tmp_path: Path) -> None:
    """After reads and writes under a permissive umask, every file mlstore made in the
    cache directory (index and its WAL, blobs, lock stripes) is 0600, every directory
    0700: nothing there is readable by another user."""
    old = os.umask(0o022)
    try:
        url, _, data = _http_canary_urls(http_server, 3 * MiB)
        root = tmp_path / "cache"
        cache = {"disk_dir": str(root), "block_threshold": MiB, "block_size": MiB}
        with Store(cache=cache) as store:
            assert store.read_bytes(url) == data
            store.write_bytes(str(tmp_path / "out.bin"), data)
            assert store.read_bytes(url, 5, 10) == data[5:10]
            assert {p.name for p in root.iterdir()} >= {"index.sqlite", "blobs", "locks"}
            assert list((root / "locks").iterdir())
            assert _modes(root) == {}  # while open: index.sqlite-wal and -shm too
        assert _modes(root) == {}
    finally:
        os.umask(old)


def test_a_cache_directory_others_can_read_is_made_private(
    http_server: tuple[Any, str], tmp_path: Path
) -> None:
    """A cache directory of one's own that others may read (0755, as mkdir makes it) is
    tightened to 0700, with the index a previous version left readable (0644)."""
    root = tmp_path / "cache"
    root.mkdir()
    root.chmod(0o755)
    (root / "blobs").mkdir()
    (root / "blobs").chmod(0o755)
    sqlite3.connect(str(root / "index.sqlite")).close()
    (root / "index.sqlite").chmod(0o644)
    url, _, data = _http_canary_urls(http_server, 1000)
    with Store(cache={"disk_dir": str(root)}) as store:
        assert store.read_bytes(url) == data
    assert _modes(root) == {}


def test_keys_an_older_index_stored_in_clear_are_deleted(tmp_path: Path) -> None:
    """An index written before keys were redacted loses its entries with credentials
    in clear, bytes and all, the first time it is opened; other entries stay."""
    from mlstore.cache.disk import DiskTier

    root = tmp_path / "cache"
    DiskTier(str(root), MiB).close()
    canary = "PWCANARY" + uuid.uuid4().hex
    db = sqlite3.connect(str(root / "index.sqlite"))
    db.execute("DELETE FROM meta WHERE name = 'keys_redacted'")  # as an older mlstore left it
    for key in (f"https://u:{canary}@h/x", f"https://h/y?sig={canary}\x00v\x001:0", "s3://b/a@b"):
        db.execute("INSERT INTO entries VALUES (?, NULL, 'h', 1, 0)", (key,))
    db.commit()
    db.close()
    DiskTier(str(root), MiB).close()
    db = sqlite3.connect(str(root / "index.sqlite"))
    try:
        assert [k for (k,) in db.execute("SELECT key FROM entries")] == ["s3://b/a@b"]
    finally:
        db.close()
    for path in _files_under(root):
        assert canary.encode() not in path.read_bytes(), path
