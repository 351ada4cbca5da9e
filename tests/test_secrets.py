"""Canary secrets never reach reprs, logs (mlstore's or the SDKs' at DEBUG), exception
text, tracebacks or pickles — on S3, GCS and Azure, against their real emulators."""

from __future__ import annotations

import logging
import pickle
import traceback
import uuid
from collections.abc import Callable
from typing import Any

import fsspec
import pytest

import mlstore
from mlstore import Store


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
