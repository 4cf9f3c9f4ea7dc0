"""Own event logs: every bad input is a one-line DataError naming file, column and (where there is one) row, raised
before any output exists (issue 17 deliverable 6). Small generated Parquet / CSV files, seconds."""

import re
from pathlib import Path

import numpy as np
import pytest

from events_utils import write_table
from hstu.trainer.config import ConfigError, load_config
from hstu.trainer.data import DataError, load_sequences, prepare

T0 = 1_000_000_000  # 2001-09-09: a plausible interaction time in seconds


def _events(n: int = 12) -> dict:
    return {"user_id": np.arange(n) % 3 + 1, "item_id": np.arange(n) % 5 + 1, "timestamp": T0 + np.arange(n),
            "rating": np.full(n, 4)}


def _cfg(tmp_path: Path, paths, *extra):
    paths = paths if isinstance(paths, list) else [paths]
    return load_config(None, ["data.name=events", f"data.events.paths=[{','.join(map(str, paths))}]",
                              "data.events.time_unit=s", f"data.cache_dir={tmp_path / 'cache'}",
                              "data.min_seq_len=4", *extra]).data


def _fails(tmp_path, paths, pattern, *extra):
    """prepare() raises one DataError line matching ``pattern`` and leaves no prepared folder behind."""
    with pytest.raises(DataError) as info:
        prepare(_cfg(tmp_path, paths, *extra), progress=False)
    text = str(info.value)
    assert "\n" not in text, text
    assert re.search(pattern, text), text
    events_dir = tmp_path / "cache" / "events"
    assert not events_dir.exists() or not any(events_dir.iterdir()), list(events_dir.iterdir())
    return info.value


def test_missing_or_renamed_column(tmp_path):
    ev = _events()
    ev["item"] = ev.pop("item_id")
    f = write_table(tmp_path / "a.parquet", ev)
    err = _fails(tmp_path, f, r"a\.parquet: column 'item_id': missing column \(data\.events\.item_column\); the file "
                 r"has: user_id, timestamp, rating, item")
    assert err.column == "item_id" and err.path == str(f)


def test_wrong_type_float_item(tmp_path):
    ev = _events()
    ev["item_id"] = ev["item_id"] + 0.5
    _fails(tmp_path, write_table(tmp_path / "a.parquet", ev), r"a\.parquet: column 'item_id': wrong type DOUBLE")


def test_wrong_type_csv_value_names_row_and_line(tmp_path):
    ev = _events()
    ev["timestamp"] = ev["timestamp"].astype(object)
    ev["timestamp"][6] = "yesterday"
    err = _fails(tmp_path, write_table(tmp_path / "a.csv", ev, fmt="csv"),
                 r"a\.csv: row 7: line 8: column 'timestamp': not a valid time .*: 'yesterday'")
    assert err.row == 7 and err.line == 8


@pytest.mark.parametrize("column", ["user_id", "item_id", "timestamp"])
def test_null_user_item_time(tmp_path, column):
    ev = _events()
    ev[column] = ev[column].astype(object)
    ev[column][4] = None
    role = {"user_id": "user", "item_id": "item", "timestamp": "time"}[column]
    err = _fails(tmp_path, write_table(tmp_path / "a.parquet", ev), rf"a\.parquet: row 5: column '{column}': "
                 rf"null {role}")
    assert err.row == 5


def test_integer_time_without_unit_is_ambiguous(tmp_path):
    f = write_table(tmp_path / "a.parquet", _events())
    _fails(tmp_path, f, r"column 'timestamp': integer times are ambiguous .*time_unit", "data.events.time_unit=")


@pytest.mark.parametrize("unit, times, when", [("ms", T0 + np.arange(12), "before 1990"),
                                               ("s", 1000 * (T0 + np.arange(12)), "in the future")])
def test_time_unit_giving_absurd_dates(tmp_path, unit, times, when):
    ev = _events()
    ev["timestamp"] = times
    _fails(tmp_path, write_table(tmp_path / "a.parquet", ev), rf"a\.parquet: row 1: column 'timestamp': time "
           rf"{when}.*time_unit='{unit}' \(wrong unit\?\)", f"data.events.time_unit={unit}")


def test_timestamp_column_needs_no_unit(tmp_path):
    import duckdb

    f = tmp_path / "ts.parquet"
    duckdb.connect().execute(f"COPY (SELECT (i % 3 + 1) AS user_id, (i % 5 + 1) AS item_id, TIMESTAMP '2001-09-09' + "
                             f"INTERVAL (i) SECOND AS timestamp FROM range(12) t(i)) TO '{f}' (FORMAT parquet)")
    summary = prepare(_cfg(tmp_path, f, "data.events.time_unit="), progress=False)
    assert summary["events"] == 12
    _fails(tmp_path / "other", f, r"column 'timestamp': data.events.time_unit = 's' applies to integer times; "
           r"this column is TIMESTAMP")


def test_empty_files(tmp_path):
    (tmp_path / "zero.parquet").write_bytes(b"")
    _fails(tmp_path, tmp_path / "zero.parquet", r"zero\.parquet: empty file \(0 bytes\)")
    ev = {k: v[:0] for k, v in _events().items()}
    _fails(tmp_path, write_table(tmp_path / "rows.parquet", ev), r"rows\.parquet: empty file \(0 rows\)")
    (tmp_path / "header.csv").write_text("user_id,item_id,timestamp\n")
    _fails(tmp_path, tmp_path / "header.csv", r"header\.csv: empty file \(0 rows\)")


def test_glob_matching_nothing_and_missing_file(tmp_path):
    _fails(tmp_path, tmp_path / "logs" / "*.parquet", r"logs/\*\.parquet: glob matches no file")
    _fails(tmp_path, tmp_path / "nope.parquet", r"nope\.parquet: file not found")


def test_not_a_parquet_file(tmp_path):
    (tmp_path / "a.parquet").write_text("user_id,item_id\n1,2\n")
    _fails(tmp_path, tmp_path / "a.parquet", r"a\.parquet: cannot read as Parquet")


def test_mixed_schemas_across_files(tmp_path):
    write_table(tmp_path / "logs" / "part-0.parquet", _events())
    ev = _events()
    ev["item_id"] = np.array([f"i{x}" for x in ev["item_id"]], dtype=object)
    write_table(tmp_path / "logs" / "part-1.parquet", ev)
    _fails(tmp_path, tmp_path / "logs" / "part-*.parquet", r"part-1\.parquet: column 'item_id': mixed schemas: type "
           r"VARCHAR here, BIGINT in .*part-0\.parquet")


def test_rating_out_of_int8_and_bad_action(tmp_path):
    ev = _events()
    ev["rating"] = ev["rating"] * 1.0
    ev["rating"][3] = 300.0
    _fails(tmp_path, write_table(tmp_path / "a.parquet", ev), r"row 4: column 'rating': not a rating in \[-128, 127\]"
           r": '300.0'", "data.events.rating_column=rating")
    ev = _events()
    ev["action"] = np.arange(12) - 1
    _fails(tmp_path / "b", write_table(tmp_path / "b.parquet", ev), r"row 1: column 'action': not an integer action "
           r"type in 0\.\.127: '-1'", "data.events.action_column=action")


def test_raw_item_ids_must_be_positive(tmp_path):
    ev = _events()
    ev["item_id"] = ev["item_id"] - 1
    _fails(tmp_path, write_table(tmp_path / "a.parquet", ev), r"row 1: column 'item_id': raw item ids must be >= 1",
           "data.events.item_ids=raw")


def test_duplicate_events_kept_or_dropped_and_counted(tmp_path):
    ev = _events()
    ev = {k: np.concatenate([v, v[:3]]) for k, v in ev.items()}  # 3 exact duplicates
    f = write_table(tmp_path / "a.parquet", ev)
    kept = prepare(_cfg(tmp_path, f), progress=False)
    dropped = prepare(_cfg(tmp_path, f, "data.events.duplicates=drop"), progress=False)
    assert (kept["duplicates"], kept["dropped_duplicates"], kept["events"]) == (3, 0, 15)
    assert (dropped["duplicates"], dropped["dropped_duplicates"], dropped["events"]) == (3, 3, 12)


def test_config_errors_name_the_key():
    base = ["data.name=events", "data.events.paths=[a.parquet]"]
    for extra, pattern in ((["data.events.split=time"], r"data\.events\.time_cutoff.*split=time"),
                           (["data.events.time_cutoff=2003-01-01"], r"data\.events\.time_cutoff.*unless"),
                           (["data.events.split=time", "data.events.time_cutoff=yesterday"], r"ISO date"),
                           (["data.events.item_column=user_id"], r"data\.events\.user_column.*no other role"),
                           (["data.events.item_ids=raw", "data.events.min_count=3"], r"min_count.*item_ids=raw"),
                           (["data.events.time_unit=hours"], r"time_unit.*one of"),
                           (["data.events.eval_users=5"], r"eval_users.*stream=true"),
                           (["data.events.paths=[]"], r"non-empty list")):
        with pytest.raises(ConfigError, match=pattern):
            load_config(None, base + extra)


def test_bad_data_fails_before_training_touches_the_run_dir(tmp_path):
    ev = _events()
    ev["user_id"] = ev["user_id"].astype(object)
    ev["user_id"][2] = None
    f = write_table(tmp_path / "a.parquet", ev)
    with pytest.raises(DataError, match=r"a\.parquet: row 3: column 'user_id': null user"):
        load_sequences(_cfg(tmp_path, f), progress=False)


# ------------------------------------------------------------------------------------ item side-feature table
def _features(tmp_path, table, *extra, fmt="parquet"):
    f = write_table(tmp_path / "log.parquet", _events())
    t = write_table(tmp_path / f"items.{fmt}", table, fmt=fmt)
    return _cfg(tmp_path, f, f"data.events.item_features.paths=[{t}]", *extra)


def test_item_features_mapped_with_unknown_items_warned_and_counted(tmp_path, caplog):
    import duckdb

    table = {"item_id": np.array([5, 1, 2, 9, 8]), "genre": np.array(["b", "a", "b", None, "c"], dtype=object),
             "tags": np.array(["x|y", "y", "", "z", "x"], dtype=object)}
    cfg = _features(tmp_path, table, "data.events.item_features.columns=[genre]",
                    "data.events.item_features.multi_columns=[tags]", "data.events.item_ids=raw", fmt="csv")
    with caplog.at_level("WARNING"):
        summary = prepare(cfg, progress=False)
    assert "2 of 5 items are not in the events (dropped), e.g. 8, 9" in caplog.text
    manifest = __import__("json").load(open(Path(summary["dataset_dir"]) / "manifest.json"))
    feats = manifest["item_features"]
    assert (feats["rows"], feats["items"], feats["unknown_items"], feats["oov_items"]) == (5, 3, 2, 0)
    con = duckdb.connect()
    rows = con.execute(f"SELECT id, genre, tags FROM '{summary['dataset_dir']}/vocab/item_features.parquet'").fetchall()
    # genre vocab a=1, b=2, c=3; tags vocab x=1, y=2, z=3 (text split by '|'; an empty CSV field = no tags)
    assert rows == [(1, 1, [2]), (2, 2, []), (5, 2, [1, 2])]


def _feature_fails(tmp_path, table, pattern, *extra):
    f = write_table(tmp_path / "log.parquet", _events())
    t = write_table(tmp_path / "items.parquet", table)
    return _fails(tmp_path, f, pattern, f"data.events.item_features.paths=[{t}]",
                  "data.events.item_features.columns=[genre]", *extra)


def test_item_features_bad_input(tmp_path):
    ok = {"item_id": np.array([1, 2, 3]), "genre": np.array(["a", "b", "c"], dtype=object)}
    _feature_fails(tmp_path / "a", {"sku": ok["item_id"], "genre": ok["genre"]}, r"items\.parquet: column 'item_id': "
                   r"missing column \(data\.events\.item_features\.item_column\); the file has: sku, genre")
    _feature_fails(tmp_path / "b", dict(ok, item_id=np.array([1, 2, 1])), r"items\.parquet: row 3: column "
                   r"'item_id': duplicate item \(the table needs one row per item\): '1'")
    _feature_fails(tmp_path / "c", dict(ok, genre=np.array([0.5, 1.5, 2.5])), r"items\.parquet: column 'genre': "
                   r"wrong type DOUBLE: a categorical feature")
    _feature_fails(tmp_path / "d", dict(ok, item_id=np.array([1, None, 3], dtype=object)), r"items\.parquet: row 2: "
                   r"column 'item_id': null item")
    _feature_fails(tmp_path / "e", dict(ok, item_id=np.array(["1", "x", "3"], dtype=object)), r"items\.parquet: "
                   r"row 2: column 'item_id': not an item id of the events' type BIGINT: 'x'")
    with pytest.raises(ConfigError, match=r"item_features\.columns.*non-empty"):
        load_config(None, ["data.name=events", "data.events.paths=[a.parquet]", "data.events.item_features.paths=[b]"])


def test_item_features_parquet_list_column_and_oov_items(tmp_path):
    import duckdb

    f = write_table(tmp_path / "log.parquet", _events(15))  # items 1..5, 3 events each
    extra = write_table(tmp_path / "more.parquet", {"user_id": np.array([1]), "item_id": np.array([6]),
                                                    "timestamp": np.array([T0]), "rating": np.array([1])})
    t = tmp_path / "items.parquet"
    duckdb.connect().execute(f"COPY (SELECT * FROM (VALUES (1, [10, 20]), (6, [30]), (4, [])) v(item_id, tags)) TO "
                             f"'{t}' (FORMAT parquet)")
    cfg = _cfg(tmp_path, [f, extra], f"data.events.item_features.paths=[{t}]",
               "data.events.item_features.multi_columns=[tags]", "data.events.min_count=2")
    summary = prepare(cfg, progress=False)
    feats = __import__("json").load(open(Path(summary["dataset_dir"]) / "manifest.json"))["item_features"]
    assert (feats["items"], feats["unknown_items"], feats["oov_items"]) == (2, 0, 1)  # item 6: seen once -> OOV
    rows = duckdb.connect().execute(f"SELECT * FROM '{summary['dataset_dir']}/vocab/item_features.parquet'").fetchall()
    assert rows == [(1, [1, 2]), (4, [])] and feats["columns"]["tags"]["vocab_size"] == 3


def test_dropped_duplicates_keep_the_first_in_file_order(tmp_path):
    k = np.arange(40)  # 40 events, then each again (same user, item, time) with another rating, later in the file
    ev = {"user_id": np.ones(80, dtype=np.int64), "item_id": np.tile(k + 1, 2), "timestamp": T0 + np.tile(k // 2, 2),
          "rating": np.repeat([1, 2], 40)}
    f = write_table(tmp_path / "a.parquet", ev)
    for tie in ("random", "item_id", "file"):
        seqs = load_sequences(_cfg(tmp_path, f, "data.events.duplicates=drop", "data.events.rating_column=rating",
                                   f"data.tie_order={tie}", "data.events.item_ids=raw", "data.max_seq_len=100"),
                              progress=False)
        assert seqs.num_events == 40 and set(seqs.ratings.tolist()) == {1}, tie


def test_csv_row_with_a_missing_field_names_its_line(tmp_path):
    (tmp_path / "a.csv").write_text("user_id,item_id,timestamp\n1,2,1000000000\n1,3\n1,4,1000000002\n")
    err = _fails(tmp_path, tmp_path / "a.csv", r"a\.csv: line 3: expected 3 fields \(user_id, item_id, timestamp\), "
                 r"got 2: '1,3'")
    assert err.line == 3


def test_bad_weight_and_context_columns(tmp_path):
    ev = _events()
    ev["w"] = np.linspace(0, 1, 12)
    ev["w"][5] = -1.0
    _fails(tmp_path / "a", write_table(tmp_path / "a.parquet", ev), r"a\.parquet: row 6: column 'w': not a finite "
           r"weight >= 0: '-1.0'", "data.events.weight_column=w")
    ev["w"] = np.linspace(0, 1, 12).astype(object)
    ev["w"][2] = None
    _fails(tmp_path / "b", write_table(tmp_path / "b.parquet", ev), r"b\.parquet: row 3: column 'w': null weight",
           "data.events.weight_column=w")
    ev = dict(_events(), device=np.linspace(0, 1, 12))
    _fails(tmp_path / "c", write_table(tmp_path / "c.parquet", ev), r"c\.parquet: column 'device': wrong type DOUBLE: "
           r"a context column must be an integer or string column", "data.events.context_columns=[device]")
    _fails(tmp_path / "d", write_table(tmp_path / "d.parquet", _events()), r"d\.parquet: column 'country': missing "
           r"column \(data\.events\.context_columns\[0\]\)", "data.events.context_columns=[country]")
