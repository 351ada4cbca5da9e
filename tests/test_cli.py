"""The ``mlstore`` command, run in-process through ``main()`` and once as a real program."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlstore.cli import main
from mlstore.config import CacheConfig, HttpPolicy, RetryPolicy


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = main(list(argv), stdout=out)
    return status, out.getvalue()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"alpha\n")
    (src / "sub" / "b.bin").write_bytes(os.urandom(70_000))
    return src


def test_cp_recursive_copies_every_byte(tree: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    status, _ = run("cp", "-r", "--no-progress", str(tree), str(dst))
    assert status == 0
    assert (dst / "a.txt").read_bytes() == b"alpha\n"
    assert (dst / "sub" / "b.bin").read_bytes() == (tree / "sub" / "b.bin").read_bytes()


def test_cp_to_memory_and_back(tree: Path, tmp_path: Path, mem_root: str) -> None:
    assert run("cp", "-r", "--no-progress", str(tree), mem_root + "/copy")[0] == 0
    back = tmp_path / "back"
    assert run("cp", "-r", "--no-progress", mem_root + "/copy", str(back))[0] == 0
    assert (back / "sub" / "b.bin").read_bytes() == (tree / "sub" / "b.bin").read_bytes()


def test_cp_file_into_directory_keeps_its_name(tree: Path, tmp_path: Path) -> None:
    target = tmp_path / "into"
    target.mkdir()
    status, out = run("cp", "-v", "--no-progress", str(tree / "a.txt"), str(target))
    assert status == 0
    assert (target / "a.txt").read_bytes() == b"alpha\n"
    written, summary = out.strip().splitlines()
    assert written.endswith("/into/a.txt") and summary == "copied 1 objects (6 B)"


def test_cp_progress_reports_total(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _ = run("cp", "-r", "--progress", str(tree), str(tmp_path / "p"))
    assert status == 0
    captured = capsys.readouterr()
    assert "100%" in captured.err and "68.4k/68.4k" in captured.err  # the bar, on stderr only
    assert "%" not in captured.out


def test_ls_long_and_plain(tree: Path) -> None:
    status, out = run("ls", str(tree))
    assert status == 0
    assert out.splitlines() == [f"file://{tree}/a.txt", f"file://{tree}/sub/"]
    status, out = run("ls", "-l", "-H", str(tree))
    assert "6 B" in out and "file://" in out


def test_cat_writes_raw_bytes(tree: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    assert main(["cat", str(tree / "sub" / "b.bin")]) == 0
    assert capfdbinary.readouterr().out == (tree / "sub" / "b.bin").read_bytes()


def test_info_is_json(tree: Path) -> None:
    status, out = run("info", str(tree / "a.txt"))
    record = json.loads(out)
    assert status == 0
    assert record["size"] == 6 and record["type"] == "file" and record["version"]


def test_find_and_glob(tree: Path) -> None:
    assert run("find", str(tree))[1].splitlines() == [
        f"file://{tree}/a.txt",
        f"file://{tree}/sub/b.bin",
    ]
    assert run("glob", f"{tree}/**/*.bin")[1].splitlines() == [f"file://{tree}/sub/b.bin"]
    assert run("glob", f"{tree}/*.nothing")[0] == 1


def test_rm(tree: Path) -> None:
    assert run("rm", "-r", str(tree / "sub"))[0] == 0
    assert not (tree / "sub").exists()


def test_errors_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cat", str(tmp_path / "missing.bin")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mlstore: error: ") and "missing.bin" in err
    assert "Traceback" not in err
    assert main(["ls", "nope://bucket/x"]) == 1
    err = capsys.readouterr().err
    assert "unknown URL scheme 'nope'" in err and "s3://" in err


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["cp", "only-one-arg"])
    assert exc.value.code == 2


def test_config_lists_settings_without_secret_values(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = tmp_path / "mlstore.toml"
    cfg.write_text('[options.s3]\nsecret = "CANARY-SECRET-1"\nendpoint_url = "http://x"\n')
    monkeypatch.setenv("MLSTORE_CONFIG", str(cfg))
    monkeypatch.setenv("MLSTORE_MAX_ATTEMPTS", "7")
    status, out = run("config", "--env")
    assert status == 0
    assert "retry.max_attempts = 7" in out
    assert "options.s3: endpoint_url, secret" in out
    assert "CANARY-SECRET-1" not in out
    assert "MLSTORE_MAX_ATTEMPTS" in out


def test_config_lists_every_field_of_each_policy() -> None:
    status, out = run("config")
    assert status == 0
    lines = out.splitlines()
    for section, cls in (("cache", CacheConfig), ("retry", RetryPolicy), ("http", HttpPolicy)):
        shown = [ln.split(" = ")[0] for ln in lines if ln.startswith(section + ".")]
        assert shown == [f"{section}.{f.name}" for f in dataclasses.fields(cls)]


def test_console_script_runs_as_a_program(tree: Path, tmp_path: Path) -> None:
    """The installed entry point (python -m mlstore) copies and lists for real."""
    dst = tmp_path / "prog"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSTORE_")}
    done = subprocess.run(
        [sys.executable, "-m", "mlstore", "cp", "-r", str(tree), str(dst)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "mlstore", "ls", str(dst)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert f"file://{dst}/a.txt" in listed.stdout


INTERRUPTED = """
import sys
import mlstore.cli as cli

def interrupted(args, out):
    # Ctrl-C landing while code made from a source text runs (a dataclass being made
    # by an import, say): caught by main() all the same
    exec("raise KeyboardInterrupt")

cli._cmd_version = interrupted
sys.exit(cli.main(["version"]))
"""


def test_an_interrupted_command_exits_130_wherever_the_interrupt_landed(
    tmp_path: Path,
) -> None:
    """A shell or a job runner reads 130 as "stopped by Ctrl-C, cleaned up". Run with
    ``python -m`` (as ``python -m mlstore``), Python 3.11-3.13 would end such a run by
    killing itself with SIGINT (-2) instead."""
    (tmp_path / "interrupted").mkdir()
    (tmp_path / "interrupted" / "__main__.py").write_text(INTERRUPTED)
    done = subprocess.run(
        [sys.executable, "-m", "interrupted"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr == "mlstore: interrupted\n"


def test_config_shows_no_secret_of_a_mount_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A mount URL's password and signature are masked in ``mlstore config`` (with and
    without ``--env``); the rest of the URL still shows where the mount points."""
    password, sig = "PWCANARY" + os.urandom(8).hex(), "SIGCANARY" + os.urandom(8).hex()
    cfg = tmp_path / "mlstore.toml"
    cfg.write_text(
        "[mounts]\n"
        f'data = "https://user:{password}@data.example.com/set?sig={sig}&v=2"\n'
        f'[cache.policies."https://user:{password}@data.example.com/"]\nvalidate = "never"\n'
    )
    monkeypatch.setenv("MLSTORE_CONFIG", str(cfg))
    for argv in (("config",), ("config", "--env")):
        status, out = run(*argv)
        assert status == 0
        assert "mount data = https://***@data.example.com/set?sig=***&v=2" in out
        assert password not in out and sig not in out
