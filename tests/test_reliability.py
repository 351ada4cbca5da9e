"""Reliability under injected faults: RELIABILITY.md R1-R9 and R19, on S3 (moto_server)
through the fault proxy (tests/servers/proxy.py), which answers 503/429/500, resets,
truncates, stalls or flips bytes on the requests a test picks, and counts every request.

Every scenario counts what happened: requests sent, retries, resumes, failed reads and
corrupt reads (bytes that differ from what was written). Waits between attempts go
through an injected sleep, so backoff and deadlines are exact and take no time; only
the stall scenario waits for a real read timeout (one second).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlstore import Store
from mlstore.errors import (
    MlstoreError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionFailedError,
    ThrottledError,
    TransientError,
)
from mlstore.hashing import content_hash
from tests.emulators import ServerProcess
from tests.servers import proxy
from tests.test_file_properties import Op, check, contents, operations

pytestmark = pytest.mark.s3

KiB = 1024
MiB = 1024 * KiB
CANARY_KEY = "AKIACANARY0RELIABLE"
CANARY_SECRET = "canary-secret-0f1e2d3c4b5a69788796a5b4c3d2e1f0"


class FakeTime:
    """A clock that moves only when the code under test sleeps; ``on_sleep`` runs at
    each wait (between two attempts)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[], None] | None = None

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep()


def make_store(
    endpoint: str,
    t: FakeTime | None = None,
    *,
    cache: dict[str, Any] | None = None,
    **retry: Any,
) -> Store:
    policy = {"max_attempts": 5, "deadline": 120.0, "backoff_base": 0.05, "backoff_max": 1.0}
    policy.update(retry)
    return Store(
        options={"s3": {"endpoint_url": endpoint, "key": CANARY_KEY, "secret": CANARY_SECRET}},
        cache=cache if cache is not None else {"enabled": False},
        retry=policy,
        clock=t.clock if t else None,
        sleep=t.sleep if t else None,
    )


@pytest.fixture
def faults(s3_fault_proxy: ServerProcess) -> str:
    return s3_fault_proxy.endpoint


@pytest.fixture
def writer(s3_options: dict[str, object]) -> Iterator[Store]:
    """Writes straight to moto (not through the proxy), with mlstore's content hash."""
    with Store(options={"s3": s3_options}, cache={"enabled": False}) as store:
        yield store


def upload(
    writer: Store, bucket: str, count: int, size: int, prefix: str = "obj"
) -> dict[str, bytes]:
    objects = {f"s3://{bucket}/{prefix}/{i:04d}": os.urandom(size) for i in range(count)}
    for url, data in objects.items():
        writer.write_bytes(url, data)
    return objects


def gets(endpoint: str) -> int:
    return int(proxy.counts(endpoint)["methods"].get("GET", 0))


def fired(endpoint: str, kind: str) -> int:
    return int(proxy.counts(endpoint).get("faults", {}).get(kind, 0))


# ---------------------------------------------------------------- R1: 503 storm


def _read_all(args: tuple[str, list[str], int]) -> tuple[list[str], int, int, int]:
    endpoint, urls, rounds = args
    store = make_store(endpoint, backoff_base=0.01, backoff_max=0.05, max_attempts=8)
    hashes, failed = [], 0
    for _ in range(rounds):
        for url in urls:
            try:
                hashes.append(content_hash(store.read_bytes(url)))
            except MlstoreError:
                failed += 1
    stats = store.stats()
    return hashes, failed, stats.get("retries", "s3"), stats.get("throttles", "s3")


@pytest.mark.slow
def test_r1_a_503_storm_costs_bounded_extra_requests_and_no_failures(
    faults: str, writer: Store, s3_bucket: str
) -> None:
    objects = upload(writer, s3_bucket, 50, 16 * KiB)
    urls = list(objects)
    proxy.set_faults(
        faults, {"fault": "status", "status": 503, "method": "GET", "probability": 0.1, "seed": 1}
    )
    processes, rounds = 4, 3
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        results = pool.map(_read_all, [(faults, urls, rounds) for _ in range(processes)])
    reads = processes * rounds * len(urls)
    expected = [content_hash(objects[u]) for u in urls] * rounds
    corrupt = sum(h != e for r in results for h, e in zip(r[0], expected, strict=True))
    failed = sum(r[1] for r in results)
    retries = sum(r[2] for r in results)
    throttles = sum(r[3] for r in results)
    sent = gets(faults)
    assert (failed, corrupt) == (0, 0)
    assert fired(faults, "status") == throttles == retries > 0
    assert sent == reads + retries, "one request per read plus one per retry: no hidden layer"
    assert sent / reads - 1 <= 0.15, f"{sent} requests for {reads} reads"


# ---------------------------------------------------------------- R2: throttled past the deadline


def test_r2_throttling_past_the_deadline_raises_throttled_error_in_time(
    faults: str, writer: Store, s3_bucket: str
) -> None:
    url = next(iter(upload(writer, s3_bucket, 1, KiB)))
    proxy.set_faults(faults, {"fault": "status", "status": 503, "method": "GET"})
    t = FakeTime()
    start = t.now
    with make_store(
        faults, t, max_attempts=50, deadline=10.0, backoff_base=1.0, backoff_max=4.0
    ) as store:
        with pytest.raises(ThrottledError) as info:
            store.read_bytes(url)
        assert store.stats().get("give_ups", "s3") == 1
    assert info.value.url == url
    assert t.now - start <= 10.0 + 1.0, "given up by the deadline"
    assert gets(faults) == len(t.sleeps) + 1 < 50


def test_r2_attempts_never_exceed_max_attempts(faults: str, writer: Store, s3_bucket: str) -> None:
    url = next(iter(upload(writer, s3_bucket, 1, KiB)))
    proxy.set_faults(faults, {"fault": "status", "status": 503, "method": "GET"})
    t = FakeTime()
    with make_store(faults, t, max_attempts=3) as store, pytest.raises(ThrottledError):
        store.read_bytes(url)
    assert gets(faults) == 3, "exactly max_attempts requests: one retry layer, not 5 x 5"


# ---------------------------------------------------------------- R3: Retry-After


def test_r3_retry_after_is_honoured(faults: str, writer: Store, s3_bucket: str) -> None:
    url, data = next(iter(upload(writer, s3_bucket, 1, KiB).items()))
    proxy.set_faults(
        faults,
        {
            "fault": "status",
            "status": 429,
            "method": "GET",
            "times": 1,
            "headers": {"Retry-After": "2"},
        },
    )
    t = FakeTime()
    with make_store(faults, t) as store:
        assert store.read_bytes(url) == data
        assert store.stats().get("throttles", "s3") == 1
    assert len(t.sleeps) == 1 and 2.0 <= t.sleeps[0] <= 2.5
    assert gets(faults) == 2


# ---------------------------------------------------------------- R4: permanent errors


@pytest.mark.parametrize(
    ("status", "error"),
    [(400, MlstoreError), (403, PermissionDeniedError), (404, NotFoundError)],
)
def test_r4_a_permanent_error_is_raised_at_once_after_one_request(
    faults: str,
    writer: Store,
    s3_bucket: str,
    status: int,
    error: type[MlstoreError],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"s3://{s3_bucket}/missing-{status}.bin"
    if status != 404:  # a real 404 from the emulator; the others injected
        url = next(iter(upload(writer, s3_bucket, 1, KiB, prefix=f"r4-{status}")))
        proxy.set_faults(faults, {"fault": "status", "status": status, "method": "GET"})
    t = FakeTime()
    caplog.set_level(logging.DEBUG)
    with make_store(faults, t) as store, pytest.raises(error) as info:
        store.read_bytes(url)
    assert not isinstance(info.value, TransientError)
    assert proxy.counts(faults)["total"] == 1 and t.sleeps == []
    assert url in str(info.value)
    captured = caplog.text + str(info.value) + repr(info.value)
    assert CANARY_SECRET not in captured


def test_retry_logs_carry_no_secret(
    faults: str, writer: Store, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = next(iter(upload(writer, s3_bucket, 1, KiB)))
    proxy.set_faults(faults, {"fault": "status", "status": 503, "method": "GET", "times": 2})
    caplog.set_level(logging.DEBUG)
    with make_store(faults, FakeTime()) as store:
        store.read_bytes(url)
    assert "retrying" in caplog.text
    assert CANARY_SECRET not in caplog.text and CANARY_KEY not in caplog.text


# ---------------------------------------------------------------- R5/R6/R9: interrupted bodies


@pytest.mark.parametrize("kind", ["truncate", "stall"])
def test_an_interrupted_body_resumes_where_it_stopped_pinned_to_its_version(
    faults: str, writer: Store, s3_bucket: str, kind: str
) -> None:
    url, data = next(iter(upload(writer, s3_bucket, 1, MiB, prefix=kind).items()))
    offset = 300 * KiB
    proxy.set_faults(faults, {"fault": kind, "method": "GET", "offset": offset, "times": 1})
    # R9: a stalled body is abandoned after read_timeout (1 s here), then resumed.
    with make_store(faults, FakeTime(), read_timeout=1.0) as store:
        assert store.read_bytes(url) == data
        stats = store.stats()
        assert (stats.get("resumes", "s3"), stats.get("retries", "s3")) == (1, 1)
    first, second = [e for e in proxy.request_log(faults) if e["method"] == "GET"]
    assert first["fault"] == kind and first["range"] is None
    assert second["range"] == f"bytes={offset}-{MiB - 1}"
    assert second["if_match"] is not None, "the rest is pinned to the first response's ETag"
    assert proxy.counts(faults)["bytes_out"] == MiB, "nothing downloaded twice"


def test_r5_resets_at_random_offsets_lose_nothing_and_refetch_little(
    faults: str, writer: Store, s3_bucket: str
) -> None:
    objects = upload(writer, s3_bucket, 40, 512 * KiB, prefix="r5")
    rules = [
        {"fault": "reset", "method": "GET", "offset": off, "probability": 0.05, "seed": i}
        for i, off in enumerate((17 * KiB, 130 * KiB, 301 * KiB, 480 * KiB))
    ]
    proxy.set_faults(faults, *rules)
    corrupt = failed = 0
    with make_store(faults, FakeTime()) as store:
        for _ in range(2):
            for url, data in objects.items():
                try:
                    corrupt += store.read_bytes(url) != data
                except MlstoreError:
                    failed += 1
    assert (failed, corrupt) == (0, 0)
    assert fired(faults, "reset") > 0
    size = 2 * sum(len(d) for d in objects.values())
    assert proxy.counts(faults)["bytes_out"] <= 1.1 * size


def test_r6_truncated_bodies_are_never_cached(
    faults: str, writer: Store, s3_bucket: str, tmp_path: Path
) -> None:
    objects = upload(writer, s3_bucket, 100, 8 * KiB, prefix="r6")
    proxy.set_faults(
        faults, {"fault": "truncate", "method": "GET", "offset": 1000, "probability": 0.5}
    )
    cache = {"disk_dir": str(tmp_path / "cache")}
    time = FakeTime()  # one clock for both Stores: the second reads later, not earlier
    # Half the bodies stop after 1,000 bytes, resumed parts included: room to finish.
    with make_store(faults, time, cache=cache, max_attempts=20) as store:
        assert all(store.read_bytes(u) == d for u, d in objects.items())
        assert store.cache.verify() == {"checked": 100, "dropped": 0}
    assert fired(faults, "truncate") > 20
    # Everything now comes from the disk tier, and every entry is whole.
    proxy.set_faults(faults, {"fault": "status", "status": 500})
    with make_store(faults, time, cache=cache, max_attempts=1) as store:
        assert all(store.read_bytes(u) == d for u, d in objects.items())


# ---------------------------------------------------------------- R7: flipped bytes


def test_r7_a_flipped_byte_is_detected_and_refetched(
    faults: str, writer: Store, s3_bucket: str, tmp_path: Path
) -> None:
    objects = upload(writer, s3_bucket, 100, 8 * KiB, prefix="r7")
    proxy.set_faults(faults, {"fault": "flip", "method": "GET", "probability": 0.1, "seed": 7})
    cache = {"disk_dir": str(tmp_path / "cache")}
    with make_store(faults, FakeTime(), cache=cache) as store:
        corrupt = sum(store.read_bytes(u) != d for u, d in objects.items())
        retries = store.stats().get("retries", "s3")
    flips = fired(faults, "flip")
    assert corrupt == 0 and flips > 0
    assert retries == flips, "each corrupted body was refused and fetched again"


# ---------------------------------------------------------------- R8: overwritten mid-read


def test_r8_an_object_overwritten_between_range_reads_is_never_mixed(
    faults: str, writer: Store, s3_bucket: str
) -> None:
    url = f"s3://{s3_bucket}/r8.bin"
    outcomes = {"error": 0, "mixed": 0}
    with make_store(faults, FakeTime()) as store:
        for _ in range(50):
            old, new = os.urandom(64 * KiB), os.urandom(64 * KiB)
            writer.write_bytes(url, old)
            with store.open(url, buffer_size=4 * KiB) as fh:
                head = fh.read(16 * KiB)
                writer.write_bytes(url, new)
                try:
                    rest = fh.read()
                except PreconditionFailedError:
                    outcomes["error"] += 1
                    continue
            outcomes["mixed"] += (head + rest) not in (old, new)
    assert outcomes == {"error": 50, "mixed": 0}


def test_r8_a_whole_read_resumed_across_an_overwrite_restarts_on_one_version(
    faults: str, writer: Store, s3_bucket: str
) -> None:
    url = f"s3://{s3_bucket}/r8-whole.bin"
    old, new = os.urandom(MiB), os.urandom(MiB)
    writer.write_bytes(url, old)
    proxy.set_faults(
        faults, {"fault": "truncate", "method": "GET", "offset": 200 * KiB, "times": 1}
    )
    t = FakeTime()
    t.on_sleep = lambda: writer.write_bytes(url, new)  # overwritten between the attempts
    with make_store(faults, t) as store:
        assert store.read_bytes(url) == new
        stats = store.stats()
        assert (stats.get("resumes", "s3"), stats.get("restarts", "s3")) == (1, 1)
    statuses = [e["status"] for e in proxy.request_log(faults) if e["method"] == "GET"]
    assert statuses == [200, 412, 200], "resume refused by If-Match, then one clean GET"


def test_r8_a_pinned_read_resumed_across_an_overwrite_raises(
    faults: str, writer: Store, s3_bucket: str
) -> None:
    url = f"s3://{s3_bucket}/r8-pinned.bin"
    writer.write_bytes(url, os.urandom(MiB))
    t = FakeTime()
    with make_store(faults, t) as store:
        fh = store.open(url, buffer_size=512 * KiB)
        proxy.set_faults(
            faults, {"fault": "truncate", "method": "GET", "offset": 100 * KiB, "times": 1}
        )
        t.on_sleep = lambda: writer.write_bytes(url, os.urandom(MiB))
        with fh, pytest.raises(PreconditionFailedError) as info:
            fh.read()
    assert info.value.url == url


# ---------------------------------------------------------------- R19: file semantics under faults


@pytest.fixture(scope="module")
def r19_setup(s3_faults: ServerProcess, moto: ServerProcess) -> Iterator[tuple[Store, Store, str]]:
    bucket = f"r19-{uuid.uuid4().hex[:12]}"
    direct = Store(options={"s3": {"endpoint_url": moto.endpoint}}, cache={"enabled": False})
    direct.mkdir(f"s3://{bucket}")
    proxy.clear_faults(s3_faults.endpoint)
    proxy.set_faults(
        s3_faults.endpoint,
        {"fault": "truncate", "method": "GET", "offset": 3, "probability": 0.3, "seed": 19},
        {"fault": "status", "status": 503, "method": "GET", "probability": 0.1, "seed": 20},
    )
    store = make_store(s3_faults.endpoint, FakeTime(), max_attempts=20)
    yield store, direct, bucket
    proxy.clear_faults(s3_faults.endpoint)
    store.close()
    direct.close()


@settings(max_examples=60, deadline=None)
@given(
    data=contents,
    buffer_size=st.integers(min_value=1, max_value=40),
    ops=st.lists(operations, max_size=20),
)
def test_r19_an_s3_file_under_faults_behaves_like_bytesio(
    r19_setup: tuple[Store, Store, str], data: bytes, buffer_size: int, ops: list[Op]
) -> None:
    store, direct, bucket = r19_setup
    url = f"s3://{bucket}/{uuid.uuid4().hex}"

    def make(content: bytes, size: int) -> Any:
        direct.write_bytes(url, content)
        return store.open(url, "rb", buffer_size=size)

    check(make, data, buffer_size, ops)


# ---------------------------------------------------------------- hedged reads


def test_a_slow_read_is_hedged_and_the_loser_cancelled(
    faults: str, writer: Store, s3_bucket: str
) -> None:
    url, data = next(iter(upload(writer, s3_bucket, 1, 64 * KiB, prefix="hedge").items()))
    # The first GET hangs before answering; its copy, sent after 0.2 s, answers.
    proxy.set_faults(
        faults, {"fault": "stall", "method": "GET", "before_headers": True, "times": 1}
    )
    with make_store(faults, FakeTime(), hedge_after=0.2) as store:
        assert store.read_bytes(url) == data
        stats = store.stats()
        assert (stats.get("hedges", "s3"), stats.get("hedge_wins", "s3")) == (1, 1)
        assert stats.get("retries", "s3") == 0
    assert gets(faults) == 2
    assert proxy.wait_idle(faults) == 0, "the stalled request was cancelled (connection closed)"


def test_hedges_stay_within_five_percent_of_reads(
    faults: str, writer: Store, s3_bucket: str
) -> None:
    objects = upload(writer, s3_bucket, 40, 4 * KiB, prefix="hedge-cap")
    proxy.set_faults(faults, {"fault": "latency", "method": "GET", "seconds": 0.05})
    with make_store(faults, FakeTime(), hedge_after=0.001) as store:
        assert all(store.read_bytes(u) == d for u, d in objects.items())
        hedges = store.stats().get("hedges", "s3")
    assert 1 <= hedges <= 0.05 * 40 + 1
    assert gets(faults) == 40 + hedges


def test_percentile_hedging_waits_for_enough_samples() -> None:
    from mlstore.backends._hedge import Hedge

    hedge = Hedge("p95")
    assert hedge.delay() is None, "no latency known yet: no hedge"
    for ms in range(1, 101):
        hedge.observe(ms / 1000)
    assert hedge.delay() == pytest.approx(0.096)
    fixed = Hedge(0.25)
    assert fixed.delay() == 0.25
    for _ in range(100):
        fixed.started()
    assert sum(fixed.allow() for _ in range(50)) == 6, "5% of 100 reads, plus one"


@pytest.mark.parametrize("bad", ["p100", "p5", "fast", "-1", 0])
def test_a_bad_hedge_setting_is_a_config_error(bad: object) -> None:
    from mlstore.config import RetryPolicy
    from mlstore.errors import ConfigError

    with pytest.raises(ConfigError, match="hedge_after"):
        RetryPolicy(hedge_after=bad)  # type: ignore[arg-type]
    assert RetryPolicy(hedge_after="P95").hedge_after == "p95"


# ---------------------------------------------------------------- GCS and Azure


@pytest.mark.gcs
@pytest.mark.parametrize("kind", ["truncate", "reset"])
def test_gcs_resumes_an_interrupted_download_pinned_to_its_generation(
    gcs_fault_proxy: ServerProcess,
    gcs_fault_options: dict[str, object],
    gcs_options: dict[str, object],
    gcs_bucket: str,
    kind: str,
) -> None:
    url, data = f"gs://{gcs_bucket}/resume-{kind}.bin", os.urandom(MiB)
    with Store(options={"gs": gcs_options}, cache={"enabled": False}) as direct:
        direct.write_bytes(url, data)
    endpoint = gcs_fault_proxy.endpoint
    proxy.set_faults(
        endpoint,
        {"fault": kind, "method": "GET", "path": "/download/", "offset": 300 * KiB, "times": 1},
    )
    retry = {"max_attempts": 5, "backoff_base": 0.01, "backoff_max": 0.05}
    t = FakeTime()
    with Store(
        options={"gs": gcs_fault_options}, cache={"enabled": False}, retry=retry, sleep=t.sleep
    ) as store:
        assert store.read_bytes(url) == data
        resumes = store.stats().get("resumes", "gs")
    downloads = [e for e in proxy.request_log(endpoint) if "/download/" in e["path"]]
    assert len(downloads) == 2 and downloads[0]["fault"] == kind
    if kind == "truncate":  # every byte sent before a FIN arrives: resumed exactly there
        assert resumes == 1
        assert downloads[1]["range"] == f"bytes={300 * KiB}-{MiB - 1}"
    if downloads[1]["range"] is not None:
        assert downloads[1]["generation"] is not None, "the rest is pinned to the generation"


@pytest.mark.azure
@pytest.mark.parametrize("kind", ["truncate", "stall"])
def test_azure_resumes_an_interrupted_download_pinned_to_its_etag(
    az_fault_proxy: ServerProcess,
    az_fault_options: dict[str, object],
    az_options: dict[str, object],
    az_container: str,
    kind: str,
) -> None:
    url, data = f"az://{az_container}/resume-{kind}.bin", os.urandom(MiB)
    with Store(options={"az": az_options}, cache={"enabled": False}) as direct:
        direct.write_bytes(url, data)
    endpoint = az_fault_proxy.endpoint
    proxy.set_faults(endpoint, {"fault": kind, "method": "GET", "offset": 300 * KiB, "times": 1})
    retry = {"max_attempts": 5, "backoff_base": 0.01, "backoff_max": 0.05, "read_timeout": 1.0}
    t = FakeTime()
    with Store(
        options={"az": az_fault_options}, cache={"enabled": False}, retry=retry, sleep=t.sleep
    ) as store:
        assert store.read_bytes(url) == data
        assert store.stats().get("resumes", "az") == 1
    gets_ = [e for e in proxy.request_log(endpoint) if e["method"] == "GET"]
    assert [e["fault"] for e in gets_] == [kind, None]
    assert gets_[1]["range"] == f"bytes={300 * KiB}-{MiB - 1}"
    assert gets_[1]["if_match"] is not None


# ---------------------------------------------------------------- writes


def test_whole_object_writes_are_retried(faults: str, s3_bucket: str, writer: Store) -> None:
    url = f"s3://{s3_bucket}/written.bin"
    proxy.set_faults(faults, {"fault": "status", "status": 503, "method": "PUT", "times": 2})
    with make_store(faults, FakeTime()) as store:
        store.write_bytes(url, b"first")
        proxy.set_faults(faults, {"fault": "status", "status": 500, "method": "PUT", "times": 1})
        with store.open(url, "wb") as fh:  # one whole-object PUT at close
            fh.write(b"second")
        assert store.stats().get("retries", "s3") == 3
    assert writer.read_bytes(url) == b"second"
    puts = [e["status"] for e in proxy.request_log(faults) if e["method"] == "PUT"]
    assert puts == [503, 503, 200, 500, 200], "write_bytes: two retries; the close's PUT: one"


@pytest.mark.gcs
@pytest.mark.azure
@pytest.mark.parametrize("cloud", ["gs", "az"])
def test_gcs_and_azure_ride_out_503s_and_fail_a_404_at_once(
    request: pytest.FixtureRequest, cloud: str
) -> None:
    if cloud == "gs":
        server = request.getfixturevalue("gcs_fault_proxy")
        options = request.getfixturevalue("gcs_fault_options")
        direct = request.getfixturevalue("gcs_options")
        root = f"gs://{request.getfixturevalue('gcs_bucket')}"
    else:
        server = request.getfixturevalue("az_fault_proxy")
        options = request.getfixturevalue("az_fault_options")
        direct = request.getfixturevalue("az_options")
        root = f"az://{request.getfixturevalue('az_container')}"
    data = os.urandom(64 * KiB)
    with Store(options={cloud: direct}, cache={"enabled": False}) as writer_:
        writer_.write_bytes(f"{root}/there.bin", data)
    proxy.set_faults(
        server.endpoint, {"fault": "status", "status": 503, "method": "GET", "times": 2}
    )
    t = FakeTime()
    retry = {"max_attempts": 5, "backoff_base": 0.5, "backoff_max": 1.0}
    with Store(
        options={cloud: options},
        cache={"enabled": False},
        retry=retry,
        clock=t.clock,
        sleep=t.sleep,
    ) as store:
        assert store.read_bytes(f"{root}/there.bin") == data
        stats = store.stats()
        assert (stats.get("retries", cloud), stats.get("throttles", cloud)) == (2, 2)
        proxy.clear_faults(server.endpoint)
        proxy.reset(server.endpoint)
        with pytest.raises(NotFoundError) as info:
            store.read_bytes(f"{root}/missing.bin")
    assert f"{root}/missing.bin" in str(info.value)
    assert len(t.sleeps) == 2, "the 404 was not retried"
    # One GET of the object; (GCS and Azure then list once, to tell a missing object
    # from a directory, so that a directory gets IsADirectoryError instead.)
    log = proxy.request_log(server.endpoint)
    assert [e["status"] for e in log if e["path"].endswith("missing.bin")] == [404]


@pytest.mark.gcs
@pytest.mark.azure
@pytest.mark.parametrize("cloud", ["gs", "az"])
def test_gcs_and_azure_refuse_a_flipped_body(request: pytest.FixtureRequest, cloud: str) -> None:
    fixtures = {
        "gs": ("gcs_fault_proxy", "gcs_fault_options", "gcs_options", "gcs_bucket"),
        "az": ("az_fault_proxy", "az_fault_options", "az_options", "az_container"),
    }[cloud]
    server, options, direct, bucket = (request.getfixturevalue(f) for f in fixtures)
    url, data = f"{cloud}://{bucket}/flipped.bin", os.urandom(64 * KiB)
    with Store(options={cloud: direct}, cache={"enabled": False}) as writer_:
        writer_.write_bytes(url, data)  # mlstore records the content hash
    proxy.set_faults(server.endpoint, {"fault": "flip", "method": "GET", "times": 1})
    t = FakeTime()
    with Store(
        options={cloud: options}, cache={"enabled": False}, clock=t.clock, sleep=t.sleep
    ) as store:
        assert store.read_bytes(url) == data
        assert store.stats().get("retries", cloud) == 1
    assert proxy.counts(server.endpoint)["faults"] == {"flip": 1}
