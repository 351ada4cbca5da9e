"""Write-back staging: ``save(..., staging="local")`` returns once the checkpoint is on
the node's disk; the upload follows in the background, driven by a journal that
survives the process.

Everything here is real: S3 is moto_server behind the fault proxy (latency makes the
uploads slow enough to observe them mid-way), savers are separate processes killed
with SIGKILL, and ``mlstore flush`` runs as the command line. A test never waits for
an upload by the clock: it reads the journal, or calls ``flush(wait=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mlstore
from mlstore.checkpoint import CheckpointWriter, flush
from mlstore.errors import ConfigError
from tests.conftest import run_child
from tests.servers import proxy

torch = pytest.importorskip("torch")
import mlstore.torch  # noqa: E402 - after the torch check

pytestmark = [pytest.mark.s3, pytest.mark.faults, pytest.mark.torch]

REPO = str(Path(__file__).resolve().parent.parent)
# The state dicts saved below, built the same way in this process and in children.
STATE = """
import torch

def state(version):
    g = torch.Generator().manual_seed(version)
    return {
        "w": torch.randn(256, 1024, generator=g),
        "v": torch.randn(256, 1024, generator=g),
        "b": torch.randn(4096, generator=g),
        "step": version,
    }
"""
_ns: dict[str, Any] = {}
exec(STATE, _ns)
state = _ns["state"]

LOAD = """
import hashlib, json, mlstore.torch
sd = mlstore.torch.load({url!r})
print(json.dumps({{k: hashlib.sha256(v.numpy().tobytes()).hexdigest()
                  if hasattr(v, "numpy") else v for k, v in sd.items()}}))
"""


def digests(sd: dict[str, Any]) -> dict[str, Any]:
    return {
        k: hashlib.sha256(v.numpy().tobytes()).hexdigest() if hasattr(v, "numpy") else v
        for k, v in sd.items()
    }


def loaded_elsewhere(url: str, env: dict[str, str]) -> object:
    """The checkpoint at ``url`` as a fresh process loads it (tensor hashes).

    Uncached: a fresh process reading through the node cache can be served a manifest
    an earlier child cached after a later save replaced it (seen with direct saves
    too, no staging involved: reported separately); the cache is not under test here.
    """
    return run_child(LOAD.format(url=url), {**env, "MLSTORE_CACHE": "0"})


def staging() -> Path:
    return Path(os.environ["MLSTORE_CACHE_DIR"]) / "staging"


def journals() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(staging().glob("*/journal.json"))]


@pytest.fixture
def endpoint(s3_fault_proxy: Any) -> Iterator[str]:
    """The fault proxy in front of moto (no faults, no latency afterwards)."""
    yield str(s3_fault_proxy.endpoint)
    proxy.set_latency(s3_fault_proxy.endpoint, 0)


@pytest.fixture
def via_proxy(endpoint: str) -> Iterator[mlstore.Store]:
    with mlstore.Store(
        options={"s3": {"endpoint_url": endpoint}},
        retry={"max_attempts": 2, "backoff_base": 0.0},
    ) as s:
        yield s


@pytest.fixture
def direct(s3_options: dict[str, object]) -> Iterator[mlstore.Store]:
    """Reads from moto itself, past the proxy and any cache."""
    with mlstore.Store(options={"s3": s3_options}, cache={"enabled": False}) as s:
        yield s


@pytest.fixture
def env(endpoint: str) -> dict[str, str]:
    """What a child process needs to reach S3 (the cache dir is inherited)."""
    return {"MLSTORE_S3_ENDPOINT_URL": endpoint, "PYTHONPATH": REPO}


def manifest_created(store: mlstore.Store, url: str) -> float | None:
    from mlstore.checkpoint import read_manifest
    from mlstore.errors import NotFoundError

    try:
        return read_manifest(store, url).created
    except NotFoundError:
        return None


def kill_mid_upload(url: str, version: int, env: dict[str, str], endpoint: str) -> None:
    """A child stages a save of ``state(version)`` to ``url`` and is SIGKILLed once one
    of its chunk uploads has landed (uploads are slowed by the proxy's latency)."""
    code = STATE + textwrap.dedent(
        f"""
        import mlstore.torch
        from mlstore.checkpoint import flush
        mlstore.torch.save(state({version}), {url!r}, staging="local")
        print("staged", flush=True)
        flush()
        print("uploaded", flush=True)
        """
    )
    proxy.reset(endpoint)
    proxy.set_latency(endpoint, 0.3)
    with subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "staged"
            deadline = time.monotonic() + 60
            while not any(
                e["method"] == "PUT" and "/.chunks/data/" in e["path"] and e["status"] == 200
                for e in proxy.request_log(endpoint)
            ):
                assert time.monotonic() < deadline, "no chunk upload began"
                assert child.poll() is None, "the child ended before it could be killed"
                time.sleep(0.02)  # polling the proxy's log, not waiting for an outcome
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
            proxy.set_latency(endpoint, 0)
    assert child.returncode == -signal.SIGKILL


# ----------------------------------------------------------------------------- tests


def test_a_staged_save_returns_before_the_upload_and_flush_finishes_it(
    s3_bucket: str,
    endpoint: str,
    via_proxy: mlstore.Store,
    direct: mlstore.Store,
    env: dict[str, str],
) -> None:
    url = f"s3://{s3_bucket}/run/step-2"
    first = mlstore.torch.save(state(1), url, store=via_proxy)
    assert not first.staged
    previous = manifest_created(direct, url)
    proxy.set_latency(endpoint, 0.3)

    info = mlstore.torch.save(state(2), url, store=via_proxy, staging="local")

    assert manifest_created(direct, url) == previous  # readers still see step 1
    assert info.staged and info.uploaded == 0 and info.new_chunks == 0
    assert info.bytes > 2 * 1024 * 1024 and info.chunks >= 4
    [journal] = journals()  # the upload is not done: its journal is still there
    assert journal["url"] == url and journal["state"] in ("staged", "uploading")
    report = flush(via_proxy, wait=True)
    assert report.uploaded == [url] and report.ok
    assert manifest_created(direct, url) != previous
    assert list(staging().iterdir()) == []
    proxy.set_latency(endpoint, 0)
    assert loaded_elsewhere(url, env) == digests(state(2))


def test_a_saver_killed_mid_upload_leaves_the_previous_checkpoint_and_cli_flush_completes_it(
    s3_bucket: str, endpoint: str, via_proxy: mlstore.Store, env: dict[str, str]
) -> None:
    url = f"s3://{s3_bucket}/run/latest"
    mlstore.torch.save(state(1), url, store=via_proxy)

    kill_mid_upload(url, 2, env, endpoint)

    assert loaded_elsewhere(url, env) == digests(state(1))
    [journal] = journals()
    assert journal["url"] == url and journal["state"] == "uploading"
    done = subprocess.run(
        [sys.executable, "-m", "mlstore", "flush"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"uploaded {url}" in done.stdout
    assert loaded_elsewhere(url, env) == digests(state(2))
    assert list(staging().iterdir()) == []


def test_the_next_staged_save_resumes_an_orphan_and_exit_waits_for_both(
    s3_bucket: str, endpoint: str, env: dict[str, str]
) -> None:
    orphan, other = f"s3://{s3_bucket}/a/ckpt", f"s3://{s3_bucket}/b/ckpt"
    kill_mid_upload(orphan, 3, env, endpoint)
    assert len(journals()) == 1

    # A second process saves with staging and exits at once: its uploader resumes the
    # orphan first, and the interpreter's exit waits for both uploads.
    code = STATE + textwrap.dedent(
        f"""
        import mlstore.torch
        info = mlstore.torch.save(state(4), {other!r}, staging="local")
        print(info.staged)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert "waiting for 1 staged checkpoint upload(s)" in done.stderr, done.stderr
    assert loaded_elsewhere(orphan, env) == digests(state(3))
    assert loaded_elsewhere(other, env) == digests(state(4))
    assert list(staging().iterdir()) == []


def test_failed_uploads_keep_the_journal_and_a_later_flush_completes_it(
    s3_bucket: str,
    endpoint: str,
    via_proxy: mlstore.Store,
    direct: mlstore.Store,
    env: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"s3://{s3_bucket}/run/failing"
    failing = {"fault": "status", "status": 503, "method": "PUT", "path": "/data/"}
    proxy.set_faults(endpoint, failing)
    info = mlstore.torch.save(state(5), url, store=via_proxy, staging="local")
    assert info.staged

    with caplog.at_level(logging.WARNING, logger="mlstore.checkpoint"):
        report = flush(via_proxy)

    assert report.failed == [url] and not report.ok and report.uploaded == []
    [journal] = journals()
    assert journal["state"] == "failed" and journal["attempts"] >= 1 and journal["error"]
    assert any(url in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert manifest_created(direct, url) is None
    assert direct.find(f"s3://{s3_bucket}/run/.chunks/locks/") == []  # the lock was released

    proxy.clear_faults(endpoint)
    report = flush(via_proxy)
    assert report.uploaded == [url] and report.ok
    assert list(staging().iterdir()) == []
    assert loaded_elsewhere(url, env) == digests(state(5))


def test_saves_to_one_url_commit_in_order_and_a_late_orphan_never_overwrites_a_newer_one(
    s3_bucket: str,
    endpoint: str,
    via_proxy: mlstore.Store,
    env: dict[str, str],
) -> None:
    url = f"s3://{s3_bucket}/run/latest"
    mlstore.torch.save(state(6), url, store=via_proxy, staging="local")
    mlstore.torch.save(state(7), url, store=via_proxy, staging="local")
    assert flush(via_proxy).ok
    assert loaded_elsewhere(url, env) == digests(state(7))

    kill_mid_upload(url, 8, env, endpoint)  # an older save, left half uploaded
    mlstore.torch.save(state(9), url, store=via_proxy)  # a newer one commits first

    report = flush(via_proxy)
    assert report.superseded == [url] and report.uploaded == []
    assert loaded_elsewhere(url, env) == digests(state(9))
    assert list(staging().iterdir()) == []


def test_the_journal_records_urls_never_store_options(s3_bucket: str, endpoint: str) -> None:
    key, secret = "AKIACANARY7Q3XW2LK9B", "canary+Secret/Value0123456789abcdefghijk"
    options = {"endpoint_url": endpoint, "key": key, "secret": secret}
    url = f"s3://{s3_bucket}/run/secret-free"
    with mlstore.Store(options={"s3": options}) as store:
        with CheckpointWriter(url, kind="files", store=store, staging="local") as writer:
            writer.add_bytes("blob", os.urandom(300_000))
            info = writer.commit({"note": "no secrets"})
        assert info.staged
        [journal] = journals()
        assert set(journal) == {
            *("version", "id", "url", "chunks_root", "chunks", "created"),
            *("state", "attempts", "error", "host", "pid"),
        }
        assert journal["url"] == url
        assert journal["chunks_root"] == f"s3://{s3_bucket}/run/.chunks"
        for path in staging().rglob("*"):
            if path.is_file():
                raw = path.read_bytes()
                assert key.encode() not in raw and secret.encode() not in raw, path
        assert flush(store).uploaded == [url]


def test_staging_needs_the_disk_cache(s3_bucket: str, endpoint: str) -> None:
    url = f"s3://{s3_bucket}/run/x"
    options = {"s3": {"endpoint_url": endpoint}}
    with mlstore.Store(options=options, cache={"enabled": False}) as store:
        with (
            pytest.raises(ConfigError, match="MLSTORE_CACHE") as caught,
            CheckpointWriter(url, kind="files", store=store, staging="local"),
        ):
            pass
        assert caught.value.url == url
        with pytest.raises(ConfigError, match="MLSTORE_CACHE"):
            flush(store)
    with (
        mlstore.Store(options=options, cache={"disk_bytes": 0}) as store,
        pytest.raises(ConfigError, match="disk_bytes"),
    ):
        mlstore.torch.save(state(1), url, store=store, staging="local")
    with pytest.raises(ConfigError, match="staging must be"):
        CheckpointWriter(url, kind="files", staging="remote")
    assert not staging().exists() or list(staging().iterdir()) == []
