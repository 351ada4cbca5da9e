"""Run mlstore's benchmarks against its peers, side by side in one run.

    python benchmarks/run.py [--quick] [--only B1,B2] [--out benchmarks/results]

Starts moto_server and the latency proxy as separate processes, uploads the data, runs
the scenarios (B1-B12, described in docs/benchmarks.md), and writes
``latest.md``, ``latest.json`` and PNG charts to ``--out``. A complete ``--quick`` run
also rewrites ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import report
from benchmarks.common import REPO, Row, aws_env, proxy_server
from benchmarks.scenarios import SCENARIOS, Ctx, Sizes, prepare


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="mlstore benchmarks (see docs/benchmarks.md)")
    p.add_argument("--quick", action="store_true", help="smaller counts (about 15 minutes)")
    p.add_argument("--only", default="", help="comma-separated scenarios, e.g. B1,B4")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="results dir")
    p.add_argument("--latency", type=float, default=0.02, help="cloud profile seconds/request")
    p.add_argument("--reps", type=int, default=0, help="repetitions (default 3 quick, 5 full)")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    p.add_argument(
        "--render",
        metavar="JSON",
        help="measure nothing: rewrite the table, charts (and docs page) from a saved JSON",
    )
    return p.parse_args(argv)


def write_outputs(rows: list[Row], info: dict[str, Any], out: Path, *, docs: bool) -> None:
    (out / "latest.md").write_text(report.markdown(rows, info))
    report.write_json(out / "latest.json", rows, info)
    written = report.charts(rows, out)
    if docs:
        page = REPO / "docs" / "benchmarks.md"
        page.write_text(report.docs_page(rows, info, written))
        print(f"wrote {page}")
    print(report.table(rows))
    print(f"wrote {out / 'latest.md'}, {out / 'latest.json'} and {len(written)} charts")


def _previous(path: Path, mode: str) -> dict[str, Any] | None:
    """The saved results of the run before, if it was of the same mode."""
    try:
        saved: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if saved.get("mode") == mode else None


def render(args: argparse.Namespace) -> int:
    saved = json.loads(Path(args.render).read_text())
    rows = [Row(**r) for r in saved.pop("rows")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    complete = saved["mode"] == "quick" and "--only" not in saved["command"]
    write_outputs(rows, saved, out, docs=complete and not args.no_docs)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render(args)
    only = [s.strip().upper() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    chosen = only or list(SCENARIOS)
    sizes = Sizes.for_mode(args.quick)
    if args.reps:
        sizes.reps = args.reps
    command = "python benchmarks/run.py" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    aws_env()

    def terminated(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # so the servers below are stopped on SIGTERM

    signal.signal(signal.SIGTERM, terminated)

    from mlstore import Store
    from tests.emulators import moto_server

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="mlstore-bench-"))
    moto = moto_server().start()
    proxy = None
    rows: list[Row] = []
    failures: list[str] = []
    try:
        proxy = proxy_server(moto.endpoint).start()
        ctx = Ctx(
            sizes=sizes,
            moto=moto.endpoint,
            proxy=proxy.endpoint,
            tmp=tmp,
            latency=args.latency,
            mlstore_workers=Store(cache={"enabled": False}).config.max_workers,
        )
        ctx.log(f"moto at {moto.endpoint}, proxy at {proxy.endpoint}, scratch {tmp}")
        prepare(ctx)
        for name in chosen:
            title, fn = SCENARIOS[name]
            ctx.log(f"{name}: {title}")
            t0 = time.perf_counter()
            try:
                got = fn(ctx)
            except Exception:  # noqa: BLE001 - one broken scenario must not lose the others
                failures.append(f"{name}: {traceback.format_exc()}")
                ctx.log(f"{name} FAILED:\n{traceback.format_exc()}")
                got = [Row(name, "(scenario failed)", None, "-", note="see the log")]
            rows += got
            ctx.log(f"{name} done in {time.perf_counter() - t0:.0f}s")
    finally:
        if proxy is not None:
            proxy.stop()
        moto.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    duration = time.perf_counter() - started
    info = {
        "command": command,
        "mode": "quick" if args.quick else "full",
        "reps": sizes.reps,
        "latency": args.latency,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": duration,
        "machine": report.machine(),
        "sizes": vars(sizes),
        "failures": failures,
    }
    info["previous"] = report.with_previous(rows, _previous(out / "latest.json", info["mode"]))
    write_outputs(rows, info, out, docs=args.quick and not only and not args.no_docs)
    print(f"total {duration:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
