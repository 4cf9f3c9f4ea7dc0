"""Own event logs: the optional item side-feature table (``data.events.item_features``; docs/data.md).

A table item -> categorical columns (one integer / string value) and multi-valued columns (Parquet LIST, or CSV
text split by ``separator``) is checked like the events (one-line errors naming file, column, row: missing column,
wrong type, null or duplicate item), mapped to the dataset's item ids and written with it:

    vocab/item_features.parquet     id (item id), one BIGINT id per categorical column (0 = missing), one
                                    BIGINT[] per multi-valued column
    vocab/feature-<column>.parquet  raw value -> id (1..K in raw-value order)

Items of the table that the events never mention are dropped with a warning and counted (``unknown_items``);
so are items that map to the OOV id (``oov_items``, item_ids=vocab with min_count).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict

from hstu.trainer.data.download import sha256_file
from hstu.trainer.data.errors import DataError
from hstu.trainer.data.events_schema import (INT_TYPES, SourceFile, check_same_schema, open_source, resolve_paths,
                                             sql_ident, sql_str)

log = logging.getLogger(__name__)
KEY = "data.events.item_features"


def _value_types(src: SourceFile, col: str, multi: bool) -> str:
    """The SQL expression of column ``col`` as a value (categorical) or a list of values (multi-valued)."""
    tp, q = src.types[col], sql_ident(col)
    base = tp[:-2] if tp.endswith("[]") else tp
    if multi and tp == "VARCHAR":
        return q  # split later (CSV text)
    if (multi and not tp.endswith("[]")) or (not multi and tp.endswith("[]")) or (
            base not in INT_TYPES and base != "VARCHAR"):
        want = "a LIST of integers or strings (or text split by the separator)" if multi else "an integer or string"
        raise DataError(f"wrong type {tp}: a {'multi-valued' if multi else 'categorical'} feature must be {want}",
                        path=src.path, column=col)
    return q


def prepare_item_features(con: Any, ev: Any, stage_dir: Path, out_dir: Path) -> Dict[str, Any]:
    """Read, check and map the table (``ev.item_features``); write its files to ``out_dir``; its manifest record.
    Needs the ``items`` table (raw -> id, NULL id = OOV) and the ``events`` view of events_prepare."""
    feats = ev.item_features
    item_col = feats.item_column or ev.item_column
    required = {f"{KEY}.item_column": item_col}
    required.update({f"{KEY}.columns": c for c in feats.columns})
    required.update({f"{KEY}.multi_columns": c for c in feats.multi_columns})
    sources = [open_source(con, p, ev, stage_dir, i, required, prefix="features")
               for i, p in enumerate(resolve_paths(feats, f"{KEY}.paths"))]
    check_same_schema(sources, required.values())
    event_item_type = con.execute("SELECT typeof(i) FROM events LIMIT 1").fetchone()[0]
    parts = []
    for src in sources:
        q = sql_ident(item_col)
        tp = src.types[item_col]
        if tp != "VARCHAR" and tp not in INT_TYPES:
            raise DataError(f"wrong type {tp}: item ids must be integers or strings", path=src.path, column=item_col)
        item = f"TRY_CAST({q} AS {event_item_type})"
        for cond, message in ((f"{q} IS NULL", "null item"),
                              (f"{item} IS NULL", f"not an item id of the events' type {event_item_type}")):
            row = con.execute(f"SELECT file_row_number, CAST({q} AS VARCHAR) FROM {src.scan} WHERE {cond} "
                              "ORDER BY file_row_number LIMIT 1").fetchone()
            if row:
                raise DataError(message, **src.where(row[0]), column=item_col, value=row[1])
        cols = [f"{item} AS item", f"{sql_str(src.path)} AS path", "file_row_number AS r"]
        for col in feats.columns:
            cols.append(f"{_value_types(src, col, False)} AS {sql_ident(col)}")
        for col in feats.multi_columns:
            value = _value_types(src, col, True)
            if src.types[col] == "VARCHAR":
                value = f"string_split({value}, {sql_str(feats.separator)})"
            cols.append(f"{value} AS {sql_ident(col)}")
        parts.append(f"SELECT {', '.join(cols)} FROM {src.scan}")
    con.execute(f"CREATE TABLE features AS {' UNION ALL '.join(parts)}")
    dup = con.execute("SELECT path, r, CAST(item AS VARCHAR) FROM (SELECT *, row_number() OVER (PARTITION BY item "
                      "ORDER BY path, r) AS k FROM features) WHERE k = 2 ORDER BY path, r LIMIT 1").fetchone()
    if dup:
        src = next(s for s in sources if s.path == dup[0])
        raise DataError("duplicate item (the table needs one row per item)", **src.where(dup[1]), column=item_col,
                        value=dup[2])
    unknown, oov, rows = con.execute(
        "SELECT count(*) FILTER (WHERE v.raw IS NULL), count(*) FILTER (WHERE v.raw IS NOT NULL AND v.id IS NULL), "
        "count(*) FROM features f LEFT JOIN items v ON f.item = v.raw").fetchone()
    if unknown:
        example = con.execute("SELECT CAST(item AS VARCHAR) FROM features f ANTI JOIN items v ON f.item = v.raw "
                              "ORDER BY item LIMIT 3").fetchall()
        log.warning("%s: %d of %d items are not in the events (dropped), e.g. %s", KEY, unknown, rows,
                    ", ".join(r[0] for r in example))
    columns: Dict[str, Dict[str, Any]] = {}
    select = ["v.id AS id"]
    for col in list(feats.columns) + list(feats.multi_columns):
        multi = col in feats.multi_columns
        c = sql_ident(col)
        values = f"SELECT DISTINCT unnest({c}) AS raw FROM features" if multi else \
            f"SELECT DISTINCT {c} AS raw FROM features"
        table = f"feature_{len(columns)}"
        con.execute(f"CREATE TABLE {table} AS SELECT raw, row_number() OVER (ORDER BY raw) AS id FROM ({values}) "
                    "WHERE raw IS NOT NULL")
        con.execute(f"COPY (SELECT * FROM {table} ORDER BY id) TO {sql_str(out_dir / f'feature-{col}.parquet')} "
                    "(FORMAT parquet)")
        if multi:
            select.append(f"(SELECT coalesce(list(t.id ORDER BY x.pos), []) FROM (SELECT unnest(f.{c}) AS raw, "
                          f"generate_subscripts(f.{c}, 1) AS pos) x JOIN {table} t ON x.raw = t.raw) AS {c}")
        else:
            select.append(f"coalesce((SELECT t.id FROM {table} t WHERE t.raw = f.{c}), 0) AS {c}")
        columns[col] = {"kind": "multi" if multi else "categorical",
                        "vocab_size": int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]),
                        "vocab_file": f"vocab/feature-{col}.parquet"}
    target = out_dir / "item_features.parquet"
    con.execute(f"COPY (SELECT {', '.join(select)} FROM features f JOIN items v ON f.item = v.raw WHERE v.id IS "
                f"NOT NULL ORDER BY v.id) TO {sql_str(target)} (FORMAT parquet)")
    for col in columns:
        columns[col]["vocab_sha256"] = sha256_file(out_dir / f"feature-{col}.parquet")
    return {"file": "vocab/item_features.parquet", "sha256": sha256_file(target), "rows": int(rows),
            "items": int(rows) - int(unknown) - int(oov), "unknown_items": int(unknown), "oov_items": int(oov),
            "columns": columns, "sources": [s.path for s in sources]}
