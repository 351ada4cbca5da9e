"""``mlstore version``, ``mlstore doctor``, a light start, and one-line errors: run as
the real program (``python -m mlstore``) in a child process."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path

import pytest

from mlstore import cli_doctor
from tests.emulators import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
#: Top-level modules of cloud SDKs (and torch) that a light start must not import.
HEAVY = {
    "boto3",
    "botocore",
    "aiobotocore",
    "s3fs",
    "gcsfs",
    "adlfs",
    "azure",
    "google",
    "obstore",
    "torch",
}


def mlstore_cli(
    *argv: str, env: dict[str, str] | None = None, python_flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return subprocess.run(
        [sys.executable, *python_flags, "-m", "mlstore", *argv],
        capture_output=True,
        text=True,
        env=child_env,
        check=False,
        timeout=120,
    )


def lines_of(out: str, check: str) -> list[str]:
    """The doctor lines of one check (``OK    endpoint s3 ...``): status and detail."""
    return [ln for ln in out.splitlines() if ln[6:].startswith(check + " ")]


def write_config(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "mlstore.toml"
    path.write_text(text)
    return {"MLSTORE_CONFIG": str(path)}


# -------------------------------------------------------------------------- light start


@pytest.mark.parametrize("argv", [("--help",), ("version",), ("doctor", "--offline")])
def test_light_commands_import_no_cloud_sdk(argv: tuple[str, ...]) -> None:
    done = mlstore_cli(*argv, python_flags=("-X", "importtime"))
    assert done.returncode == 0, done.stderr
    imported = {
        line.split("|")[-1].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "mlstore" in imported  # the report is there to be read
    assert imported & HEAVY == set()


# ------------------------------------------------------------------------------ version


def test_version_lists_python_platform_and_optional_packages() -> None:
    done = mlstore_cli("version", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["mlstore"] and info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["platform"]
    for name in ("s3fs", "gcsfs", "adlfs", "obstore", "torch", "pyfastcdc"):
        try:
            expected: str | None = metadata.version(name)
        except metadata.PackageNotFoundError:
            expected = None
        assert info["packages"][name] == expected
    text = mlstore_cli("version").stdout.splitlines()
    assert text[0] == f"mlstore {info['mlstore']}"
    assert f"s3fs {info['packages']['s3fs'] or '(not installed)'}" in text


# ------------------------------------------------------------------------------- doctor


def test_doctor_against_the_s3_emulator(
    moto: ServerProcess, s3_options: dict[str, object], tmp_path: Path
) -> None:
    env = write_config(
        tmp_path,
        f'[options.s3]\nendpoint_url = "{s3_options["endpoint_url"]}"\n'
        'key = "AKIDEXAMPLE"\nsecret = "not-a-real-secret"\n[retry]\nmax_attempts = 4\n',
    )
    done = mlstore_cli("doctor", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    (endpoint,) = lines_of(out, "endpoint s3 endpoint_url")
    assert endpoint.startswith("OK ") and "accepts connections" in endpoint
    (creds,) = lines_of(out, "credentials s3")
    assert creds.startswith("OK ") and "options.s3.key (config file" in creds
    assert "environment AWS_ACCESS_KEY_ID" in creds  # the moto fixture sets it
    assert f"retry.max_attempts = 4 from config file {env['MLSTORE_CONFIG']} [retry]" in out
    (cache_dir,) = lines_of(out, "cache dir")
    assert cache_dir.startswith("OK ") and os.environ["MLSTORE_CACHE_DIR"] in cache_dir
    assert lines_of(out, "cache filesystem") and lines_of(out, "cache space")
    assert out.splitlines()[-1].startswith("doctor: no problems found (")
    report = json.loads(mlstore_cli("doctor", "--json", env=env).stdout)
    assert report["ok"] is True and report["summary"]["FAIL"] == 0
    settings = {s["name"]: s for s in report["settings"]}
    assert settings["retry.max_attempts"]["value"] == 4
    assert settings["options.s3.secret"]["value"] is None  # names only, never values
    assert settings["cache.ttl"]["source"] == "default"


def test_an_unreachable_endpoint_fails_and_offline_skips_it(tmp_path: Path) -> None:
    env = write_config(tmp_path, '[options.s3]\nendpoint_url = "http://127.0.0.1:1"\n')
    done = mlstore_cli("doctor", "--timeout", "1", env=env)
    assert done.returncode == 1
    (endpoint,) = lines_of(done.stdout, "endpoint s3 endpoint_url")
    assert endpoint.startswith("FAIL") and "cannot connect to 127.0.0.1:1" in endpoint
    assert done.stdout.splitlines()[-1].startswith("doctor: problems found (")
    assert "1 FAIL" in done.stdout.splitlines()[-1]
    report = json.loads(mlstore_cli("doctor", "--json", "--timeout", "1", env=env).stdout)
    assert report["ok"] is False
    assert {"status": "FAIL", "check": "endpoint s3 endpoint_url"}.items() <= next(
        c for c in report["checks"] if c["check"] == "endpoint s3 endpoint_url"
    ).items()
    offline = mlstore_cli("doctor", "--offline", env=env)
    assert offline.returncode == 0, offline.stdout
    (endpoint,) = lines_of(offline.stdout, "endpoint s3 endpoint_url")
    assert endpoint.startswith("SKIP") and "--offline" in endpoint


def test_a_cache_dir_others_can_write_fails(tmp_path: Path) -> None:
    shared = tmp_path / "shared-cache"
    shared.mkdir()
    shared.chmod(0o777)
    done = mlstore_cli("doctor", "--offline", env={"MLSTORE_CACHE_DIR": str(shared)})
    assert done.returncode == 1
    (line,) = lines_of(done.stdout, "cache dir")
    assert line.startswith("FAIL") and "writable by other users (mode 777)" in line
    assert f"chmod 700 {shared}" in line
    shared.chmod(0o755)  # readable by others only: the cache tightens it itself
    done = mlstore_cli("doctor", "--offline", env={"MLSTORE_CACHE_DIR": str(shared)})
    assert done.returncode == 0
    (line,) = lines_of(done.stdout, "cache dir")
    assert line.startswith("OK") and "made 700 on first use" in line


def test_a_cache_dir_not_made_yet_is_fine(tmp_path: Path) -> None:
    target = tmp_path / "not" / "yet"
    done = mlstore_cli("doctor", "--offline", env={"MLSTORE_CACHE_DIR": str(target)})
    assert done.returncode == 0, done.stdout
    (line,) = lines_of(done.stdout, "cache dir")
    assert "does not exist yet" in line
    assert not target.exists()  # doctor changes nothing


def test_doctor_counts_fills_in_progress(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "tmp").mkdir(parents=True, mode=0o700)
    cache.chmod(0o700)
    held = os.open(cache / "tmp" / f"4242-{uuid.uuid4().hex[:12]}.mlstore-tmp", os.O_CREAT)
    (cache / "tmp" / "4243-abcdef.mlstore-tmp").touch()  # a dead filler's: not counted
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        done = mlstore_cli("doctor", "--offline", env={"MLSTORE_CACHE_DIR": str(cache)})
    finally:
        os.close(held)
    (line,) = lines_of(done.stdout, "cache sharing")
    assert "1 fill(s) in progress" in line


def test_the_filesystem_comes_from_the_mount_table(tmp_path: Path) -> None:
    table = tmp_path / "mounts"
    table.write_text(
        "/dev/sda1 / ext4 rw 0 0\n"
        f"server:/export {tmp_path} nfs4 rw 0 0\n"
        f"s3fs {tmp_path}/bucket fuse.s3fs rw 0 0\n"
    )
    assert cli_doctor._mount_of(str(tmp_path / "x"), str(table)) == (str(tmp_path), "nfs4")
    bucket = str(tmp_path / "bucket")
    assert cli_doctor._mount_of(bucket + "/y", str(table)) == (bucket, "fuse.s3fs")


def test_a_network_filesystem_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_doctor, "_mount_of", lambda path: ("/mnt/shared", "nfs4"))
    monkeypatch.setenv("MLSTORE_CACHE_DIR", str(tmp_path / "c"))
    checks, _ = cli_doctor.doctor(offline=True)
    (fs,) = [c for c in checks if c.check == "cache filesystem"]
    assert fs.status == "WARN" and "network file system" in fs.detail


def test_a_bad_setting_fails_the_config_check() -> None:
    done = mlstore_cli("doctor", "--offline", env={"MLSTORE_MAX_ATTEMPTS": "lots"})
    assert done.returncode == 1
    (line,) = lines_of(done.stdout, "config")
    assert line.startswith("FAIL") and "MLSTORE_MAX_ATTEMPTS" in line and "'lots'" in line


def test_credentials_named_by_a_missing_file_fail(tmp_path: Path) -> None:
    env = {"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "gone.json")}
    done = mlstore_cli("doctor", "--offline", env=env)
    assert done.returncode == 1
    (line,) = lines_of(done.stdout, "credentials gs")
    assert line.startswith("FAIL") and "names a missing file" in line


def test_no_secret_reaches_the_output(tmp_path: Path) -> None:
    """Canary credentials in the environment, in backend options and in a mount URL:
    doctor (text and JSON) and config show where they are, never what they are."""
    canary = "CANARY" + uuid.uuid4().hex
    env = write_config(
        tmp_path,
        f'[options.s3]\nendpoint_url = "http://127.0.0.1:1"\nsecret = "{canary}-opt"\n'
        f'key = "{canary}-key"\n[options.gs]\ntoken = "{canary}-tok"\n'
        f'[options.az]\nconnection_string = "DefaultEndpointsProtocol=http;AccountName=a;'
        f'AccountKey={canary}-ak;BlobEndpoint=http://127.0.0.1:1/a;"\n'
        f'[mounts]\ndata = "https://user:{canary}-pw@127.0.0.1:1/set?sig={canary}-sig"\n',
    )
    env |= {
        "AWS_ACCESS_KEY_ID": f"{canary}-envkey",
        "AWS_SECRET_ACCESS_KEY": f"{canary}-envsecret",
        "AWS_SESSION_TOKEN": f"{canary}-envtoken",
        "AZURE_STORAGE_CONNECTION_STRING": f"AccountName=a;AccountKey={canary}-envak",
    }
    for argv in (("doctor", "--timeout", "1"), ("doctor", "--json", "--timeout", "1")):
        done = mlstore_cli(*argv, env=env)
        assert done.returncode == 1  # the endpoints are unreachable
        assert canary not in done.stdout + done.stderr
        assert "environment AWS_SECRET_ACCESS_KEY" in done.stdout
        assert "options.s3.secret" in done.stdout
    for argv in (("config", "--env"), ("--debug", "ls", "mlstore://data/")):
        done = mlstore_cli(*argv, env=env)
        assert canary not in done.stdout + done.stderr


# ------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("argv", "status", "says"),
    [
        (("cat", "{tmp}/missing.bin"), 1, "no such object"),  # a missing object
        (("ls", "s3://"), 1, "the URL has no bucket"),  # a bad URL
        (("ls", "nope://bucket/x"), 1, "unknown URL scheme 'nope'"),
        (("ls", "--bogus", "{tmp}"), 2, "unrecognized arguments: --bogus"),  # a bad option
        (("cp", "{tmp}"), 2, "cp: the following arguments are required: DST"),
        (("doctor", "--timeout", "soon"), 2, "invalid float value: 'soon'"),
    ],
)
def test_a_user_error_is_one_line(
    argv: tuple[str, ...], status: int, says: str, tmp_path: Path
) -> None:
    done = mlstore_cli(*(a.format(tmp=tmp_path) for a in argv))
    assert done.returncode == status
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("mlstore: error: ") and says in done.stderr
    assert "Traceback" not in done.stderr


def test_a_bad_backend_option_is_one_line(tmp_path: Path) -> None:
    env = write_config(tmp_path, "[options.s3]\nbogus_option = 1\n")
    done = mlstore_cli("ls", "s3://bucket/", env=env)
    assert done.returncode == 1
    assert done.stderr.startswith("mlstore: error: ") and "bogus_option" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    done = mlstore_cli("--debug", "cat", str(tmp_path / "missing.bin"))
    assert done.returncode == 1
    assert done.stderr.startswith("Traceback (most recent call last):")
    assert done.stderr.splitlines()[-1].startswith("mlstore: error: ")


def test_an_unexpected_error_names_its_type(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from mlstore import cli

    def broken(*args: object) -> int:
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(cli, "_cmd_ls", broken)
    assert cli.main(["ls", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == (
        "mlstore: error: RuntimeError: something inside broke "
        "(run with --debug for the traceback)\n"
    )
    assert cli.main(["--debug", "ls", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and 'raise RuntimeError("something inside broke")' in err
