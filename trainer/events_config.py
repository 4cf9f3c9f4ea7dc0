"""The declared schema of your own event logs (``data.name: events``; docs/data.md "Train on your own logs").

``data.events`` says which files hold the events and what their columns mean; the column names and types are
checked against the files before any work (trainer/data/events_schema.py). Kept apart from trainer/config.py
(which embeds :class:`EventsConfig` as ``DataConfig.events``) so that file stays small; the value rules are
:func:`check_events_values`, called from the one validation pass (trainer/config_checks.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

FORMATS = ("auto", "parquet", "csv")  # auto: by file extension (.parquet/.pq, .csv/.tsv)
ID_TYPES = ("auto", "int", "string")  # auto: the file's column type (Parquet); CSV ids are strings unless int
TIME_UNITS = ("", "s", "ms", "us", "ns", "timestamp")  # "": only for timestamp/date columns (integers: ambiguous)
ITEM_IDS = ("vocab", "raw")  # vocab: contiguous ids 1..V by raw-id order; raw: keep integer ids (>= 1) as given
SPLITS = ("leave_one_out", "time")
DUPLICATES = ("keep", "drop")  # events with the same (user, item, time)
LABEL_SOURCES = ("rating", "action")  # task=ranking labels: the rating_column / action_column value of the event
LABEL_OPS = (">=", "<=", "!=", "==", ">", "<", " in ")  # checked in this order (">=" before ">")
DEFAULT_LABELS = ["like=rating>=4"]  # task=ranking with a rating_column and no data.events.labels (5-star scale)


@dataclass
class ItemFeaturesConfig:
    """Optional item side-feature table (item -> categorical / multi-valued columns), mapped to the item ids and
    saved with the prepared dataset (vocab/item_features.parquet; trainer/data/events_features.py)."""

    paths: List[str] = field(default_factory=list)  # files or globs (Parquet / CSV); [] = no table
    item_column: str = ""  # "" = data.events.item_column
    columns: List[str] = field(default_factory=list)  # categorical: one integer / string value per item
    multi_columns: List[str] = field(default_factory=list)  # multi-valued: LIST columns, or CSV text split below
    separator: str = "|"  # CSV multi-valued text: values separated by this


@dataclass
class EventsConfig:
    """Own interaction logs: files, column roles and types, vocabularies, split and preparation limits."""

    paths: List[str] = field(default_factory=list)  # files or globs (Parquet / CSV); relative to the working dir
    format: str = "auto"  # auto | parquet | csv
    csv_delimiter: str = ","
    user_column: str = "user_id"
    item_column: str = "item_id"
    time_column: str = "timestamp"
    time_unit: str = ""  # integer times: s | ms | us | ns (required); timestamp/date columns: "" or timestamp
    rating_column: str = ""  # optional, numeric -> int8 (rounded); "" = none
    action_column: str = ""  # optional, integer 0..127 (action type); "" = none
    weight_column: str = ""  # optional, numeric >= 0 (event weight, stored per event as float32); "" = none
    # optional per-event contextual columns (device, country, ...): integer / string, stored per event as ids
    # 1..K of a per-column vocabulary (null = 0)
    context_columns: List[str] = field(default_factory=list)
    user_type: str = "auto"  # auto | int | string
    item_type: str = "auto"  # auto | int | string
    item_ids: str = "vocab"  # vocab (contiguous, min_count, OOV id) | raw (integer ids kept: num_items = max id)
    min_count: int = 1  # item_ids=vocab: items seen fewer times map to the OOV id (= number of kept items + 1)
    duplicates: str = "keep"  # keep | drop: events equal in (user, item, time); counted in the manifest either way
    split: str = "leave_one_out"  # leave_one_out (last item test, second-to-last validation) | time
    time_cutoff: str = ""  # split=time: ISO date/time (UTC) or epoch seconds; test = each user's first event >= it
    num_shards: int = 0  # shard files of the prepared dataset: at least this many (0 = 1), more when
    # prepare_memory_mb needs them; multi-process training needs >= the number of processes
    shard_events: int = 1_000_000  # about this many (raw) events per shard at most: what a streaming loader holds
    prepare_memory_mb: int = 2048  # budget of hstu prepare: half DuckDB's memory_limit, half one partition's numpy
    prepare_threads: int = 0  # DuckDB threads; 0 = DuckDB's default (all cores)
    item_features: ItemFeaturesConfig = field(default_factory=ItemFeaturesConfig)
    stream: bool = False  # training reads shards one at a time, each rank its own (trainer/data/events_loader.py)
    # stream=true: each rank evaluates (and holds) the same number of users, min(eval_users, the smallest rank's
    # count); 0 = no cap (the smallest rank's count: the collective evaluation needs equal batches on every rank)
    eval_users: int = 0
    # task=ranking (docs/data.md "Ranking on your own logs"): binary tasks as NAME=SOURCE OP VALUE, SOURCE rating |
    # action (the declared rating_column / action_column), OP >= > <= < == != or "in" with a comma list, e.g.
    # ["like=rating>=4", "love=rating==5"] or ["click=action in 1,2", "share=action==3"]; [] = like=rating>=4
    labels: List[str] = field(default_factory=list)
    # split=time: events at/after the cutoff a shard keeps per user (test targets); task=ranking sets it to
    # ranking.num_eval_targets itself, retrieval uses the first one only
    keep_after_cutoff: int = 1


def _bad(key: str, value: Any, rule: str) -> str:
    return f"key 'data.events.{key}' = {value!r} must be {rule}"


def check_events_values(cfg: Any) -> None:
    """Rules of ``data.events`` that need no files; raises ConfigError (checked only when data.name=events)."""
    from hstu.trainer.config_checks import ConfigError

    if cfg.data.name != "events":
        return
    ev = cfg.data.events
    for key, allowed in (("format", FORMATS), ("time_unit", TIME_UNITS), ("user_type", ID_TYPES),
                         ("item_type", ID_TYPES), ("item_ids", ITEM_IDS), ("split", SPLITS),
                         ("duplicates", DUPLICATES)):
        if getattr(ev, key) not in allowed:
            raise ConfigError(_bad(key, getattr(ev, key), f"one of {list(allowed)}"))
    if not ev.paths:
        raise ConfigError(_bad("paths", ev.paths, "a non-empty list of files or globs (data.name=events)"))
    for i, p in enumerate(ev.paths):
        if not isinstance(p, str) or not p:
            raise ConfigError(_bad(f"paths[{i}]", p, "a non-empty path or glob"))
    for key in ("user_column", "item_column", "time_column"):
        if not getattr(ev, key):
            raise ConfigError(_bad(key, getattr(ev, key), "a column name"))
    roles = [(k, getattr(ev, k)) for k in ("user_column", "item_column", "time_column", "rating_column",
                                           "action_column", "weight_column") if getattr(ev, k)]
    roles += [(f"context_columns[{i}]", c) for i, c in enumerate(ev.context_columns)]
    names = [v for _, v in roles]
    for k, v in roles:
        if not v or names.count(v) > 1:
            raise ConfigError(_bad(k, v, "a column no other role uses"))
    if len(ev.csv_delimiter) != 1:
        raise ConfigError(_bad("csv_delimiter", ev.csv_delimiter, "one character"))
    feats = ev.item_features
    if feats.paths:
        named = list(feats.columns) + list(feats.multi_columns)
        if not named:
            raise ConfigError(_bad("item_features.columns", feats.columns, "non-empty (or multi_columns) when "
                                   "data.events.item_features.paths is set"))
        for i, col in enumerate(named):
            if not col or named.count(col) > 1 or col == (feats.item_column or ev.item_column):
                raise ConfigError(_bad(f"item_features columns[{i}]", col, "a distinct, non-empty column other "
                                       "than the item column"))
        if len(feats.separator) != 1:
            raise ConfigError(_bad("item_features.separator", feats.separator, "one character"))
    elif feats.columns or feats.multi_columns:
        raise ConfigError(_bad("item_features.paths", feats.paths, "set when item_features columns are"))
    if ev.min_count < 1:
        raise ConfigError(_bad("min_count", ev.min_count, ">= 1"))
    if ev.item_ids == "raw":
        if ev.min_count != 1:
            raise ConfigError(_bad("min_count", ev.min_count, "1 with data.events.item_ids=raw (raw ids have no "
                                   "OOV id)"))
        if ev.item_type == "string":
            raise ConfigError(_bad("item_ids", "raw", "vocab with data.events.item_type=string"))
    if ev.num_shards < 0:
        raise ConfigError(_bad("num_shards", ev.num_shards, ">= 0 (a minimum; prepare_memory_mb may need more)"))
    if ev.shard_events < 1000:
        raise ConfigError(_bad("shard_events", ev.shard_events, ">= 1000"))
    if ev.prepare_memory_mb < 64:
        raise ConfigError(_bad("prepare_memory_mb", ev.prepare_memory_mb, ">= 64"))
    if ev.eval_users < 0:
        raise ConfigError(_bad("eval_users", ev.eval_users, ">= 0 (0 = every user)"))
    if ev.eval_users and not ev.stream:
        raise ConfigError(_bad("eval_users", ev.eval_users, "0 unless data.events.stream=true"))
    if ev.keep_after_cutoff < 1:
        raise ConfigError(_bad("keep_after_cutoff", ev.keep_after_cutoff, ">= 1"))
    try:
        ranking_labels(ev)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if ev.prepare_threads < 0:
        raise ConfigError(_bad("prepare_threads", ev.prepare_threads, ">= 0"))
    if ev.split == "time":
        if not ev.time_cutoff:
            raise ConfigError(_bad("time_cutoff", ev.time_cutoff, "an ISO date/time or epoch seconds with "
                                   "data.events.split=time"))
        try:
            cutoff_seconds(ev.time_cutoff)
        except ValueError as e:
            raise ConfigError(_bad("time_cutoff", ev.time_cutoff, f"an ISO date/time or epoch seconds ({e})"))
    elif ev.time_cutoff:
        raise ConfigError(_bad("time_cutoff", ev.time_cutoff, "'' unless data.events.split=time"))


def cutoff_seconds(text: str) -> int:
    """``data.events.time_cutoff`` -> epoch seconds: an integer (seconds) or an ISO date/time (UTC if naive)."""
    import datetime as dt

    text = str(text).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    when = dt.datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp())


def parse_label(text: str, index: int = 0) -> tuple:
    """``NAME=SOURCE OP VALUE`` -> (name, source, op, values: tuple of floats); ValueError naming the key."""
    key = f"data.events.labels[{index}]"
    name, eq, rule = str(text).partition("=")
    name, rule = name.strip(), rule.strip()
    if not eq or not name.isidentifier():
        raise ValueError(_bad(f"labels[{index}]", text, "NAME=SOURCE OP VALUE (e.g. 'like=rating>=4')"))
    for op in LABEL_OPS:
        source, found, value = rule.partition(op)
        if found:
            source = source.strip()
            if source not in LABEL_SOURCES:
                raise ValueError(f"key '{key}' = {text!r}: source {source!r} must be one of {list(LABEL_SOURCES)}")
            try:
                values = tuple(float(v) for v in value.split(",")) if op == " in " else (float(value),)
            except ValueError:
                raise ValueError(f"key '{key}' = {text!r}: value {value.strip()!r} must be a number"
                                 + (" list" if op == " in " else "")) from None
            return name, source, op.strip(), values
    raise ValueError(f"key '{key}' = {text!r}: no operator (one of {[o.strip() for o in LABEL_OPS]})")


def ranking_labels(ev: Any) -> List[tuple]:
    """The parsed ``data.events.labels`` (DEFAULT_LABELS when empty and a rating column is declared); each
    source's column must be declared; names distinct."""
    texts = list(ev.labels) or (DEFAULT_LABELS if ev.rating_column else [])
    out = [parse_label(t, i) for i, t in enumerate(texts)]
    for i, (name, source, _, _) in enumerate(out):
        if not getattr(ev, f"{source}_column"):
            raise ValueError(_bad(f"labels[{i}]", texts[i], f"about a declared column (data.events.{source}_column "
                                  "is not set)"))
        if [n for n, *_ in out].count(name) > 1:
            raise ValueError(_bad(f"labels[{i}]", texts[i], "a task name no other label uses"))
    return out
