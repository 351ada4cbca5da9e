"""Plumbing shared by the harness: sizes, result rows, timing, verification, servers and
child processes."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python benchmarks/run.py` puts benchmarks/ first, not the repo
    sys.path.insert(0, str(REPO))

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
BUCKET = "bench"

Buffer = bytes | bytearray | memoryview | Any  # obstore returns its own buffer type


def aws_env() -> None:
    """moto accepts any credentials; put them where every client (and child) looks."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    # The harness passes every mlstore setting explicitly; a user's environment or
    # config file must not change what is measured.
    for name in [n for n in os.environ if n.startswith("MLSTORE" + "_")]:
        del os.environ[name]


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of the results table: one peer in one scenario."""

    scenario: str
    peer: str
    median: float | None
    unit: str
    higher_is_better: bool = True
    samples: list[float] = field(default_factory=list)
    ratio: float | None = None  # how many times better mlstore is than this row
    target: str = ""
    met: bool | None = None
    verified: bool | None = None
    note: str = ""
    is_mlstore: bool = False
    margin: float | None = None  # achieved / required: >= 1 means the target is met
    previous: float | None = None  # this row's median in the run before (same mode)
    previous_ratio: float | None = None  # and its ratio vs mlstore then

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def median(samples: Sequence[float]) -> float | None:
    return statistics.median(samples) if samples else None


def row(
    scenario: str,
    peer: str,
    samples: Sequence[float],
    unit: str,
    *,
    higher_is_better: bool = True,
    verified: bool | None = None,
    note: str = "",
) -> Row:
    return Row(
        scenario=scenario,
        peer=peer,
        median=median(samples),
        unit=unit,
        higher_is_better=higher_is_better,
        samples=[float(s) for s in samples],
        verified=verified,
        note=note,
        is_mlstore=peer.startswith("mlstore"),
    )


def ratio_vs(mine: Row, other: Row) -> float | None:
    """How many times better ``mine`` is than ``other`` (> 1: ``mine`` wins)."""
    a, b = mine.median, other.median
    if a is None or b is None:
        return None
    if mine.higher_is_better:
        return a / b if b else None
    return b / a if a else None


def fill_ratios(rows: Sequence[Row], reference: Row) -> None:
    for r in rows:
        if r is not reference and r.unit == reference.unit:
            r.ratio = ratio_vs(reference, r)
        elif r is reference:
            r.ratio = 1.0


def check(r: Row, target: str, met: bool | None, margin: float | None = None) -> None:
    """Attach a target, whether it was met and by what margin (achieved / required,
    >= 1 when met) to a row; several targets on one row join."""
    r.target = f"{r.target}; {target}" if r.target else target
    r.met = met if r.met is None else (r.met and bool(met))
    if margin is not None:
        r.margin = margin if r.margin is None else min(r.margin, margin)


# --------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def timed_passes(fn: Callable[[], Any], min_seconds: float) -> tuple[float, int, Any]:
    """Run ``fn`` (one pass over the keys) until ``min_seconds`` have passed.

    Returns (elapsed, passes, the last pass's result)."""
    passes = 0
    t0 = time.perf_counter()
    while True:
        out = fn()
        passes += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return elapsed, passes, out


# --------------------------------------------------------------------------- bytes


def digest(data: Buffer) -> int:
    import xxhash

    return int(xxhash.xxh3_64_intdigest(data))


def verify(results: Iterable[Buffer], expected: Iterable[int]) -> bool:
    """Every result has the xxh3 of what was written (no one wins by skipping work)."""
    results, expected = list(results), list(expected)
    return len(results) == len(expected) and all(
        digest(r) == e for r, e in zip(results, expected, strict=True)
    )


def readinto_full(fh: Any, view: memoryview) -> int:
    """``readinto`` until the buffer is full or the file ends."""
    done = 0
    while done < len(view):
        n = fh.readinto(view[done:])
        if not n:
            break
        done += n
    return done


def peak_rss() -> int:
    """This process's peak resident set size in bytes.

    Linux's ``getrusage(RUSAGE_SELF).ru_maxrss`` carries the peak of the process image
    before ``exec`` (a forked copy of the parent, here hundreds of MiB), so the peak of
    the current image, ``VmHWM``, is read where it exists.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def dir_bytes(path: str) -> int:
    """Bytes of the regular files below ``path`` (apparent size)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


# --------------------------------------------------------------------------- servers


def proxy_server(upstream: str) -> Any:
    """The counting, latency-adding reverse proxy of the test suite, as a process."""
    from tests.emulators import ServerProcess

    script = str(REPO / "tests" / "servers" / "proxy.py")
    return ServerProcess(
        "proxy",
        [sys.executable, script, "--upstream", upstream, "--port", "0", "--latency", "0"],
        r"listening on http://127\.0\.0\.1:(?P<port>\d+)",
    )


def set_latency(proxy_endpoint: str, seconds: float) -> None:
    req = urllib.request.Request(
        f"{proxy_endpoint}/__proxy/latency?seconds={seconds}", method="POST"
    )
    with urllib.request.urlopen(req, timeout=30):
        pass


def proxy_counts(proxy_endpoint: str) -> dict[str, Any]:
    from tests.servers import proxy

    return proxy.counts(proxy_endpoint)


def proxy_reset(proxy_endpoint: str) -> None:
    from tests.servers import proxy

    proxy.reset(proxy_endpoint)


def proxy_gets(proxy_endpoint: str) -> int:
    methods = proxy_counts(proxy_endpoint)["methods"]
    return int(methods.get("GET", 0))


# --------------------------------------------------------------------------- children


class Child:
    """A benchmark task in a fresh Python process (``python -m benchmarks.child``).

    The child sets itself up (imports, clients, a warm-up read), says ``ready``, waits
    for :meth:`go`, runs the timed part and prints one JSON line with its results.
    Several children can be started and released together (a start barrier).
    """

    def __init__(self, task: dict[str, Any]) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.child"],
            cwd=str(REPO),
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()

    def wait_ready(self, timeout: float = 300) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self._fail(f"child did not get ready (said {line!r})", timeout)

    def go(self, at: float | None = None) -> None:
        """Release the child; with ``at`` (a ``time.time()``), it starts its timed part
        then, so children released one after another measure the same wall interval."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n" if at is None else f"go {at!r}\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 900) -> dict[str, Any]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise RuntimeError(f"benchmark child timed out; stderr:\n{err[-4000:]}") from None
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if self.proc.returncode != 0 or not lines:
            raise RuntimeError(
                f"benchmark child failed (exit {self.proc.returncode}); stderr:\n{err[-4000:]}"
            )
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def _fail(self, why: str, timeout: float) -> None:
        self.proc.kill()
        _, err = self.proc.communicate(timeout=timeout)
        raise RuntimeError(f"{why}; stderr:\n{err[-4000:]}")


def run_child(task: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    child = Child(task)
    child.wait_ready(timeout)
    child.go()
    return child.result(timeout)


def run_children(tasks: Sequence[dict[str, Any]], timeout: float = 900) -> list[dict[str, Any]]:
    """Start every task, wait until all are set up, release them at once."""
    children = [Child(t) for t in tasks]
    for c in children:
        c.wait_ready(timeout)
    for c in children:
        c.go()
    return [c.result(timeout) for c in children]


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"
