"""Own event logs, step 1: find the files, check the declared schema against them, validate every value.

Everything here runs in DuckDB (docs/data.md "Engine") before any preparation work, and every problem is a one-line
:class:`DataError` naming the file, the column and — where there is one — the 1-based data row (CSV: ``line`` =
row + 1, the header being line 1):

- a path that does not exist, a glob matching nothing, an empty file (0 bytes or 0 rows), an unreadable file;
- a declared column missing from a file (the message lists the file's columns), a column of the wrong type,
  files whose declared columns have different types (mixed schemas);
- a null user / item / time / rating / action, a CSV value that does not parse as the declared type, an integer
  time without ``data.events.time_unit`` (ambiguous), a time before 1990-01-01 or in the future (wrong unit?),
  raw item ids < 1 (``item_ids=raw``), ratings / actions outside int8 / 0..127.

CSV files are first copied, as text columns and in file order, to Parquet in the preparation's temp folder so
both formats share one path with row numbers (``read_parquet(file_row_number=true)``).
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from hstu.trainer.data.errors import DataError

MIN_TIME_S = 631152000  # 1990-01-01T00:00:00Z: anything earlier is a wrong time unit, not an interaction
FUTURE_SLACK_S = 86400  # times more than a day past "now" are in the future
TIME_DIVISORS = {"s": 1, "ms": 1000, "us": 1_000_000, "ns": 1_000_000_000}
INT_TYPES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "HUGEINT"}
TIME_TYPES = ("TIMESTAMP", "DATE")  # prefixes: TIMESTAMP, TIMESTAMP_S/_MS/_NS, TIMESTAMP WITH TIME ZONE, DATE
NUMERIC_PREFIXES = ("FLOAT", "DOUBLE", "DECIMAL")
ROLES = ("user", "item", "time", "rating", "action")


def sql_str(text: str) -> str:
    """A SQL string literal."""
    return "'" + str(text).replace("'", "''") + "'"


def sql_ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + str(name).replace('"', '""') + '"'


@dataclass
class SourceFile:
    """One input file as DuckDB sees it: ``scan`` is a SQL table expression with a ``file_row_number`` column."""

    path: str
    kind: str  # parquet | csv
    scan: str
    types: Dict[str, str]  # column -> DuckDB type
    rows: int = 0
    sql_exprs: Dict[str, str] = field(default_factory=dict)  # role -> normalised SQL expression

    def where(self, row0: Optional[int]) -> Dict[str, Any]:
        """DataError location of 0-based ``row0`` (row; CSV also line)."""
        if row0 is None:
            return {"path": self.path}
        out: Dict[str, Any] = {"path": self.path, "row": int(row0) + 1}
        if self.kind == "csv":
            out["line"] = int(row0) + 2
        return out


def columns_of(ev: Any) -> Dict[str, str]:
    """role -> declared column name (optional roles only when set)."""
    out = {"user": ev.user_column, "item": ev.item_column, "time": ev.time_column}
    if ev.rating_column:
        out["rating"] = ev.rating_column
    if ev.action_column:
        out["action"] = ev.action_column
    if ev.weight_column:
        out["weight"] = ev.weight_column
    for i, col in enumerate(ev.context_columns):
        out[f"context{i}"] = col
    return out


def setting_of(role: str) -> str:
    """The data.events key that declares ``role``."""
    return f"context_columns[{role[7:]}]" if role.startswith("context") else f"{role}_column"


def resolve_paths(ev: Any, key: str = "data.events.paths") -> List[Path]:
    """``ev.paths`` (files or globs; ``key`` names the setting) -> existing files, in the given order, each glob
    sorted."""
    out: List[Path] = []
    for pattern in ev.paths:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            found = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
            if not found:
                raise DataError(f"glob matches no file ({key})", path=pattern)
            out.extend(Path(p) for p in found)
        elif os.path.isdir(expanded):
            raise DataError(f"is a directory; give files or a glob such as dir/*.parquet ({key})", path=pattern)
        elif not os.path.isfile(expanded):
            raise DataError(f"file not found ({key})", path=pattern)
        else:
            out.append(Path(expanded))
    seen, unique = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def file_kind(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffixes = [s.lower() for s in path.suffixes]
    if any(s in (".parquet", ".pq") for s in suffixes):
        return "parquet"
    if any(s in (".csv", ".tsv", ".txt") for s in suffixes):
        return "csv"
    raise DataError("cannot tell the format from the extension; set data.events.format to parquet or csv",
                    path=str(path))


def stage_csv(con: Any, path: Path, delimiter: str, parquet: str) -> None:
    """Copy a CSV file (header line, then rows) to Parquet as text columns, in file order; a malformed row is a
    DataError naming its line."""
    import csv
    import re

    import duckdb

    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        header = next(csv.reader(f, delimiter=delimiter), [])
    if not header or any(not h.strip() for h in header) or len(set(header)) != len(header):
        raise DataError("bad header line (needs distinct, non-empty column names)", path=str(path), line=1,
                        value=delimiter.join(header))
    columns = "{" + ", ".join(f"{sql_str(h)}: 'VARCHAR'" for h in header) + "}"
    try:
        con.execute(f"COPY (SELECT * FROM read_csv({sql_str(path)}, header=true, auto_detect=false, columns={columns}, "
                    f"delim={sql_str(delimiter)}, quote='\"', strict_mode=true)) TO {sql_str(parquet)} (FORMAT parquet)")
    except duckdb.Error as e:
        text = str(e)
        line = re.search(r"CSV Error on Line: (\d+)", text)
        found = re.search(r"Expected Number of Columns: (\d+) Found: (\d+)", text)
        original = re.search(r"Original Line: (.*)", text)
        if line and found:
            raise DataError(f"expected {found.group(1)} fields ({', '.join(header)}), got {found.group(2)}",
                            path=str(path), line=int(line.group(1)),
                            value=original.group(1) if original else None) from None
        where = {"line": int(line.group(1))} if line else {}
        raise DataError(f"cannot read as CSV: {_first_line(e)}", path=str(path), **where) from None


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def open_source(con: Any, path: Path, ev: Any, stage_dir: Path, index: int,
                required: Optional[Dict[str, str]] = None, prefix: str = "events") -> SourceFile:
    """Open one file (CSV: staged to Parquet as text), read its column types and row count; check the declared
    columns are there (``required``: setting -> column; default: the event roles of ``ev``)."""
    import duckdb

    if path.stat().st_size == 0:
        raise DataError("empty file (0 bytes)", path=str(path))
    kind = file_kind(path, ev.format)
    parquet = str(path)
    if kind == "csv":
        parquet = str(stage_dir / f"{prefix}-{index:05d}.parquet")
        stage_csv(con, path, ev.csv_delimiter, parquet)
    scan = f"read_parquet({sql_str(parquet)}, file_row_number=true)"
    try:
        described = con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()
        rows = int(con.execute(f"SELECT count(*) FROM read_parquet({sql_str(parquet)})").fetchone()[0])
    except duckdb.Error as e:
        raise DataError(f"cannot read as Parquet: {_first_line(e)}", path=str(path)) from None
    types = {str(r[0]): str(r[1]) for r in described if r[0] != "file_row_number"}
    src = SourceFile(str(path), kind, scan, types, rows)
    if required is None:
        required = {f"data.events.{setting_of(role)}": col for role, col in columns_of(ev).items()}
    for key, col in required.items():
        if col not in types:
            raise DataError(f"missing column ({key}); the file has: {', '.join(types)}", path=str(path), column=col)
    if rows == 0:
        raise DataError("empty file (0 rows)", path=str(path))
    return src


def check_same_schema(sources: List[SourceFile], columns: Iterable[str]) -> None:
    """Every file's declared ``columns`` have the first file's types (else: mixed schemas)."""
    first, columns = sources[0], list(columns)
    for src in sources[1:]:
        for col in columns:
            if src.types[col] != first.types[col]:
                raise DataError(f"mixed schemas: type {src.types[col]} here, {first.types[col]} in {first.path}",
                                path=src.path, column=col)


def _is_int(tp: str) -> bool:
    return tp in INT_TYPES


def _is_time(tp: str) -> bool:
    return tp.startswith(TIME_TYPES)


def role_expressions(src: SourceFile, ev: Any) -> Dict[str, Tuple[str, str]]:
    """role -> (SQL value expression, SQL condition of a bad non-null value or 'false'); raises DataError for a
    column whose type cannot hold the role."""
    cols = columns_of(ev)
    out: Dict[str, Tuple[str, str]] = {}
    for role in ("user", "item"):
        col, tp = cols[role], src.types[cols[role]]
        want = ev.user_type if role == "user" else ev.item_type
        q = sql_ident(col)
        if _is_int(tp):
            out[role] = (f"CAST({q} AS VARCHAR)", "false") if want == "string" else (f"CAST({q} AS BIGINT)", "false")
        elif tp == "VARCHAR":
            as_int = want == "int" or (role == "item" and ev.item_ids == "raw")
            out[role] = (f"TRY_CAST({q} AS BIGINT)", f"TRY_CAST({q} AS BIGINT) IS NULL") if as_int else (q, "false")
        else:
            raise DataError(f"wrong type {tp}: a {role} id must be an integer or string column", path=src.path,
                            column=col)
    col, tp, unit = cols["time"], src.types[cols["time"]], ev.time_unit
    q = sql_ident(col)
    if _is_int(tp) or (tp == "VARCHAR" and unit in TIME_DIVISORS):
        if unit not in TIME_DIVISORS:
            raise DataError(f"integer times are ambiguous ({tp}): declare data.events.time_unit as one of "
                            f"{list(TIME_DIVISORS)}", path=src.path, column=col)
        value = f"TRY_CAST({q} AS BIGINT)" if tp == "VARCHAR" else f"CAST({q} AS BIGINT)"
        bad = f"{value} IS NULL" if tp == "VARCHAR" else "false"
        out["time"] = (f"({value} // {TIME_DIVISORS[unit]})", bad)
    elif _is_time(tp) or (tp == "VARCHAR" and unit == "timestamp"):
        if unit not in ("", "timestamp"):
            raise DataError(f"data.events.time_unit = {unit!r} applies to integer times; this column is {tp} "
                            "(use '' or timestamp)", path=src.path, column=col)
        value = f"TRY_CAST({q} AS TIMESTAMP)" if tp == "VARCHAR" else q
        out["time"] = (f"CAST(floor(epoch({value})) AS BIGINT)", f"{value} IS NULL" if tp == "VARCHAR" else "false")
    elif tp == "VARCHAR":
        raise DataError("text times are ambiguous: declare data.events.time_unit (s|ms|us|ns for integers, "
                        "timestamp for ISO date/times)", path=src.path, column=col)
    else:
        raise DataError(f"wrong type {tp}: time must be an integer, timestamp or date column", path=src.path,
                        column=col)
    for role, low, high, numeric_ok in (("rating", -128, 127, True), ("action", 0, 127, False)):
        if role not in cols:
            continue
        col, tp = cols[role], src.types[cols[role]]
        q = sql_ident(col)
        if tp == "VARCHAR":
            value = f"TRY_CAST({q} AS DOUBLE)"
        elif _is_int(tp) or (numeric_ok and tp.startswith(NUMERIC_PREFIXES)):
            value = f"CAST({q} AS DOUBLE)"
        else:
            raise DataError(f"wrong type {tp}: {role} must be {'numeric' if numeric_ok else 'an integer'}",
                            path=src.path, column=col)
        bad = f"({value} IS NULL OR {value} < {low} OR {value} > {high}"
        bad += ")" if numeric_ok else f" OR {value} != round({value}))"
        out[role] = (f"CAST(round({value}) AS TINYINT)", bad)
    if "weight" in cols:
        col, tp = cols["weight"], src.types[cols["weight"]]
        q = sql_ident(col)
        if tp == "VARCHAR":
            value = f"TRY_CAST({q} AS DOUBLE)"
        elif _is_int(tp) or tp.startswith(NUMERIC_PREFIXES):
            value = f"CAST({q} AS DOUBLE)"
        else:
            raise DataError(f"wrong type {tp}: weight must be numeric", path=src.path, column=col)
        out["weight"] = (f"CAST({value} AS FLOAT)", f"({value} IS NULL OR isnan({value}) OR isinf({value}) OR "
                         f"{value} < 0)")
    for role, col in cols.items():
        if role.startswith("context"):
            tp = src.types[col]
            if tp != "VARCHAR" and not _is_int(tp):
                raise DataError(f"wrong type {tp}: a context column must be an integer or string column",
                                path=src.path, column=col)
            out[role] = (sql_ident(col), "false")
    return out


def validate_source(con: Any, src: SourceFile, ev: Any, now_s: Optional[int] = None) -> None:
    """One aggregate pass over the file; on a problem a second query finds its first row. Sets src.sql_exprs."""
    exprs = role_expressions(src, ev)
    cols = columns_of(ev)
    now_s = int(time.time()) if now_s is None else now_s
    checks: List[Tuple[str, str, str]] = []  # (role, condition, message)
    for role, col in cols.items():
        if not role.startswith("context"):  # a missing context value is allowed (id 0)
            checks.append((role, f"{sql_ident(col)} IS NULL", f"null {role}"))
        value, bad = exprs[role]
        if bad != "false":
            what = {"rating": "a rating in [-128, 127]", "action": "an integer action type in 0..127",
                    "weight": "a finite weight >= 0"}.get(role, f"a valid {role} ({src.types[col]} read as declared)")
            checks.append((role, f"{sql_ident(col)} IS NOT NULL AND {bad}", f"not {what}"))
    t = exprs["time"][0]
    unit = ev.time_unit or "timestamp"
    checks.append(("time", f"{t} < {MIN_TIME_S}", f"time before 1990-01-01 with data.events.time_unit={unit!r} "
                   "(wrong unit?)"))
    checks.append(("time", f"{t} > {now_s + FUTURE_SLACK_S}", f"time in the future with data.events.time_unit="
                   f"{unit!r} (wrong unit?)"))
    if ev.item_ids == "raw":
        checks.append(("item", f"{exprs['item'][0]} < 1", "raw item ids must be >= 1 (0 is padding; "
                       "data.events.item_ids=raw)"))
    counts = con.execute("SELECT " + ", ".join(f"count(*) FILTER (WHERE {c})" for _, c, _ in checks)
                         + f" FROM {src.scan}").fetchone()
    for (role, cond, message), n in zip(checks, counts):
        if n:
            row0, raw = con.execute(f"SELECT file_row_number, CAST({sql_ident(cols[role])} AS VARCHAR) FROM "
                                    f"{src.scan} WHERE {cond} ORDER BY file_row_number LIMIT 1").fetchone()
            more = f" ({n} rows)" if n > 1 else ""
            raise DataError(message + more, **src.where(row0), column=cols[role], value=raw)
    src.sql_exprs = {role: value for role, (value, _) in exprs.items()}


def events_view_sql(sources: List[SourceFile]) -> str:
    """UNION ALL of every file's normalised events: f (file index), r (0-based row), u, i, t (seconds) and
    rating / action when declared."""
    parts = []
    for idx, src in enumerate(sources):
        e = src.sql_exprs
        cols = [f"{idx} AS f", "file_row_number AS r", f"{e['user']} AS u", f"{e['item']} AS i", f"{e['time']} AS t"]
        cols += [f"{e[role]} AS {role}" for role in e if role in ("rating", "action", "weight")
                 or role.startswith("context")]
        parts.append(f"SELECT {', '.join(cols)} FROM {src.scan}")
    return "\nUNION ALL\n".join(parts)


def open_and_validate(con: Any, ev: Any, stage_dir: Path, progress: bool = False) -> List[SourceFile]:
    """All of step 1: resolve, open, same schema, validate -> the checked sources (sql_exprs set)."""
    from tqdm import tqdm

    files = resolve_paths(ev)
    sources = [open_source(con, p, ev, stage_dir, i) for i, p in enumerate(files)]
    check_same_schema(sources, columns_of(ev).values())
    for src in tqdm(sources, desc="validate", unit="file", disable=not progress):
        validate_source(con, src, ev)
    return sources
