"""Delimited text tables as users write them for cohorts: the pairs file of ``register-batch`` and the image
lists of ``gradicon train`` (CSV; tab-separated with a ``.tsv`` name).

:func:`read_rows` returns the rows with their line numbers, so that every message can name the line a user
has to fix; :func:`row_values` pairs a row with its header; :func:`table_path` reads a path in a cell as
relative to the table's folder. The callers check the columns they allow and raise their own errors.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple


def read_rows(path: Path) -> List[Tuple[int, List[str]]]:
    """``(line number, cells)`` of every row of ``path`` that is not blank and does not start with ``#``.

    Raises:
        OSError, UnicodeDecodeError, csv.Error: as reading the file raises them.
    """
    delimiter = "\t" if Path(path).suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as fh:
        table = list(csv.reader(fh, delimiter=delimiter))
    return [(number, row) for number, row in enumerate(table, start=1)
            if any(cell.strip() for cell in row) and not row[0].lstrip().startswith("#")]


def row_values(header: Sequence[str], cells: Sequence[str]) -> Optional[Dict[str, str]]:
    """``{column: stripped cell}`` of one row (missing trailing cells are empty), or ``None`` when the row
    has more cells than the header has columns."""
    if len(cells) > len(header):
        return None
    return {column: (cells[i].strip() if i < len(cells) else "") for i, column in enumerate(header)}


def table_path(value: Optional[str], base: Path) -> Optional[Path]:
    """A path as a table (or list) gives it: ``~`` expanded, relative to ``base`` (the table's folder) unless
    absolute; ``None`` for an empty cell."""
    if value is None or not value.strip():
        return None
    path = Path(value.strip()).expanduser()
    return path if path.is_absolute() else base / path


__all__ = ["read_rows", "row_values", "table_path"]
