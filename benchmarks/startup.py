"""B16: how long the command line takes to start, beside what a peer's CLI must import.

``mlstore --help`` runs in a fresh interpreter, as a user's shell or a Kubernetes
initContainer runs it. Its peers are the imports a Python storage CLI built on the
usual SDKs starts with: ``import s3fs`` (the reference the issue names) and ``import
boto3`` (what ``aws`` is built on), each in a fresh interpreter, and a bare ``python -c
pass`` (the floor every Python tool pays). Each command runs ``reps`` times,
interleaved; medians are compared.

The row is verified when ``python -X importtime -m mlstore --help`` shows no cloud
SDK, torch or tqdm among the modules imported.
"""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks.common import Row, check, fill_ratios, row
from benchmarks.scenarios import Ctx

HELP = "mlstore --help"
COMMANDS: dict[str, list[str]] = {
    HELP: [sys.executable, "-m", "mlstore", "--help"],
    "python -c 'import s3fs'": [sys.executable, "-c", "import s3fs"],
    "python -c 'import boto3'": [sys.executable, "-c", "import boto3"],
    "python -c pass": [sys.executable, "-c", "pass"],
}
HEAVY = ("boto3", "botocore", "s3fs", "gcsfs", "adlfs", "azure", "google", "torch", "tqdm")


def _once(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - t0


def _light() -> bool:
    """Whether ``mlstore --help`` imports none of :data:`HEAVY`."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mlstore", "--help"],
        check=True,
        capture_output=True,
        text=True,
    )
    names = {ln.rsplit("|", 1)[-1].strip() for ln in done.stderr.splitlines() if "|" in ln}
    return not any(n.split(".")[0] in HEAVY for n in names)


def b16(ctx: Ctx) -> list[Row]:
    reps = 5 if ctx.sizes.b15_reps <= 3 else 11
    for argv in COMMANDS.values():
        _once(argv)  # the files in the page cache, .pyc written
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(reps):
        for name, argv in COMMANDS.items():
            times[name].append(_once(argv))
    light = _light()
    scen = "B16 CLI start: `mlstore --help` in a fresh interpreter"
    rows = [
        row(
            scen,
            name,
            [t * 1000 for t in samples],
            "ms",
            higher_is_better=False,
            verified=light if name == HELP else None,
        )
        for name, samples in times.items()
    ]
    me = rows[0]
    fill_ratios(rows, me)
    reference = next(r for r in rows if "s3fs" in r.peer)
    ratio = reference.median / me.median if me.median else None
    check(me, "faster than import s3fs; no cloud SDK imported", bool(ratio and ratio > 1 and light))
    for r in rows[1:]:
        r.target = "informative"
    ctx.log(
        "    "
        + ", ".join(f"{name}: {1000 * sorted(s)[len(s) // 2]:.0f} ms" for name, s in times.items())
    )
    return rows
