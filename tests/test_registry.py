"""The backend registry: lazy imports, install hints, custom backends."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mlstore


@pytest.mark.parametrize(
    ("protocol", "module", "extra"),
    [("s3", "s3fs", "s3"), ("gs", "gcsfs", "gcs"), ("az", "adlfs", "azure")],
)
def test_missing_sdk_is_a_config_error_with_an_install_hint(
    protocol: str, module: str, extra: str
) -> None:
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "import mlstore\n"
        "try:\n"
        f"    mlstore.Store().read_bytes('{protocol}://bucket/key')\n"
        "except mlstore.ConfigError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert f"pip install 'mlstore[{extra}]'" in out
    assert module in out


def test_a_registered_backend_serves_its_protocol(mem_root: str) -> None:
    from mlstore.backends.memory import MemoryBackend

    class Shouting(MemoryBackend):
        def read(self, url, start=None, end=None, version=None):  # type: ignore[no-untyped-def]
            return super().read(url, start, end, version).upper()

    mlstore.register_backend("memory", Shouting)
    try:
        with mlstore.Store() as store:
            store.write_bytes(f"{mem_root}/x.txt", b"quiet")
            assert store.read_bytes(f"{mem_root}/x.txt") == b"QUIET"
    finally:
        mlstore.register_backend("memory", "mlstore.backends.memory:MemoryBackend")


def test_unknown_protocol_in_registry_is_a_config_error() -> None:
    from mlstore.backends.base import get_backend_class

    with pytest.raises(mlstore.ConfigError, match="no backend is registered"):
        get_backend_class("ftp")
