"""``mlstore._util.progress``: a tqdm bar on stderr when asked or on a terminal, nothing
(and no tqdm import) otherwise. Run in child processes, so what is imported and where
the bar goes are the real program's."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import textwrap
import threading
from pathlib import Path

from mlstore._util.progress import progress

ROOT = Path(__file__).resolve().parent.parent


def child(code: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
        timeout=60,
        **kw,  # type: ignore[arg-type]
    )


def test_a_disabled_bar_counts_and_imports_no_tqdm() -> None:
    done = child(
        """
        import sys
        from mlstore._util.progress import progress
        with progress(10, desc="quiet") as bar:  # stderr is a pipe: off
            bar.update(3)
            bar.update()
        print(bar.done, bar.shown, "tqdm" in sys.modules)
        """
    )
    assert done.stdout.split() == ["4", "False", "False"]
    assert done.stderr == ""


def test_an_enabled_bar_goes_to_stderr_only() -> None:
    done = child(
        """
        from mlstore._util.progress import progress
        with progress(5, desc="copying", unit="obj", enabled=True) as bar:
            for _ in range(5):
                bar.update()
        print("result")
        """
    )
    assert done.stdout == "result\n"
    assert "copying" in done.stderr and "5/5" in done.stderr


def test_a_terminal_gets_a_bar_by_default() -> None:
    main, secondary = pty.openpty()
    # a terminal 80 columns wide (a new pty has none, and a bar then has no room)
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "from mlstore._util.progress import progress\n"
                "with progress(2, desc='tty') as bar:\n"
                "    bar.update(2)\n"
                "print(bar.shown)\n",
            ],
            stdout=subprocess.PIPE,
            stderr=secondary,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=True,
            timeout=60,
        )
        os.close(secondary)
        secondary = -1
        drawn = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the terminal's other end is closed: all read
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        if secondary != -1:
            os.close(secondary)
        os.close(main)
    assert done.stdout == "True\n"
    assert b"tty" in drawn and b"2/2" in drawn


def test_bytes_scale_and_updates_from_threads_add_up() -> None:
    with progress(None, desc="bytes", unit="B", enabled=False) as bar:
        threads = [
            threading.Thread(target=lambda: [bar.update(7) for _ in range(1000)]) for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert bar.done == 28_000
    assert repr(bar) == "<Progress 'bytes' 28000 B>"
    bar.close()  # twice: harmless
