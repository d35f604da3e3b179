"""The Markdown tables of README.md and docs/DESIGN.md render as tables.

GitHub and PyPI (CommonMark with the GFM table extension) show a table only when its
delimiter row has as many cells as its header row; otherwise the whole table is one
paragraph of pipes.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_DELIMITER = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")


def _cells(row: str) -> int:
    row = row.strip()
    row = row.removeprefix("|").removesuffix("|")
    return len(re.split(r"(?<!\\)\|", row))


@pytest.mark.parametrize("name", ["README.md", "docs/DESIGN.md"])
def test_every_table_has_a_delimiter_row_as_wide_as_its_header(name: str) -> None:
    lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
    tables = [
        (number, header, delimiter)
        for number, (header, delimiter) in enumerate(itertools.pairwise(lines), start=1)
        if header.lstrip().startswith("|") and _DELIMITER.match(delimiter)
    ]
    assert tables
    wrong = [
        (number, _cells(header), _cells(delimiter))
        for number, header, delimiter in tables
        if _cells(header) != _cells(delimiter)
    ]
    assert wrong == []
