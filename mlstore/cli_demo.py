"""``mlstore demo``: mlstore next to plain s3fs and fsspec's ``simplecache``, on an S3
emulator behind a cloud-like latency, in about a minute.

    pip install "mlstore[demo]" && mlstore demo

It starts ``moto_server`` and a latency proxy (subprocesses on 127.0.0.1), uploads a
synthetic dataset, reads it for two epochs through each contender and prints a table:
epoch times, samples/s, remote GETs and bytes (counted by the proxy), hit ratio per
tier, dedupe and cost. Progress goes to stderr, the table (or ``--json``) to stdout.
The servers are stopped and the temporary directory removed on success, on an error
and on Ctrl-C (exit status 130; SIGTERM is treated as Ctrl-C).

``--url s3://bucket/prefix`` runs it against a real bucket instead: the dataset goes
under a fresh prefix below it and is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from mlstore.cli_warm import _jobs as _whole  # a whole number, at least 1
from mlstore.config import parse_size
from mlstore.errors import ConfigError

__all__ = ["add_parser"]

_CONTENDERS = ("mlstore", "s3fs", "simplecache")


def _size(text: str) -> int:
    try:
        n = parse_size(text.strip())
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return n


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 10:
        raise argparse.ArgumentTypeError(f"must be seconds from 0 to 10, got {text!r}")
    return value


def _only(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in _CONTENDERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"names contenders among {','.join(_CONTENDERS)}, got {text!r}"
        )
    return tuple(n for n in _CONTENDERS if n in names)


def _s3_url(text: str) -> str:
    if not text.startswith("s3://") or len(text.rstrip("/")) <= len("s3://"):
        raise argparse.ArgumentTypeError(f"must be an s3://bucket/prefix URL, got {text!r}")
    return text


def add_parser(sub: Any) -> None:
    """Add ``demo`` to the ``mlstore`` sub-command parsers ``sub``."""
    demo = sub.add_parser(
        "demo",
        help="mlstore vs s3fs vs fsspec simplecache on a local S3 emulator, with a table",
        description=(
            "Start an S3 emulator (moto_server) behind a proxy that adds a cloud-like "
            "latency to every request and counts requests and bytes, upload a synthetic "
            "dataset, read it for a few epochs through mlstore (a PyTorch DataLoader over "
            "mlstore.torch.MapDataset when torch is installed), plain s3fs and fsspec's "
            "simplecache, and print a table: epoch times, samples/s, remote GETs, bytes "
            "fetched, mlstore's hit ratio per tier, dedupe and cost. Everything it starts "
            "or writes is removed at exit (also on an error or Ctrl-C). "
            'Needs the demo extra: pip install "mlstore[demo]".'
        ),
    )
    demo.add_argument(
        "--objects", type=_whole, default=256, metavar="N",
        help="objects in the synthetic dataset; one in 16 repeats an earlier one's "
        "content, for dedupe (default: 256)",
    )  # fmt: skip
    demo.add_argument(
        "--size", type=_size, default=256 * 1024, metavar="BYTES",
        help="size of each object: 262144, 256KiB, 1MiB ... (default: 256KiB)",
    )  # fmt: skip
    demo.add_argument(
        "--epochs", type=_whole, default=2, metavar="N",
        help="passes over the dataset per contender, each in a new shuffled order (default: 2)",
    )  # fmt: skip
    demo.add_argument(
        "--latency", type=_seconds, default=0.02, metavar="SECONDS",
        help="first-byte latency the proxy adds to every request, the 'cloud profile' "
        "(default: 0.02; 0 for the bare emulator; ignored with --url)",
    )  # fmt: skip
    demo.add_argument(
        "--workers", type=_whole, default=16, metavar="N",
        help="reads in flight for every contender: threads for s3fs and simplecache, "
        "2 DataLoader workers of N/2 samples a batch for mlstore (default: 16)",
    )  # fmt: skip
    demo.add_argument(
        "--no-torch", dest="torch", action="store_false",
        help="read through mlstore with Store.read_many in threads even if torch is installed",
    )  # fmt: skip
    demo.add_argument(
        "--only", type=_only, default=_CONTENDERS, metavar="NAMES",
        help="comma-separated contenders to run, among mlstore,s3fs,simplecache (default: all)",
    )  # fmt: skip
    demo.add_argument(
        "--keep", action="store_true",
        help="keep the temporary directory (the caches) and, with --url, the uploaded data",
    )  # fmt: skip
    demo.add_argument(
        "--json", action="store_true",
        help="print the report as one JSON document instead of the table",
    )  # fmt: skip
    demo.add_argument(
        "--url", type=_s3_url, default=None, metavar="s3://BUCKET/PREFIX",
        help="run against a real bucket instead of the emulator: the dataset goes to a fresh "
        "prefix below this one (deleted at the end); GETs are counted for mlstore only",
    )  # fmt: skip
    demo.add_argument(
        "--endpoint-url", default=None, metavar="URL",
        help="with --url: the S3 endpoint (an S3-compatible store); credentials come from "
        "the usual AWS sources",
    )  # fmt: skip
    demo.set_defaults(func=_cmd_demo, needs_store=False)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while the demo runs, so it cleans up the same way."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cmd_demo(args: argparse.Namespace, out: IO[str]) -> int:
    from mlstore.demo import DemoOptions, render, run, speedup

    if args.endpoint_url and not args.url:
        raise ConfigError("demo: --endpoint-url goes with --url (a real bucket)")
    opts = DemoOptions(
        objects=args.objects,
        size=args.size,
        epochs=args.epochs,
        latency=args.latency,
        workers=args.workers,
        torch=args.torch,
        only=args.only,
        keep=args.keep,
        url=args.url,
        endpoint_url=args.endpoint_url,
    )

    def say(text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    with _sigterm_as_interrupt():
        report = run(opts, say)
    if args.json:
        report["speedup_epoch2_vs_s3fs"] = speedup(report)
        out.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
    else:
        out.write(render(report))
    return 0
