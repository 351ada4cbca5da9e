"""Replica choice for mounts: order, fall-through, and the cool-down of a failing replica."""

from __future__ import annotations

import pytest

from mlstore._engine.replicas import CircuitBreaker, with_failover
from mlstore.errors import (
    ConnectionLostError,
    NotFoundError,
    PermissionDeniedError,
    ThrottledError,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Replicas:
    """Callable replicas whose behaviour each test programs; records the calls."""

    def __init__(self, **behaviour: object) -> None:
        self.behaviour = dict(behaviour)
        self.calls: list[str] = []

    def __call__(self, name: str) -> str:
        self.calls.append(name)
        outcome = self.behaviour[name]
        if isinstance(outcome, Exception):
            raise outcome
        return str(outcome)


def run(reps: Replicas, breaker: CircuitBreaker, order: tuple[str, ...] = ("a", "b")) -> str:
    return with_failover(list(order), reps, breaker=breaker, key=lambda r: r)


def test_first_replica_answers() -> None:
    reps = Replicas(a="A", b="B")
    assert run(reps, CircuitBreaker()) == "A"
    assert reps.calls == ["a"]


def test_transient_failure_falls_through_and_is_reported() -> None:
    reps = Replicas(a=ConnectionLostError("down", url="s3://a/x"), b="B")
    moved: list[str] = []
    out = with_failover(
        ["a", "b"],
        reps,
        breaker=CircuitBreaker(),
        key=lambda r: r,
        on_failover=lambda r, e: moved.append(r),
    )
    assert out == "B" and reps.calls == ["a", "b"] and moved == ["a"]


def test_not_found_falls_through() -> None:
    reps = Replicas(a=NotFoundError("gone", url="s3://a/x"), b="B")
    assert run(reps, CircuitBreaker()) == "B"


def test_permission_error_is_raised_at_once() -> None:
    reps = Replicas(a=PermissionDeniedError("no", url="s3://a/x"), b="B")
    with pytest.raises(PermissionDeniedError):
        run(reps, CircuitBreaker())
    assert reps.calls == ["a"]


def test_all_not_found_raises_not_found() -> None:
    reps = Replicas(a=NotFoundError("x", url="s3://a/x"), b=NotFoundError("y", url="gs://b/x"))
    with pytest.raises(NotFoundError) as exc:
        run(reps, CircuitBreaker())
    assert exc.value.url == "s3://a/x"


def test_transient_wins_over_not_found_when_all_fail() -> None:
    reps = Replicas(a=ThrottledError("slow", url="s3://a/x"), b=NotFoundError("y", url="gs://b/x"))
    with pytest.raises(ThrottledError):
        run(reps, CircuitBreaker())


def test_failing_replica_is_skipped_during_cooldown_then_retried() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=2, cooldown=30, clock=clock)
    reps = Replicas(a=ConnectionLostError("down", url="s3://a/x"), b="B")
    run(reps, breaker)
    run(reps, breaker)  # second failure opens a's circuit
    reps.calls.clear()
    assert run(reps, breaker) == "B"
    assert reps.calls == ["b"], "a is skipped while cooling down"
    clock.now += 29.9
    run(reps, breaker)
    assert reps.calls == ["b", "b"]
    clock.now += 0.2  # cool-down over: a is tried again, and now it answers
    reps.behaviour["a"] = "A"
    assert run(reps, breaker) == "A"
    assert not breaker.is_open("a")


def test_every_replica_open_still_tries_all_in_order() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown=60, clock=clock)
    down = ConnectionLostError("down", url="s3://a/x")
    reps = Replicas(a=down, b=ConnectionLostError("down", url="gs://b/x"))
    with pytest.raises(ConnectionLostError):
        run(reps, breaker)
    assert breaker.is_open("a") and breaker.is_open("b")
    reps.behaviour["b"] = "B"
    reps.calls.clear()
    assert run(reps, breaker) == "B"
    assert reps.calls == ["a", "b"]


def test_single_replica_is_called_directly() -> None:
    reps = Replicas(a=ConnectionLostError("down", url="s3://a/x"))
    breaker = CircuitBreaker(threshold=1)
    with pytest.raises(ConnectionLostError):
        with_failover(["a"], reps, breaker=breaker, key=lambda r: r)
    assert not breaker.is_open("a")
