"""``mlstore stat``, ``du``, ``mkdir``, ``warm``, ``cache ...`` and ``--json``, run as the
real program (``python -m mlstore``) against the S3 emulator and local paths.

Each command runs in a child process with a config file naming the emulator's endpoint,
and the private cache directory the suite gives every test (``MLSTORE_CACHE_DIR``), so
what one command leaves in the node cache is what the next one finds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mlstore
from mlstore.cache.disk import DiskTier
from tests.emulators import ServerProcess
from tests.servers import proxy

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(
    r"warmed (\d+) objects, .+ in [\d.]+ s \((\d+) fetched, (\d+) already cached, (\d+) failed\)"
)


def cli(
    *argv: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return subprocess.run(
        [sys.executable, "-m", "mlstore", *argv],
        capture_output=True,
        text=True,
        env=child_env,
        input=stdin if stdin is not None else "",
        check=False,
        timeout=120,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def one_line_error(done: subprocess.CompletedProcess[str], *says: str) -> None:
    """A user error: status 1, one line on stderr naming what went wrong, no traceback."""
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("mlstore: error: "), done.stderr
    assert "Traceback" not in done.stderr
    for text in says:
        assert text in done.stderr


def config_for(tmp_path: Path, endpoint: str) -> dict[str, str]:
    path = tmp_path / "mlstore.toml"
    path.write_text(f'[options.s3]\nendpoint_url = "{endpoint}"\n')
    return {"MLSTORE_CONFIG": str(path)}


@pytest.fixture
def s3_env(s3_options: dict[str, object], tmp_path: Path) -> dict[str, str]:
    return config_for(tmp_path, str(s3_options["endpoint_url"]))


@pytest.fixture
def dataset(s3_options: dict[str, object], s3_bucket: str) -> dict[str, bytes]:
    """Five objects under ``s3://<bucket>/data/`` in two sub-prefixes and one beside."""
    objects = {f"s3://{s3_bucket}/data/train/{i}.bin": os.urandom(1000 + i) for i in range(3)} | {
        f"s3://{s3_bucket}/data/val/0.bin": os.urandom(500),
        f"s3://{s3_bucket}/data/readme.txt": b"five objects\n",
    }
    with mlstore.Store(options={"s3": s3_options}, cache={"enabled": False}) as s:
        for url, data in objects.items():
            s.write_bytes(url, data)
    return objects


def blob_files(cache_dir: str) -> list[Path]:
    return sorted(p for p in (Path(cache_dir) / "blobs").glob("*/*") if p.is_file())


# ------------------------------------------------------------------------------ stat


@pytest.mark.s3
def test_stat_shows_size_version_and_recorded_hash(
    s3_env: dict[str, str], dataset: dict[str, bytes], s3_bucket: str
) -> None:
    url = f"s3://{s3_bucket}/data/val/0.bin"
    out = ok(cli("stat", url, env=s3_env))
    fields = dict(line.strip().split(": ", 1) for line in out.splitlines() if line.strip())
    assert fields["url"] == url and fields["type"] == "file"
    assert fields["size"] == "500 (500 B)"
    assert fields["version"] not in ("", "-")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", fields["modified"])
    (record,) = json.loads(ok(cli("stat", "--json", url, env=s3_env)))
    assert record["name"] == url and record["size"] == 500
    assert record["version"] == fields["version"]
    recorded = record.get("content_hash")
    if recorded:  # mlstore's writes record their xxh3: shown as it is
        assert fields["xxh3-128"] == recorded
    else:
        assert fields["xxh3-128"] == "- (not recorded)"


@pytest.mark.s3
def test_stat_of_several_urls_and_a_missing_one(
    s3_env: dict[str, str], dataset: dict[str, bytes], s3_bucket: str
) -> None:
    urls = sorted(dataset)[:2]
    records = json.loads(ok(cli("stat", "--json", *urls, env=s3_env)))
    assert [r["name"] for r in records] == urls
    missing = f"s3://{s3_bucket}/data/nope.bin"
    one_line_error(cli("stat", urls[0], missing, env=s3_env), missing, "no such object")


def test_stat_of_a_local_file(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_bytes(b"12345")
    (record,) = json.loads(ok(cli("stat", "--json", str(tmp_path / "f.txt"))))
    assert record["size"] == 5 and record["name"] == f"file://{tmp_path}/f.txt"


# -------------------------------------------------------------------------------- du


@pytest.mark.s3
def test_du_per_child_and_summarized(
    s3_env: dict[str, str], dataset: dict[str, bytes], s3_bucket: str
) -> None:
    base = f"s3://{s3_bucket}/data"
    record = json.loads(ok(cli("du", "--json", base + "/", env=s3_env)))
    assert record["url"] == base
    assert record["bytes"] == sum(len(d) for d in dataset.values())
    assert record["objects"] == 5
    children = {c["url"]: (c["bytes"], c["objects"]) for c in record["children"]}
    assert children == {
        f"{base}/readme.txt": (13, 1),
        f"{base}/train/": (1000 + 1001 + 1002, 3),
        f"{base}/val/": (500, 1),
    }
    lines = ok(cli("du", base, env=s3_env)).splitlines()
    assert [ln.split()[-1] for ln in lines] == [*sorted(children), base]
    assert lines[-1].split()[:2] == [str(record["bytes"]), "5"]
    (total,) = ok(cli("du", "-s", "-h", base, env=s3_env)).splitlines()
    assert total.split() == ["3.4", "KiB", "5", "obj", base]
    summary = json.loads(ok(cli("du", "-s", "--json", base, env=s3_env)))
    assert "children" not in summary and summary["objects"] == 5


@pytest.mark.s3
def test_du_of_nothing_is_an_error(
    s3_env: dict[str, str], dataset: dict[str, bytes], s3_bucket: str
) -> None:
    missing = f"s3://{s3_bucket}/elsewhere/"
    one_line_error(cli("du", missing, env=s3_env), f"s3://{s3_bucket}/elsewhere")


def test_du_of_a_local_tree(tmp_path: Path) -> None:
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "x").write_bytes(b"x" * 10)
    (tmp_path / "d" / "y").write_bytes(b"y" * 5)
    record = json.loads(ok(cli("du", "--json", str(tmp_path / "d"))))
    assert record["bytes"] == 15 and record["objects"] == 2
    assert [c["objects"] for c in record["children"]] == [1, 1]


# ----------------------------------------------------------------------------- mkdir


@pytest.mark.s3
def test_mkdir_makes_a_bucket_and_a_local_tree(
    s3_env: dict[str, str], s3_options: dict[str, object], tmp_path: Path
) -> None:
    bucket = f"t-mk-{os.urandom(6).hex()}"
    ok(cli("mkdir", f"s3://{bucket}", env=s3_env))
    ok(cli("cp", str(ROOT / "README.md"), f"s3://{bucket}/readme.md", env=s3_env))
    listed = json.loads(ok(cli("ls", "--json", f"s3://{bucket}", env=s3_env)))
    assert [e["name"] for e in listed] == [f"s3://{bucket}/readme.md"]
    with mlstore.Store(options={"s3": s3_options}) as s:
        s.rm(f"s3://{bucket}/readme.md")
    ok(cli("mkdir", str(tmp_path / "a" / "b" / "c")))
    assert (tmp_path / "a" / "b" / "c").is_dir()


# ---------------------------------------------------------------------------- --json


@pytest.mark.s3
def test_read_only_commands_print_json_that_parses_back(
    s3_env: dict[str, str], dataset: dict[str, bytes], s3_bucket: str
) -> None:
    base = f"s3://{s3_bucket}/data"
    listed = json.loads(ok(cli("ls", "--json", base, env=s3_env)))
    assert {e["name"]: e["type"] for e in listed} == {
        f"{base}/readme.txt": "file",
        f"{base}/train": "directory",
        f"{base}/val": "directory",
    }
    found = json.loads(ok(cli("find", "--json", base, env=s3_env)))
    assert sorted(e["name"] for e in found) == sorted(dataset)
    assert {e["name"]: e["size"] for e in found} == {u: len(d) for u, d in dataset.items()}
    matched = json.loads(ok(cli("glob", "--json", f"{base}/train/*.bin", env=s3_env)))
    assert matched == sorted(u for u in dataset if "/train/" in u)
    infos = json.loads(ok(cli("info", "--json", f"{base}/readme.txt", env=s3_env)))
    assert infos[0]["size"] == 13
    settings = json.loads(ok(cli("config", "--json", "--env", env=s3_env)))
    by_name = {s["name"]: s for s in settings["settings"]}
    assert by_name["cache.disk_dir"]["value"] == os.environ["MLSTORE_CACHE_DIR"]
    assert settings["options"] == {"s3": ["endpoint_url"]}
    assert any(v["variable"] == "MLSTORE_CACHE_DIR" and v["set"] for v in settings["environment"])
    assert json.loads(ok(cli("version", "--json")))["mlstore"] == mlstore.__version__
    cache = json.loads(ok(cli("cache", "path", "--json")))
    assert cache["path"] == os.environ["MLSTORE_CACHE_DIR"]


def test_config_json_keeps_secret_values_out(tmp_path: Path) -> None:
    canary = "CANARY-" + os.urandom(8).hex()
    env = config_for(tmp_path, "http://127.0.0.1:1")
    Path(env["MLSTORE_CONFIG"]).write_text(
        f'[options.s3]\nsecret = "{canary}"\n[mounts]\nm = "https://u:{canary}@h.example/x"\n'
    )
    out = ok(cli("config", "--json", env=env))
    assert canary not in out
    record = json.loads(out)
    assert record["options"] == {"s3": ["secret"]}
    assert record["mounts"] == {"m": ["https://***@h.example/x"]}


# ------------------------------------------------------------------------------ warm


@pytest.mark.s3
def test_warm_fills_the_node_cache_once(
    s3_proxy: ServerProcess, dataset: dict[str, bytes], s3_bucket: str, tmp_path: Path
) -> None:
    env = config_for(tmp_path, s3_proxy.endpoint)
    done = cli("warm", "-j", "4", f"s3://{s3_bucket}/data/", env=env)
    out = ok(done)
    assert done.stderr == ""  # no terminal: no bar, and nothing failed
    (line,) = out.splitlines()
    assert SUMMARY.fullmatch(line), line
    assert SUMMARY.fullmatch(line).groups() == ("5", "5", "0", "0")  # type: ignore[union-attr]
    assert "3.4 KiB" in line
    assert len(blob_files(os.environ["MLSTORE_CACHE_DIR"])) == 5
    # Every process on the node now reads from the cache: no GET reaches the store.
    proxy.reset(s3_proxy.endpoint)
    url = f"s3://{s3_bucket}/data/train/2.bin"
    cat = subprocess.run(
        [sys.executable, "-m", "mlstore", "cat", url],
        capture_output=True,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    assert cat.stdout == dataset[url]
    assert proxy.requests(s3_proxy.endpoint, "GET") == 0
    again = json.loads(ok(cli("warm", "--json", f"s3://{s3_bucket}/data/", env=env)))
    assert again["fetched"] == 0 and again["cached"] == 5 and again["ok"] is True
    assert again["bytes"] == sum(len(d) for d in dataset.values())


@pytest.mark.s3
def test_warm_from_a_manifest_is_pinned_and_reports_what_failed(
    s3_env: dict[str, str],
    s3_options: dict[str, object],
    dataset: dict[str, bytes],
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    manifest_path = str(tmp_path / "data.jsonl")
    with mlstore.Store(options={"s3": s3_options}, cache={"enabled": False}) as s:
        mlstore.Manifest.build(f"s3://{s3_bucket}/data/train/", store=s).save(manifest_path)
        changed = f"s3://{s3_bucket}/data/train/1.bin"
        s.write_bytes(changed, b"rewritten after the manifest was made")
    done = cli("warm", "--manifest", manifest_path, env=s3_env)
    assert done.returncode == 1
    (failure,) = done.stderr.splitlines()
    assert failure.startswith("mlstore: warm failed: ") and changed in failure
    assert SUMMARY.fullmatch(done.stdout.strip()).groups() == ("2", "2", "0", "1")  # type: ignore[union-attr]
    report = json.loads(cli("warm", "--json", "--manifest", manifest_path, env=s3_env).stdout)
    assert report["cached"] == 2 and report["failed"] == 1 and report["ok"] is False
    assert [f["url"] for f in report["failures"]] == [changed]


@pytest.mark.s3
@pytest.mark.faults
def test_warm_goes_on_past_a_refused_object_and_exits_1(
    s3_fault_proxy: ServerProcess, dataset: dict[str, bytes], s3_bucket: str, tmp_path: Path
) -> None:
    env = config_for(tmp_path, s3_fault_proxy.endpoint)
    proxy.set_faults(
        s3_fault_proxy.endpoint,
        {"fault": "status", "status": 403, "method": "GET", "path": r"/val/0\.bin$"},
    )
    done = cli("warm", "-j", "2", f"s3://{s3_bucket}/data", env=env)
    assert done.returncode == 1
    assert SUMMARY.fullmatch(done.stdout.strip()).groups() == ("4", "4", "0", "1")  # type: ignore[union-attr]
    assert f"s3://{s3_bucket}/data/val/0.bin" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.s3
def test_warm_of_nothing_and_without_a_cache_are_errors(
    s3_env: dict[str, str], dataset: dict[str, bytes], s3_bucket: str
) -> None:
    one_line_error(cli("warm", f"s3://{s3_bucket}/typo/", env=s3_env), f"s3://{s3_bucket}/typo")
    off = {**s3_env, "MLSTORE_CACHE": "0"}
    one_line_error(cli("warm", f"s3://{s3_bucket}/data/", env=off), "disk cache is off")
    one_line_error(cli("warm", env=s3_env), "--manifest")
    done = cli("warm", "-j", "0", f"s3://{s3_bucket}/data/", env=s3_env)
    assert done.returncode == 2 and "at least 1" in done.stderr


def test_warm_of_local_files_skips_them(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    out = ok(cli("warm", str(tmp_path)))
    assert "0 failed, 1 skipped (local or memory://, never cached)" in out
    assert blob_files(os.environ["MLSTORE_CACHE_DIR"]) == []


@pytest.mark.s3
def test_warm_progress_goes_to_stderr_only_when_asked(
    s3_env: dict[str, str], dataset: dict[str, bytes], s3_bucket: str
) -> None:
    done = cli("warm", "--progress", f"s3://{s3_bucket}/data/", env=s3_env)
    assert SUMMARY.fullmatch(ok(done).strip())  # stdout: the summary, nothing else
    assert "warm" in done.stderr and "5/5" in done.stderr
    quiet = cli("warm", "--no-progress", f"s3://{s3_bucket}/data/", env=s3_env)
    assert ok(quiet) and quiet.stderr == ""


# ----------------------------------------------------------------------------- cache


def test_cache_path_is_the_directory_in_force(tmp_path: Path) -> None:
    assert ok(cli("cache", "path")).strip() == os.environ["MLSTORE_CACHE_DIR"]
    elsewhere = str(tmp_path / "elsewhere")
    env = {"MLSTORE_CACHE_DIR": elsewhere}
    record = json.loads(ok(cli("cache", "path", "--json", env=env)))
    assert record == {
        "path": elsewhere,
        "exists": False,  # `cache path` builds no Store: it creates nothing
        "disk_bytes": 10 * 1024**3,
        "enabled": True,
    }
    assert not os.path.exists(elsewhere)


@pytest.mark.s3
def test_verify_finds_a_damaged_blob_and_scrub_heals_it(
    s3_env: dict[str, str], dataset: dict[str, bytes], s3_bucket: str
) -> None:
    ok(cli("warm", f"s3://{s3_bucket}/data/", env=s3_env))
    good = ok(cli("cache", "verify", env=s3_env))
    assert good.strip().endswith(": all good") and "checked 5 blobs" in good
    url = f"s3://{s3_bucket}/data/train/0.bin"
    from mlstore.hashing import content_hash

    blob = Path(os.environ["MLSTORE_CACHE_DIR"]) / "blobs"
    damaged = next(blob.glob(f"*/{content_hash(dataset[url])}"))
    body = bytearray(damaged.read_bytes())
    body[10] ^= 0xFF
    damaged.write_bytes(bytes(body))

    done = cli("cache", "verify", env=s3_env)
    assert done.returncode == 1
    bad_lines = [ln for ln in done.stdout.splitlines() if ln.startswith("BAD ")]
    assert len(bad_lines) == 1 and "wrong hash" in bad_lines[0] and url in bad_lines[0]
    report = json.loads(cli("cache", "verify", "--json", env=s3_env).stdout)
    assert report["ok"] is False and report["checked"] == 5
    assert [b["urls"] for b in report["bad"]] == [[url]]
    assert damaged.read_bytes() == bytes(body)  # verify changes nothing

    healed = json.loads(ok(cli("cache", "scrub", "--json", env=s3_env)))
    assert healed["healed"] == [url] and healed["dropped"] == []
    assert damaged.read_bytes() == dataset[url]  # fetched again, under its own name
    assert ok(cli("cache", "verify", env=s3_env)).strip().endswith(": all good")
    cat = subprocess.run(
        [sys.executable, "-m", "mlstore", "cat", url],
        capture_output=True,
        env={**os.environ, **s3_env, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    assert cat.stdout == dataset[url]


@pytest.mark.s3
def test_scrub_drops_what_it_cannot_fetch_as_it_was(
    s3_env: dict[str, str],
    s3_options: dict[str, object],
    dataset: dict[str, bytes],
    s3_bucket: str,
) -> None:
    ok(cli("warm", f"s3://{s3_bucket}/data/", env=s3_env))
    url = f"s3://{s3_bucket}/data/readme.txt"
    from mlstore.hashing import content_hash

    blob = next(
        (Path(os.environ["MLSTORE_CACHE_DIR"]) / "blobs").glob(f"*/{content_hash(dataset[url])}")
    )
    blob.write_bytes(b"short")
    with mlstore.Store(options={"s3": s3_options}, cache={"enabled": False}) as s:
        s.write_bytes(url, b"a new version: the cached one is gone from the store\n")
    out = ok(cli("cache", "scrub", env=s3_env))
    assert f"dropped  {url}" in out.splitlines()
    assert out.splitlines()[-1].endswith("1 bad, 0 healed, 1 dropped")
    assert not blob.exists()
    assert ok(cli("cache", "verify", env=s3_env)).strip().endswith(": all good")


@pytest.mark.s3
def test_scrub_fetches_only_what_this_store_may_read(
    s3_proxy: ServerProcess,
    s3_env: dict[str, str],
    dataset: dict[str, bytes],
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    """Entries filled through another endpoint (another scope: other credentials, another
    service) are dropped, not refilled by this Store: it would not be the same entry."""
    (tmp_path / "proxy").mkdir()
    through_proxy = config_for(tmp_path / "proxy", s3_proxy.endpoint)
    ok(
        cli(
            "warm",
            f"s3://{s3_bucket}/data/val/",
            f"s3://{s3_bucket}/data/train/",
            env=through_proxy,
        )
    )
    from mlstore.hashing import content_hash

    blobs = Path(os.environ["MLSTORE_CACHE_DIR"]) / "blobs"
    damaged = sorted(u for u in dataset if "/train/" in u)[:2]
    for url in damaged:
        next(blobs.glob(f"*/{content_hash(dataset[url])}")).write_bytes(b"bad")
    report = json.loads(ok(cli("cache", "scrub", "--json", env=s3_env)))  # direct to moto
    assert report["healed"] == [] and sorted(report["dropped"]) == damaged
    report = json.loads(ok(cli("cache", "scrub", "--json", env=through_proxy)))
    assert report["bad"] == []  # nothing bad was left behind
    for url in damaged:  # the proxy's scope refills them on its next read
        assert json.loads(ok(cli("warm", "--json", url, env=through_proxy)))["fetched"] == 1


@pytest.mark.s3
def test_prune_to_a_size_and_clear(
    s3_env: dict[str, str], dataset: dict[str, bytes], s3_bucket: str
) -> None:
    ok(cli("warm", f"s3://{s3_bucket}/data/", env=s3_env))
    total = sum(len(d) for d in dataset.values())
    pruned = json.loads(ok(cli("cache", "prune", "--to", "2KiB", "--json", env=s3_env)))
    assert pruned["before"] == total and pruned["after"] <= 2048
    assert pruned["freed"] == total - pruned["after"] and pruned["evicted"] >= 1
    assert len(blob_files(os.environ["MLSTORE_CACHE_DIR"])) == 5 - pruned["evicted"]
    nothing = ok(cli("cache", "prune", env=s3_env))  # under the 10 GiB budget already
    assert nothing.startswith("freed 0 B (0 blobs)")

    refused = cli("cache", "clear", env=s3_env)  # no terminal to ask on
    one_line_error(refused, "--yes")
    assert len(blob_files(os.environ["MLSTORE_CACHE_DIR"])) == 5 - pruned["evicted"]
    cleared = json.loads(ok(cli("cache", "clear", "--yes", "--json", env=s3_env)))
    assert cleared["freed"] == pruned["after"] and cleared["left"] == 0
    assert blob_files(os.environ["MLSTORE_CACHE_DIR"]) == []
    assert "checked 0 blobs" in ok(cli("cache", "verify", env=s3_env))


@pytest.mark.s3
def test_clear_under_a_live_reader_keeps_the_index_consistent(
    s3_env: dict[str, str], s3_options: dict[str, object], dataset: dict[str, bytes]
) -> None:
    """A process that has the cache open (its index connection, its memory of what it
    read) goes on reading correct bytes after another process clears the cache, and the
    index's byte count matches the blobs it lists."""
    with mlstore.Store(options={"s3": s3_options}, cache={"memory_bytes": 0}) as reader:
        urls = sorted(dataset)
        assert reader.read_many(urls) == [dataset[u] for u in urls]
        ok(cli("cache", "clear", "--yes", env=s3_env))
        assert reader.read_many(urls) == [dataset[u] for u in urls]
        disk = reader.cache.disk
        assert isinstance(disk, DiskTier)
        rows = disk._conn().execute("SELECT coalesce(sum(size), 0), count(*) FROM blobs")
        size, count = rows.fetchone()
        assert disk.size() == size and count == 5
        assert len(blob_files(os.environ["MLSTORE_CACHE_DIR"])) == 5


def test_cache_commands_without_a_disk_tier_say_so() -> None:
    env = {"MLSTORE_DISK_BYTES": "0"}
    one_line_error(cli("cache", "verify", env=env), "no disk tier")


# ------------------------------------------------------------------------ error exits


@pytest.mark.s3
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (("stat", "s3://{bucket}/missing.bin"), "no such object"),
        (("du", "s3://{bucket}/missing/"), "s3://{bucket}/missing"),
        (("cat", "s3://{bucket}/missing.bin"), "no such object"),
        (("warm", "s3://{bucket}/missing.bin"), "s3://{bucket}/missing.bin"),
        (("stat", "s3://"), "the URL has no bucket"),
        (("du", "nope://bucket/x"), "unknown URL scheme 'nope'"),
        (("warm", "nope://bucket/x"), "unknown URL scheme 'nope'"),
        (("cache", "prune", "--to", "lots"), "--to must be a size"),
        (("info", "s3://{bucket}/missing.bin"), "s3://{bucket}/missing.bin"),
        (("find", "s3://"), "the URL has no bucket"),
        (("glob", "nope://bucket/*.bin"), "unknown URL scheme 'nope'"),
        (("mkdir", "nope://bucket/dir"), "unknown URL scheme 'nope'"),
        (("ls", "--json", "s3://{bucket}/missing.bin"), "s3://{bucket}/missing.bin"),
        (("warm", "--manifest", "s3://{bucket}/no-manifest.jsonl"), "no-manifest.jsonl"),
    ],
)
def test_user_errors_are_one_line(
    argv: tuple[str, ...], says: str, s3_env: dict[str, str], s3_bucket: str
) -> None:
    done = cli(*(a.format(bucket=s3_bucket) for a in argv), env=s3_env)
    one_line_error(done, says.format(bucket=s3_bucket))


@pytest.mark.s3
@pytest.mark.faults
@pytest.mark.parametrize("command", ["stat", "du", "cat", "ls"])
def test_a_permission_problem_is_one_line_naming_the_url(
    command: str, s3_fault_proxy: ServerProcess, s3_bucket: str, tmp_path: Path
) -> None:
    env = {**config_for(tmp_path, s3_fault_proxy.endpoint), "MLSTORE_MAX_ATTEMPTS": "1"}
    proxy.set_faults(s3_fault_proxy.endpoint, {"fault": "status", "status": 403})
    url = f"s3://{s3_bucket}/secret.bin"
    done = cli(command, url, env=env)
    one_line_error(done, s3_bucket)
    assert re.search("denied|forbidden|403", done.stderr, re.IGNORECASE), done.stderr
    debug = cli("--debug", command, url, env=env)
    assert debug.returncode == 1 and debug.stderr.startswith("Traceback")
    assert debug.stderr.splitlines()[-1].startswith("mlstore: error: ")


# ------------------------------------------------------------------------ light start


@pytest.mark.parametrize("argv", [("--help",), ("cache", "path"), ("warm", "--help")])
def test_light_commands_import_neither_sdk_nor_tqdm(argv: tuple[str, ...]) -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mlstore", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    imported = {
        line.split("|")[-1].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "mlstore" in imported
    assert imported & {"tqdm", "boto3", "botocore", "s3fs", "gcsfs", "adlfs", "torch"} == set()


@pytest.mark.s3
def test_clear_on_a_terminal_asks_first(
    s3_env: dict[str, str], dataset: dict[str, bytes], s3_bucket: str
) -> None:
    import pty

    ok(cli("warm", f"s3://{s3_bucket}/data/", env=s3_env))
    for answer, status, left in (("n\n", 1, 5), ("y\n", 0, 0)):
        main, secondary = pty.openpty()
        try:
            os.write(main, answer.encode())
            done = subprocess.run(
                [sys.executable, "-m", "mlstore", "cache", "clear"],
                stdin=secondary,
                capture_output=True,
                text=True,
                env={**os.environ, **s3_env, "PYTHONPATH": str(ROOT)},
                check=False,
                timeout=120,
            )
        finally:
            os.close(secondary)
            os.close(main)
        assert done.returncode == status, done.stderr
        assert done.stderr.startswith("drop 5 blobs (3.4 KiB) from ")
        assert len(blob_files(os.environ["MLSTORE_CACHE_DIR"])) == left
