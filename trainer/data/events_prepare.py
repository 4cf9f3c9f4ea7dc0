"""Own event logs, step 2: ``hstu prepare`` out of core -> a prepared dataset folder (docs/data.md).

    <cache_dir>/events/events-<key16>/
        manifest.json             counts, sha256 of every file, schema, options, per-shard counts
        shards/shard-00000.npz    UserSequences of the users with uid % num_shards == shard (+ num_pre for split=time)
        vocab/users.parquet       raw user id -> uid (1..U, in raw-id order)
        vocab/items.parquet       raw item id -> item id, count (item_ids=vocab: 1..V in raw-id order, items seen
                                  < min_count times -> the OOV id V + 1; item_ids=raw: id = raw id)

key = sha256 of the sources (path, size, sha256) and every option that changes the output. DuckDB (memory_limit =
half of ``data.events.prepare_memory_mb``, spilling to the temp folder) builds the vocabularies and writes the events,
already mapped to ids, hash-partitioned by user; each partition is then sorted per user in numpy — (time, tie key)
with the tie order of ``data.tie_order`` — truncated and written as one shard. There are at least
``data.events.num_shards`` partitions, more when needed for one to fit half the memory budget or to keep shards
near ``data.events.shard_events`` events: peak memory follows the settings, not the dataset. Everything is built in a temp folder
beside the target and renamed into place: a failure leaves nothing half-written (the folder of a killed prepare
is removed by the next one, as data/cache.py does with its temp files).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from hstu.trainer.data.cache import STALE_TMP_SECONDS
from hstu.trainer.data.download import sha256_file
from hstu.trainer.data.errors import DataError
from hstu.trainer.data.events_schema import events_view_sql, open_and_validate, resolve_paths, sql_str
from hstu.trainer.data.sequences import UserSequences, gather_ranges, select_ranges
from hstu.trainer.events_config import cutoff_seconds

PREPARE_VERSION = 1
WORK_BYTES_PER_EVENT = 160  # numpy work on one partition: 7 columns fetched + sort keys + permuted copies
OUTPUT_OPTIONS = ("format", "csv_delimiter", "user_column", "item_column", "time_column", "time_unit",
                  "rating_column", "action_column", "user_type", "item_type", "item_ids", "min_count", "duplicates",
                  "split", "time_cutoff", "weight_column", "context_columns")
log = logging.getLogger(__name__)


def _options(data_cfg: Any) -> Dict[str, Any]:
    ev = data_cfg.events
    out = {k: getattr(ev, k) for k in OUTPUT_OPTIONS}
    out["item_features"] = dataclasses.asdict(ev.item_features)
    out.update(max_seq_len=data_cfg.max_seq_len, min_seq_len=data_cfg.min_seq_len, tie_order=data_cfg.tie_order,
               num_shards=ev.num_shards, prepare_memory_mb=ev.prepare_memory_mb, shard_events=ev.shard_events)
    if data_cfg.tie_order == "random":
        out["tie_seed"] = int(data_cfg.seed)
    if ev.split == "time" and ev.keep_after_cutoff != 1:  # (absent at 1: the keys of existing datasets stay)
        out["keep_after_cutoff"] = int(ev.keep_after_cutoff)
    return out


def dataset_key(data_cfg: Any, files: List[Path]) -> Tuple[str, List[Dict[str, Any]]]:
    """(hex sha256 over the sources and the output options, the source records of the manifest)."""
    sources = [{"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files]
    doc = {"version": PREPARE_VERSION, "sources": sources, "options": _options(data_cfg)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest(), sources


def dataset_dir(data_cfg: Any, key: str) -> Path:
    return Path(data_cfg.cache_dir).expanduser() / "events" / f"events-{key[:16]}"


def read_manifest(folder: "str | Path") -> Dict[str, Any]:
    path = Path(folder) / "manifest.json"
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"unreadable prepared-dataset manifest ({e})", path=str(path)) from None


def prepare_events(data_cfg: Any, progress: bool = True) -> Tuple[Dict[str, Any], Path, bool]:
    """Prepare (or find) the dataset of ``data_cfg`` (data.name=events) -> (manifest, folder, cache hit)."""
    files = resolve_paths(data_cfg.events)
    feats = data_cfg.events.item_features
    feature_files = resolve_paths(feats, "data.events.item_features.paths") if feats.paths else []
    key, sources = dataset_key(data_cfg, files + feature_files)  # the events first (zipped with their checks)
    target = dataset_dir(data_cfg, key)
    if (target / "manifest.json").is_file():
        return read_manifest(target), target, True
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_builds(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    lock = open(tmp / ".lock", "wb")  # held while building: clean_stale_builds leaves a live build alone
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    try:
        manifest = _build(data_cfg, sources, tmp, progress)
        manifest["key"] = key
        _write_json(tmp / "manifest.json", manifest)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "manifest.json").is_file():  # not a concurrent prepare that finished first
                raise
    finally:
        lock.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return read_manifest(target), target, False


def clean_stale_builds(folder: Path, older_than_s: float = STALE_TMP_SECONDS) -> List[str]:
    """Remove ``.events-*.tmp-*`` build folders a killed prepare left in ``folder``: older than ``older_than_s``
    and not locked (a live build holds an exclusive flock on its ``.lock``; the rule of data/cache.py)."""
    removed, now = [], time.time()
    for tmp in folder.glob(".events-*.tmp-*"):
        try:
            if now - tmp.stat().st_mtime < older_than_s:
                continue
            with open(tmp / ".lock", "ab") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a build holds it
                shutil.rmtree(tmp, ignore_errors=True)
            removed.append(str(tmp))
        except (BlockingIOError, FileNotFoundError, NotADirectoryError):
            continue
    if removed:
        log.warning("removed %d stale prepare folder(s) left by an interrupted `hstu prepare`: %s", len(removed),
                    ", ".join(os.path.basename(r) for r in removed))
    return removed


def _write_json(path: Path, doc: Dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, sort_keys=True)


def _connect(ev: Any, work: Path) -> Any:
    import duckdb

    con = duckdb.connect(str(work / "work.duckdb"))
    con.execute(f"SET memory_limit = '{int(ev.prepare_memory_mb) // 2}MB'")  # the other half: one partition
    con.execute(f"SET temp_directory = {sql_str(work / 'spill')}")
    con.execute("SET preserve_insertion_order = false")  # order comes from (f, r), never from the scan
    if ev.prepare_threads:
        con.execute(f"SET threads = {int(ev.prepare_threads)}")
    return con


def _build(data_cfg: Any, sources: List[Dict[str, Any]], out: Path, progress: bool) -> Dict[str, Any]:
    import duckdb
    from tqdm import tqdm

    ev, started = data_cfg.events, time.time()
    work = out / "work"
    (work / "stage").mkdir(parents=True)
    (out / "shards").mkdir()
    (out / "vocab").mkdir()
    con = _connect(ev, work)
    try:
        checked = open_and_validate(con, ev, work / "stage", progress)
        con.execute(f"CREATE VIEW events AS {events_view_sql(checked)}")
        extra = [c for c in ("rating", "action", "weight") if c in checked[0].sql_exprs]
        say = tqdm.write if progress else log.info
        say(f"prepare: {sum(c.rows for c in checked):,} events in {len(checked)} file(s) checked; vocabularies ...")
        counts = _vocabularies(con, ev, out / "vocab")
        features = None
        if ev.item_features.paths:
            from hstu.trainer.data.events_features import prepare_item_features

            features = prepare_item_features(con, ev, work / "stage", out / "vocab")
        num_shards = shard_count(ev, counts["raw_events"])
        say(f"prepare: {counts['raw_users']:,} users, {counts['raw_items']:,} items; writing {num_shards} "
            "partition(s) ...")
        item = "v.id" if ev.item_ids == "raw" else f"coalesce(v.id, {counts['num_items']})"
        contexts = _context_vocabularies(con, ev, out / "vocab")
        cols = ", ".join(["uv.id AS uid", f"{item} AS iid", "e.t", "e.f", "e.r"] + [f"e.{c}" for c in extra]
                         + [f"coalesce(c{i}.id, 0) AS ctx{i}" for i in range(len(contexts))])
        joins = "".join(f" LEFT JOIN context_{i} c{i} ON e.context{i} = c{i}.raw" for i in range(len(contexts)))
        parts = work / "parts"
        con.execute(f"COPY (SELECT uv.id % {num_shards} AS part, {cols} FROM events e JOIN users uv ON e.u = uv.raw "
                    f"JOIN items v ON e.i = v.raw{joins}) TO {sql_str(parts)} (FORMAT parquet, PARTITION_BY (part))")
        shards, stats = [], {"duplicates": 0, "dropped_duplicates": 0, "short_users": 0}
        for k in tqdm(range(num_shards), desc="shards", unit="shard", disable=not progress):
            folder = parts / f"part={k}"
            arrays = (con.execute(f"SELECT * EXCLUDE (part) FROM read_parquet({sql_str(folder / '*.parquet')}, "
                                  "hive_partitioning=true)").fetchnumpy() if folder.is_dir() else None)
            shards.append(_write_shard(arrays, k, data_cfg, counts["num_items"], out / "shards", stats))
    except duckdb.Error as e:
        raise DataError(f"DuckDB failed while preparing data.events: {str(e).strip().splitlines()[0]}") from None
    finally:
        con.close()
    shutil.rmtree(work, ignore_errors=True)
    return {
        "format_version": PREPARE_VERSION, "engine": f"duckdb {duckdb.__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "prepare_seconds": time.time() - started,
        "sources": [dict(s, rows=c.rows, kind=c.kind, types=c.types) for s, c in zip(sources, checked)],
        "schema": {"declared": dataclasses.asdict(ev), "columns": {k: checked[0].types[v] for k, v in (
            ("user", ev.user_column), ("item", ev.item_column), ("time", ev.time_column))}},
        "options": _options(data_cfg),
        "counts": dict(counts, **stats, users=sum(s["users"] for s in shards),
                       events=sum(s["events"] for s in shards)),
        "num_items": counts["num_items"], "num_shards": num_shards, "shards": shards,
        "vocab": {n: {"file": f"vocab/{n}.parquet", "sha256": sha256_file(out / "vocab" / f"{n}.parquet")}
                  for n in ("users", "items")},
        "item_features": features,
        "per_event_arrays": (["weights"] if "weight" in extra else []) + [f"context_{i}" for i in range(len(contexts))],
        "contexts": contexts,
    }


def shard_count(ev: Any, raw_events: int) -> int:
    """Shards = partitions: at least data.events.num_shards (and 1), enough for one partition's numpy work to fit
    half of prepare_memory_mb, and about shard_events events per shard at most (what a streaming loader holds)."""
    by_memory = math.ceil(raw_events * WORK_BYTES_PER_EVENT / (ev.prepare_memory_mb * (1 << 20) / 2))
    return max(ev.num_shards, 1, by_memory, math.ceil(raw_events / ev.shard_events))


def _context_vocabularies(con: Any, ev: Any, folder: Path) -> List[Dict[str, Any]]:
    """Per context column i: table context_<i> (raw value -> 1..K by raw order), vocab/context-<column>.parquet."""
    out = []
    for i, col in enumerate(ev.context_columns):
        con.execute(f"CREATE TABLE context_{i} AS SELECT raw, row_number() OVER (ORDER BY raw) AS id FROM "
                    f"(SELECT DISTINCT context{i} AS raw FROM events WHERE context{i} IS NOT NULL)")
        path = folder / f"context-{col}.parquet"
        con.execute(f"COPY (SELECT * FROM context_{i} ORDER BY id) TO {sql_str(path)} (FORMAT parquet)")
        size = int(con.execute(f"SELECT count(*) FROM context_{i}").fetchone()[0])
        out.append({"column": col, "array": f"context_{i}", "vocab_size": size,
                    "vocab_file": f"vocab/{path.name}", "sha256": sha256_file(path)})
    return out


def _vocabularies(con: Any, ev: Any, folder: Path) -> Dict[str, int]:
    """users (raw -> 1..U by raw order) and items tables, written to ``folder``; raw counts."""
    con.execute("CREATE TABLE users AS SELECT u AS raw, row_number() OVER (ORDER BY u) AS id FROM "
                "(SELECT DISTINCT u FROM events)")
    con.execute("CREATE TABLE item_counts AS SELECT i AS raw, count(*) AS count FROM events GROUP BY i")
    if ev.item_ids == "raw":
        con.execute("CREATE TABLE items AS SELECT raw, raw AS id, count FROM item_counts")
        num_items = int(con.execute("SELECT max(id) FROM items").fetchone()[0])
        kept = int(con.execute("SELECT count(*) FROM items").fetchone()[0])
    else:
        m = int(ev.min_count)
        con.execute(f"CREATE TABLE items AS SELECT raw, CASE WHEN count >= {m} THEN row_number() OVER "
                    f"(PARTITION BY count >= {m} ORDER BY raw) END AS id, count FROM item_counts")
        kept = int(con.execute("SELECT count(id) FROM items").fetchone()[0])
        num_items = kept + 1  # the OOV id
    raw_events, raw_users, raw_items, oov = con.execute(
        "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM users), (SELECT count(*) FROM items), "
        "(SELECT coalesce(sum(count), 0) FROM items WHERE id IS NULL)").fetchone()
    for name in ("users", "items"):
        con.execute(f"COPY (SELECT * FROM {name} ORDER BY raw) TO {sql_str(folder / (name + '.parquet'))} "
                    "(FORMAT parquet)")
    return {"raw_events": int(raw_events), "raw_users": int(raw_users), "raw_items": int(raw_items),
            "items_kept": kept, "oov_events": int(oov), "num_items": num_items,
            "oov_id": None if ev.item_ids == "raw" else num_items}


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser (uint64 -> uint64): the seeded hash of tie_order=random."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def tie_key(arrays: Dict[str, np.ndarray], tie_order: str, seed: int) -> np.ndarray:
    """[N] secondary key for equal (user, time): file order = (file, row); item_id = the item id; random = a hash
    of (seed, file, row) — the same for any partitioning."""
    position = (arrays["f"].astype(np.uint64) << np.uint64(40)) | arrays["r"].astype(np.uint64)
    if tie_order == "file":
        return position
    if tie_order == "item_id":
        return arrays["iid"].astype(np.int64)
    with np.errstate(over="ignore"):
        return splitmix64(position ^ splitmix64(np.full(1, seed, dtype=np.uint64)))


def _write_shard(arrays: Optional[Dict[str, np.ndarray]], k: int, data_cfg: Any, num_items: int, folder: Path,
                 stats: Dict[str, int]) -> Dict[str, Any]:
    """One partition's events -> shard-<k>.npz (users sorted by uid, events by (time, tie key)); its record."""
    from hstu.trainer.data.events_split import event_window, split_shard

    ev = data_cfg.events
    n = 0 if arrays is None else int(arrays["uid"].shape[0])
    if n:
        a = {name: np.asarray(v) for name, v in arrays.items()}
        key, file_pos = tie_key(a, data_cfg.tie_order, data_cfg.seed), tie_key(a, "file", 0)
        order = np.lexsort((file_pos, key, a["t"], a["uid"]))  # file position last: a total, scan-independent order
        a = {name: v[order] for name, v in a.items()}
        file_pos = file_pos[order]
        dup_order = np.lexsort((file_pos, a["iid"], a["t"], a["uid"]))  # duplicates adjacent, first in file kept
        u, t, i = a["uid"][dup_order], a["t"][dup_order], a["iid"][dup_order]
        dup_sorted = np.zeros(n, dtype=bool)
        dup_sorted[1:] = (u[1:] == u[:-1]) & (t[1:] == t[:-1]) & (i[1:] == i[:-1])
        stats["duplicates"] += int(dup_sorted.sum())
        if ev.duplicates == "drop" and dup_sorted.any():
            keep = np.ones(n, dtype=bool)
            keep[dup_order[dup_sorted]] = False
            a = {name: v[keep] for name, v in a.items()}
            stats["dropped_duplicates"] += int((~keep).sum())
        uid = a["uid"].astype(np.int64)
        bounds = np.flatnonzero(uid[1:] != uid[:-1]) + 1
        offsets = np.concatenate([[0], bounds, [uid.size]]).astype(np.int64)
        full = UserSequences(user_ids=uid[offsets[:-1]], offsets=offsets, item_ids=a["iid"].astype(np.int64),
                             timestamps=a["t"].astype(np.int64), num_items=num_items,
                             ratings=a["rating"].astype(np.int8) if "rating" in a else None,
                             action_types=a["action"].astype(np.int8) if "action" in a else None)
        extra = {"weights": a["weight"].astype(np.float32)} if "weight" in a else {}
        extra.update({f"context_{n[3:]}": a[n].astype(np.int32) for n in a if n.startswith("ctx")})
    else:
        empty = np.zeros(0, dtype=np.int64)
        full = UserSequences(empty, np.zeros(1, dtype=np.int64), empty, empty, None, num_items)
        extra = {}
    keep_users = full.lengths() >= data_cfg.min_seq_len
    stats["short_users"] += int((~keep_users).sum())
    cutoff = cutoff_seconds(ev.time_cutoff) if ev.split == "time" else None
    rows, first, end, num_pre = event_window(full, data_cfg.max_seq_len, data_cfg.min_seq_len, cutoff,
                                             ev.keep_after_cutoff)
    seqs = select_ranges(full, rows, first, end)
    split = split_shard(seqs, num_pre, data_cfg.max_seq_len)
    path = folder / f"shard-{k:05d}.npz"
    arrays_out = seqs.to_arrays()
    if extra:  # weights / context ids: per event, aligned with item_ids (no model reads them yet)
        idx = gather_ranges(first, end)[0]
        arrays_out.update({name: arr[idx] for name, arr in extra.items()})
    if num_pre is not None:
        arrays_out["num_pre"] = num_pre
    np.savez(path, **arrays_out)
    return {"file": f"shards/{path.name}", "users": seqs.num_users, "events": seqs.num_events,
            "train_users": int((split.train.lengths() >= 2).sum()),
            "validation_users": split.validation.history.num_users, "test_users": split.test.history.num_users,
            "bytes": path.stat().st_size, "sha256": sha256_file(path)}
