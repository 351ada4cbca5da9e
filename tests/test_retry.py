"""The one retry layer: exact backoff, deadlines, Retry-After and the retry budget with
an injected clock, sleep and random source; then end to end against a real HTTP server
that answers 503 a set number of times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import pytest

import mlstore
from mlstore.config import RetryPolicy
from mlstore.errors import (
    ConnectionLostError,
    NotFoundError,
    StorageTimeoutError,
    ThrottledError,
    TransientError,
)
from mlstore.retry import Retrier, RetryBudget
from tests.emulators import ServerProcess


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing(times: int, error: Callable[[], TransientError]) -> Callable[[], str]:
    calls = {"n": 0}

    def fn() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise error()
        return "ok"

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def throttled(retry_after: float | None = None) -> ThrottledError:
    err = ThrottledError("slow down", url="s3://bucket/key", operation="read")
    err.retry_after = retry_after
    return err


def retrier(t: FakeTime, budget: RetryBudget | None = None, **policy: float) -> Retrier:
    settings = {"max_attempts": 5, "deadline": 100.0, "backoff_base": 1.0, "backoff_max": 8.0}
    settings.update(policy)
    return Retrier(
        RetryPolicy(**settings),  # type: ignore[arg-type]
        budget or RetryBudget(),
        sleep=t.sleep,
        clock=t.clock,
        rng=lambda: 0.999999,  # the top of each jitter range, to check the ceilings
    )


def test_full_jitter_ceilings_double_up_to_the_maximum() -> None:
    t = FakeTime()
    fn = failing(4, throttled)
    assert retrier(t, max_attempts=6, backoff_max=5.0).call(fn) == "ok"
    assert [round(s, 3) for s in t.sleeps] == [1.0, 2.0, 4.0, 5.0]


def test_jitter_is_drawn_below_the_ceiling() -> None:
    draws = iter([0.0, 0.5, 0.25])
    t = FakeTime()
    r = Retrier(
        RetryPolicy(backoff_base=2.0, backoff_max=100.0),
        RetryBudget(),
        sleep=t.sleep,
        clock=t.clock,
        rng=lambda: next(draws),
    )
    r.call(failing(3, throttled))
    assert t.sleeps == [0.0, 2.0, 2.0]  # 0*2, 0.5*4, 0.25*8


def test_retry_after_is_a_floor() -> None:
    t = FakeTime()
    retrier(t).call(failing(1, lambda: throttled(retry_after=2.0)))
    assert t.sleeps == [pytest.approx(2.0)]


def test_attempts_stop_at_max_attempts_with_the_last_error() -> None:
    t = FakeTime()
    fn = failing(100, throttled)
    with pytest.raises(ThrottledError):
        retrier(t, max_attempts=3).call(fn)
    assert fn.calls["n"] == 3  # type: ignore[attr-defined]


def test_no_attempt_starts_past_the_deadline() -> None:
    t = FakeTime()
    fn = failing(100, throttled)
    with pytest.raises(ThrottledError):
        retrier(t, max_attempts=100, deadline=10.0, backoff_max=4.0).call(fn)
    assert t.now <= 10.0
    assert sum(t.sleeps) <= 10.0
    assert fn.calls["n"] == 1 + len(t.sleeps)  # type: ignore[attr-defined]


def test_permanent_errors_are_not_retried() -> None:
    t = FakeTime()
    calls = {"n": 0}

    def missing() -> str:
        calls["n"] += 1
        raise NotFoundError("gone", url="s3://bucket/key", operation="read")

    with pytest.raises(NotFoundError):
        retrier(t).call(missing)
    assert calls["n"] == 1 and t.sleeps == []


def test_an_empty_budget_stops_retrying() -> None:
    t = FakeTime()
    budget = RetryBudget(capacity=10, retry_cost=5, refund=1)
    r = retrier(t, budget)
    fn = failing(100, throttled)
    with pytest.raises(ThrottledError):
        r.call(fn)
    assert fn.calls["n"] == 3, "two retries were paid for, then the bucket was empty"  # type: ignore[attr-defined]
    assert r.call(failing(0, throttled)) == "ok"
    assert budget.tokens == 1


def test_connection_errors_are_retried_too() -> None:
    t = FakeTime()
    lost = failing(2, lambda: ConnectionLostError("reset", url="s3://b/k", operation="read"))
    assert retrier(t).call(lost) == "ok"


def test_the_budget_pays_only_for_retries_that_happen() -> None:
    t = FakeTime()
    budget = RetryBudget(capacity=100, retry_cost=5, timeout_cost=10)
    with pytest.raises(ThrottledError):
        retrier(t, budget, max_attempts=3).call(failing(100, throttled))
    assert budget.tokens == 90, "two retries paid; the attempt limit, not the bucket, ended it"
    with pytest.raises(ThrottledError):
        retrier(t, budget, max_attempts=100, deadline=10.0, backoff_max=4.0).call(
            failing(100, throttled)
        )
    assert budget.tokens == 75, "three retries (waits 1, 2, 4); the fourth would pass 10 s"

    def missing() -> str:
        raise NotFoundError("gone", url="s3://b/k", operation="read")

    with pytest.raises(NotFoundError):
        retrier(t, budget).call(missing)
    assert budget.tokens == 75, "a permanent error is never paid for"
    timeout = failing(1, lambda: StorageTimeoutError("slow", url="s3://b/k", operation="read"))
    assert retrier(t, budget).call(timeout) == "ok"
    assert budget.tokens == 66, "a timeout costs more (10), the success earns 1 back"


def test_callbacks_see_each_retry_and_the_give_up() -> None:
    t = FakeTime()
    retries: list[tuple[str, int, float]] = []
    give_ups: list[tuple[str, int]] = []
    r = Retrier(
        RetryPolicy(max_attempts=3, backoff_base=1.0, backoff_max=8.0),
        RetryBudget(),
        sleep=t.sleep,
        clock=t.clock,
        rng=lambda: 0.5,
        on_retry=lambda error, attempt, delay: retries.append(
            (type(error).__name__, attempt, delay)
        ),
        on_give_up=lambda error, attempts: give_ups.append((type(error).__name__, attempts)),
    )
    with pytest.raises(ThrottledError):
        r.call(failing(100, throttled))
    assert retries == [("ThrottledError", 1, 0.5), ("ThrottledError", 2, 1.0)]
    assert give_ups == [("ThrottledError", 3)]
    assert t.sleeps == [0.5, 1.0]


def test_each_call_has_its_own_deadline() -> None:
    t = FakeTime()
    r = retrier(t, max_attempts=100, deadline=10.0, backoff_max=4.0)
    for _ in range(2):
        with pytest.raises(ThrottledError):
            r.call(failing(100, throttled))
    assert t.sleeps == pytest.approx([1.0, 2.0, 4.0] * 2, abs=1e-4), (
        "the second call starts its 10 s afresh"
    )


def test_time_spent_in_attempts_counts_against_the_deadline() -> None:
    t = FakeTime()
    calls = {"n": 0}

    def slow() -> str:
        calls["n"] += 1
        t.now += 5.0  # the attempt itself takes 5 s of the injected clock
        raise throttled()

    with pytest.raises(ThrottledError):
        retrier(t, max_attempts=100, deadline=10.0).call(slow)
    assert calls["n"] == 2 and t.sleeps == pytest.approx([1.0], abs=1e-4), (
        "at 11 s a third attempt could not start"
    )


def test_a_retried_function_may_call_through_the_same_retrier() -> None:
    t = FakeTime()
    r = retrier(t)
    inner = failing(2, throttled)
    outer_calls = {"n": 0}

    def outer() -> str:
        outer_calls["n"] += 1
        result = r.call(inner)
        if outer_calls["n"] == 1:
            raise throttled()
        return result

    assert r.call(outer) == "ok"
    assert outer_calls["n"] == 2 and inner.calls["n"] == 4  # type: ignore[attr-defined]


def test_importing_and_configuring_leave_tenacity_unloaded() -> None:
    code = (
        "import sys, mlstore\n"
        "from mlstore.config import RetryPolicy\n"
        "from mlstore.retry import Retrier, RetryBudget\n"
        "r = Retrier(RetryPolicy(), RetryBudget())\n"
        "assert r.backoff(1, Exception()) >= 0\n"
        "assert 'tenacity' not in sys.modules\n"
        "assert r.call(lambda: 7) == 7 and 'tenacity' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


# --------------------------------------------------------------- end to end


@pytest.fixture
def served(http_server: tuple[ServerProcess, str]) -> Iterator[tuple[str, str]]:
    server, root = http_server
    name = f"retry-{uuid.uuid4().hex[:8]}.bin"
    with open(os.path.join(root, name), "wb") as fh:
        fh.write(b"payload after the storm")
    yield server.endpoint, name


def requests_for(endpoint: str, path: str) -> int:
    with urllib.request.urlopen(f"{endpoint}/__requests", timeout=30) as resp:
        counts: dict[str, int] = json.load(resp)
    return counts.get(path, 0)


def store(t: FakeTime, **retry: float) -> mlstore.Store:
    return mlstore.Store(cache={"enabled": False}, retry=retry, sleep=t.sleep, clock=t.clock)


def test_a_503_storm_is_ridden_out(served: tuple[str, str]) -> None:
    endpoint, name = served
    t = FakeTime()
    path = f"/flaky/3/{name}"
    with store(t, max_attempts=5) as s:
        assert s.read_bytes(endpoint + path) == b"payload after the storm"
        stats = s.stats()
    assert requests_for(endpoint, path) == 4
    assert len(t.sleeps) == 3
    assert stats["retries"] == 3 and stats["throttles"] == 3


def test_retry_after_from_the_server_is_honoured(served: tuple[str, str]) -> None:
    endpoint, name = served
    t = FakeTime()
    with store(t, backoff_base=0.01) as s:
        s.read_bytes(f"{endpoint}/flaky/1/{name}?retry_after=2")
    assert t.sleeps == [pytest.approx(2.0)]


def test_giving_up_raises_the_typed_error_naming_the_url(served: tuple[str, str]) -> None:
    endpoint, name = served
    t = FakeTime()
    path = f"/flaky/99/{name}"
    with store(t, max_attempts=4) as s, pytest.raises(ThrottledError) as exc:
        s.read_bytes(endpoint + path)
    assert requests_for(endpoint, path) == 4, "attempts within the policy, never more"
    assert name in str(exc.value)


def test_a_404_is_one_request(served: tuple[str, str]) -> None:
    endpoint, _ = served
    t = FakeTime()
    path = f"/missing-{uuid.uuid4().hex}.bin"
    with store(t) as s, pytest.raises(mlstore.NotFoundError):
        s.read_bytes(endpoint + path)
    assert requests_for(endpoint, path) == 1 and t.sleeps == []


# ---------------------------------------------------------------- policies per prefix and operation


def test_overrides_pick_the_most_specific_policy() -> None:
    policy = RetryPolicy(
        max_attempts=5,
        deadline=100.0,
        overrides={
            "write": {"max_attempts": 3},
            "s3://hot/": {"deadline": 600},
            "s3://hot/deep/": {"deadline": 700},
            "write:s3://hot/": {"max_attempts": 10},
        },
    )
    assert policy.matching("gs://other/x", "read") == ()
    assert policy.matching("gs://other/x", "write") == ("write",)
    assert policy.matching("s3://hot/x", "read") == ("s3://hot/",)
    keys = policy.matching("s3://hot/deep/x", "write")
    assert keys == ("write", "s3://hot/deep/", "write:s3://hot/")
    chosen = policy.resolved(keys)
    assert (chosen.max_attempts, chosen.deadline) == (10, 700.0)
    assert policy.resolved(policy.matching("s3://cold/x", "write")).max_attempts == 3


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"bucket/": {"max_attempts": 2}}, "'bucket/'"),
        ({"write": {"max_tries": 2}}, "max_tries"),
        ({"write": {"max_attempts": 0}}, "max_attempts"),
        ({"delete": {"max_attempts": 2}}, "'delete'"),
        ({"s3://b/": {}}, "'s3://b/'"),
        ({"s3://b/": {"read_timeout": 5}}, "read_timeout"),
        ({"read": {"hedge_after": "p95"}}, "hedge_after"),
    ],
)
def test_a_bad_override_is_a_config_error_naming_it(overrides: object, named: str) -> None:
    with pytest.raises(mlstore.ConfigError, match="overrides") as info:
        RetryPolicy(overrides=overrides)  # type: ignore[arg-type]
    assert named in str(info.value)


@pytest.mark.s3
@pytest.mark.faults
def test_writes_and_prefixes_follow_their_own_policy(
    s3_fault_proxy: ServerProcess, s3_bucket: str
) -> None:
    from tests.servers import proxy

    endpoint = s3_fault_proxy.endpoint
    t = FakeTime()
    retry = {
        "max_attempts": 6,
        "backoff_base": 0.01,
        "backoff_max": 0.01,
        "overrides": {
            "write": {"max_attempts": 2},
            f"s3://{s3_bucket}/patient/": {"max_attempts": 4},
        },
    }
    proxy.set_faults(endpoint, {"fault": "status", "status": 503})
    with mlstore.Store(
        options={"s3": {"endpoint_url": endpoint}},
        cache={"enabled": False},
        retry=retry,
        clock=t.clock,
        sleep=t.sleep,
    ) as store:
        for url, expected in (
            (f"s3://{s3_bucket}/a.bin", {"PUT": 2, "GET": 6}),
            # a prefix is more specific than an operation alone: it decides writes too
            (f"s3://{s3_bucket}/patient/a.bin", {"PUT": 4, "GET": 4}),
        ):
            proxy.reset(endpoint)
            with pytest.raises(ThrottledError):
                store.write_bytes(url, b"x")
            with pytest.raises(ThrottledError):
                store.read_bytes(url)
            methods = proxy.counts(endpoint)["methods"]
            assert {m: methods.get(m, 0) for m in expected} == expected, url
