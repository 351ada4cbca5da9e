"""``mlstore sync`` and ``mlstore cp -r --skip-existing -j N``, run as the real program
against the S3 emulator: what they print (a summary line, or JSON that parses back),
what they send, and their error exits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mlstore
from tests.test_cli_commands import cli, config_for, ok, one_line_error


def tree(root: Path, n: int = 6) -> dict[str, bytes]:
    files = {f"part-{i}.bin": bytes([i]) * (100 + i) for i in range(n)}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


@pytest.mark.s3
def test_sync_prints_a_summary_then_sends_nothing_the_second_time(
    s3_options: dict[str, object], s3_bucket: str, tmp_path: Path
) -> None:
    env = config_for(tmp_path, str(s3_options["endpoint_url"]))
    files = tree(tmp_path / "src")
    dst = f"s3://{s3_bucket}/mirror"
    first = ok(cli("sync", str(tmp_path / "src"), dst, env=env))
    assert first.strip() == "copied 6 objects (615 B), 0 already there (0 B)"
    again = json.loads(ok(cli("sync", "--json", str(tmp_path / "src"), dst, env=env)))
    assert again["copied"] == [] and again["skipped"] == len(files) and again["deleted"] == []
    with mlstore.Store(options={"s3": s3_options}, cache={"enabled": False}) as store:
        assert {u.rsplit("/", 1)[1]: store.read_bytes(u) for u in store.find(dst)} == files


@pytest.mark.s3
def test_sync_dry_run_and_delete(
    s3_options: dict[str, object], s3_bucket: str, tmp_path: Path
) -> None:
    env = config_for(tmp_path, str(s3_options["endpoint_url"]))
    src, dst = tmp_path / "src", f"s3://{s3_bucket}/mirror2"
    tree(src)
    ok(cli("sync", str(src), dst, env=env))
    (src / "part-0.bin").unlink()
    (src / "part-1.bin").write_bytes(b"changed")

    planned = json.loads(ok(cli("sync", "--dry-run", "--delete", "--json", str(src), dst, env=env)))
    assert planned["dry_run"] is True
    assert planned["copied"] == [f"{dst}/part-1.bin"]
    assert planned["deleted"] == [f"{dst}/part-0.bin"]
    with mlstore.Store(options={"s3": s3_options}, cache={"enabled": False}) as store:
        assert store.exists(f"{dst}/part-0.bin")  # the dry run changed nothing

    out = ok(cli("sync", "--delete", "-v", str(src), dst, env=env))
    assert f"deleted {dst}/part-0.bin" in out and f"{dst}/part-1.bin" in out
    assert out.strip().splitlines()[-1].startswith("copied 1 objects")
    with mlstore.Store(options={"s3": s3_options}, cache={"enabled": False}) as store:
        assert not store.exists(f"{dst}/part-0.bin")
        assert store.read_bytes(f"{dst}/part-1.bin") == b"changed"


@pytest.mark.s3
def test_cp_skip_existing_finishes_a_copy(
    s3_options: dict[str, object], s3_bucket: str, tmp_path: Path
) -> None:
    env = config_for(tmp_path, str(s3_options["endpoint_url"]))
    src, dst = tmp_path / "src", f"s3://{s3_bucket}/copied"
    tree(src)
    ok(cli("cp", "-r", "-j", "4", str(src), dst, env=env))
    (src / "part-9.bin").write_bytes(b"one more")
    out = ok(cli("cp", "-r", "--skip-existing", str(src), dst, env=env))
    assert out.strip() == "copied 1 objects (8 B), 6 already there (615 B)"


def test_sync_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    one_line_error(cli("sync", str(tmp_path), str(tmp_path / "a")), "one is inside the other")
    one_line_error(cli("sync", str(tmp_path / "missing"), str(tmp_path / "b")), "missing")
    one_line_error(
        cli("cp", "-r", "-j", "0", str(tmp_path / "a"), str(tmp_path / "c")), "max_workers"
    )
