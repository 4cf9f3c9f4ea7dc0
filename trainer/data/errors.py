"""Errors raised by the data pipeline."""

from __future__ import annotations

from typing import Optional


class DataError(ValueError):
    """Bad or missing input data. When the problem is in a file, the message names the file, the 1-based line
    number, the field and the offending value, e.g.
    ``ratings.dat: line 3: field 'item': not a non-negative integer: 'abc'``. Tables (own event logs) name the
    1-based data row and the column: ``events.parquet: row 7: column 'user_id': null user``."""

    def __init__(
        self,
        message: str,
        *,
        path: Optional[str] = None,
        line: Optional[int] = None,
        field: Optional[str] = None,
        value: Optional[str] = None,
        row: Optional[int] = None,
        column: Optional[str] = None,
    ) -> None:
        self.path, self.line, self.field, self.value = path, line, field, value
        self.row, self.column = row, column
        where = []
        if path is not None:
            where.append(str(path))
        if row is not None:  # tables (Parquet / CSV of own event logs): 1-based data row
            where.append(f"row {row}")
        if line is not None:
            where.append(f"line {line}")
        if column is not None:
            where.append(f"column '{column}'")
        if field is not None:
            where.append(f"field '{field}'")
        text = ": ".join(where + [message])
        if value is not None:
            text += f": {value!r}"
        super().__init__(text)
