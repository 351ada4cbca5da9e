"""What a notebook shows: reprs and ``_repr_html_`` views, and short error tracebacks.

Each HTML view is parsed with :mod:`html.parser` (tags balanced, text escaped), checked
for its key fields and for sizes in KiB/MiB/GiB, and checked for the absence of every
credential the Store was given.
"""

from __future__ import annotations

import html.parser
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import mlstore
import mlstore.notebook
from mlstore._engine.copying import CopyResult
from mlstore._util.html import Markup, human_size, table
from mlstore.config import StoreConfig
from mlstore.errors import NotFoundError


class Page(html.parser.HTMLParser):
    """An HTML fragment, checked as it is parsed: every closing tag closes the tag
    opened last, and nothing is left open at the end."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.cells: list[str] = []
        self.feed(source)
        self.close()
        assert self.stack == [], f"unclosed tags {self.stack}"

    def handle_starttag(self, tag: str, attrs: object) -> None:
        self.stack.append(tag)
        self.tags.append(tag)
        if tag in ("td", "th", "caption"):
            self.cells.append("")

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self.cells:
            self.cells[-1] += data

    @property
    def text(self) -> str:
        return " | ".join(self.cells)


def page(obj: object) -> Page:
    source = obj._repr_html_()  # type: ignore[attr-defined]
    assert isinstance(source, str) and source.startswith("<table>")
    return Page(source)


# ------------------------------------------------------------------ the renderer


def test_human_sizes() -> None:
    assert human_size(0) == "0 B"
    assert human_size(1023) == "1023 B"
    assert human_size(1024) == "1.0 KiB"
    assert human_size(512 * 2**20) == "512.0 MiB"
    assert human_size(10 * 2**30) == "10.0 GiB"
    assert human_size(3 * 2**50) == "3.0 PiB"
    assert human_size(5 * 2**60) == "5120.0 PiB"


def test_tables_escape_cells_but_not_markup() -> None:
    inner = table([["<b>"]])
    out = table([["a & b", None, 3, Markup(inner)]], header=["<name>", "", "n", "t"], caption="x<y")
    parsed = Page(out)
    assert "&lt;name&gt;" in out and "a &amp; b" in out and "x&lt;y" in out
    assert "&lt;b&gt;" in out and "<b>" not in out
    assert parsed.tags.count("table") == 2
    assert "a & b" in parsed.cells and "<b>" in parsed.cells


# ------------------------------------------------------------------ a Store


CANARIES = ("AKIACANARYREPR01", "CANARY-REPR-SECRET", "CANARYSIG", "CANARYNESTED", "CANARYPW")


@pytest.fixture
def s3_store(s3_options: dict[str, object]) -> Iterator[mlstore.Store]:
    options = {
        **s3_options,
        "key": "AKIACANARYREPR01",
        "secret": "CANARY-REPR-SECRET",
        "client_kwargs": {"aws_session_token": "CANARYNESTED", "region_name": "us-east-1"},
    }
    with mlstore.Store(
        options={"s3": options},
        mounts={
            "ds": ["https://user:CANARYPW@host.example/p?X-Amz-Signature=CANARYSIG&x=1"],
            "odd": ["memory://b/x&y"],
        },
    ) as store:
        yield store


def views(store: mlstore.Store) -> dict[str, str]:
    return {
        "repr(store)": repr(store),
        "store html": store._repr_html_(),
        "repr(config)": repr(store.config),
        "config html": store.config._repr_html_(),
        "repr(cache)": repr(store.cache),
        "cache html": store.cache._repr_html_(),
    }


@pytest.mark.s3
def test_store_views_show_the_figures_and_no_secret(
    s3_store: mlstore.Store, s3_bucket: str, s3_options: dict[str, object]
) -> None:
    url = f"s3://{s3_bucket}/data/a.bin"
    s3_store.write_bytes(url, b"x" * 3 * 2**20)
    assert s3_store.read_bytes(url) == b"x" * 3 * 2**20  # fills the cache
    for name, text in views(s3_store).items():
        for canary in CANARIES:
            assert canary not in text, f"{canary} in {name}"

    store_page = page(s3_store)
    assert "mount ds" in store_page.cells and "mount odd" in store_page.cells
    assert "https://***@host.example/p?X-Amz-Signature=***&x=1" in store_page.cells
    assert "512.0 MiB" in store_page.cells  # the memory tier's budget, humanised
    assert "3.0 MiB" in store_page.cells  # the object now in the cache
    assert "this process's counters" in store_page.cells
    assert "memory://b/x&amp;y" in s3_store._repr_html_()  # escaped
    assert "memory://b/x&y" in store_page.cells

    cache_page = page(s3_store.cache)
    assert cache_page.cells[:5] == [
        "Cache in " + cache_dir(s3_store) + " (validate=ttl (300 s), verify=always)",
        "tier",
        "used",
        "budget",
        "entries",
    ]
    rows = dict(rows_of(cache_page, 4))
    assert rows["disk (this node)"] == ["3.0 MiB", "10.0 GiB", "1"]
    assert rows["memory (this process)"][1:] == ["512.0 MiB", "1"]
    assert repr(s3_store.cache) == (
        f"TieredCache(dir={cache_dir(s3_store)!r}, memory=3.0 MiB of 512.0 MiB (1 entries), "
        "disk=3.0 MiB of 10.0 GiB (1 entries))"
    )
    assert repr(s3_store).startswith(f"Store(cache={cache_dir(s3_store)!r} (memory 3.0 MiB/512.0")

    config_page = page(s3_store.config)
    options = dict(rows_of(config_page, 3))
    assert options["options.s3.key"] == ["***", "argument"]
    assert options["options.s3.secret"] == ["***", "argument"]
    assert options["options.s3.endpoint_url"] == [str(s3_options["endpoint_url"]), "argument"]
    assert "aws_session_token" in options["options.s3.client_kwargs"][0]


def cache_dir(store: mlstore.Store) -> str:
    return store.config.cache.resolved_disk_dir


def rows_of(p: Page, width: int) -> list[tuple[str, list[str]]]:
    """The body rows of a table page (after its caption and header), ``width`` cells each."""
    start = 1 + width  # caption, then the header row
    cells = p.cells[start:]
    rows = [cells[i : i + width] for i in range(0, len(cells), width)]
    return [(r[0], r[1:]) for r in rows]


def test_a_store_shown_before_its_first_read_builds_nothing(tmp_path: Path) -> None:
    store = mlstore.Store(cache={"disk_dir": str(tmp_path / "never")})
    text = repr(store) + store._repr_html_()
    assert not (tmp_path / "never").exists()
    assert "10.0 GiB" in text and "512.0 MiB" in text
    cells = page(store).cells
    assert "this process's counters" not in cells
    cache_cells = [c for c in cells if c.startswith("memory (this process)")]
    assert cache_cells  # the cache table is nested, with budgets and no figures yet


def test_config_view_names_where_each_value_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLSTORE_TTL", "42")
    config_file = tmp_path / "mlstore.toml"
    config_file.write_text('[retry]\nmax_attempts = 9\n[cost]\negress = "internet"\n')
    monkeypatch.setenv("MLSTORE_CONFIG", str(config_file))
    config = StoreConfig(cache={"memory_bytes": "1GiB"}, max_workers=7)
    rows = dict(rows_of(page(config), 3))
    assert rows["cache.ttl"] == ["42.0", "environment variable MLSTORE_TTL"]
    assert rows["cache.memory_bytes"] == ["1.0 GiB", "argument"]
    assert rows["cache.disk_bytes"] == ["10.0 GiB", "default"]
    assert rows["retry.max_attempts"] == ["9", f"config file {config_file} [retry]"]
    assert rows["cost.egress"] == ["internet", f"config file {config_file} [cost]"]
    assert rows["max_workers"] == ["7", "argument"]
    assert rows["multipart_part_size"] == ["16.0 MiB", "default"]


# ------------------------------------------------------------------ results


def test_manifest_views(mem_root: str) -> None:
    store = mlstore.Store()
    for i in range(12):
        store.write_bytes(f"{mem_root}/<x&{i:02}>.bin", b"y" * 1536)
    manifest = mlstore.Manifest.build(mem_root, store=store)
    assert manifest.total_bytes == 12 * 1536
    assert repr(manifest) == f"Manifest({mem_root + '/'!r}, 12 entries, 18.0 KiB)"
    source = manifest._repr_html_()
    assert "&lt;x&amp;00&gt;.bin" in source
    p = Page(source)
    assert p.cells[0] == f"Manifest of {mem_root}/: 12 entries, 18.0 KiB"
    rows = rows_of(p, 4)
    assert len(rows) == 11  # ten entries, then how many more
    assert rows[0] == (f"{mem_root}/<x&00>.bin", ["1.5 KiB", rows[0][1][1], "-"])
    assert rows[-1][0] == "... 2 more"


def test_manifest_views_mask_signed_urls() -> None:
    entry = mlstore.ManifestEntry("https://h.example/a.bin?sig=CANARYSIG", 5)
    manifest = mlstore.Manifest.from_entries([entry])
    assert "CANARYSIG" not in repr(manifest) + manifest._repr_html_()


def test_copy_result_views() -> None:
    written = [f"s3://b/out/{i}.bin" for i in range(7)] + ["https://h/x?sig=CANARYSIG"]
    result = CopyResult(
        written, skipped=["s3://b/out/same.bin"], skipped_bytes=2**20, copied_bytes=5 * 2**30
    )
    text = repr(result)
    assert text.startswith("CopyResult(['s3://b/out/0.bin', ")
    assert "... 3 more" in text and "skipped=1 objects / 1048576 bytes" in text
    rows = dict(rows_of(page(result), 4))
    assert rows["copied"][:2] == ["8", "5.0 GiB"]
    assert rows["copied"][2].endswith("... 3 more")
    assert rows["skipped (same content)"] == ["1", "1.0 MiB", "s3://b/out/same.bin"]
    assert (
        "CANARYSIG" not in repr(CopyResult(written[-1:])) + CopyResult(written[-1:])._repr_html_()
    )


# ------------------------------------------------------------------ tracebacks


@pytest.fixture
def shell() -> Iterator[object]:
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_cell("%xmode Context")
    yield ip
    mlstore.notebook.short_tracebacks(True)
    ip.run_cell("%xmode Context")


def run(shell: object, cell: str, capsys: pytest.CaptureFixture[str]) -> tuple[str, object]:
    capsys.readouterr()
    result = shell.run_cell(cell)  # type: ignore[attr-defined]
    out = capsys.readouterr()
    return out.out + out.err, result.error_in_exec


def test_ipython_shows_mlstore_frames_one_line_each(
    shell: object, capsys: pytest.CaptureFixture[str]
) -> None:
    cell = (
        "import mlstore\ndef load():\n    return mlstore.read_bytes('memory://no-such/x')\nload()"
    )
    text, error = run(shell, cell, capsys)
    assert isinstance(error, NotFoundError)
    assert sys.last_value is error  # the shell still records it: %debug works
    lines = text.splitlines()
    assert lines[0].startswith("Traceback (most recent call last; mlstore's frames one line each)")
    # the user's frames, with their source lines
    assert "    return mlstore.read_bytes('memory://no-such/x')" in lines
    assert "    load()" in lines
    # every mlstore frame is one line, none with its source
    mlstore_lines = [ln for ln in lines if "mlstore/" in ln]
    assert mlstore_lines and all(ln.startswith("  - mlstore/") for ln in mlstore_lines)
    assert "  - mlstore/store.py" in text
    assert not any(ln.startswith('  File "') and "/mlstore/" in ln for ln in lines)
    assert any(ln.startswith("  - (") and "tenacity" in ln for ln in lines)
    assert "  caused by FileNotFoundError: /no-such/x" in lines
    assert "NotFoundError: read memory://no-such/x: no such object or directory" in lines
    assert "interactiveshell.py" not in text  # IPython's own frame above the cell


def test_verbose_mode_and_the_switch_show_every_frame(
    shell: object, capsys: pytest.CaptureFixture[str]
) -> None:
    cell = "import mlstore\nmlstore.read_bytes('memory://no-such/y')"
    shell.run_cell("%xmode Verbose")  # type: ignore[attr-defined]
    verbose, _ = run(shell, cell, capsys)
    assert "mlstore's frames one line each" not in verbose
    assert "mlstore/_engine/reader.py" in verbose and "NotFoundError" in verbose
    shell.run_cell("%xmode Context")  # type: ignore[attr-defined]
    mlstore.notebook.short_tracebacks(False)
    plain, _ = run(shell, cell, capsys)
    assert "mlstore's frames one line each" not in plain and "NotFoundError" in plain
    mlstore.notebook.short_tracebacks(True)
    short, _ = run(shell, cell, capsys)
    assert "mlstore's frames one line each" in short


def test_other_errors_keep_ipython_traceback(
    shell: object, capsys: pytest.CaptureFixture[str]
) -> None:
    text, error = run(shell, "import mlstore\nmlstore.Store(no_such_argument=1)", capsys)
    assert error is not None and not isinstance(error, mlstore.MlstoreError)
    assert "mlstore's frames one line each" not in text


def test_format_error_outside_ipython() -> None:
    with pytest.raises(NotFoundError) as info:
        mlstore.read_bytes("memory://no-such/z")
    text = mlstore.notebook.format_error(info.value)
    assert (
        text.splitlines()[-2]
        == "NotFoundError: read memory://no-such/z: no such object or directory"
    )
    assert "  - mlstore/store.py" in text


def test_a_stats_repr_is_one_short_line_of_totals_and_timed_operations() -> None:
    from mlstore.metrics import Histogram, Stats

    timed = Histogram() + Histogram()  # an empty one does not count as timed
    stats = Stats({("requests", "s3"): 3, ("hits", "disk"): 2}, {("get", "s3"): timed})
    assert repr(stats) == "Stats(hits=2, requests=3; timed: nothing)"
    with mlstore.Store(cache={"enabled": False}) as store:
        store.write_bytes("memory://reprs/a", b"x")
        store.read_bytes("memory://reprs/a")
        shown = repr(store.stats())
    assert "\n" not in shown and "Histogram" not in shown and len(shown) < 200
