"""The documentation agrees with the code.

- docs/environment.md lists every variable in ``mlstore.config.ENV_VARS``, and no page
  names a variable mlstore does not read;
- docs/cli.md documents every subcommand and option of the ``mlstore`` parser;
- docs/configuration.md lists every field of the config classes, and its TOML examples
  load;
- the Python blocks of the docs run. A block runs unless the line just before its
  opening fence is ``<!-- docs-test: skip (reason) -->``. Blocks that run use only
  ``memory://`` and relative local paths; each runs in a fresh namespace, in an empty
  temporary directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import mlstore
from mlstore.cli import _parser
from mlstore.config import (
    ENV_VARS,
    CacheConfig,
    CostConfig,
    HttpPolicy,
    RetryPolicy,
    StoreConfig,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PACKAGE = ROOT / "mlstore"

# Read by the test suite, not by the library; docs may mention them in a test-suite note.
SUITE_VARIABLES = {"MLSTORE_REQUIRE_EMULATORS", "MLSTORE_AZURITE_BIN"}
VARIABLE = re.compile(r"\bMLSTORE_[A-Z0-9_]+\b")
SKIP_MARKER = re.compile(r"^<!--\s*docs-test:\s*skip\b.*-->$")
# A block that runs must not reach a real remote store; parse_url() alone is fine.
REMOTE_URL = re.compile(r"\b(?:s3|s3a|gs|gcs|az|abfss?|https?)://")
PARSE_CALL = re.compile(r"parse_url\(\s*\"[^\"]*\"\s*\)")


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    language: str
    code: str
    skipped: bool

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def read(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def code_blocks(path: Path) -> list[Block]:
    """Fenced code blocks of a page, with their language and skip marker."""
    blocks = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start = i
        previous = next((ln.strip() for ln in reversed(lines[:start]) if ln.strip()), "")
        i += 1
        body = []
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{path.name}:{start + 1}: unclosed code block"
        i += 1
        blocks.append(
            Block(
                page=path.name,
                line=start + 1,
                language=m.group(1),
                code="\n".join(body) + "\n",
                skipped=bool(SKIP_MARKER.match(previous)),
            )
        )
    return blocks


def python_blocks() -> list[Block]:
    return [b for p in pages() for b in code_blocks(p) if b.language == "python"]


def table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows keyed by the content of their first cell."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|[-| :]+\|$", line):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    above = re.compile(rf"^#{{1,{level}}} ")
    lines = text.splitlines()
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if above.match(lines[i])), len(lines))
    return "\n".join(lines[start + 1 : end])


# ---------------------------------------------------------------- environment variables


def test_every_variable_has_a_row_naming_its_setting() -> None:
    rows = table_rows(read("environment.md"))
    for var, setting in ENV_VARS.items():
        row = rows.get(f"`{var}`")
        assert row is not None, f"{var} has no row in docs/environment.md"
        assert len(row) == 3 and all(row), f"{var}: the row needs setting, meaning and default"
        if var != "MLSTORE_CONFIG":
            assert row[0] == f"`{setting}`", f"{var} feeds {setting}, the page says {row[0]}"


def test_the_variable_table_has_no_extra_rows() -> None:
    table = read("environment.md").split("\n## ", 1)[0]  # the table above the notes
    listed = {k.strip("`") for k in table_rows(table) if k.startswith("`MLSTORE_")}
    assert listed == set(ENV_VARS)


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_pages_name_only_variables_mlstore_reads(page: Path) -> None:
    named = set(VARIABLE.findall(page.read_text(encoding="utf-8")))
    unknown = named - set(ENV_VARS) - SUITE_VARIABLES
    assert not unknown, f"{page.name} names variables mlstore does not read: {sorted(unknown)}"


def test_the_package_reads_only_listed_variables() -> None:
    """ENV_VARS is the one list; a variable read anywhere in mlstore/ must be in it."""
    used = {v for f in PACKAGE.rglob("*.py") for v in VARIABLE.findall(f.read_text("utf-8"))}
    assert used - set(ENV_VARS) == set()


# ----------------------------------------------------------------------------- CLI


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_cli_page_lists_exactly_the_subcommands() -> None:
    rows = table_rows(read("cli.md"))
    listed = {m.group(1) for k in rows if (m := re.fullmatch(r"\[`([a-z-]+)`\]\(#[a-z-]+\)", k))}
    assert listed == set(subcommands())


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_subcommand_is_documented(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps usage lines at the terminal width
    sub = subcommands()[command]
    text = section(read("cli.md"), f"## {command}")
    flat = " ".join(text.split())
    usage = " ".join(sub.format_usage().split()).removeprefix("usage: ").replace(" [-h]", "")
    assert usage in flat, f"docs/cli.md ## {command} should show the usage line {usage!r}"
    for action in sub._actions:
        for option in action.option_strings:
            if option not in ("-h", "--help"):
                assert f"`{option}`" in text, f"mlstore {command} {option} is not documented"


# ------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("cls", [CacheConfig, RetryPolicy, HttpPolicy, CostConfig, StoreConfig])
def test_configuration_page_lists_every_field(cls: type) -> None:
    rows = table_rows(section(read("configuration.md"), f"## {cls.__name__}"))
    for f in dataclasses.fields(cls):
        assert f"`{f.name}`" in rows, f"{cls.__name__}.{f.name} is not in docs/configuration.md"


def toml_blocks() -> list[Block]:
    return [b for p in pages() for b in code_blocks(p) if b.language == "toml"]


@pytest.mark.parametrize("block", toml_blocks(), ids=lambda b: b.id)
def test_toml_examples_load(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mlstore.toml"
    path.write_text(block.code, encoding="utf-8")
    monkeypatch.setenv("MLSTORE_CONFIG", str(path))
    StoreConfig()  # raises ConfigError on an unknown key or a bad value


def test_the_complete_toml_example_has_every_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = section(read("configuration.md"), "## The config file")
    (block,) = [b for b in toml_blocks() if b.page == "configuration.md" and b.code in text]
    path = tmp_path / "mlstore.toml"
    path.write_text(block.code, encoding="utf-8")
    data = mlstore.config.load_file(str(path))
    classes = (("cache", CacheConfig), ("retry", RetryPolicy), ("http", HttpPolicy))
    for section_name, cls in (*classes, ("cost", CostConfig)):
        assert set(data[section_name]) == {f.name for f in dataclasses.fields(cls)}
    assert set(data["store"]) == {"max_workers"}
    monkeypatch.setenv("MLSTORE_CONFIG", str(path))
    assert StoreConfig().cache.memory_bytes == 1024**3


# ---------------------------------------------------------------------- runnable examples


def test_getting_started_has_runnable_examples() -> None:
    runnable = [b for b in python_blocks() if b.page == "getting-started.md" and not b.skipped]
    assert len(runnable) >= 10


@pytest.mark.parametrize("block", [b for b in python_blocks() if b.skipped], ids=lambda b: b.id)
def test_skipped_blocks_say_why(block: Block) -> None:
    lines = read(block.page).splitlines()
    marker = next(ln for ln in reversed(lines[: block.line - 1]) if ln.strip())
    assert re.search(r"skip\s*\(\w.*\)", marker), f"{block.id}: give the reason, skip (why)"


@pytest.mark.parametrize("block", [b for b in python_blocks() if not b.skipped], ids=lambda b: b.id)
def test_python_example_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    remote = REMOTE_URL.findall(PARSE_CALL.sub("", block.code))
    assert not remote, f"{block.id} reaches {remote}: mark it <!-- docs-test: skip (why) -->"
    from fsspec.implementations.memory import MemoryFileSystem

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(MemoryFileSystem, "store", dict(MemoryFileSystem.store))
    monkeypatch.setattr(MemoryFileSystem, "pseudo_dirs", list(MemoryFileSystem.pseudo_dirs))
    environ = dict(os.environ)
    try:
        code = compile(block.code, f"docs/{block.id}", "exec")
        exec(code, {"__name__": f"docs_example_{block.line}"})
    finally:
        os.environ.clear()
        os.environ.update(environ)
