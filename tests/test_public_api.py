"""The curated public surface of ``import mlstore``, and what importing it costs."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

import mlstore

# Names that the design page, the docs and the examples rely on.
DOCUMENTED = {
    "read_bytes",
    "write_bytes",
    "open",
    "ls",
    "info",
    "exists",
    "glob",
    "rm",
    "copy",
    "stats",
    "read_many",
    "Store",
    "StoreConfig",
    "CacheConfig",
    "RetryPolicy",
    "HttpPolicy",
    "Stats",
    "MlstoreError",
    "NotFoundError",
    "PermissionDeniedError",
    "PreconditionFailedError",
    "IntegrityError",
    "ConfigError",
    "TransientError",
    "ThrottledError",
    "StorageTimeoutError",
    "ConnectionLostError",
    "UnsupportedOperation",
}

HEAVY = [
    "s3fs",
    "gcsfs",
    "adlfs",
    "obstore",
    "boto3",
    "botocore",
    "aiobotocore",
    "torch",
    "urllib3",
    "pyarrow",
]


@pytest.mark.parametrize("name", mlstore.__all__)
def test_every_exported_name_exists(name: str) -> None:
    assert hasattr(mlstore, name)


def test_exports_are_unique_and_cover_the_documented_api() -> None:
    assert len(set(mlstore.__all__)) == len(mlstore.__all__)
    assert set(mlstore.__all__) >= DOCUMENTED


@pytest.mark.parametrize("name", [n for n in mlstore.__all__ if n != "__version__"])
def test_every_exported_name_is_documented(name: str) -> None:
    assert (getattr(mlstore, name).__doc__ or "").strip(), f"mlstore.{name} has no docstring"


def test_star_import_gives_exactly_the_exports() -> None:
    namespace: dict[str, object] = {}
    exec("from mlstore import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(mlstore.__all__)


def _modules_after(code: str, home: pathlib.Path) -> dict[str, bool]:
    """Which of HEAVY are imported after running ``code`` in a fresh interpreter."""
    script = (
        f"import sys, json\n{code}\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), "MLSTORE_CACHE_DIR": str(home / "c")},
    )
    loaded: dict[str, bool] = json.loads(out.stdout.strip().splitlines()[-1])
    return loaded


def test_import_loads_no_cloud_sdk_torch_or_http_client(tmp_path: pathlib.Path) -> None:
    loaded = _modules_after("import mlstore", tmp_path)
    assert [m for m, yes in loaded.items() if yes] == []


def test_local_and_memory_use_load_no_cloud_sdk_or_http_client(tmp_path: pathlib.Path) -> None:
    loaded = _modules_after(
        "import mlstore, tempfile, os\n"
        "mlstore.write_bytes('memory://api/x', b'x')\n"
        "assert mlstore.read_bytes('memory://api/x') == b'x'\n"
        "d = tempfile.mkdtemp()\n"
        "mlstore.write_bytes(os.path.join(d, 'y'), b'y')\n"
        "assert mlstore.ls(d) == ['file://' + os.path.join(d, 'y')]\n"
        "m = mlstore.Manifest.build(d)\n"
        "m.save(os.path.join(d, 'm.jsonl'))\n"
        "assert mlstore.Manifest.load(os.path.join(d, 'm.jsonl')).read(0) == b'y'",
        tmp_path,
    )
    assert [m for m, yes in loaded.items() if yes] == []


def test_http_client_loads_when_the_http_backend_is_used(tmp_path: pathlib.Path) -> None:
    # The other half of the check above: urllib3 arrives with the http backend.
    code = (
        "import mlstore, socket\n"
        "s = socket.socket()\n"
        "s.bind(('127.0.0.1', 0))  # bound, never listening: the request is refused\n"
        "try:\n"
        "    mlstore.exists(f'http://127.0.0.1:{s.getsockname()[1]}/x')\n"
        "except mlstore.MlstoreError:\n"
        "    pass"
    )
    loaded = _modules_after(code, tmp_path)
    assert loaded["urllib3"] is True
    assert loaded["boto3"] is False
