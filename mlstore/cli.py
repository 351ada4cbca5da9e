"""The ``mlstore`` command: list, copy, read and inspect any supported URL.

Examples::

    mlstore ls -l s3://bucket/train/
    mlstore cp -r ./shards s3://bucket/train/
    mlstore cat gs://bucket/labels.csv | head
    mlstore stat az://container/model.pt
    mlstore du -h s3://bucket/train/
    mlstore warm -j 32 s3://bucket/train/   # fill the node cache (an initContainer)
    mlstore cache verify      # re-hash the node cache; ``cache scrub`` heals it
    mlstore config            # the effective settings and where they came from
    mlstore flush             # upload checkpoints staged on this node (save(staging=...))
    mlstore doctor            # check config, credentials, endpoints and the cache dir
    mlstore version --json    # versions of mlstore, Python and the optional packages
    mlstore demo              # mlstore vs s3fs vs simplecache on a local S3 emulator

Exit status: 0 on success, 1 when an operation failed, 2 for a usage error. An error is
one line on stderr, ``mlstore: error: ...``; ``--debug`` adds the traceback. Every
command that only reads takes ``--json`` and then prints one JSON document.

Start-up stays light: ``--help``, ``version``, ``doctor`` and ``cache path`` import no
cloud SDK, and the :class:`~mlstore.Store` (with its cache and backends) is imported only
by the commands that use one. The commands live in ``cli_*`` modules by subject
(:mod:`~mlstore.cli_inspect`: ``stat``, ``du``; :mod:`~mlstore.cli_warm`;
:mod:`~mlstore.cli_cache`; :mod:`~mlstore.cli_config`; :mod:`~mlstore.cli_doctor`;
:mod:`~mlstore.cli_demo`),
whose parsers are added here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING, NoReturn

from mlstore._util.progress import Transfer
from mlstore._util.redact import redact_url, scrub
from mlstore._util.units import human_size as human
from mlstore.cli_sync import add_parsers as add_sync_parsers
from mlstore.errors import MlstoreError

if TYPE_CHECKING:
    from mlstore.store import Store

__all__ = ["human", "main"]


def _dump(out: IO[str], value: object) -> None:
    """Write ``value`` as one JSON document (what ``--json`` prints)."""
    out.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _cmd_ls(store: Store, args: argparse.Namespace, out: IO[str]) -> int:
    if args.json:
        _dump(out, [e.as_dict() for url in args.urls for e in store.ls(url, detail=True)])
        return 0
    for url in args.urls:
        entries = store.ls(url, detail=True)
        for entry in entries:
            name = str(entry.url) + ("/" if entry.is_dir else "")
            if args.long:
                size = "-" if entry.is_dir else (human(entry.size) if args.human else entry.size)
                when = (
                    time.strftime("%Y-%m-%d %H:%M", time.gmtime(entry.mtime))
                    if entry.mtime
                    else "-"
                )
                out.write(f"{size!s:>12}  {when:16}  {name}\n")
            else:
                out.write(name + "\n")
    return 0


def _cmd_find(store: Store, args: argparse.Namespace, out: IO[str]) -> int:
    if args.json:
        _dump(out, [e.as_dict() for e in store.find(args.url, detail=True)])
        return 0
    for url in store.find(args.url):
        out.write(url + "\n")
    return 0


def _cmd_glob(store: Store, args: argparse.Namespace, out: IO[str]) -> int:
    matches = store.glob(args.pattern)
    if args.json:
        _dump(out, matches)
        return 0 if matches else 1
    for url in matches:
        out.write(url + "\n")
    return 0 if matches else 1


def _cmd_cat(store: Store, args: argparse.Namespace, out: IO[str]) -> int:
    sink = getattr(out, "buffer", None)
    for url in args.urls:
        with store.open(url, "rb") as fh:
            while chunk := fh.read(1 << 20):
                if sink is not None:
                    sink.write(chunk)
                else:
                    out.write(chunk.decode(errors="replace"))
    if sink is not None:
        sink.flush()
    return 0


def _cmd_mkdir(store: Store, args: argparse.Namespace, out: IO[str]) -> int:
    for url in args.urls:
        store.mkdir(url)
    return 0


def _cmd_rm(store: Store, args: argparse.Namespace, out: IO[str]) -> int:
    for url in args.urls:
        store.rm(url, recursive=args.recursive)
    return 0


def _cmd_info(store: Store, args: argparse.Namespace, out: IO[str]) -> int:
    if args.json:  # one document for all URLs (without: one object per URL, as before)
        _dump(out, [store.info(url).as_dict() for url in args.urls])
        return 0
    for url in args.urls:
        out.write(json.dumps(store.info(url).as_dict(), indent=2, sort_keys=True) + "\n")
    return 0


def _shown(value: object) -> object:
    """``value`` as ``mlstore config`` may print it: URLs (mount prefixes, the keys of
    per-prefix policies) with user info and signatures masked, by the same rules as
    every other place a URL is shown. Terminal output ends up in CI logs and tickets."""
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, Mapping):
        masked = {_shown(k): _shown(v) for k, v in value.items()}
        return value if masked == dict(value) else masked  # unchanged: shown as it was
    if isinstance(value, tuple):
        return tuple(_shown(v) for v in value)
    return value


def _cmd_version(args: argparse.Namespace, out: IO[str]) -> int:
    from mlstore.cli_doctor import run_version

    return run_version(args.json, out)


def _cmd_doctor(args: argparse.Namespace, out: IO[str]) -> int:
    from mlstore.cli_doctor import run_doctor

    return run_doctor(args.offline, args.timeout, args.json, out)


def _cmd_flush(store: Store, args: argparse.Namespace, out: IO[str]) -> int:
    from mlstore.checkpoint import flush

    with Transfer("flush", enabled=args.progress) as bar:
        report = flush(store, progress=bar)
    for url in report.uploaded:
        out.write(f"uploaded {redact_url(url)}\n")
    for url in report.superseded:
        out.write(f"superseded {redact_url(url)} (a later save of it had committed)\n")
    for url in report.busy:
        out.write(f"in progress {redact_url(url)} (another process on this node uploads it)\n")
    for url in report.failed:
        sys.stderr.write(f"mlstore: failed {redact_url(url)}: staged still; run flush again\n")
    if report.discarded:
        out.write(f"discarded {report.discarded} incomplete staged save(s)\n")
    if not (report.uploaded or report.superseded or report.busy or report.failed):
        out.write("nothing staged\n")
    return 0 if report.ok else 1


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other error:
    ``mlstore: error: cp: the following arguments are required: DST (see 'mlstore cp
    --help')``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("mlstore").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"mlstore: error: {where}{message} (see '{self.prog} --help')\n")


_JSON_LIST = "print one JSON list of entries (name, size, type, version ...)"


def _parser() -> argparse.ArgumentParser:
    from mlstore import __version__, cli_cache, cli_config, cli_demo, cli_inspect, cli_warm

    p = _Parser(
        prog="mlstore",
        description="Read, write and inspect ML data on S3, GCS, Azure, local disk and HTTP.",
    )
    p.add_argument("--version", action="version", version=f"mlstore {__version__}")
    p.add_argument("--debug", action="store_true", help="on an error, also print the traceback")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    ls = sub.add_parser("ls", help="list a directory or prefix")
    ls.add_argument("urls", nargs="+", metavar="URL")
    ls.add_argument("-l", "--long", action="store_true", help="show size and modification time")
    ls.add_argument("-H", "--human", action="store_true", help="sizes in KiB/MiB/GiB")
    ls.add_argument("--json", action="store_true", help=_JSON_LIST)
    ls.set_defaults(func=_cmd_ls)

    find = sub.add_parser("find", help="list every file below a URL, recursively")
    find.add_argument("url", metavar="URL")
    find.add_argument("--json", action="store_true", help=_JSON_LIST)
    find.set_defaults(func=_cmd_find)

    glob = sub.add_parser("glob", help="list URLs matching a pattern (*, ?, **, [abc])")
    glob.add_argument("pattern", metavar="PATTERN")
    glob.add_argument("--json", action="store_true", help="print one JSON list of URLs")
    glob.set_defaults(func=_cmd_glob)

    cat = sub.add_parser("cat", help="write objects to standard output")
    cat.add_argument("urls", nargs="+", metavar="URL")
    cat.set_defaults(func=_cmd_cat)

    add_sync_parsers(sub)  # cp and sync

    mkdir = sub.add_parser("mkdir", help="create a directory (a bucket: s3://name)")
    mkdir.add_argument("urls", nargs="+", metavar="URL")
    mkdir.set_defaults(func=_cmd_mkdir)

    rm = sub.add_parser("rm", help="delete objects")
    rm.add_argument("urls", nargs="+", metavar="URL")
    rm.add_argument("-r", "--recursive", action="store_true", help="delete a directory tree")
    rm.set_defaults(func=_cmd_rm)

    info = sub.add_parser("info", help="size, version and checksums of objects, as JSON")
    info.add_argument("urls", nargs="+", metavar="URL")
    info.add_argument("--json", action="store_true", help="print one JSON list, a record a URL")
    info.set_defaults(func=_cmd_info)

    cli_inspect.add_parsers(sub)

    cli_config.add_parser(sub)

    flush = sub.add_parser(
        "flush", help="upload the checkpoints staged on this node whose saver is gone"
    )
    flush.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress on stderr (default: when stderr is a terminal)",
    )
    flush.set_defaults(func=_cmd_flush)

    version = sub.add_parser(
        "version", help="versions of mlstore, Python, the platform and optional packages"
    )
    version.add_argument("--json", action="store_true", help="print one JSON object")
    version.set_defaults(func=_cmd_version, needs_store=False)

    doctor = sub.add_parser(
        "doctor", help="check the config, credentials, endpoints and the cache directory"
    )
    doctor.add_argument(
        "--offline", action="store_true", help="skip the checks that use the network"
    )
    doctor.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="how long to wait for each endpoint (default: 3)",
    )
    doctor.add_argument("--json", action="store_true", help="print one JSON report")
    doctor.set_defaults(func=_cmd_doctor, needs_store=False)

    cli_warm.add_parser(sub)
    cli_cache.add_parser(sub)
    cli_demo.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None, *, stdout: IO[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    out = stdout or sys.stdout
    try:
        if not getattr(args, "needs_store", True):
            status: int = args.func(args, out)
            return status
        # Imported here: `mlstore --help`, `version` and `doctor` need no Store.
        from mlstore.config import StoreConfig
        from mlstore.store import Store

        with Store(StoreConfig()) as store:
            status = args.func(store, args, out)
            return status
    except BrokenPipeError:  # `mlstore cat ... | head`
        try:
            sys.stdout.close()
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        sys.stderr.write("mlstore: interrupted\n")
        _forget_interrupt()
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place a command's error is shown
        return _report(exc, args.debug)


def _forget_interrupt() -> None:
    """Let a handled Ctrl-C end ``python -m mlstore`` with status 130, as :func:`main`
    returns.

    Before Python 3.14, an interrupt that lands while code compiled from a source text
    runs (``exec``/``eval`` of a string: a dataclass or namedtuple being made during an
    import, say) marks the process as stopped by an unhandled Ctrl-C even when it is
    caught further up, and ``python -m`` then ends by killing itself with SIGINT (status
    -2, not 130; CPython gh-128130). Running any source text clears the mark."""
    exec("")  # an empty text, run for that side effect


def _report(exc: Exception, debug: bool) -> int:
    """Show ``exc`` as one line on stderr (after the traceback, with ``--debug``);
    credentials it might quote are masked. Returns the exit status, 1."""
    if debug:
        import traceback

        sys.stderr.write(scrub("".join(traceback.format_exception(exc))))
    if isinstance(exc, (MlstoreError, OSError)):
        message = str(exc) or type(exc).__name__
    else:  # not an error mlstore expects: name its type, it may be a bug
        message = f"{type(exc).__name__}: {exc}"
    hint = "" if debug else " (run with --debug for the traceback)"
    hint = hint if not isinstance(exc, MlstoreError) else ""
    sys.stderr.write(scrub(f"mlstore: error: {message}{hint}") + "\n")
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
