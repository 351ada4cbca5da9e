"""``mlstore cache serve``, a node-cache DaemonSet's container: it serves the node-wide
totals for Prometheus, prunes the cache to its budget on a schedule, and stops cleanly
on SIGTERM. Run as a real process against moto, scraped over HTTP."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import mlstore
from tests.test_cli_commands import ROOT, cli, config_for, ok

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

READY = re.compile(r"on http://127\.0\.0\.1:(\d+)/metrics; pruning to (.+) every 0\.1 s$")
SERVE = ["--port", "0", "--addr", "127.0.0.1", "--prune-every", "0.1"]
PRUNED = re.compile(r"^pruned .+ \((\d+) blobs\); the cache holds (.+)$")


def line(proc: subprocess.Popen[str]) -> str:
    """The next line the server prints (a hang guard of 60 s, not a pace)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    assert ready, "mlstore cache serve printed nothing for 60 s"
    return proc.stdout.readline().rstrip("\n")


@pytest.mark.s3
def test_serve_exports_the_node_totals_prunes_to_the_budget_and_stops_on_sigterm(
    s3_options: dict[str, object], s3_bucket: str, tmp_path: Path
) -> None:
    objects = 5
    with mlstore.Store(options={"s3": s3_options}, cache={"enabled": False}) as s:
        for i in range(objects):
            s.write_bytes(f"s3://{s3_bucket}/data/{i}.bin", os.urandom(900 + i))
    cache_dir = str(tmp_path / "node-cache")
    env = {**config_for(tmp_path, str(s3_options["endpoint_url"])), "MLSTORE_CACHE_DIR": cache_dir}
    ok(cli("warm", f"s3://{s3_bucket}/data/", env=env))  # about 4.5 KB on the node
    budget = 2500
    with subprocess.Popen(
        [sys.executable, "-m", "mlstore", "cache", "serve", *SERVE],
        env={
            **os.environ,
            **env,
            "MLSTORE_DISK_BYTES": str(budget),
            "PYTHONPATH": str(ROOT),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            served(proc, budget, cache_dir, objects)
        finally:
            if proc.poll() is None:
                proc.kill()


def served(proc: subprocess.Popen[str], budget: int, cache_dir: str, objects: int) -> None:
    """What a DaemonSet relies on: ready line, prunes, /metrics, a clean SIGTERM."""
    ready = READY.search(line(proc))
    assert ready, "no ready line"
    port = int(ready.group(1))
    pruned = PRUNED.match(line(proc))
    assert pruned and int(pruned.group(1)) >= 1
    left = sum(p.stat().st_size for p in (Path(cache_dir) / "blobs").glob("*/*"))
    assert left <= budget

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    gets = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "mlstore_requests_total" and s.labels == {"backend": "s3", "op": "get"}
    ]
    assert gets == [float(objects)]  # the warm process's GETs, one an object

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    assert proc.stdout is not None and proc.stdout.read().splitlines()[-1] == "stopped"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--port", "http"], "--port: must be a port number"),
        (["--prune-every", "-1"], "--prune-every: must be a number of seconds"),
    ],
)
def test_serve_refuses_bad_options_with_a_usage_error(args: list[str], says: str) -> None:
    done = cli("cache", "serve", *args)
    assert done.returncode == 2 and says in done.stderr, done.stderr


def test_serve_without_a_disk_tier_says_so(tmp_path: Path) -> None:
    done = cli("cache", "serve", "--port", "off", env={"MLSTORE_DISK_BYTES": "0"})
    assert done.returncode == 1 and "has no disk tier" in done.stderr, done.stderr
