"""``mlstore demo``: mlstore next to plain s3fs and fsspec's ``simplecache`` on one
synthetic dataset, with a table of what each did.

:func:`run` starts an S3 emulator (``moto_server``) behind a proxy that adds a fixed
first-byte latency to every request (the "cloud profile") and counts the requests and
bytes that pass, uploads a synthetic dataset, then reads it for a few epochs through each
contender (see :mod:`._run`). Against a real bucket (``url``) no server is started and the
dataset lives under a fresh prefix below ``url``, deleted at the end.

Servers are stopped and the temporary directory removed on the way out, however the
run ends (success, error, Ctrl-C), unless ``keep`` asks to keep the directory.
"""

from __future__ import annotations

import functools
import importlib.util
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlstore._util.units import human_size
from mlstore.demo._run import CONTENDERS, Dataset, Epoch, Setup, make_dataset, run_contender, upload
from mlstore.demo._table import render, speedup
from mlstore.errors import ConfigError

__all__ = ["CONTENDERS", "DemoOptions", "render", "require", "run", "speedup"]

_EXTRA = 'mlstore demo needs the demo extra: pip install "mlstore[demo]"'
#: The emulator accepts any credentials; these keep the real ones out of the demo.
_EMULATOR_CREDENTIALS = {"key": "demo", "secret": "demo"}


@dataclass(frozen=True)
class DemoOptions:
    """The knobs of one run (the command line's options, see ``mlstore demo --help``)."""

    objects: int = 256
    size: int = 256 * 1024
    epochs: int = 2
    latency: float = 0.02
    workers: int = 16
    torch: bool = True
    only: tuple[str, ...] = CONTENDERS
    keep: bool = False
    url: str | None = None
    endpoint_url: str | None = None
    seed: int = 0


def require(emulator: bool) -> None:
    """Raise :class:`~mlstore.errors.ConfigError` naming the extra when a package the
    demo needs is missing (moto only for the emulator)."""
    needed = ["s3fs", "fsspec", *(["moto"] if emulator else [])]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"{_EXTRA} (missing: {', '.join(missing)})")


def _uses_torch(opts: DemoOptions) -> bool:
    return opts.torch and importlib.util.find_spec("torch") is not None


class _Phase:
    """``say("starting S3 emulator… ")`` now, ``"ok (0.8 s)"`` when the block ends well."""

    def __init__(self, say: Callable[[str], None], text: str) -> None:
        self.say, self.text, self.note = say, text, ""

    def __enter__(self) -> _Phase:
        self.start = time.perf_counter()
        self.say(f"{self.text}… ")
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            note = f", {self.note}" if self.note else ""
            self.say(f"ok ({time.perf_counter() - self.start:.1f} s{note})\n")
        else:
            self.say("interrupted\n" if exc_type is KeyboardInterrupt else "failed\n")


def run(opts: DemoOptions, say: Callable[[str], None]) -> dict[str, Any]:
    """Run the demo; ``say`` gets the progress text (for stderr). Returns the report
    (what ``--json`` prints) that :func:`render` shows as a table."""
    from mlstore import Store
    from mlstore.demo._servers import (
        MOTO_READY,
        PROXY_READY,
        Server,
        counts,
        moto_argv,
        proxy_argv,
        reset,
    )

    require(emulator=opts.url is None)
    tmp = tempfile.mkdtemp(prefix="mlstore-demo-")
    report: dict[str, Any] = {"temp_dir": tmp, "kept": opts.keep, "servers": {}}
    say(f"working in {tmp}\n")
    servers: list[Server] = []
    cleanup: Callable[[], None] | None = None
    try:
        if opts.url is None:
            moto = Server("S3 emulator", moto_argv(), MOTO_READY)
            servers.append(moto)
            with _Phase(say, "starting S3 emulator (moto_server)") as phase:
                moto.start()
                phase.note = f"pid {moto.pid}"
            proxy = Server("latency proxy", proxy_argv(moto.endpoint, opts.latency), PROXY_READY)
            servers.append(proxy)
            with _Phase(say, f"starting latency proxy ({opts.latency * 1000:g} ms)") as phase:
                proxy.start()
                phase.note = f"pid {proxy.pid}"
            report["servers"] = {"s3_emulator": moto.pid, "proxy": proxy.pid}
            write_options = {"endpoint_url": moto.endpoint, **_EMULATOR_CREDENTIALS}
            read_options = {"endpoint_url": proxy.endpoint, **_EMULATOR_CREDENTIALS}
            prefix = "s3://mlstore-demo/data"
            setup_counts: Any = lambda: counts(proxy.endpoint)  # noqa: E731
            setup_reset: Any = lambda: reset(proxy.endpoint)  # noqa: E731
        else:
            read_options = {"endpoint_url": opts.endpoint_url} if opts.endpoint_url else {}
            write_options = read_options
            prefix = f"{opts.url.rstrip('/')}/mlstore-demo-{secrets.token_hex(4)}"
            setup_counts = setup_reset = None

        with _Phase(say, "making the dataset"):
            data = make_dataset(opts.objects, opts.size, opts.seed)
        say(f"uploading {opts.objects} objects of {human_size(opts.size)} to {prefix}…\n")
        with Store(cache={"enabled": False}, options={"s3": write_options}) as writer:
            if opts.url is None:
                writer.mkdir("s3://mlstore-demo")
            elif not opts.keep:
                cleanup = functools.partial(_delete, prefix, write_options)
            with _Phase(say, "upload"):
                upload(writer, prefix, data, opts.workers)
            report["dataset"] = _dataset(data, prefix)
            setup = Setup(
                url=prefix,
                options=read_options,
                workers=opts.workers,
                epochs=opts.epochs,
                tmp=tmp,
                use_torch=_uses_torch(opts),
                counts=setup_counts,
                reset=setup_reset,
                seed=opts.seed,
            )
            report.update(_settings(opts, setup))
            report["contenders"] = {}
            for name in opts.only:
                how = _how(name, setup)
                with _Phase(say, f"reading through {name} ({how})"):
                    epochs, where = run_contender(name, setup, data)
                report["contenders"][name] = {
                    "how": how,
                    "cache_dir": where,
                    "epochs": [_epoch(e) for e in epochs],
                }
            if cleanup is not None:
                with _Phase(say, f"deleting {prefix}"):
                    cleanup()
                    cleanup = None
        return report
    finally:
        if cleanup is not None:  # stopped early against a real bucket
            try:
                cleanup()
            except Exception as exc:  # noqa: BLE001 - the first error is the one to show
                say(f"could not delete {prefix}: {exc}\n")
        for server in reversed(servers):
            server.stop()
        if not opts.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _delete(prefix: str, options: dict[str, Any]) -> None:
    from mlstore import Store

    with Store(cache={"enabled": False}, options={"s3": options}) as store:
        store.rm(prefix, recursive=True)


def _dataset(data: Dataset, prefix: str) -> dict[str, Any]:
    return {
        "url": prefix,
        "objects": len(data.names),
        "object_size": len(data.blobs[data.names[0]]) if data.names else 0,
        "bytes": data.total_bytes,
        "duplicates": data.duplicates,
    }


def _settings(opts: DemoOptions, setup: Setup) -> dict[str, Any]:
    return {
        "epochs": opts.epochs,
        "workers": opts.workers,
        "torch": setup.use_torch,
        "latency": opts.latency if opts.url is None else None,
        "counted_by": "proxy" if setup.counts is not None else "mlstore",
    }


def _how(name: str, setup: Setup) -> str:
    if name == "mlstore":
        if setup.use_torch:
            batch = max(1, setup.workers // 2)
            return f"mlstore.torch.MapDataset, a DataLoader of 2 workers, batches of {batch}"
        return f"Store.read_many, {setup.workers} threads"
    if name == "s3fs":
        return f"S3FileSystem.cat_file, {setup.workers} threads"
    return f"fsspec simplecache::s3, open and read, {setup.workers} threads"


def _epoch(e: Epoch) -> dict[str, Any]:
    return {
        "seconds": round(e.seconds, 4),
        "samples": e.samples,
        "samples_per_s": round(e.samples / e.seconds, 1) if e.seconds > 0 else None,
        "bytes_read": e.bytes_read,
        "verified": True,
        "gets": e.gets,
        "requests": e.requests,
        "bytes_fetched": e.bytes_fetched,
        **e.extra,
    }
