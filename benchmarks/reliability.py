"""The reliability scenarios of RELIABILITY.md (R1-R9) at their full scale, with figures.

The test suite (tests/test_reliability.py) proves each behaviour at a size that keeps CI
short; this script runs the same faults at the sizes RELIABILITY.md names (8 processes x
2,000 reads, 1,000 truncation trials, ...) against moto_server behind the fault proxy,
with real time (real backoff sleeps, real read timeouts), and writes what it counted:

    python benchmarks/reliability.py [--quick]

Output: ``benchmarks/results/reliability.md`` (and ``.json``). Every read is checked
against the bytes written: "corrupt" counts reads that returned other bytes, "failed"
reads that raised.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import aws_env  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
RESULTS = REPO / "benchmarks" / "results"


def make_store(endpoint: str, cache: dict[str, Any] | None = None, **retry: Any) -> Any:
    import mlstore

    policy = {"max_attempts": 8, "deadline": 60.0, "backoff_base": 0.05, "backoff_max": 1.0}
    policy.update(retry)
    return mlstore.Store(
        options={"s3": {"endpoint_url": endpoint}},
        cache=cache if cache is not None else {"enabled": False},
        retry=policy,
    )


def upload(direct: str, bucket: str, count: int, size: int, prefix: str) -> dict[str, bytes]:
    store = make_store(direct)
    objects = {f"s3://{bucket}/{prefix}/{i:05d}": os.urandom(size) for i in range(count)}
    for url, data in objects.items():
        store.write_bytes(url, data)
    store.close()
    return objects


def _reader(args: tuple[str, list[str], list[str], int]) -> dict[str, int]:
    endpoint, urls, hashes, rounds = args
    from mlstore.errors import MlstoreError
    from mlstore.hashing import content_hash

    store = make_store(endpoint)
    out = {"reads": 0, "failed": 0, "corrupt": 0}
    for _ in range(rounds):
        for url, expected in zip(urls, hashes, strict=True):
            out["reads"] += 1
            try:
                out["corrupt"] += content_hash(store.read_bytes(url)) != expected
            except MlstoreError:
                out["failed"] += 1
    stats = store.stats()
    out["retries"] = stats.get("retries", "s3")
    out["resumes"] = stats.get("resumes", "s3")
    store.close()
    return out


def read_in_processes(
    endpoint: str, objects: dict[str, bytes], processes: int, rounds: int
) -> dict[str, int]:
    from mlstore.hashing import content_hash

    urls = list(objects)
    hashes = [content_hash(objects[u]) for u in urls]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        parts = pool.map(_reader, [(endpoint, urls, hashes, rounds)] * processes)
    return {k: sum(p[k] for p in parts) for k in parts[0]}


class Run:
    def __init__(self, direct: str, faulty: str, bucket: str, quick: bool) -> None:
        self.direct = direct
        self.faulty = faulty
        self.bucket = bucket
        self.quick = quick
        self.rows: list[dict[str, Any]] = []

    def scale(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def record(
        self, scenario: str, fault: str, figures: dict[str, Any], target: str, met: bool
    ) -> None:
        print(f"{scenario}: {figures} -> {'met' if met else 'MISSED'}", flush=True)
        self.rows.append(
            {"scenario": scenario, "fault": fault, "figures": figures, "target": target, "met": met}
        )

    def faults(self, *rules: dict[str, Any]) -> None:
        from tests.servers import proxy

        proxy.clear_faults(self.faulty)
        proxy.reset(self.faulty)
        if rules:
            proxy.set_faults(self.faulty, *rules)

    def counts(self) -> dict[str, Any]:
        from tests.servers import proxy

        return proxy.counts(self.faulty)

    # ------------------------------------------------------------------ scenarios

    def r1(self) -> None:
        processes, reads = 8, self.scale(2000, 250)
        objects = upload(self.direct, self.bucket, 100, 16 * KiB, "r1")
        self.faults({"fault": "status", "status": 503, "method": "GET", "probability": 0.1})
        started = time.monotonic()
        got = read_in_processes(self.faulty, objects, processes, reads // len(objects))
        sent = int(self.counts()["methods"].get("GET", 0))
        extra = sent / got["reads"] - 1
        figures = {
            "reads": got["reads"],
            "requests": sent,
            "503s": self.counts()["faults"].get("status", 0),
            "extra requests": f"{extra:.1%}",
            "failed": got["failed"],
            "corrupt": got["corrupt"],
            "wall s": round(time.monotonic() - started, 1),
        }
        ok = got["failed"] == 0 and got["corrupt"] == 0 and extra <= 0.15
        self.record(
            "R1",
            f"10% of GETs 503, {processes} processes",
            figures,
            "0 failed, 0 corrupt, <= 15% extra",
            ok,
        )

    def r2(self) -> None:
        from mlstore.errors import ThrottledError

        url = next(iter(upload(self.direct, self.bucket, 1, KiB, "r2")))
        self.faults({"fault": "status", "status": 503, "method": "GET"})
        deadline = 5.0
        store = make_store(
            self.faulty, max_attempts=50, deadline=deadline, backoff_base=0.5, backoff_max=2.0
        )
        started = time.monotonic()
        try:
            store.read_bytes(url)
            raised = "nothing"
        except ThrottledError:
            raised = "ThrottledError"
        elapsed = time.monotonic() - started
        attempts = int(self.counts()["methods"].get("GET", 0))
        figures = {
            "raised": raised,
            "after s": round(elapsed, 2),
            "deadline s": deadline,
            "attempts": attempts,
        }
        ok = raised == "ThrottledError" and elapsed <= deadline + 1 and attempts <= 50
        self.record(
            "R2", "100% 503 past the deadline", figures, "ThrottledError by deadline + 1 s", ok
        )
        self.faults({"fault": "status", "status": 503, "method": "GET"})
        store = make_store(self.faulty, max_attempts=3, backoff_base=0.01, backoff_max=0.01)
        try:
            store.read_bytes(url)
        except ThrottledError:
            pass
        attempts = int(self.counts()["methods"].get("GET", 0))
        self.record(
            "R2",
            "100% 503, max_attempts=3",
            {"attempts": attempts},
            "attempts = max_attempts (one layer)",
            attempts == 3,
        )

    def r3(self) -> None:
        url, data = next(iter(upload(self.direct, self.bucket, 1, KiB, "r3").items()))
        self.faults(
            {
                "fault": "status",
                "status": 429,
                "method": "GET",
                "times": 1,
                "headers": {"Retry-After": "2"},
            }
        )
        import mlstore

        waits: list[float] = []

        def sleep(seconds: float) -> None:
            t = time.monotonic()
            time.sleep(seconds)
            waits.append(time.monotonic() - t)

        store = mlstore.Store(
            options={"s3": {"endpoint_url": self.faulty}}, cache={"enabled": False}, sleep=sleep
        )
        ok_bytes = store.read_bytes(url) == data
        gap = waits[0] if waits else -1.0
        figures = {
            "attempts": int(self.counts()["methods"].get("GET", 0)),
            "waited s": round(gap, 3),
            "correct": ok_bytes,
        }
        self.record(
            "R3",
            "429 with Retry-After: 2",
            figures,
            "next attempt 2.0-2.5 s later",
            ok_bytes and 2.0 <= gap <= 2.5,
        )

    def r4(self) -> None:
        from mlstore.errors import MlstoreError

        store = make_store(self.faulty)
        for status in (400, 403, 404):
            url = f"s3://{self.bucket}/r4/{uuid.uuid4().hex}"
            if status == 404:
                self.faults()
            else:
                upload(self.direct, self.bucket, 1, KiB, f"r4-{status}")
                url = f"s3://{self.bucket}/r4-{status}/00000"
                self.faults({"fault": "status", "status": status, "method": "GET"})
            try:
                store.read_bytes(url)
                error = "nothing"
            except MlstoreError as exc:
                error = type(exc).__name__
                named = url in str(exc)
            requests = int(self.counts()["total"])
            self.record(
                "R4",
                f"{status}",
                {"raised": error, "requests": requests, "URL named": named},
                "1 request, typed error",
                requests == 1 and named,
            )

    def interrupted(  # R5, R6
        self, scenario: str, kind: str, probability: float, trials: int, size: int
    ) -> None:
        import random
        import tempfile

        from mlstore.errors import MlstoreError

        objects = upload(self.direct, self.bucket, trials, size, scenario.lower())
        rng = random.Random(5)
        rules = [
            {
                "fault": kind,
                "method": "GET",
                "offset": rng.randrange(1, size),
                "probability": probability / 8,  # eight offsets: `probability` in all
                "seed": i,
            }
            for i in range(8)
        ]
        self.faults(*rules)
        store = make_store(
            self.faulty,
            cache={"disk_dir": tempfile.mkdtemp(prefix="mlstore-rel-")},
            max_attempts=10,
        )
        corrupt = failed = 0
        for url, data in objects.items():
            try:
                corrupt += store.read_bytes(url) != data
            except MlstoreError:
                failed += 1
        verify = store.cache.verify()
        counts = self.counts()
        ratio = counts["bytes_out"] / (trials * size)
        stats = store.stats()
        figures = {
            "reads": trials,
            f"{kind}s": counts["faults"].get(kind, 0),
            "resumes": stats.get("resumes", "s3"),
            "failed": failed,
            "corrupt": corrupt,
            "bad cache entries": verify["dropped"],
            "bytes fetched / size": round(ratio, 3),
        }
        ok = failed == 0 and corrupt == 0 and verify["dropped"] == 0 and ratio <= 1.1
        target = "0 failed, 0 corrupt, 0 bad entries, bytes <= 1.1x"
        self.record(
            scenario,
            f"{kind} at random offsets in {probability:.0%} of bodies",
            figures,
            target,
            ok,
        )
        store.close()

    def r7(self) -> None:
        trials = self.scale(1000, 200)
        objects = upload(self.direct, self.bucket, trials, 16 * KiB, "r7")
        self.faults({"fault": "flip", "method": "GET", "probability": 0.01, "seed": 7})
        store = make_store(self.faulty)
        corrupt = sum(store.read_bytes(u) != d for u, d in objects.items())
        flips = self.counts()["faults"].get("flip", 0)
        figures = {
            "reads": trials,
            "flipped bodies": flips,
            "retries": store.stats().get("retries", "s3"),
            "corrupt": corrupt,
        }
        self.record("R7", "1 flipped byte in 1% of bodies", figures, "0 corrupt", corrupt == 0)

    def r8(self) -> None:
        from mlstore.errors import PreconditionFailedError

        trials = self.scale(200, 50)
        url = f"s3://{self.bucket}/r8.bin"
        writer = make_store(self.direct)
        store = make_store(self.faulty)
        self.faults()
        errors = mixed = clean = 0
        for _ in range(trials):
            old, new = os.urandom(256 * KiB), os.urandom(256 * KiB)
            writer.write_bytes(url, old)
            with store.open(url, buffer_size=32 * KiB) as fh:
                head = fh.read(64 * KiB)
                writer.write_bytes(url, new)
                try:
                    whole = head + fh.read()
                except PreconditionFailedError:
                    errors += 1
                    continue
            if whole in (old, new):
                clean += 1
            else:
                mixed += 1
        figures = {
            "trials": trials,
            "PreconditionFailedError": errors,
            "one version": clean,
            "mixed": mixed,
        }
        self.record("R8", "overwritten between two range reads", figures, "0 mixed", mixed == 0)

    def r9(self) -> None:
        url, data = next(iter(upload(self.direct, self.bucket, 1, MiB, "r9").items()))
        self.faults({"fault": "stall", "method": "GET", "offset": 256 * KiB, "times": 1})
        timeout = 2.0
        store = make_store(self.faulty, read_timeout=timeout, backoff_base=0.01, backoff_max=0.01)
        started = time.monotonic()
        correct = store.read_bytes(url) == data
        elapsed = time.monotonic() - started
        figures = {
            "read timeout s": timeout,
            "read done after s": round(elapsed, 2),
            "resumes": store.stats().get("resumes", "s3"),
            "correct": correct,
        }
        self.record(
            "R9",
            "body stalls for an hour",
            figures,
            "unblocked <= read timeout + 1 s",
            correct and elapsed <= timeout + 1,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller counts (a minute or two)")
    args = parser.parse_args(argv)
    aws_env()
    from tests.emulators import moto_server
    from tests.servers import proxy

    moto = moto_server().start()
    faulty = proxy.process(moto.endpoint).start()
    bucket = f"rel-{uuid.uuid4().hex[:10]}"
    try:
        make_store(moto.endpoint).mkdir(f"s3://{bucket}")
        run = Run(moto.endpoint, faulty.endpoint, bucket, args.quick)
        steps: list[Callable[[], None]] = [
            run.r1,
            run.r2,
            run.r3,
            run.r4,
            lambda: run.interrupted("R5", "reset", 0.05, run.scale(200, 60), MiB),
            lambda: run.interrupted("R6", "truncate", 0.1, run.scale(1000, 200), 64 * KiB),
            run.r7,
            run.r8,
            run.r9,
        ]
        started = time.monotonic()
        for step in steps:
            step()
        total = time.monotonic() - started
    finally:
        faulty.stop()
        moto.stop()
    write(run.rows, args, total)
    return 0 if all(r["met"] for r in run.rows) else 1


def write(rows: list[dict[str, Any]], args: argparse.Namespace, total: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/reliability.py" + (" --quick" if args.quick else "")
    lines = [
        "# Reliability figures",
        "",
        f"Command: `{command}` ({total:.0f} s); moto_server behind tests/servers/proxy.py, "
        "real time (real backoff sleeps and read timeouts).",
        "",
        f"Machine: {os.cpu_count()} cores, CPython {platform.python_version()}, "
        f"{platform.platform()}",
        "",
        "| scenario | fault | figures | pass figure | met? |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        figures = ", ".join(f"{k}: {v}" for k, v in r["figures"].items())
        met = "yes" if r["met"] else "**NO**"
        lines.append(f"| {r['scenario']} | {r['fault']} | {figures} | {r['target']} | {met} |")
    (RESULTS / "reliability.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "reliability.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {RESULTS / 'reliability.md'}")


if __name__ == "__main__":
    raise SystemExit(main())
