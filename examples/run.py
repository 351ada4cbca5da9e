"""Run every example that needs only local emulators; ``nox -s examples`` calls this.

It starts moto_server (S3) and fake-gcs-server (GCS) as processes on 127.0.0.1 with
``tests/emulators.py`` from this checkout, creates a bucket on each, points mlstore at
them through its usual settings (``MLSTORE_S3_ENDPOINT_URL``, ``MLSTORE_GCS_ENDPOINT_URL``
and ``AWS_*``), gives every example a private cache directory, runs each script as a
subprocess with a timeout and executes the notebook with nbclient (its outputs are
discarded, never written back). It prints one PASS/FAIL line per example with its time,
stops the servers, and exits non-zero if any example failed.

Usage, from the repository root::

    python examples/run.py                 # all of them
    python examples/run.py quickstart      # those whose name contains a word
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # tests/emulators.py, from this checkout

from tests.emulators import EmulatorUnavailable, ServerProcess, fake_gcs_server, moto_server  # noqa: E402

TIMEOUT = 150.0  # seconds per example
GCS_PROJECT = "mlstore-examples"
# Every example that needs only the local emulators, in the order they run.
EXAMPLES = (
    "quickstart.py",
    "pytorch_dataloader.py",
    "checkpoint.py",
    "pandas_pyarrow_dask.py",
    "notebook.ipynb",
    "multicloud_mounts.py",  # last: it kills its own S3 server
)


def make_bucket(url: str, env: dict[str, str]) -> None:
    """Create a bucket in a child process, so this process imports no cloud SDK."""
    code = (
        "import sys, mlstore\n"
        "store = mlstore.Store(options={'gs': {'project': sys.argv[2]}})\n"
        "store.mkdir(sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", code, url, GCS_PROJECT], env=env, check=True)


# Executes a notebook in memory with nbclient, on a kernel of this Python.
NOTEBOOK = """
import sys, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, timeout=120, kernel_name="python3").execute()
print(f"{len(nb.cells)} cells executed")
"""


def run_example(name: str, env: dict[str, str]) -> tuple[bool, str]:
    """Run one example in its own process group; on timeout the whole group (DataLoader
    workers, the notebook's kernel) is killed. Returns (passed, output)."""
    path = str(HERE / name)
    argv = [sys.executable, path]
    if name.endswith(".ipynb"):
        argv = [sys.executable, "-c", NOTEBOOK, path]
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return False, f"{output}\ntimed out after {TIMEOUT:.0f} s"
    return proc.returncode == 0, output


def main(selected: list[str]) -> int:
    # The emulators' settings only: none of the machine's MLSTORE_* settings or config.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSTORE_")}
    env.update(
        AWS_ACCESS_KEY_ID="testing",  # moto accepts any credentials
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])),
    )
    servers: list[ServerProcess] = []
    results: list[tuple[str, bool, float]] = []
    work = tempfile.mkdtemp(prefix="mlstore-examples-")
    try:
        s3 = moto_server().start()
        servers.append(s3)
        gcs = fake_gcs_server().start()
        servers.append(gcs)
        doomed = moto_server().start()  # multicloud_mounts kills this one
        servers.append(doomed)
        assert doomed.proc is not None
        doomed_group = str(doomed.proc.pid)  # started in a new session: pid == group id
        env["MLSTORE_S3_ENDPOINT_URL"] = s3.endpoint
        env["MLSTORE_GCS_ENDPOINT_URL"] = gcs.endpoint
        env["STORAGE_EMULATOR_HOST"] = gcs.endpoint  # gcsfs: anonymous, to the emulator
        bucket = f"examples-{uuid.uuid4().hex[:8]}"
        make_bucket(f"s3://{bucket}", env)
        make_bucket(f"gs://{bucket}", env)
        make_bucket(f"s3://{bucket}", {**env, "MLSTORE_S3_ENDPOINT_URL": doomed.endpoint})

        extra_env = {  # the settings of the examples that need more
            "multicloud_mounts.py": {
                "EXAMPLE_SECOND_URL": f"gs://{bucket}/multicloud_mounts",
                "MLSTORE_S3_ENDPOINT_URL": doomed.endpoint,
                "EXAMPLE_KILL_PID": doomed_group,
            }
        }
        for name in EXAMPLES:
            if selected and not any(word in name for word in selected):
                continue
            example_env = {
                **env,
                "MLSTORE_CACHE_DIR": tempfile.mkdtemp(prefix="cache-", dir=work),
                "EXAMPLE_URL": f"s3://{bucket}/{Path(name).stem}",
                **extra_env.get(name, {}),
            }
            start = time.monotonic()
            ok, output = run_example(name, example_env)
            seconds = time.monotonic() - start
            results.append((name, ok, seconds))
            print(f"{'PASS' if ok else 'FAIL'}  {name:<28} {seconds:6.1f} s", flush=True)
            if not ok or os.environ.get("EXAMPLES_VERBOSE"):
                print("    " + output.rstrip().replace("\n", "\n    "), flush=True)
    except EmulatorUnavailable as exc:
        print(f"FAIL  an emulator did not start: {exc}")
        return 1
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    failed = [name for name, ok, _ in results if not ok]
    total = sum(seconds for _, _, seconds in results)
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed in {total:.1f} s")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
