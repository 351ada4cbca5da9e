"""``mlstore demo`` run as a user runs it: a subprocess with its own S3 emulator and
latency proxy. Each test checks what the demo reports and that nothing it started or
wrote outlives it (server process groups, temporary directory), however it ended."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import mlstore

pytestmark = [pytest.mark.s3, pytest.mark.slow]

SMALL = ["--objects", "24", "--size", "64KiB"]


@pytest.fixture(autouse=True)
def _needs_moto() -> None:
    if importlib.util.find_spec("moto") is None:
        message = "moto[server] is not installed (pip install 'mlstore[demo]')"
        if os.environ.get("MLSTORE_REQUIRE_EMULATORS") == "1":
            pytest.fail(message)
        pytest.skip(message)


def _demo(*args: str) -> list[str]:
    return [sys.executable, "-m", "mlstore", "demo", *args]


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _started(stderr: str) -> tuple[list[int], Path]:
    """The server PIDs and the temporary directory the demo announced on stderr."""
    pids = [int(p) for p in re.findall(r"\bpid (\d+)", stderr)]
    found = re.search(r"^working in (.+)$", stderr, re.MULTILINE)
    assert found, stderr
    return pids, Path(found.group(1))


def _until_uploading(env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """A demo big enough to still be uploading, started and read (stderr) until it says
    it is uploading; returns it and what it said."""
    proc = subprocess.Popen(
        _demo("--objects", "3000", "--size", "1KiB"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    seen = []
    assert proc.stderr is not None
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("uploading"):
            break
    return proc, "".join(seen)


def test_demo_reports_every_contender_and_cleans_up() -> None:
    done = subprocess.run(_demo(*SMALL, "--json"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)

    assert report["dataset"]["objects"] == 24
    assert report["dataset"]["duplicates"] == 1
    assert report["counted_by"] == "proxy"
    assert set(report["contenders"]) == {"mlstore", "s3fs", "simplecache"}
    for name, found in report["contenders"].items():
        assert len(found["epochs"]) == 2, name
        for epoch in found["epochs"]:
            assert epoch["verified"] is True
            assert epoch["samples"] == 24
            assert epoch["bytes_read"] == 24 * 64 * 1024
    first, second = report["contenders"]["mlstore"]["epochs"]
    assert first["gets"] >= 24 and first["bytes_fetched"] >= 24 * 64 * 1024
    assert second["gets"] == 0 and second["requests"] == 0
    assert first["dedupe_bytes_saved"] == 64 * 1024  # the one duplicate is stored once
    assert second["hit_ratio"]["memory"] + second["hit_ratio"]["disk"] == 1.0
    assert second["saved_usd"] > 0
    assert all(e["gets"] >= 24 for e in report["contenders"]["s3fs"]["epochs"])
    assert report["contenders"]["simplecache"]["epochs"][1]["gets"] == 0
    assert report["speedup_epoch2_vs_s3fs"] is not None

    assert sorted(report["servers"]) == ["proxy", "s3_emulator"]
    for pid in report["servers"].values():
        assert not _group_alive(pid)
    assert not Path(report["temp_dir"]).exists()


def test_demo_table_without_torch_keeps_its_cache_when_asked(tmp_path: Path) -> None:
    done = subprocess.run(
        _demo(*SMALL, "--no-torch", "--only", "mlstore,s3fs", "--keep"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    pids, tmp = _started(done.stderr)
    try:
        assert "speed-up epoch 2 vs s3fs:" in done.stdout
        assert "Store.read_many" in done.stdout
        assert "simplecache" not in done.stdout
        rows = [line.split() for line in done.stdout.splitlines()]
        mlstore_rows = [r for r in rows if r[:1] == ["mlstore"]]
        assert mlstore_rows and f"mlstore cache lives in {tmp}" in done.stdout
        assert (tmp / "mlstore-cache").is_dir()  # --keep
        assert len(pids) == 2 and not any(_group_alive(p) for p in pids)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def test_demo_against_a_bucket_leaves_nothing_there(s3_bucket: str, moto: Any) -> None:
    """``--url``: no server of its own; the dataset goes below the prefix and is gone
    afterwards; GETs are mlstore's own count, the peers' are not known (null)."""
    done = subprocess.run(
        _demo(*SMALL, "--json", "--url", f"s3://{s3_bucket}/runs", "--endpoint-url", moto.endpoint),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["servers"] == {} and report["counted_by"] == "mlstore"
    assert report["dataset"]["url"].startswith(f"s3://{s3_bucket}/runs/mlstore-demo-")
    first, second = report["contenders"]["mlstore"]["epochs"]
    assert first["gets"] == 24 and second["gets"] == 0
    assert report["contenders"]["s3fs"]["epochs"][0]["gets"] is None
    with mlstore.Store(options={"s3": {"endpoint_url": moto.endpoint}}) as store:
        assert store.find(f"s3://{s3_bucket}/") == []
    assert not Path(report["temp_dir"]).exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_the_servers_and_removes_the_temp_dir(signum: int) -> None:
    proc, seen = _until_uploading()
    proc.send_signal(signum)
    _, rest = proc.communicate(timeout=120)
    stderr = seen + rest
    assert proc.returncode == 130, stderr
    assert stderr.rstrip().endswith("mlstore: interrupted")
    pids, tmp = _started(stderr)
    assert len(pids) == 2
    assert not any(_group_alive(p) for p in pids)
    assert not tmp.exists()


def test_a_crashed_emulator_fails_the_demo_cleanly() -> None:
    proc, seen = _until_uploading({"MLSTORE_MAX_ATTEMPTS": "1"})
    pids, _ = _started(seen)
    os.killpg(pids[0], signal.SIGKILL)  # the S3 emulator dies as the upload starts
    out, rest = proc.communicate(timeout=120)
    stderr = seen + rest
    assert proc.returncode == 1, stderr
    assert stderr.rstrip().splitlines()[-1].startswith("mlstore: error: ")
    assert out == ""
    _, tmp = _started(stderr)
    assert not any(_group_alive(p) for p in pids)
    assert not tmp.exists()


def test_bytes_that_differ_from_the_upload_fail_the_demo() -> None:
    from mlstore.demo._run import _check, digest, make_dataset

    data = make_dataset(4, 100)
    want = [digest(data.blobs[name]) for name in data.names]
    _check("s3fs", 0, list(want), want)
    with pytest.raises(mlstore.IntegrityError, match=r"s3fs read wrong bytes in epoch 2: 1 of 4"):
        _check("s3fs", 1, [*want[:3], digest(b"not it")], want)
    with pytest.raises(mlstore.IntegrityError, match="4 of 4"):
        _check("mlstore", 1, want[:3], want)


def test_a_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlstore.demo import require

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "moto" else real(n))
    require(emulator=False)  # a real bucket needs no emulator
    extra = r'pip install "mlstore\[demo\]" \(missing: moto\)'
    with pytest.raises(mlstore.ConfigError, match=extra):
        require(emulator=True)


def test_help_explains_every_option() -> None:
    done = subprocess.run(_demo("--help"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for option in (
        "--objects", "--size", "--epochs", "--latency", "--workers", "--no-torch",
        "--only", "--keep", "--json", "--url", "--endpoint-url",
    ):  # fmt: skip
        assert option in done.stdout, option


def test_usage_errors_start_nothing() -> None:
    for args in (["--size", "lots"], ["--only", "s3fs,boto"], ["--url", "gs://b/p"]):
        done = subprocess.run(_demo(*args), capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, args
        assert done.stderr.startswith("mlstore: error: "), done.stderr
        assert "working in" not in done.stderr


def test_help_and_import_load_no_demo_dependency() -> None:
    code = (
        "import sys, mlstore, mlstore.cli as c\n"
        "try:\n    c.main(['demo', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('moto', 's3fs', 'torch', 'aiohttp') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
