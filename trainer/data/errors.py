"""Errors raised by the data pipeline."""

from __future__ import annotations

from typing import Optional


class DataError(ValueError):
    """Bad or missing input data. When the problem is in a file, the message names the file, the 1-based line
    number, the field and the offending value, e.g.
    ``ratings.dat: line 3: field 'item': not a non-negative integer: 'abc'``."""

    def __init__(
        self,
        message: str,
        *,
        path: Optional[str] = None,
        line: Optional[int] = None,
        field: Optional[str] = None,
        value: Optional[str] = None,
    ) -> None:
        self.path, self.line, self.field, self.value = path, line, field, value
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        text = ": ".join(where + [message])
        if value is not None:
            text += f": {value!r}"
        super().__init__(text)
