"""The demo's two servers, each a subprocess in its own session on 127.0.0.1: the S3
emulator (``moto_server``) and the latency proxy in front of it (:mod:`._proxy`).

A server is ready when it prints the line that names its port (no fixed wait). Each is
started with ``start_new_session=True``, so a Ctrl-C in the terminal reaches the demo
alone, and is stopped by killing its whole process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Sequence
from typing import Any

from mlstore.errors import MlstoreError

__all__ = ["Server", "counts", "moto_argv", "proxy_argv", "reset"]

_TAIL = 20  # lines of a server's output kept for its error message


class Server:
    """One server subprocess; ``port`` comes from the line matching ``ready``."""

    def __init__(self, name: str, argv: Sequence[str], ready: str, timeout: float = 60.0) -> None:
        self.name = name
        self.argv = list(argv)
        self.ready = re.compile(ready)
        self.timeout = timeout
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        """Start the process and wait for its ready line; a server that exits or stays
        silent raises :class:`~mlstore.errors.MlstoreError` with its last lines."""
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        found = threading.Event()
        proc = self.proc

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.output = [*self.output[-_TAIL:], line]
                if not found.is_set():
                    m = self.ready.search(line)
                    if m:
                        self.port = int(m.group("port"))
                        found.set()
            found.set()  # it exited: start() sees no port

        threading.Thread(target=pump, name=f"demo-{self.name}", daemon=True).start()
        if not found.wait(self.timeout) or not self.port or proc.poll() is not None:
            tail = "".join(self.output).strip()
            self.stop()
            raise MlstoreError(f"demo: {self.name} did not start" + (f": {tail}" if tail else ""))
        return self

    def stop(self) -> None:
        """Kill the server's process group (TERM, then KILL) and reap it; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):  # whatever is left in its group
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def moto_argv() -> list[str]:
    """How to start moto's S3 server on a free port of 127.0.0.1."""
    exe = shutil.which("moto_server")
    base = [exe] if exe else [sys.executable, "-m", "moto.server"]
    return [*base, "-H", "127.0.0.1", "-p", "0"]


def proxy_argv(upstream: str, latency: float) -> list[str]:
    """How to start the latency proxy in front of ``upstream``."""
    return [
        sys.executable,
        "-m",
        "mlstore.demo._proxy",
        "--upstream",
        upstream,
        "--latency",
        repr(latency),
    ]


MOTO_READY = r"Running on http://127\.0\.0\.1:(?P<port>\d+)"
PROXY_READY = r"listening on http://127\.0\.0\.1:(?P<port>\d+)"


def _call(endpoint: str, route: str, method: str) -> dict[str, Any]:
    request = urllib.request.Request(endpoint + route, method=method)
    with urllib.request.urlopen(request, timeout=30) as answer:
        found: dict[str, Any] = json.load(answer)
    return found


def counts(proxy: str) -> dict[str, Any]:
    """The proxy's counts: ``{"requests", "methods": {"GET": n}, "bytes_out"}``."""
    return _call(proxy, "/__demo/counts", "GET")


def reset(proxy: str) -> None:
    """Zero the proxy's counts."""
    _call(proxy, "/__demo/reset", "POST")
