"""The Stats snapshot rendered as text and HTML: every column stays its own, whatever
the lengths of the counter names and values."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from mlstore.metrics import Stats

LONG = {
    ("bytes_read", "s3"): 123456789012345,
    ("dedupe_bytes_saved", "cache"): 7,
    ("a_very_long_counter_name_for_the_test", "cache"): 42,
    ("hits", "a-protocol-with-a-long-name"): 3,
}


def _columns(line: str) -> list[str]:
    return re.split(r"\s+", line.strip())


def test_the_text_table_separates_every_column() -> None:
    stats = Stats(LONG)
    lines = str(stats).splitlines()
    names = sorted({name for name, _ in LONG})
    assert _columns(lines[0]) == ["protocol", *names]
    assert len(lines) == 1 + len({proto for _, proto in LONG})
    for line in lines[1:]:
        proto, *values = _columns(line)
        row = stats.by_protocol[proto]
        assert values == [str(row.get(name, 0)) for name in names]
    # columns line up: each value ends where its header ends
    ends = [m.end() for m in re.finditer(r"\S+", lines[0])]
    for line in lines[1:]:
        assert [m.end() for m in re.finditer(r"\S+", line)][1:] == ends[1:]
    assert stats.table() == str(stats)


def test_the_html_table_has_one_cell_per_column() -> None:
    class Cells(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[list[str]] = []

        def handle_starttag(self, tag: str, attrs: object) -> None:
            if tag == "tr":
                self.rows.append([])
            elif tag in ("td", "th"):
                self.rows[-1].append("")

        def handle_data(self, data: str) -> None:
            self.rows[-1][-1] += data

    parser = Cells()
    parser.feed(Stats(LONG)._repr_html_())
    names = sorted({name for name, _ in LONG})
    assert parser.rows[0] == ["protocol", *names]
    assert {row[0] for row in parser.rows[1:]} == {proto for _, proto in LONG}
    assert all(len(row) == 1 + len(names) for row in parser.rows)


def test_an_empty_snapshot_says_so() -> None:
    assert str(Stats()) == "(no activity)"
