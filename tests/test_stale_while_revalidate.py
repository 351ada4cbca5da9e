"""Past the ttl, a cached copy is served at once and checked in the background, by one
process on the node (``CacheConfig.stale_while_revalidate``), against a real S3
(moto_server) behind the counting proxy; the node-wide claims with real processes and a
real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mlstore
from mlstore import Store
from tests.conftest import run_child
from tests.emulators import ServerProcess
from tests.servers import proxy

pytestmark = pytest.mark.s3

TTL = 10.0
WINDOW = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def via_proxy(s3_proxy: ServerProcess) -> Iterator[str]:
    proxy.reset(s3_proxy.endpoint)
    proxy.clear_faults(s3_proxy.endpoint)
    yield s3_proxy.endpoint
    proxy.clear_faults(s3_proxy.endpoint)


@pytest.fixture
def cache_dir(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


def make_store(endpoint: str, cache_dir: str, clock: Any = None, **cache: Any) -> Store:
    settings = {
        "disk_dir": cache_dir,
        "validate": "ttl",
        "ttl": TTL,
        "stale_while_revalidate": WINDOW,
        **cache,
    }
    return Store(options={"s3": {"endpoint_url": endpoint}}, cache=settings, clock=clock)


def upload(endpoint: str, url: str, data: bytes) -> None:
    """Write with a cache-less Store: another tool, as far as the node cache knows."""
    with Store(options={"s3": {"endpoint_url": endpoint}}, cache={"enabled": False}) as s:
        s.write_bytes(url, data)


def counts(endpoint: str) -> tuple[int, int]:
    return proxy.requests(endpoint, "HEAD"), proxy.requests(endpoint, "GET")


# ---------------------------------------------------------------- one process


def test_past_the_ttl_a_copy_is_served_at_once_and_checked_in_the_background(
    via_proxy: str, s3_bucket: str, cache_dir: str
) -> None:
    clock = Clock()
    url = f"s3://{s3_bucket}/swr/same.bin"
    upload(via_proxy, url, b"version one")
    with make_store(via_proxy, cache_dir, clock) as store:
        assert store.read_bytes(url) == b"version one"
        clock.now += TTL + 1
        proxy.reset(via_proxy)
        assert store.read_bytes(url) == b"version one"
        assert store.cache.settle(30)
        assert counts(via_proxy) == (1, 0), "one HEAD, in the background; no GET"
        stats = store.stats()
        assert stats.get("stale_served", "cache") == 1
        assert stats.get("revalidations", "cache") == 1
        clock.now += TTL - 1  # restamped by the check: trusted for another ttl
        proxy.reset(via_proxy)
        for _ in range(3):
            assert store.read_bytes(url) == b"version one"
        assert proxy.counts(via_proxy)["total"] == 0


def test_a_copy_changed_in_the_store_is_served_within_the_window_then_replaced(
    via_proxy: str, s3_bucket: str, cache_dir: str
) -> None:
    clock = Clock()
    changed, deleted = f"s3://{s3_bucket}/swr/changed.bin", f"s3://{s3_bucket}/swr/deleted.bin"
    upload(via_proxy, changed, b"version one")
    upload(via_proxy, deleted, b"here")
    with make_store(via_proxy, cache_dir, clock) as store:
        store.read_bytes(changed), store.read_bytes(deleted)
        upload(via_proxy, changed, b"version two")
        with Store(options={"s3": {"endpoint_url": via_proxy}}, cache={"enabled": False}) as s:
            s.rm(deleted)
        clock.now += TTL + 1
        # Bounded staleness: within the window, the old copy once more...
        assert store.read_bytes(changed) == b"version one"
        assert store.read_bytes(deleted) == b"here"
        assert store.cache.settle(30)
        # ...and once the check is done, the store's answer.
        assert store.read_bytes(changed) == b"version two"
        with pytest.raises(mlstore.NotFoundError):
            store.read_bytes(deleted)
        assert store.stats().get("stale", "cache") == 2
    with make_store(via_proxy, cache_dir, clock) as fresh:  # and so does the next process
        assert fresh.read_bytes(changed) == b"version two"


def test_past_the_window_a_copy_is_checked_before_it_is_served(
    via_proxy: str, s3_bucket: str, cache_dir: str
) -> None:
    clock = Clock()
    url = f"s3://{s3_bucket}/swr/old.bin"
    upload(via_proxy, url, b"version one")
    with make_store(via_proxy, cache_dir, clock) as store:
        store.read_bytes(url)
        upload(via_proxy, url, b"version two")
        clock.now += TTL + WINDOW + 1
        proxy.reset(via_proxy)
        assert store.read_bytes(url) == b"version two"
        assert counts(via_proxy) == (1, 1)
        assert store.stats().get("stale_served", "cache") == 0


def test_a_window_of_zero_checks_every_copy_past_the_ttl_before_serving_it(
    via_proxy: str, s3_bucket: str, cache_dir: str
) -> None:
    clock = Clock()
    url = f"s3://{s3_bucket}/swr/optout.bin"
    upload(via_proxy, url, b"version one")
    with make_store(via_proxy, cache_dir, clock, stale_while_revalidate=0) as store:
        store.read_bytes(url)
        upload(via_proxy, url, b"version two")
        clock.now += TTL + 1
        assert store.read_bytes(url) == b"version two"


def test_a_ttl_of_zero_checks_every_read_whatever_the_window(
    via_proxy: str, s3_bucket: str, cache_dir: str
) -> None:
    url = f"s3://{s3_bucket}/swr/ttl0.bin"
    upload(via_proxy, url, b"version one")
    with make_store(via_proxy, cache_dir, ttl=0) as store:
        assert store.read_bytes(url) == b"version one"
        upload(via_proxy, url, b"version two")
        assert store.read_bytes(url) == b"version two"
        assert store.stats().get("stale_served", "cache") == 0


def test_open_serves_a_copy_within_the_window_and_checks_it_in_the_background(
    via_proxy: str, s3_bucket: str, cache_dir: str
) -> None:
    clock = Clock()
    url = f"s3://{s3_bucket}/swr/opened.bin"
    upload(via_proxy, url, b"version one")
    with make_store(via_proxy, cache_dir, clock) as filler:
        filler.read_bytes(url)
    upload(via_proxy, url, b"version two")
    clock.now += TTL + 1
    with make_store(via_proxy, cache_dir, clock) as store:
        proxy.reset(via_proxy)
        with store.open(url) as fh:
            assert fh.read() == b"version one"
        assert store.cache.settle(30)
        assert counts(via_proxy) == (1, 0)
        with store.open(url) as fh:
            assert fh.read() == b"version two"


def test_a_check_that_fails_leaves_the_copy_served_within_the_window(
    via_proxy: str, s3_bucket: str, cache_dir: str
) -> None:
    clock = Clock()
    url = f"s3://{s3_bucket}/swr/denied.bin"
    upload(via_proxy, url, b"version one")
    with make_store(via_proxy, cache_dir, clock) as store:
        store.read_bytes(url)
        clock.now += TTL + 1
        proxy.set_faults(via_proxy, {"fault": "status", "method": "HEAD", "status": 403})
        assert store.read_bytes(url) == b"version one", "the failed check is not the read's"
        assert store.cache.settle(30)
        assert store.read_bytes(url) == b"version one"
        proxy.clear_faults(via_proxy)
        clock.now += WINDOW  # past the window: checked in line, and it succeeds
        proxy.reset(via_proxy)
        assert store.read_bytes(url) == b"version one"
        assert counts(via_proxy) == (1, 0)


def test_a_memory_copy_takes_the_stamp_another_process_checked(
    via_proxy: str, s3_bucket: str, cache_dir: str
) -> None:
    clock = Clock()
    url = f"s3://{s3_bucket}/swr/memory.bin"
    upload(via_proxy, url, b"version one")
    with (
        make_store(via_proxy, cache_dir, clock) as reader,
        make_store(via_proxy, cache_dir, clock) as neighbour,
    ):
        for _ in range(3):  # the second read from disk copies it to the memory tier
            reader.read_bytes(url)
        assert reader.cache.memory.size() > 0
        clock.now += TTL + 1
        proxy.reset(via_proxy)
        assert neighbour.read_bytes(url) == b"version one"
        assert neighbour.cache.settle(30)
        assert reader.read_bytes(url) == b"version one"
        assert reader.cache.settle(30)
        assert counts(via_proxy) == (1, 0), "the reader trusted the neighbour's check"
        assert reader.stats().get("stale_served", "cache") == 0


# ---------------------------------------------------------------- the node


def _child_code(
    endpoint: str, cache_dir: str, offset: float, urls: list[str], window: float = WINDOW
) -> str:
    """A process whose clock runs ``offset`` seconds ahead, reading ``urls``."""
    return f"""
        import json, time
        from mlstore import Store
        store = Store(
            options={{"s3": {{"endpoint_url": {endpoint!r}}}}},
            cache={{"disk_dir": {cache_dir!r}, "validate": "ttl", "ttl": {TTL},
                    "stale_while_revalidate": {window}}},
            clock=lambda: time.time() + {offset},
        )
        got = [store.read_bytes(u).decode() for u in {urls!r}]
        settled = store.cache.settle(60)
        stats = store.stats()
        print(json.dumps({{"got": got, "settled": settled,
                           "checks": stats.get("revalidations", "cache")}}))
    """


def test_one_check_per_object_per_node_however_many_processes_read_it(
    via_proxy: str, s3_bucket: str, cache_dir: str
) -> None:
    urls = [f"s3://{s3_bucket}/swr/node-{i}.bin" for i in range(20)]
    for i, url in enumerate(urls):
        upload(via_proxy, url, f"object {i}".encode())
    with make_store(via_proxy, cache_dir) as filler:
        for url in urls:
            filler.read_bytes(url)
    proxy.reset(via_proxy)
    code = _child_code(via_proxy, cache_dir, TTL + 1, urls)  # every copy past the ttl
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = []
    for reader in readers:
        out, err = reader.communicate(timeout=120)
        assert reader.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    expected = [f"object {i}" for i in range(20)]
    assert all(r["got"] == expected and r["settled"] for r in results)
    assert sum(r["checks"] for r in results) == len(urls), "one check per object"
    assert counts(via_proxy) == (len(urls), 0), "one HEAD per object for the whole node"


def test_a_claim_whose_holder_was_killed_lapses(
    via_proxy: str, s3_bucket: str, cache_dir: str
) -> None:
    url = f"s3://{s3_bucket}/swr/killed.bin"
    upload(via_proxy, url, b"version one")
    with make_store(via_proxy, cache_dir) as filler:
        filler.read_bytes(url)
    upload(via_proxy, url, b"version two")
    proxy.set_faults(via_proxy, {"fault": "stall", "method": "HEAD", "before_headers": True})
    holder_code = f"""
        import sys, time
        from mlstore import Store
        store = Store(
            options={{"s3": {{"endpoint_url": {via_proxy!r}}}}},
            cache={{"disk_dir": {cache_dir!r}, "validate": "ttl", "ttl": {TTL},
                    "stale_while_revalidate": 600}},
            clock=lambda: time.time() + {TTL + 1},
        )
        assert store.read_bytes({url!r}) == b"version one"
        print("claimed", flush=True)  # the claim is taken before the read returns
        sys.stdin.read()
    """
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(holder_code)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    with holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "claimed"
        finally:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(30)
    proxy.clear_faults(via_proxy)
    proxy.reset(via_proxy)
    # While the dead holder's claim lasts, others serve the copy and leave the check.
    held = run_child(_child_code(via_proxy, cache_dir, TTL + 1, [url], window=600), {})
    assert held == {"got": ["version one"], "settled": True, "checks": 0}
    assert counts(via_proxy) == (0, 0)
    # Once it lapses (a clock a minute on, within this test's long window), one check.
    lapsed = run_child(_child_code(via_proxy, cache_dir, TTL + 62, [url], window=600), {})
    assert lapsed == {"got": ["version one"], "settled": True, "checks": 1}
    after = run_child(_child_code(via_proxy, cache_dir, TTL + 62, [url], window=600), {})
    assert after["got"] == ["version two"]


def test_the_stale_window_is_a_setting_with_an_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLSTORE_STALE_WHILE_REVALIDATE", "5")
    assert mlstore.CacheConfig().stale_while_revalidate == 5.0
    monkeypatch.setenv("MLSTORE_STALE_WHILE_REVALIDATE", "-1")
    with pytest.raises(mlstore.ConfigError, match="stale_while_revalidate"):
        mlstore.CacheConfig()
