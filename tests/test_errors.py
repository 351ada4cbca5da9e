"""The exception hierarchy: builtin bases, attributes, messages, redaction, pickling."""

from __future__ import annotations

import io
import pickle

import pytest

import mlstore
from mlstore import errors
from mlstore.errors import redact_url


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.NotFoundError, FileNotFoundError),
        (errors.PermissionDeniedError, PermissionError),
        (errors.ConfigError, ValueError),
        (errors.StorageTimeoutError, TimeoutError),
        (errors.ConnectionLostError, ConnectionError),
        (errors.UnsupportedOperation, io.UnsupportedOperation),
        (errors.IsADirectoryError_, IsADirectoryError),
    ],
)
def test_errors_are_caught_by_the_builtin_of_the_same_meaning(
    cls: type[errors.MlstoreError], builtin: type[BaseException]
) -> None:
    with pytest.raises(builtin):
        raise cls("boom", url="s3://bucket/key", operation="read")
    with pytest.raises(errors.MlstoreError):
        raise cls("boom")


@pytest.mark.parametrize(
    "cls",
    [errors.ThrottledError, errors.StorageTimeoutError, errors.ConnectionLostError],
)
def test_transient_errors_share_one_base(cls: type[errors.MlstoreError]) -> None:
    assert issubclass(cls, errors.TransientError)


@pytest.mark.parametrize(
    "cls",
    [
        errors.NotFoundError,
        errors.PermissionDeniedError,
        errors.PreconditionFailedError,
        errors.IntegrityError,
        errors.ConfigError,
    ],
)
def test_permanent_errors_are_not_transient(cls: type[errors.MlstoreError]) -> None:
    assert not issubclass(cls, errors.TransientError)


def test_every_error_class_is_exported_from_the_package() -> None:
    for name in errors.__all__:
        if name in ("redact_url", "IsADirectoryError_"):
            continue
        assert getattr(mlstore, name) is getattr(errors, name)


def test_error_carries_url_and_operation_and_names_them() -> None:
    exc = errors.NotFoundError("no such object", url="s3://bucket/a/b.bin", operation="read")
    assert exc.url == "s3://bucket/a/b.bin"
    assert exc.operation == "read"
    assert "s3://bucket/a/b.bin" in str(exc)
    assert "read" in str(exc)
    assert "no such object" in str(exc)


def test_error_without_url_or_operation() -> None:
    exc = errors.ConfigError("bad setting")
    assert exc.url is None
    assert exc.operation is None
    assert str(exc) == "bad setting"


def test_error_message_never_holds_credentials_from_the_url() -> None:
    url = "https://alice:hunter2@example.com/data.bin?X-Amz-Signature=deadbeef&part=3"
    exc = errors.PermissionDeniedError("forbidden", url=url, operation="read")
    for text in (str(exc), repr(exc), exc.url or ""):
        assert "hunter2" not in text
        assert "alice" not in text
        assert "deadbeef" not in text
    assert "example.com/data.bin" in str(exc)
    assert "part=3" in str(exc)


@pytest.mark.parametrize(
    ("url", "hidden", "kept"),
    [
        ("https://user:pw@host/a", ["user", "pw"], ["host/a"]),
        ("https://host/a?sig=S3CR3T&x=1", ["S3CR3T"], ["x=1", "sig="]),
        ("https://host/a?signature=S3CR3T", ["S3CR3T"], ["signature="]),
        ("https://host/a?token=S3CR3T&page=2", ["S3CR3T"], ["page=2"]),
        ("https://host/a?access_token=S3CR3T", ["S3CR3T"], []),
        ("https://acct.blob.core.windows.net/c/k?sv=2022&sp=r&sig=S3CR3T", ["S3CR3T"], ["c/k"]),
        ("https://host/a?X-Amz-Credential=AKIA1&X-Amz-Signature=S3CR3T", ["S3CR3T", "AKIA1"], []),
        ("https://host/a?X-Goog-Signature=S3CR3T&X-Goog-Expires=60", ["S3CR3T"], ["Expires=60"]),
        ("https://host/a?SAS=S3CR3T", ["S3CR3T"], []),
    ],
)
def test_redact_url_hides_user_info_and_secret_query_values(
    url: str, hidden: list[str], kept: list[str]
) -> None:
    redacted = redact_url(url)
    for secret in hidden:
        assert secret not in redacted
    for part in kept:
        assert part in redacted


@pytest.mark.parametrize(
    "url", ["s3://bucket/key", "/local/path", "memory://a/b", "https://host/a?page=2"]
)
def test_redact_url_leaves_urls_without_secrets_alone(url: str) -> None:
    assert redact_url(url) == url


@pytest.mark.parametrize(
    "cls",
    [
        errors.MlstoreError,
        errors.NotFoundError,
        errors.PermissionDeniedError,
        errors.PreconditionFailedError,
        errors.IntegrityError,
        errors.ConfigError,
        errors.UnsupportedOperation,
        errors.IsADirectoryError_,
        errors.TransientError,
        errors.ThrottledError,
        errors.StorageTimeoutError,
        errors.ConnectionLostError,
    ],
)
def test_errors_pickle_round_trip_with_their_attributes(cls: type[errors.MlstoreError]) -> None:
    exc = cls("went wrong", url="gs://bucket/obj", operation="info")
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is cls
    assert copy.url == "gs://bucket/obj"
    assert copy.operation == "info"
    assert copy.reason == "went wrong"
    assert str(copy) == str(exc)


def test_retry_after_survives_pickling() -> None:
    # DataLoader workers send errors to the parent; the retry layer needs Retry-After.
    exc = errors.ThrottledError("slow down", url="s3://bucket/k", operation="read")
    exc.retry_after = 2.5
    copy = pickle.loads(pickle.dumps(exc))
    assert copy.retry_after == 2.5


def test_pickled_error_keeps_its_url_redacted() -> None:
    exc = errors.NotFoundError("gone", url="https://u:pw@h/x?sig=S3CR3T")
    data = pickle.dumps(exc)
    assert b"S3CR3T" not in data
    assert b"pw@" not in data
